"""NIQE, the Natural Image Quality Evaluator (no reference; lower = better).

Mittal, Soundararajan and Bovik, "Making a 'Completely Blind' Image Quality Analyzer",
IEEE Signal Processing Letters 2013. Computed as BasicSR 1.4.2 does (``basicsr/metrics/niqe.py``,
``calculate_niqe(img, crop_border=0, convert_to='y')``), which in turn reproduces the official
MATLAB release to about 1e-6:

1. The image is quantised to 8 bits, its Y channel of ITU-R BT.601 YCbCr in [16, 235] rounded
   to integers (as BasicSR, for MATLAB parity) and cropped to whole 96x96 blocks (top-left).
2. At two scales (full, and MATLAB-bicubic anti-aliased half size), the MSCN coefficients
   ``(I - mu) / (sigma + 1)`` with the 7x7 Gaussian window of the pristine model, then per block
   (96x96, resp. 48x48) 18 features: an AGGD fit of the MSCN values and of their products with
   the four neighbours (horizontal, vertical, two diagonals; circular shifts inside the block).
3. A multivariate Gaussian fitted to the 36-d block features is compared with the pristine
   model: ``sqrt((mu_p - mu_d)^T pinv((S_p + S_d) / 2) (mu_p - mu_d))`` (Eq. 10 of the paper).

The pristine model (``niqe_pris_params.npz`` next to this file: ``mu_pris_param`` (1, 36),
``cov_pris_param`` (36, 36), ``gaussian_window`` (7, 7)) is copied unchanged from the BasicSR 1.4.2
source archive (``basicsr/metrics/niqe_pris_params.npz``; Copyright BasicSR authors, Apache-2.0),
whose numbers are those of the official MATLAB release.

Typical values: 2-5 for clean photos, larger when blurred, noisy or compressed. Not
differentiable (NumPy, per image). Undefined (NaN) when fewer than two blocks have any texture,
e.g. a constant image.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from finpercep.checks import check_image_batch, require

convolve = require("scipy.ndimage", extra="metrics").convolve
gamma = require("scipy.special", extra="metrics").gamma

BLOCK_SIZE = 96  # the official recommended block size (no overlap), as in BasicSR
MIN_BLOCKS = 2  # a covariance needs at least two blocks

# Grid of AGGD shape parameters searched by moment matching (BasicSR / MATLAB: 0.2:0.001:10).
_GAM = np.arange(0.2, 10.001, 0.001)
_R_GAM = gamma(2.0 / _GAM) ** 2 / (gamma(1.0 / _GAM) * gamma(3.0 / _GAM))
# Neighbour directions for the pairwise products (BasicSR's np.roll shifts).
_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))


@lru_cache(maxsize=1)
def _pristine_model() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pristine MVG model: ``mu (36,)``, ``cov (36, 36)`` and the 7x7 Gaussian ``window``."""
    path = Path(__file__).with_name("niqe_pris_params.npz")
    if not path.is_file():
        raise FileNotFoundError(f"NIQE pristine parameters missing: {path} (reinstall finpercep)")
    with np.load(path, allow_pickle=False) as p:
        return p["mu_pris_param"].reshape(-1), p["cov_pris_param"], p["gaussian_window"]


def _check_images(img: torch.Tensor) -> None:
    check_image_batch(img, "niqe")
    h, w = img.shape[-2:]
    if (h // BLOCK_SIZE) * (w // BLOCK_SIZE) < MIN_BLOCKS:
        raise ValueError(
            f"niqe needs at least {MIN_BLOCKS} whole {BLOCK_SIZE}x{BLOCK_SIZE} blocks "
            f"(e.g. {BLOCK_SIZE}x{2 * BLOCK_SIZE}); got {h}x{w}"
        )


def rgb_to_y(rgb8: np.ndarray) -> np.ndarray:
    """Rounded ITU-R BT.601 luma of an 8-bit RGB image ``(H, W, 3)`` -> ``(H, W)`` float32 in [16, 235].

    The MATLAB ``rgb2ycbcr`` convention, with BasicSR's exact arithmetic (``to_y_channel`` in
    float32, then ``round``) so that the integers agree bit for bit.
    """
    x = rgb8.astype(np.float32) / np.float32(255.0)
    y = (x @ np.array([65.481, 128.553, 24.966]) + 16.0) / 255.0
    return np.round(y.astype(np.float32) * np.float32(255.0))


def _cubic(x: np.ndarray) -> np.ndarray:
    """MATLAB's bicubic kernel (a = -0.5)."""
    ax = np.abs(x)
    return (1.5 * ax**3 - 2.5 * ax**2 + 1) * (ax <= 1) + (-0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2) * (
        (ax > 1) & (ax <= 2)
    )


def _matlab_resize_matrix(n_in: int, scale: float) -> np.ndarray:
    """``(n_out, n_in)`` matrix of MATLAB ``imresize(..., 'bicubic')`` with anti-aliasing along one axis.

    Same weights as BasicSR's ``calculate_weights_indices`` (kernel widened by 1/scale when
    shrinking; symmetric border handling, edge pixel repeated), folded into a dense matrix.
    """
    n_out = math.ceil(n_in * scale)
    width = 4.0 / scale if scale < 1 else 4.0
    x = np.arange(1, n_out + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)  # output pixel centre in input coordinates (1-based)
    left = np.floor(u - width / 2)
    taps = math.ceil(width) + 2
    idx = left[:, None] + np.arange(taps)[None, :]  # (n_out, taps) 1-based input indices
    dist = u[:, None] - idx
    weights = scale * _cubic(dist * scale) if scale < 1 else _cubic(dist)
    weights /= weights.sum(axis=1, keepdims=True)
    # Symmetric padding: index 0 -> 1, -1 -> 2, n+1 -> n, ... (1-based), then 0-based.
    i0 = idx - 1
    i0 = np.where(i0 < 0, -i0 - 1, i0)
    i0 = np.where(i0 >= n_in, 2 * n_in - 1 - i0, i0).astype(np.int64)
    mat = np.zeros((n_out, n_in))
    np.add.at(mat, (np.repeat(np.arange(n_out), taps), i0.ravel()), weights.ravel())
    return mat


def matlab_imresize_half(img: np.ndarray) -> np.ndarray:
    """MATLAB ``imresize(img, 0.5)`` (bicubic, anti-aliased) of a 2-D image."""
    rows = _matlab_resize_matrix(img.shape[0], 0.5).astype(img.dtype)
    cols = _matlab_resize_matrix(img.shape[1], 0.5).astype(img.dtype)
    return rows @ img @ cols.T


def _aggd_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Moment-matching fit of an asymmetric generalised Gaussian to each row of ``x (N, M)``.

    Returns ``alpha, beta_l, beta_r`` each ``(N,)`` (Mittal et al. 2012, BRISQUE Eq. 7-8; the
    grid search of BasicSR's ``estimate_aggd_param``). Rows without negative or positive values
    give NaN scale parameters, as in BasicSR.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        neg, pos = x < 0, x > 0
        left_std = np.sqrt((x**2 * neg).sum(1) / neg.sum(1))
        right_std = np.sqrt((x**2 * pos).sum(1) / pos.sum(1))
        gammahat = left_std / right_std
        rhat = np.mean(np.abs(x), 1) ** 2 / np.mean(x**2, 1)
        rhatnorm = rhat * (gammahat**3 + 1) * (gammahat + 1) / (gammahat**2 + 1) ** 2
        # argmin of a NaN row is 0 (numpy returns the first NaN), exactly as in BasicSR.
        alpha = _GAM[np.argmin((_R_GAM[None, :] - rhatnorm[:, None]) ** 2, axis=1)]
        c = np.sqrt(gamma(1 / alpha) / gamma(3 / alpha))
    return alpha, left_std * c, right_std * c


def _block_features(blocks: np.ndarray) -> np.ndarray:
    """18 NIQE features per block: ``blocks (N, b, b)`` MSCN coefficients -> ``(N, 18)``."""
    n = blocks.shape[0]
    alpha, bl, br = _aggd_fit(blocks.reshape(n, -1))
    feats = [alpha, (bl + br) / 2]
    for shift in _SHIFTS:
        prod = blocks * np.roll(blocks, shift, axis=(1, 2))
        alpha, bl, br = _aggd_fit(prod.reshape(n, -1))
        mean = (br - bl) * gamma(2 / alpha) / gamma(1 / alpha)
        feats += [alpha, mean, bl, br]
    return np.stack(feats, axis=1)


def niqe_y(y: np.ndarray) -> float:
    """NIQE of one luma image ``y (H, W)`` in [0, 255] (already rounded if MATLAB parity is wanted)."""
    mu_p, cov_p, window = _pristine_model()
    nbh, nbw = y.shape[0] // BLOCK_SIZE, y.shape[1] // BLOCK_SIZE
    # float32 throughout, as BasicSR: in flat regions the MSCN values are rounding noise whose
    # signs enter the AGGD fit, so the precision changes the score (by ~0.03 on astronaut).
    img = y[: nbh * BLOCK_SIZE, : nbw * BLOCK_SIZE].astype(np.float32)
    per_scale = []
    for scale in (1, 2):
        mu = convolve(img, window, mode="nearest")
        sigma = np.sqrt(np.abs(convolve(img**2, window, mode="nearest") - mu**2))
        mscn = (img - mu) / (sigma + 1)  # Eq. 1
        b = BLOCK_SIZE // scale
        # (nbh*b, nbw*b) -> (nbh*nbw, b, b): the grid of non-overlapping blocks.
        blocks = mscn.reshape(nbh, b, nbw, b).transpose(0, 2, 1, 3).reshape(-1, b, b)
        per_scale.append(_block_features(blocks))
        if scale == 1:
            img = matlab_imresize_half(img / np.float32(255.0)) * np.float32(255.0)
    feats = np.concatenate(per_scale, axis=1)  # (blocks, 36)
    valid = feats[~np.isnan(feats).any(axis=1)]  # flat blocks give NaN features (nancov)
    if len(valid) < MIN_BLOCKS:
        return float("nan")  # (nearly) flat image: the MVG fit is undefined
    mu_d = np.nanmean(feats, axis=0)
    d = mu_p - mu_d
    quality = d @ np.linalg.pinv((cov_p + np.cov(valid, rowvar=False)) / 2) @ d
    return float(np.sqrt(quality))


def niqe(img: torch.Tensor) -> torch.Tensor:
    """NIQE of each image in a batch; lower = better (the raw metric, not a reward).

    Args:
        img: ``(B, 3, H, W)`` float RGB in [0, 1], with at least two whole 96x96 blocks
            (e.g. 96x192; 512x512 holds 25). Any device; computed on the CPU in NumPy.

    Returns:
        ``(B,)`` float32 on ``img``'s device; typical 2-10, unbounded above; NaN for (nearly) flat images.
    """
    _check_images(img)
    # 8-bit RGB, as the metric (and BasicSR's MATLAB parity) is defined on 8-bit images.
    arr = (img.detach().to("cpu", torch.float64).clamp(0, 1) * 255).round().to(torch.uint8)
    scores = [niqe_y(rgb_to_y(x.permute(1, 2, 0).numpy())) for x in arr]
    return torch.tensor(scores, dtype=torch.float32, device=img.device)
