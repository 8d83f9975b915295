"""Upscaling images with any policy, tiled for large images: the engine behind ``finpercep sr``.

:func:`upscale_tiled` cuts the LR image into ``tile x tile`` tiles, runs each with ``context``
extra LR pixels on every side (clipped at the image border), and keeps only the tile's own
output. A convolutional policy whose receptive field fits in ``context`` gives the same output
as a whole-image pass (tested for small networks); a policy with a larger receptive field (the
23-block RRDBNets) differs from a whole-image pass only near tile edges. Memory is bounded by
one tile.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TextIO

import torch
from torch import nn

from finpercep.checks import check_image_batch

log = logging.getLogger(__name__)

TILE = 128
"""Default LR tile size in pixels (x4: 512 x 512 output per tile)."""
CONTEXT = 16
"""Default LR context around each tile in pixels."""


@torch.no_grad()
def upscale_tiled(policy: nn.Module, lr: torch.Tensor, tile: int = TILE, context: int = CONTEXT) -> torch.Tensor:
    """``lr (B, 3, h, w)`` in [0, 1] -> ``sr (B, 3, h*s, w*s)`` in [0, 1] (module docstring).
    ``tile <= 0`` runs the whole image at once."""
    lr = check_image_batch(lr, "upscale_tiled")
    s = int(policy.scale)
    b, _, h, w = lr.shape
    if tile <= 0 or (h <= tile and w <= tile):
        return policy(lr).clamp(0, 1)
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    out = lr.new_empty(b, 3, h * s, w * s)
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            y0, x0 = max(0, y - context), max(0, x - context)
            y1, x1 = min(h, y + tile + context), min(w, x + tile + context)
            sr = policy(lr[:, :, y0:y1, x0:x1]).clamp(0, 1)
            ty, tx = min(tile, h - y), min(tile, w - x)
            out[:, :, y * s : (y + ty) * s, x * s : (x + tx) * s] = \
                sr[:, :, (y - y0) * s : (y - y0 + ty) * s, (x - x0) * s : (x - x0 + tx) * s]
    return out


def run_sr(paths: list[str | Path], policy: nn.Module, out_dir: Path, *, tile: int = TILE, context: int = CONTEXT,
           device: str = "cpu", progress: bool = True, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Upscale every image in ``paths`` (files or folders) into ``out_dir/<name>.png``; print one
    line per written file on ``out`` and one ``error: <path>: <why>`` line per failed input on
    ``err`` (the others are still processed). Returns 0, or 1 if any input failed."""
    from finpercep.io import ImageReadError, read_image, save_png, to_tensor
    from finpercep.reward.score import expand_inputs, output_names

    files, errors = expand_inputs(paths)
    for e in errors:
        print(f"error: {e}", file=err)
    names = output_names(files)
    policy = policy.to(device).eval()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), desc=f"sr {getattr(policy, 'name', '')}", unit="img", file=err)
    failed = bool(errors)
    for f, name in zip(files, names):
        try:
            lr = to_tensor(read_image(f)[0])[None].to(device)
            sr = upscale_tiled(policy, lr, tile, context)
            target = out_dir / f"{name}.png"
            save_png(target, sr[0].cpu())
            print(f"{f} -> {target} ({lr.shape[3]}x{lr.shape[2]} -> {sr.shape[3]}x{sr.shape[2]})", file=out, flush=True)
        except (ImageReadError, ValueError, RuntimeError) as e:
            failed = True
            print(f"error: {f}: {e}", file=err, flush=True)
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    return 1 if failed else 0
