"""PIQE, the Perception-based Image Quality Evaluator (no reference; lower = better).

Venkatanath N, Praneeth D, Maruthi Chandrasekhar Bh, Channappayya and Medasani, "Blind image
quality evaluation using perception based features", NCC 2015. Re-implemented in NumPy after
MATLAB's ``piqe`` (Image Processing Toolbox), which ``pypiqe==1.2`` ports line by line:

1. 8-bit grey image (MATLAB ``rgb2gray`` weights, rounded), padded at the bottom/right to whole
   16x16 blocks by repeating the last row/column.
2. MSCN coefficients ``(I - mu) / (sigma + 1)`` with a 7x7 Gaussian of sigma 7/6, replicate border.
3. Blocks whose MSCN variance exceeds 0.1 are "spatially active" (N_SA of them). An active block
   is *impaired* (blockiness / sudden artifacts) if, along any of its four edges, one of the
   11 runs of 6 pixels has a standard deviation below 0.1; it is *noisy* if its standard
   deviation exceeds twice the relative gap between it and the centre/surround deviation ratio.
4. ``score = 100 * (sum_active [impaired * (1 - var) + noisy * var] + 1) / (N_SA + 1)``.

The centre/surround split reproduces MATLAB exactly, including its deletion of columns 8 and 10
(1-based) of the block as the "surround" (the second deletion indexes the already shortened
block); ``pypiqe`` does the same. Two places where ``pypiqe`` departs from MATLAB follow MATLAB
here: ``pypiqe`` pads by mirroring and stretches the grey image to a maximum of 255; the two
agree whenever the size is a multiple of 16 and the brightest grey pixel is 255.

Score in [0, 100] nominally (a noisy block with variance above 1 can push it slightly higher);
a flat image scores 100. Not differentiable (NumPy, per image).
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from finpercep.checks import check_image_batch, require

correlate1d = require("scipy.ndimage", extra="metrics").correlate1d

BLOCK_SIZE = 16
ACTIVITY_THRESHOLD = 0.1  # MSCN variance above which a block is spatially active
IMPAIRED_THRESHOLD = 0.1  # edge-segment std below which a block shows a noticeable artifact
WINDOW = 6  # pixels per edge segment
# MATLAB rgb2gray: the luma row of the inverse of the NTSC YIQ matrix.
_GREY = np.array([0.298936021293775, 0.587043074451121, 0.114020904255103])


def _gaussian_1d(size: int = 7, sigma: float = 7 / 6) -> np.ndarray:
    x = np.arange(size) - size // 2
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _blur(img: np.ndarray) -> np.ndarray:
    """MATLAB ``imgaussfilt(img, 7/6, 'FilterSize', 7, 'Padding', 'replicate')``."""
    k = _gaussian_1d()
    return correlate1d(correlate1d(img, k, axis=0, mode="nearest"), k, axis=1, mode="nearest")


def _blocks(img: np.ndarray, b: int) -> np.ndarray:
    """``(H, W)`` with H, W multiples of ``b`` -> ``(H/b * W/b, b, b)`` non-overlapping blocks."""
    h, w = img.shape
    return img.reshape(h // b, b, w // b, b).transpose(0, 2, 1, 3).reshape(-1, b, b)


def _impaired(blocks: np.ndarray) -> np.ndarray:
    """``(N, 16, 16) -> (N,)`` bool: some edge has a 6-pixel run with std < 0.1 (MATLAB noticeDistCriterion)."""
    edges = np.stack([blocks[:, 0, :], blocks[:, :, -1], blocks[:, -1, :], blocks[:, :, 0]], axis=1)
    runs = sliding_window_view(edges, WINDOW, axis=2)  # (N, 4 edges, 11 runs, 6)
    return (runs.std(axis=-1, ddof=1) < IMPAIRED_THRESHOLD).any(axis=(1, 2))


def _centre_surround_ratio(blocks: np.ndarray) -> np.ndarray:
    """``(N, 16, 16) -> (N,)`` std of the two centre columns over std of the "surround" (MATLAB centerSurDev)."""
    b = blocks.shape[-1]
    c1 = b // 2 - 1  # 0-based; MATLAB: center1 = ((blockSize - 1) + 1) / 2 = 8 (1-based)
    centre = np.concatenate([blocks[:, :, c1], blocks[:, :, c1 + 1]], axis=1)
    keep = np.ones(b, dtype=bool)
    keep[c1] = False
    keep[c1 + 2] = False  # MATLAB deletes column c1+1 of the already shortened block
    surround = blocks[:, :, keep].reshape(len(blocks), b * (b - 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = centre.std(axis=1, ddof=1) / surround.std(axis=1, ddof=1)
    return np.nan_to_num(ratio, nan=0.0, posinf=np.inf)


def piqe_grey(grey: np.ndarray) -> float:
    """PIQE of one grey image ``(H, W)`` with integer values in [0, 255] (float64)."""
    h, w = grey.shape
    pad_h, pad_w = -h % BLOCK_SIZE, -w % BLOCK_SIZE
    img = np.pad(grey, ((0, pad_h), (0, pad_w)), mode="edge")
    mu = _blur(img)
    sigma = np.sqrt(np.abs(_blur(img * img) - mu * mu))
    norm = (img - mu) / (sigma + 1)
    blocks = _blocks(norm, BLOCK_SIZE)
    var = blocks.reshape(len(blocks), -1).var(axis=1, ddof=1)
    active = var > ACTIVITY_THRESHOLD
    if not active.any():
        return 100.0  # nothing salient to judge: MATLAB's formula gives (0 + 1) / (0 + 1) * 100
    blocks, var = blocks[active], var[active]
    impaired = _impaired(blocks)
    block_sigma = np.sqrt(var)
    ratio = _centre_surround_ratio(blocks)
    with np.errstate(divide="ignore", invalid="ignore"):
        beta = np.abs(block_sigma - ratio) / np.maximum(block_sigma, ratio)
    noisy = block_sigma > 2 * beta
    distortion = float(np.sum(impaired * (1 - var) + noisy * var))
    return (distortion + 1) / (int(active.sum()) + 1) * 100


def _check_images(img: torch.Tensor) -> None:
    check_image_batch(img, "piqe", min_size=1)


def piqe(img: torch.Tensor) -> torch.Tensor:
    """PIQE of each image in a batch; lower = better (the raw metric, not a reward).

    Args:
        img: ``(B, 3, H, W)`` float RGB in [0, 1], any size (padded to 16x16 blocks). Any device;
            computed on the CPU in NumPy.

    Returns:
        ``(B,)`` float32 on ``img``'s device, nominally in [0, 100]; 100 for a flat image.
    """
    _check_images(img)
    rgb8 = (img.detach().to("cpu", torch.float64).clamp(0, 1) * 255).round()
    grey = np.round(rgb8.permute(0, 2, 3, 1).numpy() @ _GREY)  # MATLAB rgb2gray on uint8
    scores = [piqe_grey(g) for g in grey]
    return torch.tensor(scores, dtype=torch.float32, device=img.device)
