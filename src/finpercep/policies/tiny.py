"""``tiny-x4``: a small fast x4 SR network, and the recipe that trains it in minutes on CPU.

The network (ESPCN-style, Shi et al. 2016, "Real-Time Single Image and Video Super-Resolution
Using an Efficient Sub-Pixel Convolutional Neural Network") works entirely at LR resolution and
predicts a residual over the bicubic upscale ``u`` of the LR through PixelShuffle::

    sr = clamp01(u + PixelShuffle_s(conv_tail(body(conv_head(lr)))))

The tail is zero-initialised, so an untrained ``TinySR`` is exactly bicubic upscaling.

**Clamping.** ``clamp01`` is a straight-through clamp (:func:`clamp01_st`): the value is clamped
to [0, 1], the gradient passes as if it were the identity. A plain clamp would zero the gradient of
every pixel that overshoots, exactly the pixels a reward (or L1) wants to pull back.

The recipe (:class:`TinyTrainConfig`, :func:`train_tiny`) trains with L1 on random HR crops of
real photos and their LR made by the data engine's Real-ESRGAN degradation
(:mod:`finpercep.policies.recipe_data`); the shipped weights come from ``configs/policy_tiny.yaml``
through ``benchmarks/train_policies.py``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from finpercep.checks import check_image_batch
from finpercep.config import check_at_least, check_between, check_positive
from finpercep.data.degradations import DegradationConfig
from finpercep.types import NonFiniteError

if TYPE_CHECKING:
    from finpercep.policies.flow import FlowTrainConfig

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).parent / "weights"

MAX_CHANNELS = 1024
"""Bound on the feature channels of ``tiny`` and ``flow`` (32 and 48 by default; a 3x3 convolution
at 1024 channels is 9.4 M parameters)."""
MAX_LAYERS = 256
"""Bound on their hidden layers / residual blocks (6 and 4 by default)."""


# ----------------------------------------------------------------------------------------------
# Helpers shared with flow.py
# ----------------------------------------------------------------------------------------------


def clamp01_st(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] in value, identity in gradient (straight-through)."""
    return x + (x.clamp(0.0, 1.0) - x).detach()


def bicubic_upscale(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """``(B, C, h, w) -> (B, C, h*s, w*s)`` bicubic (``F.interpolate``, ``align_corners=False``),
    not clamped (it overshoots slightly at edges)."""
    return F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False)


def resolve_checkpoint(path: str | Path | None, default: Path, recipe: str) -> Path:
    """The checkpoint folder for ``path``: the shipped ``default`` when ``None``; a training run
    folder (with ``model/``) or a checkpoint folder otherwise. FileNotFoundError says how to make it."""
    from finpercep.policies import CONFIG_NAME

    folder = default if path is None else Path(path)
    if (folder / "model" / CONFIG_NAME).is_file():
        folder = folder / "model"
    if not (folder / CONFIG_NAME).is_file():
        what = "shipped weights are missing" if path is None else "no policy checkpoint there"
        raise FileNotFoundError(
            f"{folder}: {what} (expected config.json + model.safetensors). Train them with "
            f"`python benchmarks/train_policies.py --which {recipe} --photos runs/photos/train --out runs/policies`"
        )
    return folder


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyConfig:
    """Architecture of :class:`TinySR`."""

    channels: int = 32
    """Feature channels of every hidden convolution."""
    num_layers: int = 6
    """Hidden 3x3 convolutions (with ReLU) between the head and the tail."""
    scale: int = 4
    """Upscaling factor s (the tail predicts 3 * s^2 channels, rearranged by PixelShuffle)."""

    def __post_init__(self) -> None:
        check_between("TinyConfig", 1, MAX_CHANNELS, channels=self.channels)
        check_between("TinyConfig", 0, MAX_LAYERS, num_layers=self.num_layers)
        if self.scale not in (2, 3, 4, 8):
            raise ValueError(f"scale must be 2, 3, 4 or 8, got {self.scale}")


class TinySR(nn.Module):
    """Small residual x``s`` SR network: ``forward(lr (B, 3, h, w) in [0, 1]) -> sr (B, 3, h*s,
    w*s) in [0, 1]`` (straight-through clamp; see the module docstring)."""

    arch = "tiny"

    def __init__(self, cfg: TinyConfig = TinyConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.scale = cfg.scale
        self.name = f"tiny-x{cfg.scale}"
        c = cfg.channels
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(cfg.num_layers))
        self.tail = nn.Conv2d(c, 3 * cfg.scale**2, 3, padding=1)
        nn.init.zeros_(self.tail.weight)  # start as bicubic
        nn.init.zeros_(self.tail.bias)

    def residual(self, lr: torch.Tensor) -> torch.Tensor:
        """The predicted ``sr - bicubic(lr)`` ``(B, 3, h*s, w*s)``, before clamping."""
        x = F.relu(self.head(lr))
        for conv in self.body:
            x = F.relu(conv(x))
        return F.pixel_shuffle(self.tail(x), self.scale)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        check_image_batch(lr, f"{self.name}: lr")
        return clamp01_st(bicubic_upscale(lr, self.scale) + self.residual(lr))


def load_tiny(path: str | Path | None = None) -> TinySR:
    """The shipped ``tiny-x4`` (``path=None``; ``finpercep/policies/weights/tiny-x4/``), or the
    checkpoint / training run folder ``path``. Eval mode, CPU, float32."""
    from finpercep.policies import load_policy_checkpoint

    model = load_policy_checkpoint(resolve_checkpoint(path, WEIGHTS_DIR / "tiny-x4", "tiny"))
    if not isinstance(model, TinySR):
        raise ValueError(f"{path}: holds a {type(model).__name__} checkpoint, not a TinySR")
    return model


# ----------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyTrainConfig:
    """How ``tiny-x4`` is trained (L1 on degraded real-photo crops). YAML fills it; unknown keys
    are errors."""

    model: TinyConfig = field(default_factory=TinyConfig)
    """Architecture."""
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    """How LR inputs are made from HR crops (Real-ESRGAN x4plus defaults)."""
    steps: int = 2000
    """Optimiser steps."""
    batch: int = 16
    """HR crops per step."""
    crop: int = 128
    """HR crop side in pixels (a multiple of the scale); the LR side is ``crop / scale``."""
    lr: float = 2e-3
    """Peak learning rate (Adam), reached after ``warmup`` steps, then cosine decay to 0."""
    warmup: int = 50
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    augment: bool = True
    """Random flips and 90-degree rotations of the crops."""
    seed: int = 0
    """Seeds the initialisation and the data order (batch i comes from ``default_rng([seed, i])``)."""
    threads: int = 1
    """torch CPU threads while training (restored afterwards); training is bit-reproducible for
    a fixed seed and thread count. On a shared 2-core machine 1 is faster than 2 (two OpenMP
    threads spin against the other processes)."""
    log_every: int = 20
    """Steps between ``metrics.jsonl`` lines."""

    def __post_init__(self) -> None:
        check_recipe(self)


def check_recipe(cfg: TinyTrainConfig | FlowTrainConfig) -> None:
    """The value checks :class:`TinyTrainConfig` and ``FlowTrainConfig`` share (ValueError naming the field)."""
    check_at_least("recipe", 1, steps=cfg.steps, batch=cfg.batch, threads=cfg.threads, log_every=cfg.log_every)
    check_at_least("recipe", 0, warmup=cfg.warmup, weight_decay=cfg.weight_decay, seed=cfg.seed)
    check_positive("recipe", lr=cfg.lr)
    if cfg.crop < 8 * cfg.model.scale or cfg.crop % cfg.model.scale:
        raise ValueError(f"recipe.crop must be a multiple of scale {cfg.model.scale} and >= {8 * cfg.model.scale}, got {cfg.crop}")


def train_tiny(cfg: TinyTrainConfig, photos: Path, out: Path, progress: bool = True) -> Path:
    """Train :class:`TinySR` with L1 on ``cfg.batch`` random ``cfg.crop`` crops of the images under
    ``photos`` per step; write ``out/train_config.json``, ``out/metrics.jsonl`` (``loss/l1``,
    ``psnr`` of the batch, ``lr``, ``time/step``) and the final checkpoint ``out/model/``, which is
    returned. Not resumable (it is meant to take minutes); ``out/metrics.jsonl`` is restarted."""
    from finpercep.config import to_dict
    from finpercep.io import save_json
    from finpercep.policies import save_policy
    from finpercep.io import append_jsonl
    from finpercep.policies.recipe_data import cosine_lr, load_photos, progress_bar, sample_batch

    out = Path(out)
    images = load_photos(photos, cfg.crop)
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / "train_config.json", {"recipe": "tiny", "photos": str(photos), "config": to_dict(cfg)})
    metrics = out / "metrics.jsonl"
    metrics.unlink(missing_ok=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(cfg.seed)
        model = TinySR(cfg.model).train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        bar = progress_bar(cfg.steps, "tiny-x4", progress)
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            lr_img, hr = sample_batch(images, cfg.seed, step, cfg.batch, cfg.crop, cfg.model.scale, cfg.degradation, cfg.augment)
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup)
            sr = model(lr_img)
            loss = (sr - hr).abs().mean()
            if not torch.isfinite(loss):
                raise NonFiniteError(f"train_tiny: loss is {loss.item()} at step {step + 1}; the run stops here "
                                     f"(this recipe is not resumable: rerun with a lower lr than {cfg.lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                mse = float(((sr.detach() - hr) ** 2).mean())
                append_jsonl(metrics, {
                    "step": step, "loss/l1": loss.item(), "psnr": -10.0 * math.log10(max(mse, 1e-10)),
                    "lr": opt.param_groups[0]["lr"], "time/step": time.perf_counter() - t0,
                })
            bar(loss.item())
        return save_policy(model.eval(), out / "model")
    finally:
        torch.set_num_threads(threads)
