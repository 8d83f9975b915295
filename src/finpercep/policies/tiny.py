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
real photos and their LR made by the data engine's Real-ESRGAN degradation, through the loop the
flow recipe shares (:mod:`finpercep.policies.recipe`); the shipped weights come from
``configs/policy_tiny.yaml`` through ``benchmarks/train_policies.py``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from finpercep.checks import check_image_batch
from finpercep.config import check_between
from finpercep.policies.recipe import RecipeConfig, train_recipe

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
    from finpercep.io import CONFIG_NAME

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
    from finpercep.policies.checkpoint import load_checkpoint

    return load_checkpoint(resolve_checkpoint(path, WEIGHTS_DIR / "tiny-x4", "tiny"), {TinySR.arch: (TinySR, TinyConfig)})


# ----------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyTrainConfig(RecipeConfig):
    """How ``tiny-x4`` is trained (L1 on degraded real-photo crops): the shared recipe settings
    (:class:`finpercep.policies.recipe.RecipeConfig`) and the architecture. YAML fills it;
    unknown keys are errors."""

    model: TinyConfig = field(default_factory=TinyConfig)
    """Architecture."""


def l1_loss(model: nn.Module, lr: torch.Tensor, hr: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    """The tiny recipe's loss: ``mean |model(lr) - hr|`` over the batch (``lr (B, 3, h, w)``,
    ``hr (B, 3, h*s, w*s)`` in [0, 1]); logs ``loss/l1`` and the batch's ``psnr`` (dB). Draws
    nothing from ``generator``."""
    sr = model(lr)
    loss = (sr - hr).abs().mean()
    mse = float(((sr.detach() - hr) ** 2).mean())
    return loss, {"loss/l1": loss.item(), "psnr": -10.0 * math.log10(max(mse, 1e-10))}


def train_tiny(cfg: TinyTrainConfig, photos: Path, out: Path, progress: bool = True) -> Path:
    """Train :class:`TinySR` (initialised from ``cfg.seed``) with :func:`l1_loss` through
    :func:`finpercep.policies.recipe.train_recipe`: ``out/train_config.json``, ``out/metrics.jsonl``
    (``loss/l1``, ``psnr``, ``lr``, ``time/step``) and the checkpoint ``out/model/``, which is
    returned. Not resumable (minutes long); ``out/metrics.jsonl`` is restarted."""
    torch.manual_seed(cfg.seed)
    return train_recipe(cfg, TinySR(cfg.model), l1_loss, photos, out, recipe="tiny", progress=progress)
