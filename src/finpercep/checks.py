"""Input checks shared by every public entry point that takes an image batch."""

from __future__ import annotations

import torch


def check_image_batch(x: object, who: str, *, min_size: int = 1, tol: float = 1e-3) -> torch.Tensor:
    """Validate ``x`` as a ``(B, 3, H, W)`` float image batch in [0, 1] and return it.

    ``min_size``: smallest allowed H and W. ``tol``: how far values may stray outside [0, 1]
    (e.g. 0.5 for a reward that must accept an SR generator's slight overshoot). Every failure
    raises ValueError with ``who`` and what to do.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{who}: expected a torch.Tensor (B, 3, H, W) in [0, 1], got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(
            f"{who}: expected shape (B, 3, H, W) (RGB, batched; use x[None] for one image), got {tuple(x.shape)}"
        )
    if x.shape[0] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{who}: empty batch or image, got shape {tuple(x.shape)}")
    if min(x.shape[-2:]) < min_size:
        raise ValueError(f"{who}: needs images of at least {min_size}x{min_size}, got {tuple(x.shape[-2:])}")
    if not x.is_floating_point():
        raise ValueError(f"{who}: expected a float tensor in [0, 1], got dtype {x.dtype} (divide uint8 by 255)")
    lo, hi = torch.aminmax(x.detach())  # one pass; NaN propagates into both
    lo, hi = float(lo), float(hi)
    if not (lo == lo and hi == hi) or abs(lo) == float("inf") or abs(hi) == float("inf"):
        raise ValueError(f"{who}: input contains NaN or infinite values")
    if lo < -tol or hi > 1 + tol:
        raise ValueError(f"{who}: expected values in [0, 1], got range [{lo:.3g}, {hi:.3g}] (divide 8-bit images by 255)")
    return x
