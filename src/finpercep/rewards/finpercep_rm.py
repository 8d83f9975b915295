"""FinPercep-RM as a reward: ``RM_k`` at any curriculum stage ``k`` (arXiv 2512.22647: the model and
its staged growth ``RM_0 .. RM_N``).

``FinPercepReward(stage)(sr)`` is the frozen model's own output: ``score (B,)`` (unbounded, higher =
better, in the model's "margin units", see :mod:`finpercep.reward.model`) and, at stages ``k >= 1``,
``map (B, 1, H, W)`` in [0, 1] (higher = more degraded) with its ``map_logits``. Stage 0 (``RM_0``,
the global-only model) has no map. No reference is needed; the score is differentiable with
respect to ``sr`` (the model's parameters are frozen, ``requires_grad=False``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from finpercep.rewards.base import check_sr
from finpercep.types import RewardOutput


def load_rm(
    checkpoint: str | Path | None = None,
    stage: int | None = None,
    device: str | torch.device = "cpu",
    cache: dict | None = None,
):
    """The frozen FinPercep-RM ``load_reward(checkpoint, stage, device)`` gives, loaded at most once
    per ``cache`` dict: two rewards built with the same ``cache`` that resolve to the same checkpoint
    folder and device share one model (``create_reward`` keeps one cache per call, so
    ``"finpercep+fused"`` loads the model once). ``cache=None`` always loads."""
    from finpercep.reward import api

    if cache is None:
        return api.load_reward(checkpoint, stage, device)
    key = (str(api.resolve_checkpoint(checkpoint, stage)), str(torch.device(device)))
    if key not in cache:
        cache[key] = api.load_reward(checkpoint, stage, device)
    model = cache[key]
    if stage is not None and model.stage != stage:
        # A single checkpoint folder resolves to itself whatever the stage; load_reward checks it
        # on the first load, this repeats the check for the later ones.
        raise ValueError(f"{key[0]} is a single stage-{model.stage} checkpoint, but stage {stage} was asked for")
    return model


def rm_input(model: torch.nn.Module, sr: torch.Tensor, who: str) -> torch.Tensor:
    """``sr`` checked and cast to the model's dtype (differentiable); refuses a device mismatch
    with a message instead of letting torch fail deep inside a convolution."""
    sr = check_sr(sr, who)
    p = next(model.parameters())
    if sr.device != p.device:
        raise ValueError(f"reward {who!r} is on {p.device} but sr is on {sr.device}; call reward.to({str(sr.device)!r})")
    return sr if sr.dtype == p.dtype else sr.to(p.dtype)


class FinPercepReward:
    """FinPercep-RM stage ``k`` as a :class:`finpercep.types.Reward` (module docstring).

    Args:
        stage: ``k`` of ``RM_k``; ``None`` = the last stage of ``checkpoint``.
        checkpoint: a training run folder (``stage_K/`` subfolders), a single checkpoint folder,
            or ``None`` for the embedded default (as :func:`finpercep.reward.api.load_reward` takes).
        device: where the model runs; ``sr`` must be on it (``.to(device)`` moves the reward).
        model: an already loaded FinPercep-RM to wrap instead of loading one (``stage``, if given,
            must match it); ``checkpoint`` and ``device`` are then ignored.
        name: the spec that builds it (default ``finpercep`` or ``finpercep:K``).

    Attributes: ``model`` (the frozen ``FinPercepRM``), ``stage`` (its ``k``), and the Reward
    metadata: no reference, differentiable, range ``(-inf, inf)``, ``has_map`` iff ``k >= 1``.
    """

    needs_reference = False
    differentiable = True
    range = (-math.inf, math.inf)

    def __init__(
        self,
        stage: int | None = None,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
        *,
        model: torch.nn.Module | None = None,
        name: str | None = None,
    ) -> None:
        if model is None:
            model = load_rm(checkpoint, stage, device)
        elif stage is not None and model.stage != stage:
            raise ValueError(f"FinPercepReward: stage {stage} asked for, but the given model is at stage {model.stage}")
        self.model = model
        self.stage: int = model.stage
        self.name = name or ("finpercep" if stage is None else f"finpercep:{stage}")
        self.has_map = self.stage > 0

    def to(self, device: str | torch.device) -> "FinPercepReward":
        """Move the model to ``device`` (in place; a model shared with another reward moves too)."""
        self.model.to(device)
        return self

    def __call__(
        self, sr: torch.Tensor, lr: torch.Tensor | None = None, hr: torch.Tensor | None = None
    ) -> RewardOutput:
        """``sr (B, 3, H, W)`` in [0, 1] -> ``RewardOutput(score (B,), map (B, 1, H, W) | None,
        map_logits | None)``; ``lr`` and ``hr`` are ignored (no-reference)."""
        return self.model(rm_input(self.model, sr, self.name))

    def __repr__(self) -> str:
        return f"FinPercepReward(name={self.name!r}, stage={self.stage})"
