"""Metric math for the reward-model benchmarks (issue 3, section 4) and RL evaluation.

Pure functions of tensors (numpy arrays and sequences are accepted and converted); each returns a
plain python ``float``. No sklearn: the two ranking metrics are written out here and checked in
``tests/test_eval_metrics.py`` against brute-force definitions.

Pixel metrics (:func:`pixel_auroc`, :func:`average_precision`, :func:`iou_at`, :func:`map_mae`)
pool every element they are given ("micro" average): pass one image's map for a per-image value,
or a whole stack ``(B, 1, H, W)`` for one number over all pixels of a test set. Labels / masks are
bool or exactly {0, 1}; scores / maps are any finite real numbers (higher = more likely degraded).
Score metrics (:func:`order_accuracy`, :func:`drop_fraction`) take one score per image, higher =
better, and use strict inequalities: a tie counts as a failure.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray | Sequence[float]

DEFAULT_IOU_THRESHOLD = 0.5
"""Threshold on a map in [0, 1] for :func:`iou_at` in the benchmarks: the map's own decision
boundary (``sigmoid(logit) >= 0.5`` <=> ``logit >= 0``), so it needs no tuning on test data."""


# ---------------------------------------------------------------------------------------------
# Input checks


def _as_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    """``x`` as a CPU tensor (no copy for CPU tensors); raises ValueError if it is empty or not numeric."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{name}: expected a tensor, array or sequence of numbers ({e})") from None
    if t.numel() == 0:
        raise ValueError(f"{name}: empty input")
    if t.dtype == torch.bool:
        return t
    if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
        raise ValueError(f"{name}: expected real numbers, got dtype {t.dtype}")
    return t


def _values(x: ArrayLike, name: str) -> torch.Tensor:
    """Flattened float64 values, all finite."""
    t = _as_tensor(x, name).reshape(-1).to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return t


def _labels(x: ArrayLike, name: str) -> torch.Tensor:
    """Flattened bool labels; non-bool input must hold exactly 0 and 1."""
    t = _as_tensor(x, name).reshape(-1)
    if t.dtype == torch.bool:
        return t
    if not bool(((t == 0) | (t == 1)).all()):
        raise ValueError(f"{name}: labels must be bool or exactly 0/1 (threshold a soft map first)")
    return t != 0


def _same_size(a: torch.Tensor, b: torch.Tensor, names: str, shape_a: tuple, shape_b: tuple) -> None:
    if a.numel() != b.numel():
        raise ValueError(f"{names}: sizes differ, shapes {shape_a} and {shape_b}")


def _shape(x: ArrayLike) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else (len(x),)  # type: ignore[arg-type]


def _scores_and_labels(scores: ArrayLike, labels: ArrayLike, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    s, y = _values(scores, f"{who}: scores"), _labels(labels, f"{who}: labels")
    _same_size(s, y, f"{who}: scores and labels", _shape(scores), _shape(labels))
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.numel():
        raise ValueError(
            f"{who}: needs both positive and negative labels, got {n_pos} positive of {y.numel()} "
            "(undefined for an all-clean or all-degraded image; pool images or skip it)"
        )
    return s, y


# ---------------------------------------------------------------------------------------------
# Pixel metrics


def pixel_auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` (any shape, higher = predicted positive) against
    bool ``labels`` of the same size, exact, ties counted as 1/2.

    Mann-Whitney U statistic (Hanley & McNeil 1982): with 1-based ranks of all scores, tied
    scores sharing their average rank, ``AUROC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)``
    where ``R_pos`` is the rank sum of the positives. One sort, O(n log n): fine for millions of
    pixels (float64 rank sums are exact up to ~1e8 elements). Raises ValueError when only one
    class is present.
    """
    s, y = _scores_and_labels(scores, labels, "pixel_auroc")
    s_sorted, order = torch.sort(s)
    _, counts = torch.unique_consecutive(s_sorted, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)  # 1-based rank of each tie group's last element
    avg_rank = ends - (counts.to(torch.float64) - 1.0) / 2.0  # mean of ranks start..end
    ranks = torch.repeat_interleave(avg_rank, counts)  # rank of each sorted element
    n_pos = float(y.sum())
    n_neg = float(y.numel()) - n_pos
    r_pos = float(ranks[y[order]].sum())
    return (r_pos - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg)


def average_precision(scores: ArrayLike, labels: ArrayLike) -> float:
    """Average precision of ``scores`` against bool ``labels``: ``AP = sum_n (R_n - R_{n-1}) P_n``
    over the distinct score values taken as thresholds in decreasing order (``P_n``, ``R_n`` the
    precision and recall of ``scores >= threshold_n``), the step-wise area under the
    precision-recall curve without interpolation (the definition used by scikit-learn's
    ``average_precision_score``). Tied scores form one threshold. Raises ValueError when only one
    class is present.
    """
    s, y = _scores_and_labels(scores, labels, "average_precision")
    s_sorted, order = torch.sort(s, descending=True)
    y_sorted = y[order].to(torch.float64)
    _, counts = torch.unique_consecutive(s_sorted, return_counts=True)
    last = torch.cumsum(counts, 0) - 1  # index of the last element of each tie group
    tp = torch.cumsum(y_sorted, 0)[last]
    predicted = (last + 1).to(torch.float64)
    precision = tp / predicted
    recall = tp / tp[-1]
    d_recall = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((d_recall * precision).sum())


def iou_at(pred_map: ArrayLike, mask: ArrayLike, threshold: float = DEFAULT_IOU_THRESHOLD) -> float:
    """Intersection over union of ``pred_map >= threshold`` and the binary ``mask`` (same size).

    When both are empty the prediction is perfect and the IoU is 1.0 (a clean image predicted clean).
    """
    if not np.isfinite(threshold):
        raise ValueError(f"iou_at: threshold must be a finite number, got {threshold}")
    p = _values(pred_map, "iou_at: pred_map") >= threshold
    g = _labels(mask, "iou_at: mask")
    _same_size(p, g, "iou_at: pred_map and mask", _shape(pred_map), _shape(mask))
    union = int((p | g).sum())
    if union == 0:
        return 1.0
    return int((p & g).sum()) / union


def map_mae(pred: ArrayLike, gt: ArrayLike) -> float:
    """Mean absolute error ``mean |pred - gt|`` between two maps of the same size (e.g. ``M`` and
    ``M_gt``, both in [0, 1]: the L1 of ``L_map``, PAPER.md section 3)."""
    p, g = _values(pred, "map_mae: pred"), _values(gt, "map_mae: gt")
    _same_size(p, g, "map_mae: pred and gt", _shape(pred), _shape(gt))
    return float((p - g).abs().mean())


# ---------------------------------------------------------------------------------------------
# Score metrics (one score per image, higher = better)


def _score_vectors(who: str, **named: ArrayLike) -> list[torch.Tensor]:
    vs = [_values(v, f"{who}: {k}") for k, v in named.items()]
    sizes = {k: v.numel() for k, v in zip(named, vs)}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{who}: every input needs one score per image, got sizes {sizes}")
    return vs


def order_accuracy(s_hr: ArrayLike, s_syn: ArrayLike, s_sr: ArrayLike) -> float:
    """Fraction of triplets ordered as the ranking loss asks, ``S_HR > S_syn > S_SR`` (strict;
    PAPER.md section 3, ``L_rank``). Inputs: one score per triplet, equal sizes."""
    hr, syn, sr = _score_vectors("order_accuracy", s_hr=s_hr, s_syn=s_syn, s_sr=s_sr)
    return float(((hr > syn) & (syn > sr)).to(torch.float64).mean())


def drop_fraction(s_clean: ArrayLike, s_distorted: ArrayLike) -> float:
    """Local sensitivity (issue 3, section 4): the fraction of images whose score drops when an
    artifact is added, ``S_distorted < S_clean`` (strict: an unchanged score is not a drop)."""
    clean, dist = _score_vectors("drop_fraction", s_clean=s_clean, s_distorted=s_distorted)
    return float((dist < clean).to(torch.float64).mean())
