"""Drawing a degradation map over an image: the one heatmap look shared by the data engine's contact
sheet, ``finpercep score --overlay``, RL sample grids and the reward-hacking figures.

A leaf: torch and NumPy only; matplotlib (the ``report`` extra) is imported inside
:func:`heatmap_overlay`, where its colormap is needed, and by :func:`pyplot`.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import torch

from finpercep.checks import require

OVERLAY_ALPHA = 0.6
"""Default weight of the heatmap colour in :func:`heatmap_overlay` (0 = the image itself)."""
COLORMAP = "inferno"
"""matplotlib colormap of the heatmap: black -> purple -> orange -> yellow as the map rises."""


def heatmap_overlay(img: torch.Tensor, heat: torch.Tensor | np.ndarray, alpha: float = OVERLAY_ALPHA) -> torch.Tensor:
    """Blend a map onto an image as a heatmap: ``(1 - alpha) * img + alpha * inferno(map)``.

    ``img``: (3, H, W) float in [0, 1]; ``heat``: (H, W) in [0, 1] (clamped; higher = more
    degraded, drawn hotter: black -> purple -> orange -> yellow). Returns (3, H, W) float32 in [0, 1].

    Raises ValueError for a wrong shape, an ``alpha`` outside [0, 1] or a map with NaN / infinite
    values; ImportError naming the extra when matplotlib is not installed.
    """
    matplotlib = require("matplotlib", extra="report")

    if not isinstance(img, torch.Tensor) or img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"img must be a (3, H, W) tensor, got {type(img).__name__} {tuple(getattr(img, 'shape', ()))}")
    m = torch.as_tensor(np.asarray(heat, dtype=np.float32) if isinstance(heat, np.ndarray) else heat).float()
    if m.ndim != 2 or tuple(m.shape) != tuple(img.shape[1:]):
        raise ValueError(f"map must be (H, W) = {tuple(img.shape[1:])} to match the image, got {tuple(m.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not torch.isfinite(m).all():
        raise ValueError("map contains NaN or infinite values")
    lut = torch.from_numpy(matplotlib.colormaps[COLORMAP](np.linspace(0.0, 1.0, 256))[:, :3].astype(np.float32))
    idx = m.clamp(0, 1).mul(255).round().long()  # (H, W) in 0..255
    colour = lut[idx].permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    return ((1.0 - alpha) * img.float().cpu() + alpha * colour).clamp(0, 1)


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (figures go to files, no display is
    needed), for the training-curve figures. Raises ImportError naming the ``report`` extra when
    matplotlib is not installed."""
    require("matplotlib", extra="report").use("Agg")
    return require("matplotlib.pyplot", extra="report")


__all__ = ["COLORMAP", "OVERLAY_ALPHA", "heatmap_overlay", "pyplot"]
