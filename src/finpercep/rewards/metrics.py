"""Classic no-reference metrics and full-reference fidelity terms as rewards (higher = better).

No reference (:class:`NRMetricReward`; :mod:`finpercep.baselines`, computed on the CPU in NumPy,
not differentiable, so for DPO / GRPO and evaluation only). The raw metrics are lower-is-better,
so the score is the negated metric, returned detached on ``sr``'s device:

=========  ==========================  ============================================================
name       score range                 raw metric
=========  ==========================  ============================================================
niqe       (-inf, 0]                   NIQE >= 0; needs two whole 96x96 blocks (e.g. 96x192);
                                       NaN for a (nearly) flat image
brisque    (-inf, inf)                 BRISQUE, nominally [0, 100] but an SVR output: it can leave
                                       that interval (below 0 on clean photo crops); NaN for a
                                       constant image; at least 16x16
piqe       (-inf, 0)                   PIQE > 0, nominally at most 100 (slightly above for very
                                       noisy blocks); a flat image scores 100
=========  ==========================  ============================================================

Full reference (``hr`` required; differentiable with respect to ``sr``):

- ``l1``: ``-mean |sr - hr|`` per image, range [-1, 0] for inputs in [0, 1];
- ``ssim``: :func:`ssim` (Wang et al. 2004) on RGB, range [-1, 1];
- ``stlpips``: ``-ST-LPIPS`` (AlexNet, :class:`finpercep.baselines.STLPIPS`), range (-inf, 0];
  images at least 32x32.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from finpercep.rewards.base import check_hr, check_sr
from finpercep.types import RewardOutput

# ---------------------------------------------------------------------------------------------
# No-reference metrics

NR_RANGES: dict[str, tuple[float, float]] = {
    "niqe": (-math.inf, 0.0),
    "brisque": (-math.inf, math.inf),
    "piqe": (-math.inf, 0.0),
}
"""Declared bounds of each NR reward's score (module docstring says why)."""

_NR_MIN_SIZE = {"niqe": 1, "brisque": 16, "piqe": 1}  # niqe checks its block count itself


class NRMetricReward:
    """A classic no-reference metric of :mod:`finpercep.baselines` as a reward: ``score = -metric(sr)``.

    Args:
        metric: ``"niqe"``, ``"brisque"`` or ``"piqe"``.

    Not differentiable: the score is detached, computed on the CPU (NumPy) and returned on ``sr``'s
    device. ``to(device)`` is a no-op (there is nothing to move).
    """

    needs_reference = False
    differentiable = False
    has_map = False

    def __init__(self, metric: str) -> None:
        if metric not in NR_RANGES:
            raise ValueError(f"NRMetricReward: unknown metric {metric!r}; choose one of {sorted(NR_RANGES)}")
        from finpercep.baselines import METRICS

        self.name = metric
        self.range = NR_RANGES[metric]
        self._fn = METRICS[metric].fn

    def to(self, device: str | torch.device) -> "NRMetricReward":
        return self

    def __call__(
        self, sr: torch.Tensor, lr: torch.Tensor | None = None, hr: torch.Tensor | None = None
    ) -> RewardOutput:
        """``sr (B, 3, H, W)`` in [0, 1] -> ``RewardOutput(score (B,))``, detached, float32."""
        sr = check_sr(sr, self.name, _NR_MIN_SIZE[self.name])
        # The baselines quantise to 8 bits after clamping; the clamp here only lets a slight SR
        # overshoot through their stricter [0, 1] check.
        return RewardOutput(score=-self._fn(sr.detach().clamp(0, 1)))

    def __repr__(self) -> str:
        return f"NRMetricReward({self.name!r})"


# ---------------------------------------------------------------------------------------------
# Full-reference fidelity terms

SSIM_WINDOW = 11
"""Side of the Gaussian window of :func:`ssim` (Wang et al. 2004)."""
SSIM_SIGMA = 1.5
"""Standard deviation of the Gaussian window of :func:`ssim`, in pixels."""


def _gaussian_window(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    x = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Structural similarity (Wang, Bovik, Sheikh and Simoncelli, IEEE TIP 2004, Eq. 13), per image.

    Args:
        x, y: ``(B, C, H, W)`` in [0, 1] (data range 1), same shape, ``H, W >= window``.
        window, sigma: the Gaussian weighting window (11 and 1.5 as in the paper).

    Returns:
        ``(B,)`` in [-1, 1], 1 for identical images: the SSIM map averaged over the channels
        (RGB: each channel on its own, no colour conversion) and over the *valid* positions (no
        padding: the window stays inside the image). Population (co)variances, ``C1 = 0.01^2``,
        ``C2 = 0.03^2``. This is ``skimage.metrics.structural_similarity(..., channel_axis=...,
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)``
        (tested). Differentiable with respect to both inputs.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim: x and y must be (B, C, H, W) of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < window:
        raise ValueError(f"ssim: images must be at least {window}x{window}, got {tuple(x.shape[-2:])}")
    c1, c2 = 0.01**2, 0.03**2
    c = x.shape[1]
    g = _gaussian_window(window, sigma, x)
    gh, gw = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid positions only
        return F.conv2d(F.conv2d(t, gh, groups=c), gw, groups=c)

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.mean(dim=(1, 2, 3))


class L1Reward:
    """``score = -mean |sr - hr|`` per image (range [-1, 0] for inputs in [0, 1]); full-reference,
    differentiable."""

    name = "l1"
    needs_reference = True
    differentiable = True
    range = (-1.0, 0.0)
    has_map = False

    def to(self, device: str | torch.device) -> "L1Reward":
        return self

    def __call__(
        self, sr: torch.Tensor, lr: torch.Tensor | None = None, hr: torch.Tensor | None = None
    ) -> RewardOutput:
        sr = check_sr(sr, self.name)
        hr = check_hr(sr, hr, self.name)
        return RewardOutput(score=-(sr - hr.to(sr.dtype)).abs().mean(dim=(1, 2, 3)))

    def __repr__(self) -> str:
        return "L1Reward()"


class SSIMReward:
    """``score = ssim(sr, hr)`` on RGB (:func:`ssim`; range [-1, 1]); full-reference,
    differentiable; images at least 11x11."""

    name = "ssim"
    needs_reference = True
    differentiable = True
    range = (-1.0, 1.0)
    has_map = False

    def to(self, device: str | torch.device) -> "SSIMReward":
        return self

    def __call__(
        self, sr: torch.Tensor, lr: torch.Tensor | None = None, hr: torch.Tensor | None = None
    ) -> RewardOutput:
        sr = check_sr(sr, self.name, SSIM_WINDOW)
        hr = check_hr(sr, hr, self.name)
        return RewardOutput(score=ssim(sr, hr.to(sr.dtype)))

    def __repr__(self) -> str:
        return "SSIMReward()"


class STLPIPSReward:
    """``score = -ST-LPIPS(sr, hr)`` (range (-inf, 0]); full-reference, differentiable.

    Args:
        net: ``"alex"`` (default) or ``"vgg"`` backbone of :class:`finpercep.baselines.STLPIPS`.
        weights: explicit weight file; default the one in the installed ``stlpips-pytorch``.
        device: where the network runs; ``sr`` and ``hr`` must be on it.
    """

    needs_reference = True
    differentiable = True
    range = (-math.inf, 0.0)
    has_map = False

    def __init__(
        self, net: str = "alex", weights: str | Path | None = None, device: str | torch.device = "cpu", name: str | None = None
    ) -> None:
        from finpercep.baselines.stlpips import STLPIPS

        self.metric = STLPIPS(net=net, weights=weights).to(device)
        self.name = name or ("stlpips" if net == "alex" else f"stlpips-{net}")

    def to(self, device: str | torch.device) -> "STLPIPSReward":
        self.metric.to(device)
        return self

    def __call__(
        self, sr: torch.Tensor, lr: torch.Tensor | None = None, hr: torch.Tensor | None = None
    ) -> RewardOutput:
        from finpercep.baselines.stlpips import MIN_SIZE

        sr = check_sr(sr, self.name, MIN_SIZE)
        hr = check_hr(sr, hr, self.name)
        dev = self.metric.shift.device
        if sr.device != dev:
            raise ValueError(f"reward {self.name!r} is on {dev} but sr is on {sr.device}; call reward.to({str(sr.device)!r})")
        return RewardOutput(score=-self.metric(sr, hr))

    def __repr__(self) -> str:
        return f"STLPIPSReward(net={self.metric.net_name!r})"
