"""Procedural generative-SR artifacts and classic interpolation, as SR families.

Two kinds of entries for the SR zoo (``finpercep.types.SRFamily``):

* **procedural** families inject one typical artifact of generative (GAN / diffusion) SR into the
  *HR* image, with a controlled ``severity`` in [0, 1]. The region swap then differs from HR by the
  artifact only, so the ground-truth map measures exactly the artifact.
* **interpolation** families upscale the LR with bicubic or Lanczos resampling.

Every artifact is a pure function ``fn(img, severity, rng) -> (out, params)`` with ``img`` a float
tensor ``(3, H, W)`` in [0, 1] (any ``H, W >= 8``), ``severity`` in [0, 1] and ``rng`` a
``numpy.random.Generator``. Contract (checked by ``tests/test_artifacts.py`` for every entry of
:data:`ARTIFACTS`): ``severity == 0`` returns the input unchanged; the mean absolute change grows
strictly with severity; the output is float32, clamped to [0, 1], same shape; the same rng seed
gives the same output; ``params`` holds every random choice as plain JSON values. The random
choices (periods, tile sizes, noise fields, ...) do not depend on severity, so a fixed seed and a
growing severity give a growing version of the *same* artifact.

The work is done in numpy / OpenCV on ``(H, W, 3)`` float32 arrays; each artifact takes a few
~1-60 ms per 256x256 image on one core (see :func:`benchmark_artifacts`).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
from PIL import Image

from finpercep.checks import require
from finpercep.types import Params, SRFamily

ArtifactFn = Callable[[torch.Tensor, float, np.random.Generator], tuple[torch.Tensor, Params]]

MIN_SIZE = 8
"""Smallest image side every artifact supports."""

DEFAULT_SEVERITY_RANGE = (0.15, 1.0)
"""Severity range of the procedural families. Below ~0.15 most artifacts change fewer than a
couple of grey levels on average, which is below what the reward model can be asked to see; 1.0
is the strongest level that still looks like a plausible SR output."""

# ITU-R BT.601 full-range luma weights (also JPEG's), used for luminance and YCbCr below.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _check(img: torch.Tensor, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Validate an artifact's inputs; return the image as an ``(H, W, 3)`` float32 array."""
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"img must be a torch.Tensor (3, H, W) in [0, 1], got {type(img).__name__}")
    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"img must have shape (3, H, W), got {tuple(img.shape)}")
    if img.shape[1] < MIN_SIZE or img.shape[2] < MIN_SIZE:
        raise ValueError(f"img must be at least {MIN_SIZE}x{MIN_SIZE}, got {tuple(img.shape[1:])}")
    if not img.is_floating_point():
        raise ValueError(f"img must be a float tensor in [0, 1], got dtype {img.dtype}")
    if isinstance(severity, bool) or not isinstance(severity, (int, float, np.floating, np.integer)):
        raise ValueError(f"severity must be a number in [0, 1], got {severity!r}")
    if not (0.0 <= float(severity) <= 1.0):  # also rejects NaN
        raise ValueError(f"severity must be in [0, 1], got {severity}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    x = img.detach().to("cpu", torch.float32).permute(1, 2, 0).contiguous().numpy()
    lo, hi = float(x.min()), float(x.max())
    if not (lo >= -1e-3 and hi <= 1.0 + 1e-3):  # also rejects NaN
        raise ValueError(f"img values must be in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    return x


def _identity(img: torch.Tensor) -> torch.Tensor:
    """Severity 0: the input itself, as a float32 copy."""
    return img.detach().to(torch.float32).clone()


def _to_tensor(x: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``(H, W, 3)`` array -> ``(3, H, W)`` float32 tensor in [0, 1] on ``like``'s device."""
    out = torch.from_numpy(np.ascontiguousarray(np.clip(x, 0.0, 1.0).transpose(2, 0, 1), dtype=np.float32))
    return out.to(like.device)


def _luma(x: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` RGB -> ``(H, W)`` BT.601 luma."""
    return np.ascontiguousarray(x @ _LUMA)


def _rgb_to_ycbcr(x: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] -> full-range YCbCr (JPEG / BT.601), chroma centred on 0, ``(H, W, 3)``."""
    y = x @ _LUMA
    cb = (x[..., 2] - y) * (0.5 / (1.0 - 0.114))
    cr = (x[..., 0] - y) * (0.5 / (1.0 - 0.299))
    return np.stack([y, cb, cr], axis=-1).astype(np.float32)


def _ycbcr_to_rgb(x: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_rgb_to_ycbcr`."""
    y, cb, cr = x[..., 0], x[..., 1], x[..., 2]
    r = y + cr * (2.0 * (1.0 - 0.299))
    b = y + cb * (2.0 * (1.0 - 0.114))
    g = (y - 0.299 * r - 0.114 * b) / 0.587
    return np.stack([r, g, b], axis=-1).astype(np.float32)


def _gauss(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (reflect border), any ``(H, W)`` or ``(H, W, C)`` float32 array."""
    cv2 = require("cv2", extra="data")
    return cv2.GaussianBlur(x, (0, 0), sigmaX=float(sigma), borderType=cv2.BORDER_REFLECT_101)


def _sub_seed(rng: np.random.Generator) -> int:
    """Draw a seed for a large random array (noise field, per-tile values) from ``rng``.

    The array itself is too big for ``params``; its seed reproduces it exactly.
    """
    return int(rng.integers(0, 2**31 - 1))


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int, channels: int) -> np.ndarray:
    """A smooth random field ``(h, w, channels)`` with values ~N(0, 1) varying over ``cells`` cells.

    White noise on a coarse grid, upsampled with bicubic interpolation: cheap low-frequency
    variation, used for local colour shifts.
    """
    gh, gw = cells + 1, cells + 1
    coarse = rng.standard_normal((gh, gw, channels)).astype(np.float32)
    cv2 = require("cv2", extra="data")
    field = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    return field.reshape(h, w, channels)


# --------------------------------------------------------------------------------------------
# The artifacts
# --------------------------------------------------------------------------------------------


def halo(img: torch.Tensor, severity: float, rng: np.random.Generator) -> tuple[torch.Tensor, Params]:
    """Over-sharpening halos: a strong, wide unsharp mask on luminance (bright/dark rims at edges).

    The look of GAN-SR over-sharpening, and of the unsharp-masked targets Real-ESRGAN trains on
    (Wang et al., ICCVW 2021); see Liang et al., "Details or Artifacts" (LDL), CVPR 2022.
    ``out = x + amount * (Y - G_sigma * Y)``, amount 0..2, sigma 1.5..3 px.
    Deterministic (uses no randomness).
    """
    x = _check(img, severity, rng)
    amount, sigma = 2.0 * severity, 1.5 + 1.5 * severity
    params: Params = {"amount": float(amount), "sigma": float(sigma)}
    if severity == 0:
        return _identity(img), params
    y = _luma(x)
    detail = y - _gauss(y, sigma)
    return _to_tensor(x + amount * detail[..., None], img), params


def _sinc_kernel(cutoff: float, size: int) -> np.ndarray:
    """2-D circular ideal low-pass (jinc) kernel, as Real-ESRGAN's ``circular_lowpass_kernel``.

    ``cutoff`` in radians per pixel (pi = Nyquist), ``size`` odd. Sums to 1.
    """
    j1 = require("scipy.special", extra="data").j1

    r = np.hypot(*np.meshgrid(np.arange(size) - size // 2, np.arange(size) - size // 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        k = cutoff * j1(cutoff * r) / (2 * np.pi * r)
    k[size // 2, size // 2] = cutoff**2 / (4 * np.pi)
    return (k / k.sum()).astype(np.float32)


def ringing(img: torch.Tensor, severity: float, rng: np.random.Generator) -> tuple[torch.Tensor, Params]:
    """Gibbs ringing: faint echoes parallel to edges, from the side lobes of a sinc low-pass.

    Real-ESRGAN (Wang et al., ICCVW 2021, "ringing and overshoot artifacts") models ringing and
    overshoot with a 2-D sinc (jinc) filter. We keep only its oscillating side lobes (the kernel
    outside the first zero of the Bessel function, made zero-sum), so the image stays sharp, flat
    areas stay flat and each edge gets 2-3 alternating echoes at ~5-10 px.
    Random: cutoff in [pi/4, pi/2.5]. Gain 0..2.5.
    """
    x = _check(img, severity, rng)
    cutoff = float(rng.uniform(np.pi / 4, np.pi / 2.5))
    gain = 2.5 * severity
    params: Params = {"cutoff": cutoff, "gain": float(gain), "kernel_size": 21}
    if severity == 0:
        return _identity(img), params
    kernel = _sinc_kernel(cutoff, 21)
    r = np.hypot(*np.meshgrid(np.arange(21) - 10, np.arange(21) - 10))
    ring = (r > 3.8317 / cutoff) & (r <= 10.0)  # 3.8317: first zero of J1
    # Side lobes only, minus their mean over the annulus: zero-sum (flat areas unchanged) and no
    # weight at the centre (the edge itself is not sharpened).
    side = np.where(ring, kernel - kernel[ring].mean(), 0.0).astype(np.float32)
    cv2 = require("cv2", extra="data")
    ripple = cv2.filter2D(x, -1, side, borderType=cv2.BORDER_REFLECT_101)
    return _to_tensor(x + gain * ripple, img), params


def _oriented_kernel(angle: float, along: float = 2.0, across: float = 0.6, size: int = 9) -> np.ndarray:
    """Elongated Gaussian ``(size, size)`` with its long axis at ``angle`` (radians), sums to 1."""
    c = np.arange(size) - size // 2
    xx, yy = np.meshgrid(c, c)
    u = xx * math.cos(angle) + yy * math.sin(angle)  # along the strands
    v = -xx * math.sin(angle) + yy * math.cos(angle)  # across
    k = np.exp(-0.5 * ((u / along) ** 2 + (v / across) ** 2))
    return (k / k.sum()).astype(np.float32)


_TEXTURE_ANGLES = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4)


def texture(img: torch.Tensor, severity: float, rng: np.random.Generator) -> tuple[torch.Tensor, Params]:
    """Hallucinated high-frequency texture: fine strands that follow the local structure.

    The fake fine detail GAN / diffusion SR invents on hair, fur, grass and fabric (Ledig et al.,
    SRGAN, CVPR 2017; Liang et al., LDL, CVPR 2022). White noise is smeared by
    elongated Gaussians in four directions, band-passed (minus a 1.5 px Gaussian) and squashed by
    ``tanh`` into short strokes; each pixel takes the strokes parallel to its edges (structure
    tensor, Bigun & Granlund 1987), isotropic blobs where there is no orientation. Amplitude
    follows local luminance contrast (floor 0.1 in flat areas); mostly luminance (colour part 0.3).
    """
    x = _check(img, severity, rng)
    h, w, _ = x.shape
    noise_seed = _sub_seed(rng)
    amp = 0.08 * severity
    params: Params = {"noise_seed": noise_seed, "amplitude": float(amp), "stroke_sigmas": [2.0, 0.6],
                      "band_sigma": 1.5, "colour_weight": 0.3}
    if severity == 0:
        return _identity(img), params
    noise = np.random.default_rng(noise_seed).standard_normal((h, w, 4), dtype=np.float32)  # 1 + 3 ch.
    y = _luma(x)
    # Structure tensor: orientation of the edges and how strongly oriented the patch is.
    gy, gx = np.gradient(y)
    jxx, jyy, jxy = (_gauss(a, 2.0) for a in (gx * gx, gy * gy, gx * gy))
    edge_angle = 0.5 * np.arctan2(2 * jxy, jxx - jyy) + np.pi / 2  # along the edge, not across
    coherence = np.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / (jxx + jyy + 1e-6)
    low = _gauss(noise, 1.5)
    strokes = np.zeros((h, w, 4), np.float32)
    weights = np.zeros((h, w), np.float32)
    cv2 = require("cv2", extra="data")
    for angle in _TEXTURE_ANGLES:
        wk = np.maximum(np.cos(2 * (edge_angle - angle)), 0.0) ** 2
        smeared = cv2.filter2D(noise, -1, _oriented_kernel(angle), borderType=cv2.BORDER_REFLECT_101)
        strokes += wk[..., None] * (smeared - low)
        weights += wk
    blobs = _gauss(noise, 0.6) - low
    c = np.clip(coherence, 0.0, 1.0)[..., None]
    band = c * strokes / (weights[..., None] + 1e-6) + (1 - c) * blobs
    band = np.tanh(2.0 * band / (band.std(axis=(0, 1), keepdims=True) + 1e-8))
    pattern = band[..., :1] + 0.3 * band[..., 1:]  # (H, W, 3)
    local_std = np.sqrt(np.maximum(_gauss((y - _gauss(y, 2.0)) ** 2, 3.0), 0.0))
    busy = 0.1 + 0.9 * np.clip(local_std / 0.05, 0.0, 1.0)
    return _to_tensor(x + amp * busy[..., None] * pattern, img), params


def _kuwahara(x: np.ndarray, radius: int) -> np.ndarray:
    """Soft Kuwahara filter: a weighted mean of the means of the four ``(radius+1)^2`` quadrants
    around each pixel, weight ``(var + 1e-4)^-2`` (luminance variance). The hard minimum of
    Kuwahara et al. (1976) gives square blocks; this soft weighting follows the generalised
    Kuwahara filter of Papari et al. (IEEE TIP 2007; here q = 4 on the standard deviation).
    ``(H, W, 3)`` -> ``(H, W, 3)``.
    """
    cv2 = require("cv2", extra="data")
    k = radius + 1
    y = _luma(x)
    total = np.zeros_like(x)
    weights = np.zeros(x.shape[:2], np.float32)
    for anchor in ((radius, radius), (0, radius), (radius, 0), (0, 0)):
        box = dict(ksize=(k, k), anchor=anchor, borderType=cv2.BORDER_REFLECT_101)
        var = np.maximum(cv2.boxFilter(y * y, -1, **box) - cv2.boxFilter(y, -1, **box) ** 2, 0.0)
        wq = 1.0 / (var + 1e-4) ** 2
        total += wq[..., None] * cv2.boxFilter(x, -1, **box)
        weights += wq
    return total / weights[..., None]


def painterly(img: torch.Tensor, severity: float, rng: np.random.Generator) -> tuple[torch.Tensor, Params]:
    """Oil-painting look: edge-preserving Kuwahara smoothing (flat, smeared patches) + posterising.

    The over-smoothed "oil-paint / watercolour" texture that GAN and diffusion SR leave on fine
    detail (grass, fur, skin) when they smooth it away (Kuwahara et al. 1976 and Papari et al.
    2007 for the filter, the standard way to render an oil-painting look).
    Two passes of a soft Kuwahara filter with radius 2 px, then colour levels 64 -> 24 per
    channel, blended with weight sqrt(severity). Deterministic.
    """
    x = _check(img, severity, rng)
    radius = 2
    levels = int(round(64 - 40 * severity))
    weight = math.sqrt(severity)
    params: Params = {"radius": radius, "passes": 2, "levels": levels, "weight": float(weight)}
    if severity == 0:
        return _identity(img), params
    painted = _kuwahara(_kuwahara(x, radius), radius)
    painted = np.round(painted * (levels - 1)) / (levels - 1)
    return _to_tensor(x + weight * (painted - x), img), params


def checkerboard(img: torch.Tensor, severity: float, rng: np.random.Generator) -> tuple[torch.Tensor, Params]:
    """Checkerboard / grid pattern of transposed convolutions, period 2-4 px, stronger on content.

    A stride-``p`` transposed convolution whose kernel size is not divisible by ``p`` gives each of
    the ``p x p`` output phases a different gain (Odena et al., "Deconvolution and Checkerboard
    Artifacts", Distill 2016). We tile a random zero-mean ``p x p`` gain pattern (mostly shared
    across channels) and scale it by local brightness and edge strength, as the network's
    activations would. Random: period in {2, 3, 4}, the pattern, grid offset. Gain 0..0.12.
    """
    x = _check(img, severity, rng)
    h, w, _ = x.shape
    period = int(rng.integers(2, 5))
    tile = rng.standard_normal((period, period, 1)) + 0.3 * rng.standard_normal((period, period, 3))
    tile = tile - tile.mean(axis=(0, 1), keepdims=True)
    tile = tile / (np.abs(tile).max() + 1e-8)
    oy, ox = int(rng.integers(0, period)), int(rng.integers(0, period))
    gain = 0.12 * severity
    params: Params = {"period": period, "offset": [oy, ox], "gain": float(gain),
                      "tile": np.round(tile, 6).tolist()}
    if severity == 0:
        return _identity(img), params
    reps = (h // period + 2, w // period + 2, 1)
    pattern = np.tile(tile.astype(np.float32), reps)[oy:oy + h, ox:ox + w]
    y = _luma(x)
    gy, gx = np.gradient(_gauss(y, 1.0))
    edge = np.clip(np.hypot(gx, gy) / 0.05, 0.0, 1.0)
    content = (0.3 + 0.4 * y + 0.6 * edge)[..., None]
    return _to_tensor(x + gain * content * pattern, img), params


def color_shift(img: torch.Tensor, severity: float, rng: np.random.Generator) -> tuple[torch.Tensor, Params]:
    """Local colour shift: a hue rotation, chroma gain and colour cast that drift across the region.

    Generative SR often changes colours while keeping structure (Real-ESRGAN and diffusion SR
    colour shifts; StableSR, Wang et al., IJCV 2024, adds a colour correction against it).
    In YCbCr, luma is kept; the chroma vector is rotated by up to 25 deg, scaled by up to +-30 %
    and offset by up to 0.035. Each of the four controls is a random constant (|c| in [0.4, 1],
    random sign) plus a smooth random field (std ~0.3, 2-4 cells), so the shift is consistent
    within a region yet not uniform.
    """
    x = _check(img, severity, rng)
    h, w, _ = x.shape
    cells = int(rng.integers(2, 5))
    field_seed = _sub_seed(rng)
    bias = rng.uniform(0.4, 1.0, size=4) * rng.choice([-1.0, 1.0], size=4)
    max_angle_deg, max_gain, max_cast = 25.0 * severity, 0.3 * severity, 0.035 * severity
    params: Params = {"cells": cells, "field_seed": field_seed, "bias": [float(b) for b in bias],
                      "max_angle_deg": float(max_angle_deg), "max_chroma_gain": float(max_gain),
                      "max_cast": float(max_cast)}
    if severity == 0:
        return _identity(img), params
    local = 0.3 * _smooth_field(np.random.default_rng(field_seed), h, w, cells, 4)  # (H, W, 4)
    controls = np.clip(bias.astype(np.float32) + local, -1.0, 1.0)  # (H, W, 4) in [-1, 1]
    ycc = _rgb_to_ycbcr(x)
    angle, gain = math.radians(max_angle_deg) * controls[..., 0], 1.0 + max_gain * controls[..., 1]
    cb, cr = ycc[..., 1].copy(), ycc[..., 2].copy()
    cos, sin = np.cos(angle), np.sin(angle)
    ycc[..., 1] = gain * (cos * cb - sin * cr) + max_cast * controls[..., 2]
    ycc[..., 2] = gain * (sin * cb + cos * cr) + max_cast * controls[..., 3]
    return _to_tensor(_ycbcr_to_rgb(ycc), img), params


# JPEG standard quantisation tables (ITU-T T.81, Annex K, Tables K.1 and K.2).
_JPEG_LUMA_Q = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=np.float32)
_JPEG_CHROMA_Q = np.array([
    [17, 18, 24, 47, 99, 99, 99, 99], [18, 21, 26, 66, 99, 99, 99, 99],
    [24, 26, 56, 99, 99, 99, 99, 99], [47, 66, 99, 99, 99, 99, 99, 99],
    [99, 99, 99, 99, 99, 99, 99, 99], [99, 99, 99, 99, 99, 99, 99, 99],
    [99, 99, 99, 99, 99, 99, 99, 99], [99, 99, 99, 99, 99, 99, 99, 99]], dtype=np.float32)


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix ``(n, n)``: ``coeffs = D @ block @ D.T``."""
    k = np.arange(n)[:, None]
    d = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.astype(np.float32)


def _quant_tables(block: int, quality: float) -> np.ndarray:
    """JPEG tables for luma, Cb, Cr ``(3, block, block)`` on the 0-255 scale, IJG quality scaling.

    For 16x16 blocks each 8x8 entry covers a 2x2 group of frequencies, and is doubled because the
    orthonormal 16-point DCT coefficients of a smooth block are twice the 8-point ones.
    """
    scale = 5000.0 / quality if quality < 50 else 200.0 - 2.0 * quality
    tables = [np.maximum(np.floor((t * scale + 50.0) / 100.0), 1.0) for t in (_JPEG_LUMA_Q, _JPEG_CHROMA_Q)]
    f = block // 8
    tables = [np.kron(t, np.ones((f, f), np.float32)) * f for t in tables]
    return np.stack([tables[0], tables[1], tables[1]]).astype(np.float32)


def blocking(img: torch.Tensor, severity: float, rng: np.random.Generator) -> tuple[torch.Tensor, Params]:
    """Block artifacts: 8x8 or 16x16 DCT quantisation with JPEG tables (visible block grid).

    The JPEG baseline codec (ITU-T T.81; Wallace 1992): YCbCr, block DCT, division by the
    standard tables scaled to a quality factor, rounding. SR models trained on compressed data
    reproduce such grids. Quality ``15 + 75 (1 - severity)^1.5``: 90 -> 59 -> 34 -> 15 at severity
    0, 0.3, 0.6, 1. Random: block size (8 with p=0.7,
    else 16) and grid offset (the crop need not be aligned with the codec's grid).
    """
    x = _check(img, severity, rng)
    h, w, _ = x.shape
    block = 8 if rng.random() < 0.7 else 16
    oy, ox = int(rng.integers(0, block)), int(rng.integers(0, block))
    quality = 15.0 + 75.0 * (1.0 - severity) ** 1.5
    params: Params = {"block": block, "offset": [oy, ox], "quality": float(quality)}
    if severity == 0:
        return _identity(img), params
    # Pad so that block boundaries fall at rows oy + k*block (and cols ox + k*block) of the image.
    top, left = (block - oy) % block, (block - ox) % block
    bottom, right = (-(h + top)) % block, (-(w + left)) % block
    ycc = _rgb_to_ycbcr(x) * 255.0
    ycc[..., 0] -= 128.0  # JPEG level shift
    pad = np.pad(ycc, ((top, bottom), (left, right), (0, 0)), mode="edge")
    ph, pw = pad.shape[:2]
    # (ph, pw, c) -> (by, bx, c, block, block): one DCT block per (by, bx, c).
    blocks = pad.reshape(ph // block, block, pw // block, block, 3).transpose(0, 2, 4, 1, 3)
    d = _dct_matrix(block)
    q = _quant_tables(block, quality)  # (c, block, block)
    coef = np.round((d @ blocks @ d.T) / q) * q
    rec = (d.T @ coef @ d).transpose(0, 3, 1, 4, 2).reshape(ph, pw, 3)
    rec = np.ascontiguousarray(rec[top:top + h, left:left + w])
    rec[..., 0] += 128.0
    return _to_tensor(_ycbcr_to_rgb(rec / 255.0), img), params


def seams(img: torch.Tensor, severity: float, rng: np.random.Generator) -> tuple[torch.Tensor, Params]:
    """Tile seams: per-tile tone, colour and sharpness differences, discontinuous at tile borders.

    Tiled inference (Real-ESRGAN's ``--tile``; tiled diffusion SR such as StableSR / SUPIR) runs
    each tile with its own context, so neighbouring tiles disagree in brightness, colour and
    detail, and their borders show as straight seams. Random: tile size in {32, 48, 64} (at most
    half the shorter image side), grid offset, per tile a gain (std 6 %), offset (std 0.03),
    colour tint (std 0.015) and sharpness change (-0.6..+1.0 unsharp amount), all times severity.
    """
    x = _check(img, severity, rng)
    h, w, _ = x.shape
    tile = min(int(rng.choice([32, 48, 64])), max(4, min(h, w) // 2))
    oy, ox = int(rng.integers(0, tile)), int(rng.integers(0, tile))
    ny, nx = (h + oy) // tile + 1, (w + ox) // tile + 1
    tiles_seed = _sub_seed(rng)
    params: Params = {"tile": tile, "offset": [oy, ox], "grid": [ny, nx], "tiles_seed": tiles_seed}
    if severity == 0:
        return _identity(img), params
    tiles_rng = np.random.default_rng(tiles_seed)
    gain = 0.06 * tiles_rng.standard_normal((ny, nx, 1))
    offset = 0.03 * tiles_rng.standard_normal((ny, nx, 1)) + 0.015 * tiles_rng.standard_normal((ny, nx, 3))
    sharp = tiles_rng.uniform(-0.6, 1.0, size=(ny, nx, 1))
    # Per-pixel tile index -> per-pixel parameters (nearest lookup gives the hard seams).
    iy, ix = (np.arange(h) + oy) // tile, (np.arange(w) + ox) // tile

    def per_pixel(a: np.ndarray) -> np.ndarray:  # (ny, nx, c) -> (h, w, c)
        return a[iy][:, ix].astype(np.float32)

    detail = x - _gauss(x, 1.2)
    out = x * (1.0 + severity * per_pixel(gain)) + severity * per_pixel(offset)
    out = out + severity * per_pixel(sharp) * detail
    return _to_tensor(out, img), params


ARTIFACTS: dict[str, ArtifactFn] = {
    "halo": halo,
    "ringing": ringing,
    "texture": texture,
    "painterly": painterly,
    "checkerboard": checkerboard,
    "color_shift": color_shift,
    "blocking": blocking,
    "seams": seams,
}
"""Every procedural artifact by name: ``fn(img (3,H,W) in [0,1], severity in [0,1], rng) -> (out, params)``."""


# --------------------------------------------------------------------------------------------
# SR families
# --------------------------------------------------------------------------------------------


def _check_lr_hr(lr: torch.Tensor, hr: torch.Tensor, scale: int) -> None:
    """Validate the SRFn arguments: ``lr (3, h, w)``, ``hr (3, h*scale, w*scale)``, scale >= 1."""
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    for name, t in (("lr", lr), ("hr", hr)):
        if not isinstance(t, torch.Tensor) or t.ndim != 3 or t.shape[0] != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a (3, H, W) tensor, got {shape}")
    want = (3, lr.shape[1] * scale, lr.shape[2] * scale)
    if tuple(hr.shape) != want:
        raise ValueError(f"hr must be lr upscaled x{scale}, i.e. {want}, got {tuple(hr.shape)}")


def procedural_family(
    name: str,
    severity_range: tuple[float, float] = DEFAULT_SEVERITY_RANGE,
    artifacts: dict[str, ArtifactFn] | None = None,
) -> SRFamily:
    """An SR family that applies artifact ``name`` to the HR image with severity ~ U(severity_range).

    ``severity_range = (s, s)`` fixes the severity (tests, benchmarks). ``artifacts``: the catalogue
    to look ``name`` up in (default :data:`ARTIFACTS`; the negative edits pass theirs). The SR
    output's params are ``{"artifact", "severity", "severity_range", "artifact_params"}``.
    """
    catalogue = ARTIFACTS if artifacts is None else artifacts
    if name not in catalogue:
        raise ValueError(f"unknown artifact {name!r}; choose one of {sorted(catalogue)}")
    lo, hi = (float(v) for v in severity_range)
    if not (0.0 <= lo <= hi <= 1.0):
        raise ValueError(f"severity_range must satisfy 0 <= lo <= hi <= 1, got {severity_range}")
    artifact = catalogue[name]

    def fn(lr: torch.Tensor, hr: torch.Tensor, scale: int, rng: np.random.Generator) -> tuple[torch.Tensor, Params]:
        _check_lr_hr(lr, hr, scale)
        severity = float(rng.uniform(lo, hi)) if hi > lo else lo
        out, artifact_params = artifact(hr, severity, rng)
        return out, {"artifact": name, "severity": severity, "severity_range": [lo, hi],
                     "artifact_params": artifact_params}

    doc = (artifact.__doc__ or name).strip().splitlines()[0]
    return SRFamily(name=name, kind="procedural", description=f"{doc} Severity ~ U[{lo:g}, {hi:g}].",
                    fn=fn, scales=(2, 4), uses_hr=True, cost="cheap", licence="Apache-2.0 (finpercep)")


PROCEDURAL_FAMILIES: dict[str, SRFamily] = {name: procedural_family(name) for name in ARTIFACTS}
"""One procedural SR family per artifact, severity ~ U[0.15, 1.0] (:data:`DEFAULT_SEVERITY_RANGE`)."""


def _pil_upscale(lr: torch.Tensor, scale: int, resample: Image.Resampling) -> torch.Tensor:
    """Upscale ``(3, h, w)`` -> ``(3, h*scale, w*scale)`` with Pillow on float32 channels.

    Pillow resamples with the half-pixel-centre convention (output pixel ``i`` samples input
    coordinate ``(i + 0.5) / scale - 0.5``), so the result is aligned with an area downscale.
    Cubic and Lanczos overshoot, so the output is clamped to [0, 1].
    """
    x = lr.detach().to("cpu", torch.float32).numpy()
    h, w = x.shape[1:]
    size = (w * scale, h * scale)
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(c), mode="F").resize(size, resample)) for c in x]
    return torch.from_numpy(np.clip(np.stack(chans), 0.0, 1.0).astype(np.float32)).to(lr.device)


def _interpolation_family(name: str, resample: Image.Resampling, description: str) -> SRFamily:
    def fn(lr: torch.Tensor, hr: torch.Tensor, scale: int, rng: np.random.Generator) -> tuple[torch.Tensor, Params]:
        _check_lr_hr(lr, hr, scale)
        return _pil_upscale(lr, scale, resample), {"method": name, "library": "pillow"}

    return SRFamily(name=name, kind="interpolation", description=description, fn=fn, scales=(2, 4),
                    uses_hr=False, cost="cheap", licence="Pillow: MIT-CMU (HPND)")


INTERPOLATION_FAMILIES: dict[str, SRFamily] = {
    "bicubic": _interpolation_family(
        "bicubic", Image.Resampling.BICUBIC,
        "Bicubic upscaling (Keys 1981, a = -0.5 as MATLAB imresize), Pillow, half-pixel centres."),
    "lanczos": _interpolation_family(
        "lanczos", Image.Resampling.LANCZOS,
        "Lanczos-3 upscaling (Duchon 1979), Pillow, half-pixel centres."),
}
"""Classic interpolation of the LR: bicubic and Lanczos."""


def benchmark_artifacts(size: int = 256, repeats: int = 5, severity: float = 1.0) -> dict[str, float]:
    """Seconds per ``size x size`` image for each artifact (median of ``repeats``), current threads.

    Set ``cv2.setNumThreads(1)`` / ``torch.set_num_threads(1)`` beforehand for one-core numbers.
    """
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.random((3, size, size), dtype=np.float32))
    times: dict[str, float] = {}
    for name, fn in ARTIFACTS.items():
        runs = []
        for i in range(repeats):
            t0 = time.perf_counter()
            fn(img, severity, np.random.default_rng(i))
            runs.append(time.perf_counter() - t0)
        times[name] = float(np.median(runs))
    return times
