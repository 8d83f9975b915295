"""Real-ESRGAN second-order degradation: HR (3, H, W) -> LR (3, H/s, W/s), every choice recorded.

Follows Real-ESRGAN (Wang et al., "Real-ESRGAN: Training Real-World Blind Super-Resolution with
Pure Synthetic Data", ICCVW 2021, Sec. 3 and Fig. 2) as configured in BasicSR's
``train_realesrgan_x4plus.yml``; our own code, written from the paper and the known behaviour of
BasicSR's ``random_mixed_kernels``, ``circular_lowpass_kernel``, ``random_add_gaussian_noise_pt``,
``random_add_poisson_noise_pt`` and ``RealESRGANModel.feed_data``.

The pipeline (all steps on float32 images in [0, 1]):

    round 1: blur (always) -> random resize -> noise -> JPEG
    round 2: blur (p=0.8)  -> random resize -> noise
    final:   either [resize to H/s x W/s + sinc filter] then JPEG,
             or     JPEG then [resize to H/s x W/s + sinc filter]      (50/50)
    quantise to 8 bit (round, clamp)

As in Real-ESRGAN, round 2's JPEG *is* the final JPEG (quality from ``round2.jpeg_range``), and
round 2's resize is relative to the target LR size, not to the current size.

Deliberate differences from BasicSR (all small):
- JPEG through OpenCV (integer quality, 4:2:0 chroma) instead of the differentiable DiffJPEG.
- Resizes go to an explicit integer size (at least 1 px), so tiny inputs never break.
- A generalised/plateau shape exponent is drawn 50/50 below/above 1 only when its range
  straddles 1 (BasicSR always does, which puts half the mass of the plateau range [1, 2] on
  exactly 1); otherwise uniformly over the range.
- Real-ESRGAN degrades an unsharp-masked HR; we degrade the HR itself, so that LR, SR and HR
  in a data-set triplet refer to the same image.
- Blur through OpenCV (same reflect borders as BasicSR's ``filter2D``, ~10x faster on CPU);
  OpenCV filters larger kernels via DFT, equal to direct filtering to ~1e-6.
- Resizes are our own separable area / bilinear / bicubic with ``F.interpolate`` semantics
  (equal to it to ~1e-5): torch's bilinear upsampling changes its last bits with the thread
  count, and a data-set build must not depend on ``--workers``.

Cost: a 256x256 -> 64x64 degradation takes ~11 ms median (p95 ~25 ms) on one CPU core.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Callable

import numpy as np
import torch

from finpercep.checks import require
from finpercep.types import Params

SUPPORTED_SCALES = (2, 4)
RESIZE_MODES = ("area", "bilinear", "bicubic")
RESIZE_DIRECTIONS = ("up", "down", "keep")
_ODD_SIZES_7_TO_21 = tuple(range(7, 22, 2))
# ITU-R BT.601 luma weights (as torchvision's rgb_to_grayscale, used by BasicSR's Poisson noise).
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def _check_range(name: str, rng: tuple[float, float], lo: float | None = None, hi: float | None = None) -> None:
    """Raise ValueError unless ``rng`` is an ordered pair inside [lo, hi]."""
    if len(rng) != 2:
        raise ValueError(f"{name} must be a (low, high) pair, got {rng!r}")
    a, b = rng
    if not (math.isfinite(a) and math.isfinite(b)) or a > b:
        raise ValueError(f"{name} must be an ordered (low, high) pair of finite numbers, got {rng!r}")
    if (lo is not None and a < lo) or (hi is not None and b > hi):
        raise ValueError(f"{name}={rng!r} must lie within [{lo}, {hi}]")


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")


def _check_distribution(name: str, probs: tuple[float, ...], n: int) -> None:
    if len(probs) != n:
        raise ValueError(f"{name} needs {n} probabilities, got {len(probs)}: {probs!r}")
    if any(p < 0 for p in probs) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
        raise ValueError(f"{name} must be non-negative and sum to 1, got {probs!r} (sum {sum(probs)})")


def _check_sizes(name: str, sizes: tuple[int, ...]) -> None:
    if not sizes or any(int(k) != k or k < 1 or k % 2 == 0 for k in sizes):
        raise ValueError(f"{name} must be a non-empty tuple of odd positive integers, got {sizes!r}")


def _check_modes(name: str, modes: tuple[str, ...]) -> None:
    if not modes or any(m not in RESIZE_MODES for m in modes):
        raise ValueError(f"{name} must be a non-empty subset of {RESIZE_MODES}, got {modes!r}")


@dataclass(frozen=True)
class KernelConfig:
    """How one blur kernel is drawn (BasicSR ``random_mixed_kernels`` + sinc; Real-ESRGAN Sec. 3.1)."""

    kinds: tuple[str, ...] = (
        "iso",
        "aniso",
        "generalized_iso",
        "generalized_aniso",
        "plateau_iso",
        "plateau_aniso",
    )
    """Kernel kinds drawn when no sinc is drawn; names from ``KERNEL_KINDS``."""
    kind_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    """Probability of each entry of ``kinds`` (sums to 1)."""
    sizes: tuple[int, ...] = _ODD_SIZES_7_TO_21
    """Kernel side lengths in pixels (odd), drawn uniformly."""
    sigma_range: tuple[float, float] = (0.2, 3.0)
    """Standard deviation (pixels) of the Gaussian-family kernels, per principal axis."""
    rotation_range: tuple[float, float] = (-math.pi, math.pi)
    """Rotation angle (radians) of anisotropic kernels."""
    betag_range: tuple[float, float] = (0.5, 4.0)
    """Shape exponent of the generalised Gaussian exp(-0.5 * q^beta) (q = x^T Sigma^-1 x)."""
    betap_range: tuple[float, float] = (1.0, 2.0)
    """Shape exponent of the plateau kernel 1 / (1 + q^beta)."""
    sinc_prob: float = 0.1
    """Probability that the kernel is a sinc (circular low-pass) instead of one of ``kinds``."""
    sinc_omega_small: tuple[float, float] = (math.pi / 3, math.pi)
    """Sinc cut-off frequency (radians/pixel) for kernels smaller than ``sinc_size_threshold``."""
    sinc_omega_large: tuple[float, float] = (math.pi / 5, math.pi)
    """Sinc cut-off frequency (radians/pixel) for kernels of at least ``sinc_size_threshold``."""
    sinc_size_threshold: int = 13
    """Kernel size from which the lower cut-offs of ``sinc_omega_large`` are allowed."""

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in KERNEL_KINDS]
        if unknown:
            raise ValueError(f"unknown kernel kinds {unknown}; choose from {sorted(KERNEL_KINDS)}")
        _check_distribution("kind_probs", self.kind_probs, len(self.kinds))
        _check_sizes("sizes", self.sizes)
        _check_range("sigma_range", self.sigma_range, lo=1e-3)
        _check_range("rotation_range", self.rotation_range)
        _check_range("betag_range", self.betag_range, lo=1e-3)
        _check_range("betap_range", self.betap_range, lo=1e-3)
        _check_prob("sinc_prob", self.sinc_prob)
        _check_range("sinc_omega_small", self.sinc_omega_small, lo=1e-3, hi=math.pi)
        _check_range("sinc_omega_large", self.sinc_omega_large, lo=1e-3, hi=math.pi)


@dataclass(frozen=True)
class RoundConfig:
    """One degradation round (Real-ESRGAN Sec. 3.1-3.2): blur -> resize -> noise -> JPEG."""

    blur_prob: float = 1.0
    """Probability that the round blurs at all (Real-ESRGAN: 1 in round 1, 0.8 in round 2)."""
    kernel: KernelConfig = field(default_factory=KernelConfig)
    """How the blur kernel is drawn."""
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)
    """Probabilities of resizing up / down / keeping the size."""
    resize_range: tuple[float, float] = (0.15, 1.5)
    """Resize factor range: 'up' draws from [1, high], 'down' from [low, 1]. Round 1 scales the
    current image; round 2 scales the target LR size (H/s, W/s), as in Real-ESRGAN."""
    resize_modes: tuple[str, ...] = RESIZE_MODES
    """Interpolation modes (torch ``F.interpolate`` semantics, no anti-aliasing), drawn uniformly."""
    gaussian_noise_prob: float = 0.5
    """Probability of Gaussian noise; otherwise Poisson noise."""
    noise_sigma_range: tuple[float, float] = (1.0, 30.0)
    """Gaussian noise standard deviation in 8-bit grey levels (divided by 255 when applied)."""
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    """Multiplier of the Poisson (shot) noise drawn at 8-bit photon counts."""
    gray_noise_prob: float = 0.4
    """Probability that the noise is the same on all three channels (grey) rather than colour."""
    jpeg_range: tuple[int, int] = (30, 95)
    """JPEG quality (integer, both ends inclusive). Round 2's range is used by the final JPEG."""

    def __post_init__(self) -> None:
        _check_prob("blur_prob", self.blur_prob)
        _check_distribution("resize_probs", self.resize_probs, 3)
        _check_range("resize_range", self.resize_range, lo=1e-3)
        if not self.resize_range[0] <= 1.0 <= self.resize_range[1]:
            raise ValueError(f"resize_range must contain 1 (down from low, up to high), got {self.resize_range!r}")
        _check_modes("resize_modes", self.resize_modes)
        _check_prob("gaussian_noise_prob", self.gaussian_noise_prob)
        _check_range("noise_sigma_range", self.noise_sigma_range, lo=0.0)
        _check_range("poisson_scale_range", self.poisson_scale_range, lo=0.0)
        _check_prob("gray_noise_prob", self.gray_noise_prob)
        _check_range("jpeg_range", self.jpeg_range, lo=1, hi=100)
        if any(int(q) != q for q in self.jpeg_range):
            raise ValueError(f"jpeg_range must hold integers, got {self.jpeg_range!r}")


def _second_round() -> RoundConfig:
    """Real-ESRGAN x4plus second-round defaults: milder blur, resize and noise."""
    return RoundConfig(
        blur_prob=0.8,
        kernel=KernelConfig(sigma_range=(0.2, 1.5)),
        resize_probs=(0.3, 0.4, 0.3),
        resize_range=(0.3, 1.2),
        noise_sigma_range=(1.0, 25.0),
        poisson_scale_range=(0.05, 2.5),
    )


@dataclass(frozen=True)
class DegradationConfig:
    """Real-ESRGAN second-order degradation; defaults are the x4plus training settings.

    Build from YAML/JSON with :meth:`from_dict` (unknown keys are errors); record with :meth:`to_dict`.
    """

    round1: RoundConfig = field(default_factory=RoundConfig)
    """First degradation round (blur always; strong resize range and noise)."""
    round2: RoundConfig = field(default_factory=_second_round)
    """Second round (milder); its ``jpeg_range`` is the final JPEG's."""
    final_sinc_prob: float = 0.8
    """Probability of the final sinc (circular low-pass) filter; otherwise no final filter."""
    final_sinc_sizes: tuple[int, ...] = _ODD_SIZES_7_TO_21
    """Side lengths (odd pixels) of the final sinc kernel, drawn uniformly."""
    final_sinc_omega_range: tuple[float, float] = (math.pi / 3, math.pi)
    """Cut-off frequency (radians/pixel) of the final sinc filter."""
    final_resize_modes: tuple[str, ...] = RESIZE_MODES
    """Interpolation modes for the resize to the target LR size, drawn uniformly."""
    final_jpeg_first_prob: float = 0.5
    """Probability of the order JPEG -> [resize + sinc] (else [resize + sinc] -> JPEG)."""

    def __post_init__(self) -> None:
        for name in ("round1", "round2"):
            if not isinstance(getattr(self, name), RoundConfig):
                raise ValueError(f"{name} must be a RoundConfig, got {type(getattr(self, name)).__name__}")
        _check_prob("final_sinc_prob", self.final_sinc_prob)
        _check_sizes("final_sinc_sizes", self.final_sinc_sizes)
        _check_range("final_sinc_omega_range", self.final_sinc_omega_range, lo=1e-3, hi=math.pi)
        _check_modes("final_resize_modes", self.final_resize_modes)
        _check_prob("final_jpeg_first_prob", self.final_jpeg_first_prob)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), JSON-serialisable."""
        return _tuples_to_lists(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DegradationConfig:
        """Inverse of :meth:`to_dict`; missing keys take defaults, unknown keys raise ValueError."""
        return _from_dict(cls, d, "DegradationConfig")


def _tuples_to_lists(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _tuples_to_lists(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_tuples_to_lists(v) for v in x]
    return x


def _from_dict(cls: type, d: dict[str, Any], where: str) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; known: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    defaults = cls()
    for name, value in d.items():
        current = getattr(defaults, name)
        if is_dataclass(current):
            kwargs[name] = _from_dict(type(current), value, f"{where}.{name}")
        elif isinstance(current, tuple):
            kwargs[name] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Blur kernels (BasicSR degradations.py semantics; Real-ESRGAN Sec. 3.1)
# --------------------------------------------------------------------------------------------


def _grid(size: int) -> np.ndarray:
    """(size, size, 2) float64 pixel offsets (x, y) from the kernel centre."""
    ax = np.arange(size, dtype=np.float64) - (size - 1) / 2
    xx, yy = np.meshgrid(ax, ax)  # xx varies along columns (x), yy along rows (y)
    return np.stack([xx, yy], axis=-1)


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """q = d^T Sigma^-1 d over the grid, Sigma = R diag(sigma_x^2, sigma_y^2) R^T, R rotation(theta)."""
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    cov = rot @ np.diag([sigma_x**2, sigma_y**2]) @ rot.T
    d = _grid(size)
    return np.einsum("...i,ij,...j->...", d, np.linalg.inv(cov), d)


def _normalise(k: np.ndarray) -> np.ndarray:
    return (k / k.sum()).astype(np.float32)


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """Bivariate Gaussian exp(-q/2), (size, size) float32 summing to 1."""
    return _normalise(np.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, theta)))


def generalized_gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> np.ndarray:
    """Generalised Gaussian exp(-0.5 q^beta) (Real-ESRGAN Eq. 3 family); beta<1 heavier tails."""
    return _normalise(np.exp(-0.5 * np.power(_quadratic_form(size, sigma_x, sigma_y, theta), beta)))


def plateau_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> np.ndarray:
    """Plateau-shaped kernel 1 / (1 + q^beta) (Real-ESRGAN Sec. 3.1): flat top, soft shoulders."""
    return _normalise(1.0 / (np.power(_quadratic_form(size, sigma_x, sigma_y, theta), beta) + 1.0))


def circular_lowpass_kernel(size: int, omega_c: float) -> np.ndarray:
    """2-D sinc: ideal circular low-pass with cut-off ``omega_c`` rad/px (Real-ESRGAN Eq. 4).

    k(r) = omega_c * J1(omega_c r) / (2 pi r), k(0) = omega_c^2 / (4 pi), truncated to
    (size, size) and normalised to sum 1. Has negative lobes (ringing is the point).
    """
    special = require("scipy.special", extra="data")
    r = np.hypot(*np.moveaxis(_grid(size), -1, 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        k = omega_c * special.j1(omega_c * r) / (2 * np.pi * r)
    k[r == 0] = omega_c**2 / (4 * np.pi)
    return _normalise(k)


def _uniform(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(rng.uniform(lo_hi[0], lo_hi[1]))


def _draw_beta(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    """Shape exponent: 50/50 from [lo, 1) or [1, hi] when the range straddles 1 (BasicSR), else uniform."""
    lo, hi = lo_hi
    if lo < 1.0 < hi:
        return _uniform(rng, (lo, 1.0)) if rng.uniform() < 0.5 else _uniform(rng, (1.0, hi))
    return _uniform(rng, lo_hi)


def _draw_shape(rng: np.random.Generator, cfg: KernelConfig, isotropic: bool) -> dict[str, float]:
    if isotropic:
        s = _uniform(rng, cfg.sigma_range)
        return {"sigma_x": s, "sigma_y": s, "theta": 0.0}
    return {
        "sigma_x": _uniform(rng, cfg.sigma_range),
        "sigma_y": _uniform(rng, cfg.sigma_range),
        "theta": _uniform(rng, cfg.rotation_range),
    }


KernelFn = Callable[[np.random.Generator, int, KernelConfig], tuple[np.ndarray, Params]]


def random_iso_kernel(rng: np.random.Generator, size: int, cfg: KernelConfig) -> tuple[np.ndarray, Params]:
    """Isotropic Gaussian, sigma ~ U(sigma_range)."""
    p: Params = {"kind": "iso", "size": size, **_draw_shape(rng, cfg, isotropic=True)}
    return make_kernel(p), p


def random_aniso_kernel(rng: np.random.Generator, size: int, cfg: KernelConfig) -> tuple[np.ndarray, Params]:
    """Anisotropic Gaussian, sigma_x, sigma_y ~ U(sigma_range), theta ~ U(rotation_range)."""
    p: Params = {"kind": "aniso", "size": size, **_draw_shape(rng, cfg, isotropic=False)}
    return make_kernel(p), p


def random_generalized_iso_kernel(rng: np.random.Generator, size: int, cfg: KernelConfig) -> tuple[np.ndarray, Params]:
    """Isotropic generalised Gaussian, beta from ``betag_range``."""
    p: Params = {"kind": "generalized_iso", "size": size, **_draw_shape(rng, cfg, isotropic=True)}
    p["beta"] = _draw_beta(rng, cfg.betag_range)
    return make_kernel(p), p


def random_generalized_aniso_kernel(
    rng: np.random.Generator, size: int, cfg: KernelConfig
) -> tuple[np.ndarray, Params]:
    """Anisotropic generalised Gaussian, beta from ``betag_range``."""
    p: Params = {"kind": "generalized_aniso", "size": size, **_draw_shape(rng, cfg, isotropic=False)}
    p["beta"] = _draw_beta(rng, cfg.betag_range)
    return make_kernel(p), p


def random_plateau_iso_kernel(rng: np.random.Generator, size: int, cfg: KernelConfig) -> tuple[np.ndarray, Params]:
    """Isotropic plateau kernel, beta from ``betap_range``."""
    p: Params = {"kind": "plateau_iso", "size": size, **_draw_shape(rng, cfg, isotropic=True)}
    p["beta"] = _draw_beta(rng, cfg.betap_range)
    return make_kernel(p), p


def random_plateau_aniso_kernel(rng: np.random.Generator, size: int, cfg: KernelConfig) -> tuple[np.ndarray, Params]:
    """Anisotropic plateau kernel, beta from ``betap_range``."""
    p: Params = {"kind": "plateau_aniso", "size": size, **_draw_shape(rng, cfg, isotropic=False)}
    p["beta"] = _draw_beta(rng, cfg.betap_range)
    return make_kernel(p), p


def random_sinc_kernel(rng: np.random.Generator, size: int, cfg: KernelConfig) -> tuple[np.ndarray, Params]:
    """Circular low-pass; omega_c from ``sinc_omega_small`` below ``sinc_size_threshold``, else ``_large``."""
    omega_range = cfg.sinc_omega_small if size < cfg.sinc_size_threshold else cfg.sinc_omega_large
    p: Params = {"kind": "sinc", "size": size, "omega_c": _uniform(rng, omega_range)}
    return make_kernel(p), p


KERNEL_KINDS: dict[str, KernelFn] = {
    "iso": random_iso_kernel,
    "aniso": random_aniso_kernel,
    "generalized_iso": random_generalized_iso_kernel,
    "generalized_aniso": random_generalized_aniso_kernel,
    "plateau_iso": random_plateau_iso_kernel,
    "plateau_aniso": random_plateau_aniso_kernel,
    "sinc": random_sinc_kernel,
}
"""Kernel kind name -> ``fn(rng, size, cfg) -> (kernel (size, size) float32 sum 1, params)``."""

ISOTROPIC_KINDS = frozenset({"iso", "generalized_iso", "plateau_iso", "sinc"})


def make_kernel(params: Params) -> np.ndarray:
    """Rebuild a kernel exactly from its recorded params (``{"kind", "size", ...}``)."""
    kind, size = params["kind"], int(params["size"])
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be odd and positive, got {size}")
    if kind == "sinc":
        return circular_lowpass_kernel(size, params["omega_c"])
    shape = (size, params["sigma_x"], params["sigma_y"], params["theta"])
    if kind in ("iso", "aniso"):
        return gaussian_kernel(*shape)
    if kind in ("generalized_iso", "generalized_aniso"):
        return generalized_gaussian_kernel(*shape, params["beta"])
    if kind in ("plateau_iso", "plateau_aniso"):
        return plateau_kernel(*shape, params["beta"])
    raise ValueError(f"unknown kernel kind {kind!r}; choose from {sorted(KERNEL_KINDS)}")


def random_kernel(rng: np.random.Generator, cfg: KernelConfig = KernelConfig()) -> tuple[np.ndarray, Params]:
    """Draw size, then sinc (p = ``sinc_prob``) or a kind from ``kinds`` (BasicSR ``random_mixed_kernels``).

    Returns ``(kernel (k, k) float32 summing to 1, params)``; ``make_kernel(params)`` rebuilds it.
    """
    size = int(rng.choice(cfg.sizes))
    if rng.uniform() < cfg.sinc_prob:
        kind = "sinc"
    else:
        kind = cfg.kinds[int(rng.choice(len(cfg.kinds), p=cfg.kind_probs))]
    return KERNEL_KINDS[kind](rng, size, cfg)


# --------------------------------------------------------------------------------------------
# Image operations. Internally on (h, w, 3) float32 numpy arrays (OpenCV's layout); the public
# wrappers take and return (3, h, w) float32 tensors. Every operation gives the same bits for any
# torch/OpenCV thread count, so a data-set build does not depend on --workers.
# --------------------------------------------------------------------------------------------


def _to_hwc(img: torch.Tensor) -> np.ndarray:
    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"expected a (3, h, w) image tensor, got shape {tuple(img.shape)}")
    return np.ascontiguousarray(img.detach().cpu().float().permute(1, 2, 0).numpy())


def _to_chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _filter_hwc(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    cv2 = require("cv2", extra="data")
    out = cv2.filter2D(x, -1, np.asarray(kernel, dtype=np.float32), borderType=cv2.BORDER_REFLECT_101)
    return out.reshape(x.shape)  # OpenCV drops a trailing axis of size 1; keep (h, w, c)


def filter2d(img: torch.Tensor, kernel: np.ndarray) -> torch.Tensor:
    """Filter each channel of (3, h, w) with a (k, k) kernel (BasicSR ``filter2D``).

    Borders reflect without repeating the edge pixel (torch 'reflect' = OpenCV
    ``BORDER_REFLECT_101``), also for images smaller than the kernel. OpenCV correlates; every
    kernel here is point-symmetric, so that equals convolution. OpenCV rather than ``F.conv2d``:
    its 21x21 filter is ~10x faster on CPU.
    """
    return _to_chw(_filter_hwc(_to_hwc(img), kernel))


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> list[np.ndarray]:
    """Keys cubic-convolution weights of taps -1, 0, 1, 2 at fractional offset t (torch's A = -0.75)."""

    def near(d: np.ndarray) -> np.ndarray:  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d: np.ndarray) -> np.ndarray:  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _resize_axis(x: np.ndarray, n_out: int, axis: int, mode: str) -> np.ndarray:
    """Resize one axis with ``F.interpolate`` semantics (align_corners=False, no anti-aliasing).

    Taps are gathered and summed element-wise in a fixed order (no BLAS, no threads), so the result
    does not depend on thread counts; it matches torch to ~1e-6 (torch's own bilinear upsampling
    changes its last bits with ``torch.set_num_threads``, which is why we do not call it).
    """
    n_in = x.shape[axis]
    if n_in == n_out:
        return x
    i = np.arange(n_out, dtype=np.int64)
    if mode == "area":  # torch adaptive_avg_pool: mean over [floor(i*n/m), ceil((i+1)*n/m))
        start = (i * n_in) // n_out
        stop = ((i + 1) * n_in + n_out - 1) // n_out
        csum = np.cumsum(x, axis=axis, dtype=np.float64)
        csum = np.concatenate([np.zeros_like(np.take(csum, [0], axis=axis)), csum], axis=axis)
        count = (stop - start).astype(np.float64).reshape([-1 if d == axis else 1 for d in range(x.ndim)])
        return ((np.take(csum, stop, axis=axis) - np.take(csum, start, axis=axis)) / count).astype(np.float32)
    src = (i + 0.5) * (n_in / n_out) - 0.5
    if mode == "bilinear":
        src = np.maximum(src, 0.0)
        i0 = np.floor(src).astype(np.int64)
        frac = np.minimum(src - i0, 1.0)
        taps, weights = [i0, np.minimum(i0 + 1, n_in - 1)], [1.0 - frac, frac]
    elif mode == "bicubic":
        i0 = np.floor(src).astype(np.int64)
        taps = [np.clip(i0 + d, 0, n_in - 1) for d in (-1, 0, 1, 2)]
        weights = _cubic_weights(src - i0)
    else:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    shape = [-1 if d == axis else 1 for d in range(x.ndim)]
    out = np.zeros([n_out if d == axis else s for d, s in enumerate(x.shape)], dtype=np.float32)
    for tap, wt in zip(taps, weights):
        out += np.take(x, tap, axis=axis) * wt.astype(np.float32).reshape(shape)
    return out


def _resize_hwc(x: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if min(size) < 1:
        raise ValueError(f"resize target must be at least 1x1, got {size}")
    return _resize_axis(_resize_axis(x, int(size[0]), 0, mode), int(size[1]), 1, mode)


def resize(img: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize (3, h, w) to ``size`` = (h', w') like ``F.interpolate(mode=mode)`` (area / bilinear /
    bicubic, align_corners=False, no anti-aliasing: aliasing is part of the degradation)."""
    return _to_chw(_resize_hwc(_to_hwc(img), size, mode))


def _gaussian_noise_hwc(x: np.ndarray, sigma: float, gray: bool, rng: np.random.Generator) -> np.ndarray:
    h, w, _ = x.shape
    noise = rng.standard_normal((h, w, 1 if gray else 3), dtype=np.float32) * np.float32(sigma / 255.0)
    return np.clip(x + noise, 0.0, 1.0)


def add_gaussian_noise(img: torch.Tensor, sigma: float, gray: bool, rng: np.random.Generator) -> torch.Tensor:
    """(3, h, w) + N(0, (sigma/255)^2), one field shared by all channels if ``gray``; clipped to [0, 1]
    (BasicSR ``random_add_gaussian_noise_pt``)."""
    return _to_chw(_gaussian_noise_hwc(_to_hwc(img), sigma, gray, rng))


def _poisson_noise_hwc(x: np.ndarray, scale: float, gray: bool, rng: np.random.Generator) -> np.ndarray:
    src = (x @ _LUMA)[..., None] if gray else x  # (h, w, 1) luma or (h, w, 3)
    q = np.clip(np.round(src * 255.0), 0, 255)  # 8-bit levels
    levels = int(np.count_nonzero(np.bincount(q.astype(np.int64).ravel(), minlength=256)))
    vals = float(2 ** math.ceil(math.log2(max(levels, 1))))  # photon count of a full-scale pixel
    q = q / 255.0
    noise = (rng.poisson(q * vals) / vals - q).astype(np.float32) * np.float32(scale)
    return np.clip(x + noise, 0.0, 1.0)


def add_poisson_noise(img: torch.Tensor, scale: float, gray: bool, rng: np.random.Generator) -> torch.Tensor:
    """Shot noise at 8-bit photon counts, times ``scale`` (BasicSR ``random_add_poisson_noise_pt``).

    The image (its luma if ``gray``) is quantised to 8 bit; its number of distinct levels rounded
    up to a power of two, ``vals``, is the photon count of a white pixel; noise =
    Poisson(x * vals) / vals - x, so its variance grows with brightness. Clipped to [0, 1].
    """
    return _to_chw(_poisson_noise_hwc(_to_hwc(img), scale, gray, rng))


def _jpeg_hwc(x: np.ndarray, quality: int) -> np.ndarray:
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality!r}")
    cv2 = require("cv2", extra="data")
    u8 = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)  # round, not truncate
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(u8[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - OpenCV failure
        raise RuntimeError("OpenCV failed to JPEG-encode the image")
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].astype(np.float32) / np.float32(255.0)


def jpeg_compress(img: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG round trip of (3, h, w) in [0, 1] at integer ``quality`` in [1, 100] (OpenCV/libjpeg,
    4:2:0 chroma; Real-ESRGAN uses a differentiable JPEG with the same role)."""
    return _to_chw(_jpeg_hwc(_to_hwc(img), quality))


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


def _choice(rng: np.random.Generator, options: tuple[str, ...], probs: tuple[float, ...] | None = None) -> str:
    return options[int(rng.choice(len(options), p=probs))]


def _random_blur(x: np.ndarray, cfg: RoundConfig, rng: np.random.Generator) -> tuple[np.ndarray, Params | None]:
    if rng.uniform() >= cfg.blur_prob:
        return x, None
    kernel, p = random_kernel(rng, cfg.kernel)
    return _filter_hwc(x, kernel), p


def _random_resize(
    x: np.ndarray, base: tuple[int, int], cfg: RoundConfig, rng: np.random.Generator
) -> tuple[np.ndarray, Params]:
    """Resize ``base`` (h, w) by a random factor; Real-ESRGAN Sec. 3.1 'resize'."""
    direction = _choice(rng, RESIZE_DIRECTIONS, cfg.resize_probs)
    lo, hi = cfg.resize_range
    if direction == "up":
        factor = _uniform(rng, (1.0, hi))
    elif direction == "down":
        factor = _uniform(rng, (lo, 1.0))
    else:
        factor = 1.0
    mode = _choice(rng, cfg.resize_modes)
    size = (max(1, int(base[0] * factor)), max(1, int(base[1] * factor)))
    p: Params = {"direction": direction, "factor": factor, "mode": mode, "size": list(size)}
    return _resize_hwc(x, size, mode), p


def _random_noise(x: np.ndarray, cfg: RoundConfig, rng: np.random.Generator) -> tuple[np.ndarray, Params]:
    """Gaussian or Poisson, colour or grey (Real-ESRGAN Sec. 3.1 'noise')."""
    gaussian = bool(rng.uniform() < cfg.gaussian_noise_prob)
    if gaussian:
        sigma = _uniform(rng, cfg.noise_sigma_range)
        gray = bool(rng.uniform() < cfg.gray_noise_prob)
        return _gaussian_noise_hwc(x, sigma, gray, rng), {"kind": "gaussian", "sigma": sigma, "gray": gray}
    scale = _uniform(rng, cfg.poisson_scale_range)
    gray = bool(rng.uniform() < cfg.gray_noise_prob)
    return _poisson_noise_hwc(x, scale, gray, rng), {"kind": "poisson", "scale": scale, "gray": gray}


def _random_quality(rng: np.random.Generator, jpeg_range: tuple[int, int]) -> int:
    return int(rng.integers(int(jpeg_range[0]), int(jpeg_range[1]) + 1))


def _check_input(hr: torch.Tensor, scale: int) -> None:
    if not isinstance(hr, torch.Tensor):
        raise ValueError(f"degrade expects a torch.Tensor (3, H, W), got {type(hr).__name__}")
    if hr.ndim != 3 or hr.shape[0] != 3:
        raise ValueError(f"degrade expects an RGB image tensor of shape (3, H, W), got {tuple(hr.shape)}")
    if not hr.is_floating_point():
        raise ValueError(f"degrade expects a float tensor in [0, 1], got dtype {hr.dtype}")
    if isinstance(scale, bool) or scale not in SUPPORTED_SCALES:
        raise ValueError(f"scale must be one of {SUPPORTED_SCALES}, got {scale!r}")
    h, w = hr.shape[1:]
    if h % scale or w % scale:
        raise ValueError(f"HR size {h}x{w} is not divisible by scale {scale}; crop it to a multiple of {scale}")
    if not torch.isfinite(hr).all():
        raise ValueError("HR image contains NaN or infinite values")
    lo, hi = float(hr.min()), float(hr.max())
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise ValueError(f"HR values must lie in [0, 1], got range [{lo:.4f}, {hi:.4f}]")


def degrade(
    hr: torch.Tensor, scale: int, rng: np.random.Generator, cfg: DegradationConfig = DegradationConfig()
) -> tuple[torch.Tensor, Params]:
    """Real-ESRGAN second-order degradation (Wang et al. 2021, Sec. 3, Fig. 2).

    Args:
        hr: (3, H, W) float in [0, 1], RGB; H and W divisible by ``scale``.
        scale: 2 or 4.
        rng: the only source of randomness; the same seed gives a bit-identical result.
        cfg: ranges and probabilities (defaults: Real-ESRGAN x4plus).

    Returns:
        ``(lr, params)``: lr (3, H/scale, W/scale) float32 in [0, 1], on hr's device, exactly
        representable in 8 bit; params a JSON-serialisable record of every random choice::

            {"scale", "hr_size": [H, W],
             "round1": {"blur": kernel params | None, "resize": {...}, "noise": {...}, "jpeg": {"quality"}},
             "round2": {"blur": ..., "resize": ..., "noise": ...},
             "final":  {"order": [...], "resize_mode", "sinc": kernel params | None, "jpeg": {"quality"}}}
    """
    _check_input(hr, scale)
    h, w = int(hr.shape[1]), int(hr.shape[2])
    target = (h // scale, w // scale)
    x = np.clip(_to_hwc(hr), 0.0, 1.0)  # (H, W, 3) float32

    # Round 1: blur -> resize (relative to the current size) -> noise -> JPEG.
    x, blur1 = _random_blur(x, cfg.round1, rng)
    x, resize1 = _random_resize(x, (h, w), cfg.round1, rng)
    x, noise1 = _random_noise(x, cfg.round1, rng)
    q1 = _random_quality(rng, cfg.round1.jpeg_range)
    x = _jpeg_hwc(x, q1)

    # Round 2: blur -> resize (relative to the target LR size) -> noise; its JPEG is the final one.
    x, blur2 = _random_blur(x, cfg.round2, rng)
    x, resize2 = _random_resize(x, target, cfg.round2, rng)
    x, noise2 = _random_noise(x, cfg.round2, rng)

    # Final: [resize to target + sinc] and JPEG, in random order (Real-ESRGAN Sec. 3.2: other
    # orders "introduce twisted lines").
    jpeg_first = bool(rng.uniform() < cfg.final_jpeg_first_prob)
    mode = _choice(rng, cfg.final_resize_modes)
    sinc: Params | None = None
    if rng.uniform() < cfg.final_sinc_prob:
        size = int(rng.choice(cfg.final_sinc_sizes))
        sinc = {"kind": "sinc", "size": size, "omega_c": _uniform(rng, cfg.final_sinc_omega_range)}
    q2 = _random_quality(rng, cfg.round2.jpeg_range)
    if jpeg_first:
        x = _jpeg_hwc(x, q2)
    x = _resize_hwc(x, target, mode)
    if sinc is not None:
        x = _filter_hwc(x, make_kernel(sinc))
    if not jpeg_first:
        x = _jpeg_hwc(x, q2)
    x = np.round(np.clip(x, 0.0, 1.0) * np.float32(255.0)) / np.float32(255.0)  # exact 8-bit values

    order = ["jpeg", "resize", "sinc"] if jpeg_first else ["resize", "sinc", "jpeg"]
    params: Params = {
        "scale": int(scale),
        "hr_size": [h, w],
        "round1": {"blur": blur1, "resize": resize1, "noise": noise1, "jpeg": {"quality": q1}},
        "round2": {"blur": blur2, "resize": resize2, "noise": noise2},
        "final": {"order": order, "resize_mode": mode, "sinc": sinc, "jpeg": {"quality": q2}},
    }
    return _to_chw(x.astype(np.float32)).to(hr.device), params
