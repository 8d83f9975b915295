"""The fused curriculum reward of co-evolutionary curriculum learning (arXiv 2512.22647, the
stage-k reward of CCL):

    R_k(I) = l1 * S_k(I) + l2 * (1 - softmax_max(M_k(I)))

``S_k`` and ``M_k`` are FinPercep-RM stage ``k``'s score and map. The second term penalises the
worst local defect: ``softmax_max`` is a soft maximum of the map, so one small badly degraded
region lowers the reward even when the global score barely moves. The paper gives neither the
exact soft maximum nor ``l1, l2``; ours: the softmax-weighted mean below, ``l1 = l2 = 1``.

At stage 0 (``RM_0``, no map) the second term has nothing to read and is the constant ``l2``
(as if the map were 0 everywhere): ``R_0 = l1 * S_0 + l2``, so the reward keeps its offset when the
curriculum moves on to ``RM_1``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from finpercep.rewards.finpercep_rm import FinPercepReward
from finpercep.types import RewardOutput

DEFAULT_TAU = 0.05
"""Default temperature of :func:`softmax_max` (ours; maps live in [0, 1])."""
DEFAULT_L1 = 1.0
"""Default weight of the score term (the paper does not give one)."""
DEFAULT_L2 = 1.0
"""Default weight of the worst-defect term (the paper does not give one)."""


def softmax_max(map: torch.Tensor, tau: float = DEFAULT_TAU) -> torch.Tensor:
    """Soft maximum of each map: ``sum_p softmax(M / tau)_p * M_p`` over the pixels ``p``.

    Args:
        map: ``(B, 1, H, W)`` real values (a FinPercep-RM map lies in [0, 1]).
        tau: temperature > 0, in the map's units.

    Returns:
        ``(B,)``: the softmax-weighted mean of the map's values. Properties (tested): it lies in
        ``[mean(M), max(M)]`` (weights grow with the value, so high values count more than in
        the plain mean); a constant map gives that constant; as ``tau -> 0`` it tends to
        ``max(M)``, as ``tau -> inf`` to ``mean(M)``. It is smooth, so the gradient flows to every
        pixel, most of it to the highest ones. A region of ``n`` pixels at value ``m`` over a
        background at ``b`` outweighs the ``N`` background pixels once ``n * exp((m - b) / tau)``
        is large against ``N``: the smaller ``tau``, the smaller the defect it notices.
    """
    if not isinstance(map, torch.Tensor) or map.ndim != 4 or map.shape[1] != 1:
        raise ValueError(f"softmax_max: expected a map (B, 1, H, W), got {tuple(getattr(map, 'shape', ()))}")
    if not (isinstance(tau, (int, float)) and tau > 0 and math.isfinite(tau)):
        raise ValueError(f"softmax_max: tau must be a finite number > 0, got {tau!r}")
    flat = map.flatten(1)  # (B, H*W)
    return (torch.softmax(flat / tau, dim=1) * flat).sum(dim=1)


class FusedReward:
    """``R_k = l1 * S_k + l2 * (1 - softmax_max(M_k, tau))`` on FinPercep-RM stage ``k`` (module
    docstring), a :class:`finpercep.types.Reward`.

    Args:
        stage, checkpoint, device: which RM_k, as for :class:`FinPercepReward` (``stage=None``:
            the last one).
        l1: weight of the score ``S_k`` (default 1).
        l2: weight of the worst-defect term (default 1).
        tau: temperature of :func:`softmax_max` (default :data:`DEFAULT_TAU`).
        model: an already loaded FinPercep-RM to wrap (shared, not copied).
        name: the spec that builds it (default ``fused`` or ``fused:K``).

    Output: ``score (B,)`` in ``(-inf, inf)`` (``S_k`` is unbounded), differentiable w.r.t. ``sr``;
    ``map`` / ``map_logits`` are RM_k's (``None`` at stage 0, where the score is ``l1 * S_0 + l2``).
    """

    needs_reference = False
    differentiable = True
    range = (-math.inf, math.inf)

    def __init__(
        self,
        stage: int | None = None,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
        l1: float = DEFAULT_L1,
        l2: float = DEFAULT_L2,
        tau: float = DEFAULT_TAU,
        *,
        model: torch.nn.Module | None = None,
        name: str | None = None,
    ) -> None:
        for label, v in (("l1", l1), ("l2", l2)):
            if not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"FusedReward: {label} must be a finite number, got {v!r}")
        if not (isinstance(tau, (int, float)) and tau > 0 and math.isfinite(tau)):
            raise ValueError(f"FusedReward: tau must be a finite number > 0, got {tau!r}")
        self.name = name or ("fused" if stage is None else f"fused:{stage}")
        self.rm = FinPercepReward(stage, checkpoint, device, model=model, name=self.name)  # errors name this reward
        self.l1, self.l2, self.tau = float(l1), float(l2), float(tau)
        self.stage = self.rm.stage
        self.has_map = self.rm.has_map

    @property
    def model(self) -> torch.nn.Module:
        """The frozen FinPercep-RM underneath."""
        return self.rm.model

    def to(self, device: str | torch.device) -> "FusedReward":
        self.rm.to(device)
        return self

    def __call__(
        self, sr: torch.Tensor, lr: torch.Tensor | None = None, hr: torch.Tensor | None = None
    ) -> RewardOutput:
        """``sr (B, 3, H, W)`` in [0, 1] -> ``RewardOutput(score (B,), map, map_logits)``; ``lr`` and
        ``hr`` are ignored."""
        out = self.rm(sr)
        if out.map is None:
            score = self.l1 * out.score + self.l2
        else:
            score = self.l1 * out.score + self.l2 * (1 - softmax_max(out.map, self.tau))
        return RewardOutput(score=score, map=out.map, map_logits=out.map_logits)

    def __repr__(self) -> str:
        return f"FusedReward(name={self.name!r}, stage={self.stage}, l1={self.l1}, l2={self.l2}, tau={self.tau})"
