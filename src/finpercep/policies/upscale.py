"""Upscaling images with any policy, tiled for large images: the engine behind ``finpercep sr``.

:func:`upscale_tiled` cuts the LR image into ``tile x tile`` tiles, runs each with ``context``
extra LR pixels on every side (clipped at the image border), and keeps only the tile's own
output. A convolutional policy whose receptive field fits in ``context`` gives the same output
as a whole-image pass (tested for small networks); a policy with a larger receptive field (the
23-block RRDBNets) differs from a whole-image pass only near tile edges. Memory is bounded by
one tile. :func:`run_sr` keeps transparency: the alpha channel is upscaled bicubically and the
output written as an RGBA PNG.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from torch import nn

from finpercep.checks import check_image_batch

log = logging.getLogger(__name__)

TILE = 128
"""Default LR tile size in pixels (x4: 512 x 512 output per tile)."""
CONTEXT = 16
"""Default LR context around each tile in pixels."""


def _param_dtype(policy: nn.Module) -> torch.dtype | None:
    """The dtype of ``policy``'s first floating-point parameter, or None for a parameter-free policy."""
    return next((p.dtype for p in policy.parameters() if p.is_floating_point()), None)


@torch.no_grad()
def upscale_tiled(policy: nn.Module, lr: torch.Tensor, tile: int = TILE, context: int = CONTEXT) -> torch.Tensor:
    """``lr (B, 3, h, w)`` in [0, 1] -> ``sr (B, 3, h*s, w*s)`` in [0, 1] (module docstring).

    ``lr`` may be float16, bfloat16, float32 or float64; it is cast to the policy's dtype (so is
    the output). ``tile <= 0`` runs the whole image at once. Raises ValueError for a bad ``lr``
    (:func:`finpercep.checks.check_image_batch`: integer images need dividing by 255) or ``context < 0``.
    """
    lr = check_image_batch(lr, "upscale_tiled", dtype=_param_dtype(policy))
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


def upscale_alpha(alpha: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An alpha channel ``(h, w)`` uint8 resized to ``size = (H, W)`` with bicubic interpolation
    (what Real-ESRGAN's command line does with ``--alpha_upsampler bicubic``); ``(H, W)`` uint8."""
    from PIL import Image

    return np.asarray(Image.fromarray(alpha, mode="L").resize((size[1], size[0]), Image.BICUBIC), dtype=np.uint8)


def upscale_file(path: Path, policy: nn.Module, target: Path, *, tile: int = TILE, context: int = CONTEXT,
                 device: str = "cpu") -> str:
    """Upscale one image file into the PNG ``target``: RGB stays RGB; an image with transparency
    gives an RGBA PNG, its alpha upscaled bicubically (:func:`upscale_alpha`). Returns the line
    ``run_sr`` prints. Raises ImageReadError (unreadable input), ValueError / RuntimeError (the
    policy failed) or :class:`finpercep.io.WriteError` (the output cannot be written)."""
    from finpercep.io import read_image_rgba, save_png, to_tensor, to_uint8

    rgb, alpha, _ = read_image_rgba(path)
    lr = to_tensor(rgb)[None].to(device)
    sr = to_uint8(upscale_tiled(policy, lr, tile, context)[0])
    if alpha is not None:
        sr = np.dstack([sr, upscale_alpha(alpha, sr.shape[:2])])
    save_png(target, sr)
    kind = " RGBA" if alpha is not None else ""
    return f"{path} -> {target} ({rgb.shape[1]}x{rgb.shape[0]} -> {sr.shape[1]}x{sr.shape[0]}{kind})"


def run_sr(paths: list[str | Path], policy: nn.Module, out_dir: Path, *, tile: int = TILE, context: int = CONTEXT,
           device: str = "cpu", progress: bool = True, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Upscale every image in ``paths`` (files or folders) into ``out_dir/<name>.png``
    (:func:`upscale_file`); print one line per written file on ``out`` and one
    ``error: <path>: <why>`` line per failed input on ``err`` (the others are still processed).
    Returns 0, or 1 if any input failed. A :class:`finpercep.io.WriteError` (disk full, read-only
    ``out_dir``) stops the run: the next files would fail the same way. ``out`` / ``err``: default
    the current ``sys.stdout`` / ``sys.stderr``."""
    out, err = out or sys.stdout, err or sys.stderr
    from finpercep.io import ImageReadError, expand_inputs, output_names

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
    try:
        for f, name in zip(files, names):
            try:
                line = upscale_file(f, policy, out_dir / f"{name}.png", tile=tile, context=context, device=device)
                print(line, file=out, flush=True)
            except ImageReadError as e:  # its message starts with the path
                failed = True
                print(f"error: {e}", file=err, flush=True)
            except (ValueError, RuntimeError, MemoryError) as e:
                failed = True
                print(f"error: {f}: {e}", file=err, flush=True)
            if bar:
                bar.update(1)
    finally:
        if bar:
            bar.close()
    return 1 if failed else 0
