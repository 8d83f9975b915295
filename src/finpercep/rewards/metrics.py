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
- ``ssim``: :func:`finpercep.metrics.ssim` (Wang et al. 2004) on RGB, range [-1, 1] (the
  Y-channel SSIM of SR papers is :func:`finpercep.metrics.ssim_y`, used in evaluation);
- ``stlpips``: ``-ST-LPIPS`` (AlexNet, :class:`finpercep.baselines.STLPIPS`), range (-inf, 0];
  images at least 32x32.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from finpercep.metrics import SSIM_SIGMA, SSIM_WINDOW, ssim  # noqa: F401 (defined there, kept importable here)
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
# Full-reference fidelity terms (the metric math lives in finpercep.metrics)


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
