"""Metric math for the reward-model benchmarks and RL evaluation: a leaf (torch and NumPy only).

Pure functions of tensors (numpy arrays and sequences are accepted and converted); each returns a
plain python ``float``. No sklearn: the two ranking metrics are written out here and checked in
``tests/test_eval_metrics.py`` against brute-force definitions.

Pixel metrics (:func:`pixel_auroc`, :func:`average_precision`, :func:`iou_at`, :func:`map_mae`)
pool every element they are given ("micro" average): pass one image's map for a per-image value,
or a whole stack ``(B, 1, H, W)`` for one number over all pixels of a test set. Labels / masks are
bool or exactly {0, 1}; scores / maps are any finite real numbers (higher = more likely degraded).
Score metrics (:func:`order_accuracy`, :func:`drop_fraction`) take one score per image, higher =
better, and use strict inequalities: a tie counts as a failure.

Fidelity metrics (:func:`psnr`, :func:`psnr_y`, :func:`ssim`, :func:`ssim_y`) are different: per
image, ``(B,)`` tensors, differentiable, on image batches ``(B, C, H, W)`` in [0, 1]. ``psnr_y`` /
``ssim_y`` follow the convention of SR papers (BasicSR's ``calculate_psnr`` / ``calculate_ssim``
with ``test_y_channel=True``): the BT.601 luma :func:`rgb_to_y`, ``crop_border`` pixels dropped at
each edge, SSIM with the 11x11 Gaussian window of sigma 1.5 (Wang et al. 2004). ``ssim(...,
downsample=True)`` adds the automatic downsampling of Wang et al.'s ``ssim.m``. The RGB variants
(:func:`psnr`, :func:`ssim`) average over all channels, without colour conversion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

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
    ``M_gt``, both in [0, 1]: the L1 of the map loss ``L_map``, arXiv 2512.22647)."""
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
    the ranking loss ``L_rank`` of arXiv 2512.22647). Inputs: one score per triplet, equal sizes."""
    hr, syn, sr = _score_vectors("order_accuracy", s_hr=s_hr, s_syn=s_syn, s_sr=s_sr)
    return float(((hr > syn) & (syn > sr)).to(torch.float64).mean())


def drop_fraction(s_clean: ArrayLike, s_distorted: ArrayLike) -> float:
    """Local sensitivity: the fraction of images whose score drops when an
    artifact is added, ``S_distorted < S_clean`` (strict: an unchanged score is not a drop)."""
    clean, dist = _score_vectors("drop_fraction", s_clean=s_clean, s_distorted=s_distorted)
    return float((dist < clean).to(torch.float64).mean())


# ---------------------------------------------------------------------------------------------
# Fidelity metrics (per image, full reference, differentiable)

SSIM_WINDOW = 11
"""Side of the Gaussian window of :func:`ssim` (Wang et al. 2004)."""
SSIM_SIGMA = 1.5
"""Standard deviation of the Gaussian window of :func:`ssim`, in pixels."""
MSE_FLOOR = 1e-12
"""Smallest MSE :func:`psnr` uses, so identical images give 120 dB instead of infinity."""

# ITU-R BT.601 luma for RGB in [0, 1], on the 0..255 scale: MATLAB's rgb2ycbcr, BasicSR's rgb2ycbcr.
_Y_OFFSET = 16.0
_Y_WEIGHTS = (65.481, 128.553, 24.966)


def _check_pair(x: torch.Tensor, y: torch.Tensor, who: str, rgb: bool = False) -> None:
    if x.ndim != 4 or x.shape != y.shape:
        raise ValueError(f"{who}: x and y must be (B, C, H, W) of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if rgb and x.shape[1] != 3:
        raise ValueError(f"{who}: needs RGB images (B, 3, H, W), got {x.shape[1]} channels (use psnr / ssim for other images)")


def _crop(x: torch.Tensor, border: int, who: str, min_size: int = 1) -> torch.Tensor:
    """``x`` without ``border`` pixels at each edge; raises ValueError if less than ``min_size`` remains."""
    if border < 0:
        raise ValueError(f"{who}: crop_border must be >= 0, got {border}")
    h, w = x.shape[-2] - 2 * border, x.shape[-1] - 2 * border
    if min(h, w) < min_size:
        raise ValueError(
            f"{who}: images of {tuple(x.shape[-2:])} leave {h}x{w} after crop_border={border}, need at least "
            f"{min_size}x{min_size}; use larger images or a smaller crop_border"
        )
    return x[..., border : x.shape[-2] - border, border : x.shape[-1] - border]


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """The luma Y of ITU-R BT.601 YCbCr, as SR papers measure it: ``(B, 3, H, W)`` RGB in [0, 1] ->
    ``(B, 1, H, W)`` in [16/255, 235/255].

    ``Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255``: MATLAB's ``rgb2ycbcr`` and BasicSR's
    ``rgb2ycbcr(y_only=True)``, not rounded to 8 bits. Differentiable.
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"rgb_to_y: expected (B, 3, H, W) RGB, got shape {tuple(x.shape)}")
    w = torch.tensor(_Y_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x * w).sum(1, keepdim=True) + _Y_OFFSET) / 255.0


def psnr(x: torch.Tensor, y: torch.Tensor, *, crop_border: int = 0) -> torch.Tensor:
    """PSNR in dB per image: ``10 log10(1 / MSE)`` over all channels (data range 1).

    Args:
        x, y: ``(B, C, H, W)`` in [0, 1], same shape (RGB: BasicSR's ``calculate_psnr`` with
            ``test_y_channel=False``; scikit-image's ``peak_signal_noise_ratio`` on 8-bit images).
        crop_border: pixels dropped at each edge before measuring (SR papers: the scale factor).

    Returns:
        ``(B,)``; at most 120 dB (the MSE is floored at :data:`MSE_FLOOR`; BasicSR returns
        infinity for identical images). Differentiable.
    """
    _check_pair(x, y, "psnr")
    x, y = _crop(x, crop_border, "psnr"), _crop(y, crop_border, "psnr")
    mse = (x - y).pow(2).flatten(1).mean(1).clamp_min(MSE_FLOOR)
    return -10.0 * torch.log10(mse)


def psnr_y(x: torch.Tensor, y: torch.Tensor, *, crop_border: int = 0) -> torch.Tensor:
    """PSNR in dB on the BT.601 luma (:func:`rgb_to_y`), as SR papers report it (BasicSR's
    ``calculate_psnr(..., crop_border, test_y_channel=True)``). ``x, y``: ``(B, 3, H, W)`` RGB in
    [0, 1]. Returns ``(B,)``, at most 120 dB; differentiable."""
    _check_pair(x, y, "psnr_y", rgb=True)
    return psnr(rgb_to_y(x), rgb_to_y(y), crop_border=crop_border)


def ssim_downsample_factor(height: int, width: int) -> int:
    """Wang et al.'s automatic downsampling factor ``f = max(1, round(min(H, W) / 256))`` (``ssim.m``;
    MATLAB rounds halves up: a 384-pixel side gives 2)."""
    return max(1, math.floor(min(height, width) / 256 + 0.5))


def _symmetric_pad(x: torch.Tensor, dim: int, before: int, after: int) -> torch.Tensor:
    """MATLAB's ``'symmetric'`` padding (the edge pixel repeated: ``c b a | a b c | c b``) along ``dim``."""
    n = x.shape[dim]
    idx = torch.cat([torch.arange(before - 1, -1, -1), torch.arange(n), torch.arange(n - 1, n - 1 - after, -1)])
    return x.index_select(dim, idx.to(x.device))


def ssim_downsample(x: torch.Tensor, f: int) -> torch.Tensor:
    """The downsampling of Wang et al.'s ``ssim.m``: ``imfilter(x, ones(f) / f^2, 'symmetric', 'same')``
    sampled at rows and columns ``1:f:end``. ``(B, C, H, W)`` -> ``(B, C, ceil(H / f), ceil(W / f))``.

    Each output pixel is the mean of an ``f x f`` block starting ``(f - 1) // 2`` pixels before it
    (MATLAB's kernel centre), mirrored at the borders. Identity for ``f = 1``; differentiable.
    """
    if f < 1:
        raise ValueError(f"ssim_downsample: factor must be >= 1, got {f}")
    if f == 1:
        return x
    before = (f - 1) // 2
    for dim in (-2, -1):
        n = x.shape[dim]
        x = _symmetric_pad(x, dim, before, max(0, f * math.ceil(n / f) - n - before))
    return F.avg_pool2d(x, f, stride=f)


def _gaussian_window(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    x = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _ssim_terms(x: torch.Tensor, y: torch.Tensor, window: int, sigma: float) -> torch.Tensor:
    """The SSIM map per channel at the valid positions, ``(B, C, H - window + 1, W - window + 1)``
    (Wang et al. 2004, Eq. 13: population (co)variances, ``C1 = 0.01^2``, ``C2 = 0.03^2``)."""
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
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    window: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
    *,
    crop_border: int = 0,
    downsample: bool = False,
) -> torch.Tensor:
    """Structural similarity (Wang, Bovik, Sheikh and Simoncelli, IEEE TIP 2004, Eq. 13), per image.

    Args:
        x, y: ``(B, C, H, W)`` in [0, 1] (data range 1), same shape; at least ``window`` pixels on
            each side after cropping and downsampling.
        window, sigma: the Gaussian weighting window (11 and 1.5 as in the paper).
        crop_border: pixels dropped at each edge first (SR papers: the scale factor).
        downsample: then shrink by :func:`ssim_downsample_factor` with :func:`ssim_downsample`,
            as Wang et al.'s ``ssim.m`` does (pyiqa and BasicSR do not).

    Returns:
        ``(B,)`` in [-1, 1], 1 for identical images: the SSIM map averaged over the channels
        (each on its own, no colour conversion) and over the *valid* positions (the window stays
        inside the image). Population (co)variances, ``C1 = 0.01^2``, ``C2 = 0.03^2``. This is
        ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=1)`` and BasicSR's ``calculate_ssim`` (tested).
        Differentiable with respect to both inputs.
    """
    _check_pair(x, y, "ssim")
    x, y = _crop(x, crop_border, "ssim", window), _crop(y, crop_border, "ssim", window)
    if downsample:
        f = ssim_downsample_factor(*x.shape[-2:])
        x, y = ssim_downsample(x, f), ssim_downsample(y, f)
    if min(x.shape[-2:]) < window:
        raise ValueError(f"ssim: images must be at least {window}x{window} (after cropping and downsampling), got {tuple(x.shape[-2:])}")
    return _ssim_terms(x, y, window, sigma).mean(dim=(1, 2, 3))


def ssim_map(x: torch.Tensor, y: torch.Tensor, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Local SSIM (Wang et al. 2004, Eq. 13) as a map the size of the images.

    Args:
        x, y: ``(B, C, H, W)`` in [0, 1], same shape, ``H, W >= window``.
        window, sigma: the Gaussian weighting window (11 and 1.5 as in the paper).

    Returns:
        ``(B, 1, H, W)`` in [-1, 1], 1 where the images agree: each channel's SSIM of the window
        centred on the pixel, averaged over the channels (as :func:`ssim`, whose mean over the
        valid positions it is; on RGB a colour or saturation change lowers it, on the luma it
        would not), computed where the window stays inside the image and copied from the nearest
        such position into the ``window // 2`` pixels at each edge. Raises ``ValueError`` for
        mismatched or too small images. Differentiable.
    """
    _check_pair(x, y, "ssim_map")
    if min(x.shape[-2:]) < window:
        raise ValueError(f"ssim_map: images must be at least {window}x{window}, got {tuple(x.shape[-2:])}")
    s = _ssim_terms(x, y, window, sigma).mean(1, keepdim=True)
    r = window // 2
    return F.pad(s, (r, window - 1 - r, r, window - 1 - r), mode="replicate")


def ssim_y(x: torch.Tensor, y: torch.Tensor, *, crop_border: int = 0, downsample: bool = False) -> torch.Tensor:
    """SSIM on the BT.601 luma (:func:`rgb_to_y`), as SR papers report it: BasicSR's
    ``calculate_ssim(..., crop_border, test_y_channel=True)`` (11x11 Gaussian, sigma 1.5, on the
    0..255 scale, which gives the same value as on [0, 1]). ``downsample=True`` adds Wang et al.'s
    automatic downsampling (:func:`ssim`). ``x, y``: ``(B, 3, H, W)`` RGB in [0, 1]. Returns
    ``(B,)`` in [-1, 1]; differentiable."""
    _check_pair(x, y, "ssim_y", rgb=True)
    return ssim(rgb_to_y(x), rgb_to_y(y), crop_border=crop_border, downsample=downsample)
