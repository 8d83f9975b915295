"""The training recipe of the project's own SR policies, ``tiny-x4`` (:mod:`finpercep.policies.tiny`)
and ``flow-x4`` (:mod:`finpercep.policies.flow`): one config base and one loop.

Both train on the same data, random HR crops of real photos and their LR made by the data
engine's Real-ESRGAN degradation (:mod:`finpercep.policies.recipe_data`), with AdamW under a
linear warm-up and cosine decay. They differ only in the loss, which each passes to
:func:`train_recipe` as a function (L1 for ``tiny``, flow matching for ``flow``).

A recipe's output folder ``OUT/`` holds ``train_config.json`` (``{"recipe", "photos",
"config"}``), ``metrics.jsonl`` (one line every ``log_every`` steps and at the last; ``step``
0-based) and ``model/``, the checkpoint. A recipe takes minutes and does not resume: a rerun
starts the folder's log afresh. With a fixed seed and thread count it is bit-reproducible.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from finpercep.config import check_at_least, check_positive, to_dict
from finpercep.data.degradations import DegradationConfig
from finpercep.io import save_json
from finpercep.runs import TRAIN_CONFIG, append_metrics, progress_bar, restart_metrics
from finpercep.types import NonFiniteError

RecipeLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, dict[str, float]]]
"""``loss_fn(model, lr (B, 3, c/s, c/s), hr (B, 3, c, c), generator) -> (loss, logs)``: the scalar
loss to minimise (with a gradient) and the values to log (its own name, e.g. ``loss/l1``, and any
batch statistics). ``generator`` is the step's own (:func:`recipe_data.step_generator`), for
losses that draw noise."""


@dataclass(frozen=True)
class RecipeConfig:
    """What the ``tiny`` and ``flow`` recipes share; each adds its ``model`` (an architecture config
    with a ``scale``). YAML fills it (flat keys); unknown keys are errors."""

    model: Any
    """Architecture (the recipe's own config class)."""
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    """How LR inputs are made from HR crops (Real-ESRGAN x4plus defaults)."""
    steps: int = 2000
    """Optimiser steps."""
    batch: int = 16
    """HR crops per step."""
    crop: int = 128
    """HR crop side in pixels (a multiple of the scale, at least 8 times it); the LR side is
    ``crop / scale``."""
    learning_rate: float = 2e-3
    """Peak learning rate (AdamW), reached after ``warmup`` steps, then cosine decay to 0."""
    warmup: int = 50
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    augment: bool = True
    """Random flips and 90-degree rotations of the crops."""
    seed: int = 0
    """Seeds the initialisation, the data order (batch i comes from ``default_rng([seed, i])``)
    and the loss's own draws of step i (flow matching's noise and times)."""
    threads: int = 1
    """torch CPU threads while training (restored afterwards); training is bit-reproducible for
    a fixed seed and thread count. On a shared 2-core machine 1 is faster than 2 (two OpenMP
    threads spin against the other processes)."""
    log_every: int = 20
    """Steps between ``metrics.jsonl`` lines."""

    def __post_init__(self) -> None:
        check_at_least("recipe", 1, steps=self.steps, batch=self.batch, threads=self.threads, log_every=self.log_every)
        check_at_least("recipe", 0, warmup=self.warmup, weight_decay=self.weight_decay, seed=self.seed)
        check_positive("recipe", learning_rate=self.learning_rate)
        scale = self.model.scale
        if self.crop < 8 * scale or self.crop % scale:
            raise ValueError(f"recipe.crop must be a multiple of scale {scale} and >= {8 * scale}, got {self.crop}")


def train_recipe(cfg: RecipeConfig, model: nn.Module, loss_fn: RecipeLoss, photos: str | Path, out: str | Path,
                 *, recipe: str, progress: bool = True) -> Path:
    """Train ``model`` (freshly initialised, changed in place) with ``loss_fn`` on ``cfg.batch``
    random ``cfg.crop`` crops of the images under ``photos`` per step, and save it; returns the
    checkpoint folder ``out/model/``. Writes ``out/train_config.json`` (``recipe`` names it) and
    ``out/metrics.jsonl`` (``step``, the loss's logs, ``lr``, ``time/step``).

    Raises FileNotFoundError when ``photos`` holds no image of at least ``cfg.crop`` pixels, and
    :class:`NonFiniteError` naming the step when the loss is NaN or infinite.
    """
    from finpercep.policies.checkpoint import save_policy
    from finpercep.policies.recipe_data import cosine_lr, load_photos, sample_batch, step_generator

    out = Path(out)
    images = load_photos(photos, cfg.crop)
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / TRAIN_CONFIG, {"recipe": recipe, "photos": str(photos), "config": to_dict(cfg)})
    restart_metrics(out)

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        bar = progress_bar(cfg.steps, model.name, enabled=progress)
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            lr_img, hr = sample_batch(images, cfg.seed, step, cfg.batch, cfg.crop, cfg.model.scale, cfg.degradation,
                                      cfg.augment)
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, cfg.steps, cfg.learning_rate, cfg.warmup)
            loss, logs = loss_fn(model, lr_img, hr, step_generator(cfg.seed, step))
            if not torch.isfinite(loss):
                raise NonFiniteError(f"train_{recipe}: loss is {loss.item()} at step {step + 1}; the run stops here "
                                     f"(this recipe is not resumable: rerun with a learning_rate lower than "
                                     f"{cfg.learning_rate})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                append_metrics(out, {"step": step, **logs, "lr": opt.param_groups[0]["lr"],
                                     "time/step": time.perf_counter() - t0})
            bar.advance(loss=f"{loss.item():.4f}")
        bar.close()
        return save_policy(model.eval(), out / "model")
    finally:
        torch.set_num_threads(threads)
