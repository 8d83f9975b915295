"""BRISQUE, the Blind/Referenceless Image Spatial Quality Evaluator (no reference; lower = better).

Mittal, Moorthy and Bovik, "No-Reference Image Quality Assessment in the Spatial Domain",
IEEE TIP 2012, computed as the authors' MATLAB release does (``brisquescore.m``,
``brisque_feature.m``, ``estimateggdparam.m``, ``estimateaggdparam.m``; LIVE, 2011), with its
trained model:

1. The RGB image quantised to 8 bits and made grey with MATLAB's ``rgb2gray`` (weights
   0.298936, 0.587043, 0.114021, rounded to integers), kept on the 0..255 scale.
2. At two scales (full, then MATLAB ``imresize(I, 0.5)``: bicubic, anti-aliased) the MSCN
   coefficients ``(I - mu) / (sigma + 1)``: ``mu``, ``sigma`` from a 7x7 Gaussian window of
   sigma 7/6 with zero padding (``filter2(..., 'same')``).
3. A generalised Gaussian fitted to the MSCN values (``[alpha, mean(x^2)]``) and an asymmetric
   one to their products with the circularly shifted neighbours (``circshift`` by ``[0 1]``,
   ``[1 0]``, ``[1 1]``, ``[-1 1]``; ``[alpha, eta, sigma_l^2, sigma_r^2]`` each), by moment
   matching over the grid ``alpha = 0.2:0.001:10``: 18 features per scale, 36 in all.
4. The features scaled to [-1, 1] with the release's ``allrange`` (min/max over LIVE), then its
   epsilon-SVR ``allmodel`` (RBF, ``gamma = 0.05``, 774 support vectors, trained on all of the
   LIVE IQA database): ``score = sum_i coef_i exp(-gamma |x - sv_i|^2) - rho``, ``rho = -153.591``.

The model (``brisque_live.npz`` next to this file) holds ``allmodel`` and ``allrange`` unchanged,
converted to arrays by ``tools/brisque_live_model.py``; Copyright (c) 2011 The University of
Texas at Austin, redistributable with its notice (``brisque_live_LICENSE.txt``, also next to it).

Agreement with the MATLAB release's scores published in pyiqa's calibration table (5 TID2013
images; ``tests/test_metrics_calibration.py``): within 0.025 on the four images whose flat areas
are small (at most 2 % of the pixels). Inside a flat area the MSCN values are floating-point
rounding noise of the convolution, and their signs enter the fits, so there the score depends on
the convolution routine: on ``I19`` (30 % flat pixels) we get 64.6 where MATLAB gave 72.3 (other
convolution routines give 64.2 to 69.9). The release writes the features with 6 decimals before
``svm-scale``; we do not, which moves scores by less than 1e-3.

Typical values: about 0-20 for clean photos, up to ~100 for heavily distorted ones; the SVR is
not clipped, so values slightly outside [0, 100] occur. Not differentiable (NumPy, per image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from finpercep.baselines.niqe import matlab_imresize_half
from finpercep.baselines.piqe import _GREY as MATLAB_RGB2GRAY  # MATLAB rgb2gray's weights, one copy
from finpercep.checks import check_image_batch, require

signal = require("scipy.signal", extra="metrics")
gamma = require("scipy.special", extra="metrics").gamma

MIN_SIZE = 16  # smallest side accepted; the fits need a few hundred coefficients per scale
MODEL_FILE = Path(__file__).with_name("brisque_live.npz")

# The release's grid of shape parameters and the moment ratios it matches (estimate*param.m).
_ALPHAS = 0.2 + 0.001 * np.arange(9801)  # 0.2:0.001:10
_R_GGD = gamma(1 / _ALPHAS) * gamma(3 / _ALPHAS) / gamma(2 / _ALPHAS) ** 2
_R_AGGD = 1 / _R_GGD
# circshift offsets (rows, columns) of the four neighbours: horizontal, vertical, two diagonals.
_SHIFTS = ((0, 1), (1, 0), (1, 1), (-1, 1))


@dataclass(frozen=True)
class BrisqueModel:
    """The trained BRISQUE regressor: feature scaling and an RBF epsilon-SVR."""

    feat_min: np.ndarray  # (36,) per-feature minimum of the training set (allrange)
    feat_max: np.ndarray  # (36,)
    support_vectors: np.ndarray  # (n_sv, 36) in the scaled feature space
    coefs: np.ndarray  # (n_sv,) dual coefficients
    gamma: float  # RBF kernel width
    rho: float  # bias (subtracted)


@lru_cache(maxsize=1)
def load_model() -> BrisqueModel:
    """The release's trained model (``allmodel`` + ``allrange``) from ``brisque_live.npz`` (cached)."""
    if not MODEL_FILE.is_file():
        raise FileNotFoundError(f"BRISQUE model missing: {MODEL_FILE} (reinstall finpercep)")
    with np.load(MODEL_FILE, allow_pickle=False) as m:
        return BrisqueModel(
            feat_min=m["feat_min"], feat_max=m["feat_max"], support_vectors=m["support_vectors"],
            coefs=m["coefs"], gamma=float(m["gamma"]), rho=float(m["rho"]),
        )


def _gaussian_window(n: int = 7, sigma: float = 7 / 6) -> np.ndarray:
    y, x = np.indices((n, n)) - n // 2
    k = np.exp(-(x**2 + y**2) / (2 * sigma**2))
    k /= k.sum()  # fspecial('gaussian', 7, 7/6)
    return k / k.sum()  # ... normalised once more by brisque_feature.m (last-bit identical)


def mscn(grey: np.ndarray) -> np.ndarray:
    """MSCN coefficients ``(I - mu) / (sigma + 1)`` of a grey image ``(H, W)`` on the 0..255 scale (Eq. 1)."""
    k = _gaussian_window()
    mu = signal.correlate2d(grey, k, mode="same")  # filter2(window, I, 'same'): zero padding
    sigma = np.sqrt(np.abs(signal.correlate2d(grey * grey, k, mode="same") - mu * mu))
    return (grey - mu) / (sigma + 1)


def _rms(x: np.ndarray) -> float:
    """Root mean square; NaN for no values (an empty side of the distribution)."""
    return float(np.sqrt(np.mean(x * x))) if x.size else math.nan


def ggd_fit(x: np.ndarray) -> tuple[float, float]:
    """``(alpha, sigma^2)`` of a zero-mean generalised Gaussian fitted to ``x`` (``estimateggdparam.m``);
    ``alpha`` is NaN when ``x`` is all zero."""
    sigma_sq = float(np.mean(x * x))
    e_abs = float(np.mean(np.abs(x)))
    if e_abs == 0:
        return math.nan, sigma_sq
    rho = sigma_sq / e_abs**2
    return float(_ALPHAS[np.argmin(np.abs(rho - _R_GGD))]), sigma_sq  # the first minimum, as MATLAB's min


def aggd_fit(x: np.ndarray) -> tuple[float, float, float, float]:
    """``(alpha, eta, sigma_l, sigma_r)`` of an asymmetric generalised Gaussian fitted to ``x``.

    ``estimateaggdparam.m``: left ``x < 0``, right ``x > 0`` (zeros in neither), shape by
    least-squares match over the grid; ``eta`` the mean (Eq. 8 of the paper). ``alpha`` and
    ``eta`` are NaN when a side is empty.
    """
    sigma_l, sigma_r = _rms(x[x < 0]), _rms(x[x > 0])
    if not (sigma_l > 0 and sigma_r > 0):  # NaN (empty side) compares False
        return math.nan, math.nan, sigma_l, sigma_r
    g = sigma_l / sigma_r
    r_hat = float(np.mean(np.abs(x))) ** 2 / float(np.mean(x * x))
    r_norm = r_hat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    alpha = float(_ALPHAS[np.argmin((_R_AGGD - r_norm) ** 2)])
    eta = (sigma_r - sigma_l) * gamma(2 / alpha) / gamma(1 / alpha) * np.sqrt(gamma(1 / alpha) / gamma(3 / alpha))
    return alpha, float(eta), sigma_l, sigma_r


def brisque_features(grey: np.ndarray) -> np.ndarray:
    """The 18 features of one scale of a grey image ``(H, W)`` on the 0..255 scale -> ``(18,)``."""
    m = mscn(grey)
    feats = list(ggd_fit(m))
    for shift in _SHIFTS:
        alpha, eta, sl, sr = aggd_fit(m * np.roll(m, shift, axis=(0, 1)))  # circshift
        feats += [alpha, eta, sl**2, sr**2]
    return np.array(feats, dtype=np.float64)


def brisque_grey(grey: np.ndarray, model: BrisqueModel | None = None) -> float:
    """BRISQUE score of one grey image ``(H, W)`` float64 on the 0..255 scale (``brisquescore.m``).

    NaN for a constant image (the fits are undefined).
    """
    if grey.min() == grey.max():
        return float("nan")
    model = model or load_model()
    feats = np.concatenate([brisque_features(grey), brisque_features(matlab_imresize_half(grey))])
    scaled = -1 + 2 * (feats - model.feat_min) / (model.feat_max - model.feat_min)  # svm-scale
    k = np.exp(-model.gamma * ((model.support_vectors - scaled[None, :]) ** 2).sum(1))
    return float(model.coefs @ k - model.rho)


def rgb2gray_matlab(rgb8: np.ndarray) -> np.ndarray:
    """MATLAB ``rgb2gray`` of 8-bit RGB values ``(..., 3)`` -> ``(...)`` float64 integers in [0, 255]."""
    return np.floor(rgb8 @ MATLAB_RGB2GRAY + 0.5)  # uint8 output: rounded half up


def _check_images(img: torch.Tensor) -> None:
    check_image_batch(img, "brisque", min_size=MIN_SIZE)


def brisque(img: torch.Tensor) -> torch.Tensor:
    """BRISQUE of each image in a batch; lower = better (the raw metric, not a reward).

    Args:
        img: ``(B, 3, H, W)`` float RGB in [0, 1], at least 16x16. Any device; computed on the
            CPU in NumPy. Quantised to 8 bits first, as the release reads 8-bit images.

    Returns:
        ``(B,)`` float32 on ``img``'s device; nominally [0, 100] but not clipped (strong
        distortions or synthetic images can exceed 100); NaN for a constant image.
    """
    _check_images(img)
    model = load_model()
    rgb8 = torch.floor(img.detach().to("cpu", torch.float64).clamp(0, 1) * 255 + 0.5)  # im2uint8
    greys = rgb2gray_matlab(rgb8.permute(0, 2, 3, 1).numpy())
    scores = [brisque_grey(g, model) for g in greys]
    return torch.tensor(scores, dtype=torch.float32, device=img.device)
