"""Training losses of FinPercep-RM (Liu et al., arXiv 2512.22647, the reward model's losses):

    L_map   = | M(I_syn) - M_gt |_1
    L_rank  = max(0, m1 - (S(I_syn) - S(I_SR))) + max(0, m2 - (S(I_GT) - S(I_syn)))
    L_align = | S(I_GT) - S_base(I_GT) |
    L       = l_map * L_map + l_rank * L_rank + l_align * L_align

v2 (ours, off by default): ``L_edit`` and ``L_adv``, :func:`below_loss` of the HR against a random
negative edit of it and against an SR output after pixel-space ascent on the reward
(:mod:`finpercep.reward.train`, ``edit_negatives`` / ``adversarial_weight``).

Pure functions of tensors; every term is a mean over the batch (and over pixels for ``L_map``)
and is computed in float32 whatever the autocast dtype of its inputs. Margins and weights are not
given in the paper; :class:`RMLossConfig` documents ours.

Loss normalisation (v2, ours; ``RMTrainConfig.loss_norm_decay``): each term is divided by a
running mean of its own magnitude before weighting, ``L = sum_t l_t L_t / max(mean_t, floor)``, so
every term pulls with about its weight whatever its scale (our first run with a trainable encoder
in every stage let the map loss move the shared encoder until the score head died). The running
means are state; they live in a :class:`LossNormalizer` kept by the trainer, and
:func:`total_loss` takes the divisors as plain numbers (``scales``). Its options are the trainer's,
not :class:`RMLossConfig`'s, so configs that embed an ``RMLossConfig`` (co-evolution's) keep
their saved form.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from finpercep.types import RewardOutput


def _check_scores(who: str, **scores: torch.Tensor) -> None:
    shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in scores.items()}
    first = next(iter(scores.values()))
    if not all(isinstance(v, torch.Tensor) and v.ndim == 1 for v in scores.values()) or len(set(shapes.values())) != 1:
        raise ValueError(f"{who}: expected score tensors of equal shape (B,), got {shapes}")
    if first.numel() == 0:
        raise ValueError(f"{who}: empty batch")


def map_loss(pred_map: torch.Tensor, gt_map: torch.Tensor, balance_threshold: float | None = None) -> torch.Tensor:
    """``L_map = |M(I_syn) - M_gt|_1`` (arXiv 2512.22647), the mean absolute difference.

    ``pred_map`` and ``gt_map``: ``(B, 1, H, W)`` in [0, 1] (a ``(B, H, W)`` ground truth is
    accepted and given its channel axis). Returns a float32 scalar in [0, 1].

    ``balance_threshold`` (ours): pixels with ``M_gt > threshold`` and the others each get half of
    every image's weight, so the L1 is a mean over "degraded" and "clean" pixels alike. Swapped
    regions cover 3-30 % of an image, and a plain L1 is then minimised by predicting ~0 everywhere
    (its per-pixel optimum is the median): our first RM_1 did exactly that (a near-zero map inside
    and outside the masks). An image without degraded pixels keeps the plain mean.
    """
    if not isinstance(pred_map, torch.Tensor) or not isinstance(gt_map, torch.Tensor):
        raise ValueError("map_loss: expected two tensors")
    if gt_map.ndim == 3:
        gt_map = gt_map.unsqueeze(1)
    if pred_map.ndim != 4 or pred_map.shape[1] != 1 or pred_map.shape != gt_map.shape:
        raise ValueError(
            "map_loss: expected pred and gt maps of equal shape (B, 1, H, W), "
            f"got {tuple(pred_map.shape)} and {tuple(gt_map.shape)}"
        )
    err = (pred_map.float() - gt_map.float()).abs()
    if balance_threshold is None:
        return err.mean()
    pos = (gt_map > balance_threshold).float()
    n_pos = pos.sum(dim=(1, 2, 3), keepdim=True)
    n_neg = pos[0].numel() - n_pos
    # half the weight to each class when an image has both, all of it to the one it has otherwise
    half = torch.where((n_pos > 0) & (n_neg > 0), 0.5, 1.0)
    w = half * (pos / n_pos.clamp(min=1) + (1 - pos) / n_neg.clamp(min=1))
    return (w * err).sum(dim=(1, 2, 3)).mean()


def rank_loss(s_gt: torch.Tensor, s_syn: torch.Tensor, s_sr: torch.Tensor, m1: float, m2: float) -> torch.Tensor:
    """Triplet hinge ``L_rank = max(0, m1 - (S_syn - S_SR)) + max(0, m2 - (S_GT - S_syn))``
    (arXiv 2512.22647): zero once ``S_SR + m1 <= S_syn <= S_GT - m2``.

    Scores ``(B,)`` each (higher = better); returns the batch mean, a float32 scalar >= 0.
    """
    _check_scores("rank_loss", s_gt=s_gt, s_syn=s_syn, s_sr=s_sr)
    s_gt, s_syn, s_sr = s_gt.float(), s_syn.float(), s_sr.float()
    lower = torch.relu(m1 - (s_syn - s_sr))
    upper = torch.relu(m2 - (s_gt - s_syn))
    return (lower + upper).mean()


def below_loss(s_gt: torch.Tensor, s_neg: torch.Tensor, margin: float) -> torch.Tensor:
    """Hinge ``max(0, margin - (S_GT - S_neg))``, the batch mean (ours): a negative image (a
    photometric or information-removing edit of the HR, or an SR output pushed up the reward by
    pixel-space ascent) must score ``margin`` below its HR, as a whole SR output does in
    ``L_rank`` (``margin = m1 + m2``). Scores ``(B,)`` each; returns a float32 scalar >= 0."""
    _check_scores("below_loss", s_gt=s_gt, s_neg=s_neg)
    return torch.relu(margin - (s_gt.float() - s_neg.float())).mean()


def align_loss(s_gt: torch.Tensor, s_base_gt: torch.Tensor) -> torch.Tensor:
    """``L_align = |S(I_GT) - S_base(I_GT)|`` (arXiv 2512.22647), the batch mean.

    ``s_base_gt`` ``(B,)`` is the frozen stage-0 model's score of the same clean images; it is
    detached here (a target, never trained through). Ties every stage to RM_0's score scale.
    """
    _check_scores("align_loss", s_gt=s_gt, s_base_gt=s_base_gt)
    return (s_gt.float() - s_base_gt.detach().float()).abs().mean()


@dataclass(frozen=True)
class RMLossConfig:
    """Weights and margins of ``L = l_map L_map + l_rank L_rank + l_align L_align`` (ours; the paper
    gives none)."""

    l_map: float = 1.0
    """Weight of the map L1. ``L_map`` is a mean over pixels in [0, 1] (typically 0.05-0.2 on
    sparse maps), as large as a partly violated hinge; 1.0 gives the two comparable pull."""

    map_balance: float | None = 0.1
    """``M_gt`` level above which a pixel counts as degraded in the class-balanced L1 (see
    :func:`map_loss`); ``None`` = the plain L1 of the paper."""

    l_rank: float = 1.0
    """Weight of the ranking hinge; 1.0 with margins of 1.0 fixes the score unit."""

    l_align: float = 0.5
    """Weight of the anchor of clean-image scores to RM_0. Below ``l_rank`` so it keeps the scale
    without stopping a stage from separating GT from syn more sharply than RM_0 did."""

    m1: float = 1.0
    """Margin of ``S_syn - S_SR``. The scale of the score is free (the MLP's last layer can
    rescale it), so the margin defines the unit: 1.0 = "one margin"."""

    m2: float = 1.0
    """Margin of ``S_GT - S_syn``. Equal to ``m1``: a local swap must cost as much score as the
    step from a local swap to a fully SR image, which is the fine-grained sensitivity we want
    (arXiv 2512.22647: a global IQA score barely notices local defects)."""

    def __post_init__(self) -> None:
        for name in ("l_map", "l_rank", "l_align", "m1", "m2"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"RMLossConfig.{name} must be >= 0, got {getattr(self, name)}")


LOSS_TERMS = ("rank", "map", "align", "edit", "adv")
"""The terms of ``L``, as named in ``loss/<term>`` logs and in ``scales``."""


class LossNormalizer:
    """Running means of the loss terms' magnitudes, for loss normalisation (module docstring; ours).

    ``scales()`` gives the divisor of each term seen so far, ``max(m_t, floor)`` with ``m_t`` the
    bias-corrected exponential mean (as in Adam) of its unweighted values over the previous steps;
    a term not seen yet is absent (divisor 1 at its first step). ``update(logs)`` adds a step's
    ``loss/<term>`` values (call it after a successful step, so a non-finite loss leaves it as it
    was). ``state_dict`` / ``load_state_dict`` hold plain numbers (saved with trainer checkpoints).
    """

    def __init__(self, decay: float = 0.99, floor: float = 0.01) -> None:
        if not 0 <= decay < 1 or not floor > 0:
            raise ValueError(f"LossNormalizer: decay must be in [0, 1) and floor > 0, got {decay}, {floor}")
        self.decay, self.floor = decay, floor
        self.means: dict[str, float] = {}  # biased exponential means
        self.counts: dict[str, int] = {}

    def scales(self) -> dict[str, float]:
        return {t: max(m / (1 - self.decay ** self.counts[t]), self.floor) for t, m in self.means.items()}

    def update(self, logs: Mapping[str, float]) -> None:
        for t in LOSS_TERMS:
            if f"loss/{t}" in logs:
                v = abs(float(logs[f"loss/{t}"]))
                self.means[t] = self.decay * self.means.get(t, 0.0) + (1 - self.decay) * v
                self.counts[t] = self.counts.get(t, 0) + 1

    def state_dict(self) -> dict[str, dict[str, float]]:
        return {"means": dict(self.means), "counts": dict(self.counts)}

    def load_state_dict(self, state: Mapping[str, Mapping[str, float]]) -> None:
        self.means = {str(k): float(v) for k, v in state["means"].items()}
        self.counts = {str(k): int(v) for k, v in state["counts"].items()}


def total_loss(
    out_gt: RewardOutput,
    out_syn: RewardOutput,
    out_sr: RewardOutput,
    gt_map_syn: torch.Tensor | None,
    base_score_gt: torch.Tensor | None,
    cfg: RMLossConfig = RMLossConfig(),
    scales: Mapping[str, float] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``L = l_map L_map + l_rank L_rank + l_align L_align`` (arXiv 2512.22647) for a batch of
    triplets ``(I_GT, I_syn, I_SR)``.

    The map term is used when ``out_syn.map`` is not None (stages >= 1; at stage 0 it is left out,
    and ``gt_map_syn`` may be None); the align term when ``base_score_gt`` (RM_0's scores of the
    GT images, ``(B,)``) is given (it is None when training RM_0 itself). Returns the scalar loss
    and logging numbers: ``loss/total`` and ``loss/<term>`` for each active term (unweighted),
    ``rank/ordered`` (fraction of triplets with ``S_SR < S_syn < S_GT``) and ``score/{gt,syn,sr}``
    (batch means).

    ``scales`` (loss normalisation, :class:`LossNormalizer`): each term is divided by
    ``scales[term]`` (missing = 1) before weighting, ``L = sum_t l_t L_t / scales[t]``; the logged
    terms stay unscaled, ``loss/total`` is the scaled sum and ``loss_scale/<term>`` the divisors.
    """
    div = {t: 1.0 for t in LOSS_TERMS} | dict(scales or {})
    if not all(v > 0 for v in div.values()):
        raise ValueError(f"total_loss: scales must be > 0, got {dict(scales or {})}")
    s_gt, s_syn, s_sr = out_gt.score, out_syn.score, out_sr.score
    l_rank = rank_loss(s_gt, s_syn, s_sr, cfg.m1, cfg.m2)
    loss = cfg.l_rank * l_rank / div["rank"]
    logs = {"loss/rank": float(l_rank.detach())}
    if out_syn.map is not None:
        if gt_map_syn is None:
            raise ValueError("total_loss: the model has a map (stage >= 1) but gt_map_syn is None")
        l_map = map_loss(out_syn.map, gt_map_syn, cfg.map_balance)
        loss = loss + cfg.l_map * l_map / div["map"]
        logs["loss/map"] = float(l_map.detach())
    if base_score_gt is not None:
        l_align = align_loss(s_gt, base_score_gt)
        loss = loss + cfg.l_align * l_align / div["align"]
        logs["loss/align"] = float(l_align.detach())
    with torch.no_grad():
        ordered = ((s_sr < s_syn) & (s_syn < s_gt)).float().mean()
    logs.update(
        {
            "loss/total": float(loss.detach()),
            "rank/ordered": float(ordered),
            "score/gt": float(s_gt.detach().float().mean()),
            "score/syn": float(s_syn.detach().float().mean()),
            "score/sr": float(s_sr.detach().float().mean()),
        }
    )
    if scales is not None:
        logs.update({f"loss_scale/{t}": div[t] for t in LOSS_TERMS if f"loss/{t}" in logs})
    return loss, logs
