"""Data shared by the training recipes of ``tiny-x4`` and ``flow-x4`` (:mod:`finpercep.policies.recipe`).

The pairs are what a real-world SR network meets: a random HR crop of a real photo and its LR made
by the data engine's Real-ESRGAN second-order degradation
(:func:`finpercep.data.degradations.degrade`). The data order is a pure function of ``(seed,
step)``: step ``i`` draws from ``numpy.random.default_rng([seed, i])``, so a rerun (or a resumed
run) sees the same batches with no sampler state; the loss's own draws of step ``i`` come from
:func:`step_generator`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from finpercep.data.degradations import DegradationConfig, degrade


def load_photos(folder: str | Path, min_size: int) -> list[np.ndarray]:
    """Every image under ``folder`` as an ``(H, W, 3)`` uint8 array (kept 8-bit: a 1280x800 photo
    costs 3 MB of memory, not 12). Images with a side below ``min_size`` are skipped; no usable
    image at all is a FileNotFoundError saying what was needed."""
    from finpercep.io import list_images, read_image

    paths = list_images(folder)  # FileNotFoundError for a missing folder
    arrays = [read_image(p)[0] for p in paths]
    usable = [a for a in arrays if min(a.shape[:2]) >= min_size]
    if not usable:
        raise FileNotFoundError(
            f"{folder}: no image of at least {min_size}x{min_size} pixels among {len(paths)} files "
            "(fetch photos with `finpercep data photos --out DIR` or lower the crop size)"
        )
    return usable


def step_rng(seed: int, step: int) -> np.random.Generator:
    """The generator that draws step ``step``'s batch (and nothing else)."""
    return np.random.default_rng([int(seed), int(step)])


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU torch generator of step ``step``'s loss draws (flow matching's times and noise),
    apart from the data's: seeded with ``SeedSequence([seed, step, 1])``."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, 1]).generate_state(1)[0]))


def random_crop(img: np.ndarray, crop: int, rng: np.random.Generator, augment: bool) -> np.ndarray:
    """A random ``crop x crop`` window of ``img`` (H, W, 3), with a random flip / 90-degree
    rotation (the 8 symmetries of the square) when ``augment``."""
    h, w = img.shape[:2]
    y, x = int(rng.integers(h - crop + 1)), int(rng.integers(w - crop + 1))
    out = img[y : y + crop, x : x + crop]
    if augment:
        out = np.rot90(out, k=int(rng.integers(4)))
        if rng.uniform() < 0.5:
            out = out[:, ::-1]
    return np.ascontiguousarray(out)


def center_crop(img: np.ndarray, crop: int) -> np.ndarray:
    """The central ``crop x crop`` window of ``img`` (H, W, 3) (the whole short side if smaller,
    cut down to a multiple of 4)."""
    h, w = img.shape[:2]
    c = min(crop, h, w) // 4 * 4
    y, x = (h - c) // 2, (w - c) // 2
    return np.ascontiguousarray(img[y : y + c, x : x + c])


def degrade_batch(
    hr_crops: list[np.ndarray], scale: int, rng: np.random.Generator, cfg: DegradationConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lr (B, 3, c/s, c/s), hr (B, 3, c, c))`` float32 in [0, 1] from uint8 crops, each LR made
    by :func:`degrade` with draws from ``rng`` in order."""
    from finpercep.io import to_tensor

    hr = [to_tensor(c) for c in hr_crops]
    lr = [degrade(x, scale, rng, cfg)[0] for x in hr]
    return torch.stack(lr), torch.stack(hr)


def sample_batch(
    photos: list[np.ndarray],
    seed: int,
    step: int,
    batch: int,
    crop: int,
    scale: int,
    cfg: DegradationConfig,
    augment: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training batch ``step``: ``batch`` random HR crops (photo, position and symmetry drawn
    uniformly) and their degraded LR; ``(lr (B, 3, crop/s, crop/s), hr (B, 3, crop, crop))``.
    A pure function of its arguments."""
    rng = step_rng(seed, step)
    crops = [random_crop(photos[int(rng.integers(len(photos)))], crop, rng, augment) for _ in range(batch)]
    return degrade_batch(crops, scale, rng, cfg)


def eval_pairs(
    folder: str | Path, crop: int, scale: int, seed: int, cfg: DegradationConfig = DegradationConfig()
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Evaluation pairs: the center ``crop`` of every image under ``folder`` and its LR degraded
    with ``default_rng(seed)`` (drawn in sorted file order). Returns ``(names, lr (N, 3, c/s, c/s),
    hr (N, 3, c, c))``; every image must be at least ``crop`` on its short side."""
    from finpercep.io import list_images, read_image

    paths = list_images(folder)
    if not paths:
        raise FileNotFoundError(f"{folder}: no images")
    crops = []
    for p in paths:
        arr = read_image(p)[0]
        if min(arr.shape[:2]) < crop:
            raise ValueError(f"{p}: {arr.shape[1]}x{arr.shape[0]} is smaller than the {crop}px evaluation crop")
        crops.append(center_crop(arr, crop))
    lr, hr = degrade_batch(crops, scale, np.random.default_rng(seed), cfg)
    return [p.stem for p in paths], lr, hr


def cosine_lr(step: int, steps: int, base_lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
