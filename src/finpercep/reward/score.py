"""The engine behind ``finpercep score``: score image files with a FinPercep-RM,
print one line per image, optionally write each map (``.npy``) and a heatmap overlay (``.png``).

No argument parsing here: the CLI builds the model with :func:`finpercep.reward.api.load_reward`
and calls :func:`run_score`. Output contract:

- ``json_out``: one JSON object per image per line on ``out``, flushed line by line:
  ``{"path", "score", "map", "map_mean", "map_max", "height", "width", "notes"}``; ``map`` is the
  written ``.npy`` path (``str(maps_dir / "<name>.npy")``) or ``null`` (no ``maps_dir``, or a
  stage-0 model, which has no map; ``map_mean`` / ``map_max`` are then ``null`` too); ``notes`` lists
  the conversions made while reading (grey, alpha, 16-bit).
- otherwise an aligned table on ``out``: path, score, map mean, map max (``-`` without a map).
- every file that cannot be scored (missing, unreadable, corrupt, not an image, above
  :data:`finpercep.io.MAX_PIXELS`, a float image with NaN / inf) gets one line
  ``error: <path>: <why>`` on ``err``; the other files are still scored and the exit status is 1.
- a map or overlay that cannot be written (disk full, read-only folder) stops the run with
  :class:`finpercep.io.WriteError`: the later files would fail the same way.

Output names: ``<name>`` is the file's stem, made distinct by :func:`finpercep.io.output_names`
(``x``, ``x-1``, ``x-2``, ... for inputs that share a stem), assigned over all inputs before
scoring, so they do not depend on which files fail.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from finpercep.io import (
    ImageReadError,
    WriteError,
    expand_inputs,
    output_names,
    read_image,
    save_npy,
    save_png,
    to_tensor,
)
from finpercep.reward.api import ImageScore, score_images
from finpercep.reward.model import FinPercepRM

log = logging.getLogger(__name__)

TILE = 512
"""Images above ``TILE * TILE`` pixels are scored in ``TILE x TILE`` tiles (exact, bounded memory;
:func:`finpercep.reward.api.score_images`). 512 px keeps a tile's activations around 100 MB on
EfficientNet-Lite0 while the per-tile overhead (the context crop) stays small."""


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def run_score(
    paths: list[str | Path],
    model: FinPercepRM,
    *,
    json_out: bool,
    maps_dir: Path | None,
    overlay_dir: Path | None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    progress: bool = False,
) -> int:
    """Score every image in ``paths`` (files or folders) with ``model`` and report (module
    docstring). Returns the exit status: 0 when every file was scored, 1 when any failed.
    ``out`` / ``err``: default the current ``sys.stdout`` / ``sys.stderr``."""
    out, err = out or sys.stdout, err or sys.stderr
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise ValueError("run_score: no paths given (pass image files or folders)")
    if not isinstance(model, FinPercepRM):
        raise ValueError(f"run_score expects a FinPercepRM (see load_reward), got {type(model).__name__}")
    from tqdm import tqdm

    files, input_errors = expand_inputs(paths)
    names = output_names(files)
    bar = tqdm(total=len(files), desc="scoring", unit="img", file=err, disable=not progress or not files)

    def say(msg: str, stream: TextIO) -> None:
        # Through tqdm while a bar is shown, so that the bar is not torn by the message.
        if bar.disable:
            print(msg, file=stream, flush=True)
        else:
            tqdm.write(msg, file=stream)
            stream.flush()

    def say_err(msg: str) -> None:
        say(msg, err)

    for msg in input_errors:
        say_err(f"error: {msg}")
    has_map = model.stage > 0
    if not has_map and (maps_dir is not None or overlay_dir is not None):
        say_err("note: this is a stage-0 model (RM_0, global score only): it has no map, so --maps / --overlay write nothing")
    write_maps = maps_dir is not None and has_map
    write_overlays = overlay_dir is not None and has_map

    width = max([len(str(f)) for f in files] + [len("path")])
    if not json_out and files:
        print(f"{'path':<{width}}  {'score':>9}  {'map_mean':>8}  {'map_max':>8}", file=out, flush=True)

    failed = len(input_errors)
    for f, name in zip(files, names):
        try:
            rec = score_file(f, model, name, maps_dir if write_maps else None, overlay_dir if write_overlays else None)
        except WriteError:
            bar.close()
            raise  # disk full, read-only --maps / --overlay: every later file would fail the same way
        except (ImageReadError, ValueError, RuntimeError, MemoryError, OSError) as e:
            # One line per failed file; the rest are still scored.
            failed += 1
            say_err(f"error: {e}" if isinstance(e, ImageReadError) else f"error: {f}: {type(e).__name__}: {e}")
        else:
            say(json.dumps(rec) if json_out else _table_row(rec, width), out)
        bar.update(1)
    bar.close()
    if failed:
        print(f"{failed} of {len(files) + len(input_errors)} inputs failed", file=err, flush=True)
    return 1 if failed else 0


def score_file(path: Path, model: FinPercepRM, name: str, maps_dir: Path | None, overlay_dir: Path | None) -> dict:
    """Read, score and (optionally) write the map and overlay of one image file; return its JSON
    record (module docstring). Raises ImageReadError / ValueError / RuntimeError on failure, and
    :class:`finpercep.io.WriteError` when an output cannot be written."""
    arr, notes = read_image(path)
    img = to_tensor(arr)
    del arr  # huge images: keep one copy
    res = score_images(model, [img], tile=TILE)[0]
    if not math.isfinite(res.score):
        raise ValueError(f"the model returned a non-finite score ({res.score}); is the checkpoint broken?")
    map_path = _write_outputs(img, res, name, maps_dir, overlay_dir)
    for n in notes:
        log.info("%s: %s", path, n)
    return {
        "path": str(path),
        "score": res.score,
        "map": map_path,
        "map_mean": None if res.map is None else float(res.map.mean()),
        "map_max": None if res.map is None else float(res.map.max()),
        "height": int(img.shape[1]),
        "width": int(img.shape[2]),
        "notes": notes,
    }


def _table_row(rec: dict, width: int) -> str:
    return f"{rec['path']:<{width}}  {rec['score']:>9.4f}  {_fmt(rec['map_mean'], '.4f'):>8}  {_fmt(rec['map_max'], '.4f'):>8}"


def _write_outputs(img: torch.Tensor, res: ImageScore, name: str, maps_dir: Path | None, overlay_dir: Path | None) -> str | None:
    """Write the map ``maps_dir/<name>.npy`` (float32 (H, W) in [0, 1]) and the overlay
    ``overlay_dir/<name>.png``; return the map's path as a string, or None when none was written."""
    if res.map is None:
        return None
    heat = res.map.clamp(0, 1)
    map_path = None
    if maps_dir is not None:
        p = Path(maps_dir) / f"{name}.npy"
        save_npy(p, heat.numpy().astype(np.float32, copy=False))
        map_path = str(p)
    if overlay_dir is not None:
        from finpercep.viz import heatmap_overlay

        save_png(Path(overlay_dir) / f"{name}.png", heatmap_overlay(img, heat))
    return map_path
