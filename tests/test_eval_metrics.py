"""finpercep.metrics: hand-made cases and brute-force definitions (no sklearn)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from finpercep.metrics import (
    DEFAULT_IOU_THRESHOLD,
    average_precision,
    drop_fraction,
    iou_at,
    map_mae,
    order_accuracy,
    pixel_auroc,
    psnr,
    psnr_y,
    rgb_to_y,
    ssim,
    ssim_downsample,
    ssim_y,
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


# --- fidelity metrics (per image); calibration against BasicSR / scikit-image / published values
# --- is in tests/test_metrics_calibration.py ----------------------------------------------------


def test_rgb_to_y_hand_values():
    rgb = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 3)
    y = rgb_to_y(rgb)
    assert y.shape == (1, 1, 1, 3)
    # Black and white map to the BT.601 studio range 16..235; red to 16 + 65.481.
    assert y.flatten().tolist() == pytest.approx([16 / 255, 235 / 255, (16 + 65.481) / 255])


def test_psnr_and_psnr_y_hand_values():
    x = torch.full((1, 3, 8, 8), 0.5, dtype=torch.float64)
    y = x + 0.1
    assert psnr(x, y).item() == pytest.approx(20.0)
    # A grey shift of d moves Y by d * 219 / 255 (the luma weights sum to 219).
    assert psnr_y(x, y).item() == pytest.approx(-20 * np.log10(0.1 * 219 / 255))
    # Only the 2-pixel border differs: 48 of 64 pixels, MSE 0.0075; cropping it leaves identity.
    z = x.clone()
    z[..., 2:6, 2:6] += 0.1
    assert psnr(z, y).item() == pytest.approx(-10 * np.log10(48 / 64 * 0.01))
    assert psnr(z, y, crop_border=2).item() == pytest.approx(120.0)  # MSE floored at 1e-12


def test_ssim_crop_border_ignores_the_border():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 24, generator=g, dtype=torch.float64)
    y = x.clone()
    y[..., :3, :] = 0.0  # damage the top 3 rows only
    assert ssim(x, y).max().item() < 0.995  # the damage reaches the first valid windows
    assert ssim(x, y, crop_border=3).tolist() == pytest.approx([1.0, 1.0])
    assert ssim_y(x, y, crop_border=3).tolist() == pytest.approx([1.0, 1.0])


def test_ssim_downsample_hand_made():
    # f = 2: means of the 2x2 blocks starting at each output pixel; the last row / column of an
    # odd size is averaged with its mirror (itself). f = 3: MATLAB centres the 3x3 box on the
    # output pixel, so the first block takes row 0 twice (mirrored): (0+0+1)*2 + (6+6+7) = 21 / 9.
    a = torch.arange(25.0, dtype=torch.float64).view(1, 1, 5, 5)
    assert ssim_downsample(a, 2)[0, 0].tolist() == [[3.0, 5.0, 6.5], [13.0, 15.0, 16.5], [20.5, 22.5, 24.0]]
    b = torch.arange(36.0, dtype=torch.float64).view(1, 1, 6, 6)
    assert ssim_downsample(b, 3).flatten().tolist() == pytest.approx([21 / 9, 5.0, 165 / 9, 21.0])
    assert torch.equal(ssim_downsample(a, 1), a)


def test_fidelity_metrics_are_differentiable():
    g = torch.Generator().manual_seed(1)
    y = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64)
    x = (y + 0.05 * torch.randn(y.shape, generator=g, dtype=torch.float64)).clamp(0, 1).requires_grad_(True)
    (ssim_y(x, y, crop_border=2).sum() + psnr_y(x, y, crop_border=2).sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert (x.grad[..., :2, :] == 0).all()  # the cropped border has no influence


def test_fidelity_metrics_reject_bad_input():
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, x[..., :31])
    with pytest.raises(ValueError, match="RGB"):
        psnr_y(x[:, :1], x[:, :1])
    with pytest.raises(ValueError, match="crop_border=12"):
        ssim_y(x, x, crop_border=12)
    with pytest.raises(ValueError, match="crop_border must be >= 0"):
        psnr(x, x, crop_border=-1)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[..., :10, :10], x[..., :10, :10])
    with pytest.raises(ValueError, match="B, 3, H, W"):
        rgb_to_y(x[0])
