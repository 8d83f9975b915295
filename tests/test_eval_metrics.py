"""finpercep.eval.metrics: hand-made cases and brute-force definitions (no sklearn)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from finpercep.eval.metrics import (
    DEFAULT_IOU_THRESHOLD,
    average_precision,
    drop_fraction,
    iou_at,
    map_mae,
    order_accuracy,
    pixel_auroc,
)


def brute_auroc(s: np.ndarray, y: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + 1/2 P(equal), over all pairs: O(n^2)."""
    pos, neg = s[y], s[~y]
    gt = (pos[:, None] > neg[None, :]).sum()
    eq = (pos[:, None] == neg[None, :]).sum()
    return float((gt + 0.5 * eq) / (len(pos) * len(neg)))


def brute_ap(s: np.ndarray, y: np.ndarray) -> float:
    """sum_n (R_n - R_{n-1}) P_n, thresholding at every distinct score in decreasing order."""
    ap, prev_recall = 0.0, 0.0
    for t in sorted(set(s.tolist()), reverse=True):
        pred = s >= t
        tp = (pred & y).sum()
        recall = tp / y.sum()
        ap += (recall - prev_recall) * tp / pred.sum()
        prev_recall = recall
    return float(ap)


# --- AUROC / AP --------------------------------------------------------------------------------


def test_auroc_hand_made():
    assert pixel_auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert pixel_auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    # The classic example: one of the four positive/negative pairs is misordered.
    assert pixel_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # Constant scores carry no information: exactly 0.5, whatever the class balance.
    assert pixel_auroc(torch.full((10,), 0.3), torch.arange(10) < 3) == 0.5
    # A tie between one positive and one negative counts as half a correct pair.
    assert pixel_auroc([0.5, 0.5, 0.9], [True, False, False]) == pytest.approx(0.25)


def test_ap_hand_made():
    # P at the positives' ranks: 1/1 (0.8) and 2/3 (0.35) -> (1 + 2/3) / 2.
    assert average_precision([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(5 / 6)
    assert average_precision([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0
    # All tied: one threshold that predicts everything, precision = base rate.
    assert average_precision(np.zeros(8), np.arange(8) < 2) == pytest.approx(0.25)


@pytest.mark.parametrize("seed", range(6))
def test_auroc_and_ap_match_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    s = rng.integers(0, 12, n).astype(np.float32) / 11  # few distinct values: many ties
    if seed % 2:
        s = rng.random(n).astype(np.float32)  # continuous scores
    y = rng.random(n) < rng.uniform(0.1, 0.9)
    y[0], y[1] = True, False  # both classes present
    assert pixel_auroc(torch.from_numpy(s), torch.from_numpy(y)) == pytest.approx(brute_auroc(s, y), abs=1e-12)
    assert average_precision(s, y) == pytest.approx(brute_ap(s, y), abs=1e-12)


def test_pixel_metrics_accept_maps_of_any_shape():
    rng = np.random.default_rng(0)
    m = torch.from_numpy(rng.random((2, 1, 9, 7)).astype(np.float32))
    mask = torch.from_numpy(rng.random((2, 1, 9, 7)) < 0.3).float()  # float {0, 1} masks are fine
    s, y = m.numpy().ravel(), mask.numpy().ravel() > 0
    assert pixel_auroc(m, mask) == pytest.approx(brute_auroc(s, y))
    assert average_precision(m, mask) == pytest.approx(brute_ap(s, y))


def test_auroc_is_rank_invariant_and_flips():
    rng = np.random.default_rng(1)
    s, y = rng.random(500), rng.random(500) < 0.2
    a = pixel_auroc(s, y)
    assert pixel_auroc(np.exp(3 * s) - 7, y) == pytest.approx(a)  # monotone transform
    assert pixel_auroc(-s, y) == pytest.approx(1 - a)


def test_auroc_millions_of_pixels_fast():
    g = torch.Generator().manual_seed(0)
    y = torch.rand(4_000_000, generator=g) < 0.03
    s = (torch.rand(4_000_000, generator=g) + y.float() * 0.5).clamp(max=1.0)
    s = (s * 255).round() / 255  # 8-bit-like scores: heavy ties
    t0 = time.perf_counter()
    a = pixel_auroc(s, y)
    assert time.perf_counter() - t0 < 10.0
    # Exact value for this construction: positives ~U(0.5, 1.5) clamped, negatives ~U(0, 1) ->
    # P(pos > neg) = 1 - 1/8 = 0.875 (up to sampling noise and the 1/255 quantisation).
    assert a == pytest.approx(0.875, abs=0.01)


@pytest.mark.parametrize("fn", [pixel_auroc, average_precision])
def test_ranking_metrics_reject_bad_input(fn):
    with pytest.raises(ValueError, match="both positive and negative"):
        fn([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="sizes differ"):
        fn([0.1, 0.2, 0.3], [True, False])
    with pytest.raises(ValueError, match="NaN"):
        fn([0.1, float("nan")], [True, False])
    with pytest.raises(ValueError, match="0/1"):
        fn([0.1, 0.2], [0.3, 0.9])
    with pytest.raises(ValueError, match="empty"):
        fn([], [])


# --- IoU / MAE ---------------------------------------------------------------------------------


def test_iou_hand_made():
    pred = torch.tensor([[0.9, 0.6, 0.1], [0.2, 0.5, 0.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    # pred >= 0.5 -> {(0,0), (0,1), (1,1)}; mask -> {(0,0), (0,2), (1,1)}; 2 shared of 4.
    assert iou_at(pred, mask, 0.5) == pytest.approx(0.5)
    assert iou_at(pred, mask, 0.55) == pytest.approx(1 / 4)  # (1,1) drops out: 1 shared of 4
    assert iou_at(mask, mask, DEFAULT_IOU_THRESHOLD) == 1.0
    assert iou_at(torch.zeros(4, 4), torch.zeros(4, 4), 0.5) == 1.0  # clean predicted clean
    assert iou_at(torch.ones(4, 4), torch.zeros(4, 4), 0.5) == 0.0
    with pytest.raises(ValueError, match="sizes differ"):
        iou_at(torch.zeros(4, 4), torch.zeros(4, 5), 0.5)
    with pytest.raises(ValueError, match="threshold"):
        iou_at(torch.zeros(4, 4), torch.zeros(4, 4), float("nan"))


def test_map_mae():
    assert map_mae(torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0.0, 1.0, 0.0])) == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    a, b = rng.random((1, 1, 5, 6)), rng.random((5, 6))
    assert map_mae(a, b) == pytest.approx(np.abs(a[0, 0] - b).mean())  # same size, other layout
    with pytest.raises(ValueError, match="sizes differ"):
        map_mae(np.zeros(3), np.zeros(4))


# --- score metrics -----------------------------------------------------------------------------


def test_order_accuracy():
    hr = torch.tensor([3.0, 3.0, 1.0, 2.0])
    syn = torch.tensor([2.0, 1.0, 2.0, 2.0])
    sr = torch.tensor([1.0, 2.0, 0.0, 1.0])
    # ok | syn < sr | hr < syn | hr == syn (tie is a failure)
    assert order_accuracy(hr, syn, sr) == 0.25
    assert order_accuracy([3.0], [2.0], [1.0]) == 1.0
    with pytest.raises(ValueError, match="one score per image"):
        order_accuracy([1.0, 2.0], [1.0], [0.0])


def test_drop_fraction():
    clean = np.array([1.0, 1.0, 1.0, 1.0, 1.0])
    dist = np.array([0.5, 1.0, 2.0, 0.99, -3.0])
    assert drop_fraction(clean, dist) == pytest.approx(3 / 5)  # an unchanged score is not a drop
    assert drop_fraction(torch.tensor([0.0]), torch.tensor([1.0])) == 0.0
    with pytest.raises(ValueError, match="NaN"):
        drop_fraction([1.0], [float("nan")])
