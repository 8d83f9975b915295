"""Progressive training of FinPercep-RM: RM_0 .. RM_N (arXiv 2512.22647: the reward model's losses and
its curriculum of growing stages).

Read top to bottom, the loop is:

    RM_0 = FinPercepRM(stage 0)                      global score only, trained with L_rank
    for k in 1..N:  RM_k = RM_{k-1}.grow()           one more (finer) decoder level
                    train with L = l_map L_map + l_rank L_rank + l_align |S(HR) - S_RM0(HR)|
    every RM_k is saved as RUN/stage_k/ (config.json + model.safetensors)

One optimiser step is :func:`rm_train_step`, which co-evolution's refreshes reuse; the run folder's
bookkeeping (``train_config.json``, ``metrics.jsonl``, ``ckpt/``) is :mod:`finpercep.runs`.

Design notes:

- **Data order is a function of (seed, stage, step).** Each step draws its global batch from
  ``SeedSequence([seed, stage, step])`` and rank ``r`` of ``W`` processes takes the ``r``-th slice,
  so a resumed run sees exactly the batches an uninterrupted one would, with no sampler state.
- **Checkpoints** are folders ``RUN/ckpt/s{stage}-{step}/`` holding the model (``config.json`` +
  ``model.safetensors``) and ``trainer.pt`` (optimizer state, stage, step; written last, read with
  ``weights_only=True``), then ``RUN/ckpt/LATEST`` names the newest complete one. A kill at any
  point leaves the previous checkpoint intact. A finished stage is ``RUN/stage_k/`` with its
  validation numbers in ``val.json`` (written last: its presence marks the stage done).
- **Distributed**: launched by ``torchrun``, every process runs this same loop on its slice of the
  batch; gradients are averaged by DDP (gloo on CPU, NCCL on GPU); only rank 0 writes files.
- ``metrics.jsonl`` gets one line per ``log_every`` steps (``loss/*``, ``rank/ordered``,
  ``score/*``, ``lr``, ``time/step``) and one ``val/*`` line per stage; ``loss.png`` plots them.
  A stage that (re)starts drops its lines logged after its checkpoint (all of them without one),
  so a rerun after a kill logs each step once.
- A non-finite loss (e.g. a NaN ground-truth map) stops the run with
  :class:`finpercep.types.NonFiniteError` naming the stage, step and last good checkpoint.
- **Stabilisers for an encoder trained in every stage (v2, ours; all off by default).** The
  alignment target is the frozen ``RM_0`` (always); the encoder has its own, lower learning rate
  (``backbone_lr`` / ``grown_backbone_lr``); the gradient norm is clipped (``max_grad_norm``); each
  loss term can be divided by a running mean of its magnitude (``loss_norm_decay``,
  :class:`finpercep.reward.losses.LossNormalizer`); and an exponential moving average of the
  weights (``ema_decay``, :class:`WeightEMA`) is what a stage saves, validates and grows from.
  Checkpoints hold the EMA and the loss means, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist

from finpercep.config import check_at_least, check_positive, to_dict
from finpercep.distributed import all_reduce_mean, barrier, destroy, dist_info, init_distributed, local_device
from finpercep.io import CKPT_DIR, save_json
from finpercep.reward.losses import LossNormalizer, RMLossConfig, below_loss, total_loss
from finpercep.reward.model import FinPercepRM, RMConfig, config_record, load_pretrained, save_pretrained
from finpercep.runs import (
    TRAIN_CONFIG,
    append_metrics,
    check_config,
    last_checkpoint_note,
    load_trainer_state,
    progress_bar,
    read_metrics,
    save_trainer_state,
    truncate_metrics,
)
from finpercep.types import NonFiniteError, RewardOutput, Triplet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RMTrainConfig:
    """How RM_0 .. RM_N are trained. YAML files fill it (``--config``); unknown keys are errors."""

    model: RMConfig = field(default_factory=lambda: RMConfig(decoder_stage=0))
    """Architecture. ``decoder_stage`` is ignored: training starts at 0 and grows to ``stages``."""
    loss: RMLossConfig = field(default_factory=RMLossConfig)
    """Loss weights and ranking margins (the losses of arXiv 2512.22647)."""
    stages: int | None = None
    """N, the last stage; ``None`` = ``len(model.levels)`` (all decoder levels)."""
    steps_per_stage: tuple[int, ...] = (300,)
    """Optimiser steps per stage; one number for all stages, or one per stage 0..N."""
    batch_size: int = 8
    """Triplets per step per process (each triplet is 3 images through the model)."""
    learning_rate: float = 1e-3
    """Learning rate of the decoder and score head (AdamW). Runs whose ``train_config.json`` still
    says ``lr`` resume (:func:`finpercep.runs.check_config`)."""
    backbone_lr: float = 1e-4
    """Learning rate of the pretrained encoder."""
    grown_backbone_lr: float | None = None
    """Encoder learning rate for stages >= 1; ``None`` = ``backbone_lr``; 0 freezes the encoder
    after RM_0, so the grown stages train only the decoder and score head on RM_0's features. (Our
    first embedded run, with the encoder trained in every stage, lost its score: the map loss moved
    the shared features, the alignment loss exploded, and the score head's units died.)"""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    warmup_steps: int = 20
    """Linear warm-up at the start of each stage (new parameters appear at each growth)."""
    crop: int | None = None
    """Random square crop of each triplet for training (``None`` = whole sample). Validation
    always uses whole samples."""
    gt_map: Literal["dataset", "pixel_only"] = "dataset"
    """Map targets: the data set's ``map_syn`` (pixel + feature), or recomputed from pixel
    differences only (the paper's ablation) from the same data."""
    exclude_families: tuple[str, ...] = ()
    """SR families left out of training entirely (held out for evaluation)."""
    val_fraction: float = 0.1
    """Without ``--val-data``: the last units of the data set held out for validation."""
    val_max: int = 64
    """At most this many validation samples per stage."""
    log_every: int = 10
    """Steps between ``metrics.jsonl`` lines."""
    ckpt_every: int = 50
    """Steps between resumable checkpoints."""
    seed: int = 0
    """Seeds model initialisation and the data order."""
    amp: Literal["none", "bf16", "fp16"] = "none"
    """Autocast precision (GPU); ``none`` = float32."""
    max_grad_norm: float = 5.0
    """Clip the global gradient norm (encoder, decoder and head together) to this before each step."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the weights (:class:`WeightEMA`, decay in (0, 1),
    warmed up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates); the EMA weights are what
    a stage saves, validates and grows the next stage from. ``None`` = no EMA (the v1 recipe)."""
    loss_norm_decay: float | None = None
    """Loss normalisation (:mod:`finpercep.reward.losses`): divide each loss term by the running
    mean of its magnitude, with this decay in [0, 1) (about ``1 / (1 - decay)`` steps of memory), so
    the map loss cannot dominate the others. ``None`` = the plain weighted sum (the paper, v1)."""
    loss_norm_floor: float = 0.01
    """Smallest divisor of loss normalisation, > 0: a term whose running mean falls below it (a
    mostly satisfied hinge, an alignment already met) is not blown up into a large gradient."""
    channels_last: bool = False
    """Train in the channels-last memory format (model and inputs): the same losses and gradients up
    to float rounding (not bit for bit); faster in 2 of 3 runs of ``benchmarks/rm_train_speed.py`` on
    a loaded 2-core CPU (``docs/reward_model.md``, v2). Off by default so that runs started before
    it resume bit for bit; the v2 recipe turns it on."""

    edit_negatives: float = 0.0
    """Weight of the edit-ranking term ``L_edit`` (v2, ours; 0 = off, the v1 recipe): every step, each
    HR crop also gets a random negative edit (:func:`finpercep.data.negatives.random_negative_edits`:
    darker, gamma, saturation, contrast, blur, plastic, flat or constant, severity ~ U[0.1, 1]) that
    must score ``m1 + m2`` below it (:func:`finpercep.reward.losses.below_loss`). The data engine's
    negative families teach the same through region swaps; this term shows every photo of every
    batch edited, at one more image per triplet."""
    adversarial_weight: float = 0.0
    """Weight of the adversarial term ``L_adv`` (v2, ours; 0 = off): every step, the batch's SR images
    are pushed up the reward by ``adversarial_steps`` signed-gradient steps in pixel space within an
    L-inf ball of ``adversarial_eps`` (random start, the "fast" adversarial training of Wong et al.,
    arXiv 2001.03994), and must still score ``m1 + m2`` below their HR. Aimed at what
    ``benchmarks/rm_hackability.py`` measures: a reward an optimiser can raise by imperceptible
    pixel changes. Costs ``adversarial_steps`` extra forward and backward passes over B images."""
    adversarial_steps: int = 1
    """Ascent steps of the adversarial term (each of size ``1.25 * adversarial_eps / steps``)."""
    adversarial_eps: float = 8 / 255
    """L-inf radius of the adversarial term's perturbation, in [0, 1] pixel units."""

    def __post_init__(self) -> None:
        n = len(self.model.levels)
        if self.stages is not None and not 0 <= self.stages <= n:
            raise ValueError(f"stages must be in [0, {n}] (len(model.levels)), got {self.stages}")
        if not self.steps_per_stage or any(s < 1 for s in self.steps_per_stage):
            raise ValueError(f"steps_per_stage must be positive, got {self.steps_per_stage}")
        if len(self.steps_per_stage) not in (1, self.last_stage + 1):
            raise ValueError(f"steps_per_stage needs 1 or {self.last_stage + 1} entries, got {len(self.steps_per_stage)}")
        check_at_least("RMTrainConfig", 1, batch_size=self.batch_size, log_every=self.log_every,
                       ckpt_every=self.ckpt_every)
        check_at_least("RMTrainConfig", 0, backbone_lr=self.backbone_lr, weight_decay=self.weight_decay,
                       warmup_steps=self.warmup_steps, val_max=self.val_max, seed=self.seed)
        check_positive("RMTrainConfig", learning_rate=self.learning_rate)
        if self.grown_backbone_lr is not None:
            check_at_least("RMTrainConfig", 0, grown_backbone_lr=self.grown_backbone_lr)
        check_positive("RMTrainConfig", max_grad_norm=self.max_grad_norm)
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"RMTrainConfig.ema_decay must be in (0, 1) or None, got {self.ema_decay}")
        if self.loss_norm_decay is not None and not 0 <= self.loss_norm_decay < 1:
            raise ValueError(f"RMTrainConfig.loss_norm_decay must be in [0, 1) or None, "
                             f"got {self.loss_norm_decay}")
        check_positive("RMTrainConfig", loss_norm_floor=self.loss_norm_floor)
        check_at_least("RMTrainConfig", 0, edit_negatives=self.edit_negatives,
                       adversarial_weight=self.adversarial_weight)
        check_at_least("RMTrainConfig", 1, adversarial_steps=self.adversarial_steps)
        if not 0 < self.adversarial_eps <= 1:
            raise ValueError(f"RMTrainConfig.adversarial_eps must be in (0, 1], got {self.adversarial_eps}")
        if self.crop is not None and self.crop < 32:
            raise ValueError(f"crop must be >= 32 or None, got {self.crop}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    @property
    def last_stage(self) -> int:
        return len(self.model.levels) if self.stages is None else self.stages

    def steps(self, stage: int) -> int:
        return self.steps_per_stage[0] if len(self.steps_per_stage) == 1 else self.steps_per_stage[stage]


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


class Triplets:
    """The training / validation triplets of an FGR data set: its :class:`FGRDataset` (the reader)
    and the map target, the data set's ``map_syn`` or, for the pixel-only ablation, one recomputed
    from pixel differences on each whole sample."""

    def __init__(self, root: Path, records: list[dict], pixel_only: bool) -> None:
        from finpercep.data.dataset import TRIPLET_KEYS, FGRDataset
        from finpercep.data.gt_maps import GTMapConfig, GTMapper

        keys = tuple(k for k in TRIPLET_KEYS if not (pixel_only and k == "map_syn"))
        self.dataset = FGRDataset(root, keys=keys, records=records)
        self.pixel_mapper = GTMapper(GTMapConfig(pixel_only=True)) if pixel_only else None

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, idx: list[int], crop: int | None, rng: np.random.Generator) -> Triplet:
        """Samples ``idx`` as one :class:`Triplet` with ``mask``, in random ``crop`` windows drawn
        from ``rng`` (:meth:`FGRDataset.load_triplets`)."""
        return self.dataset.load_triplets(idx, crop, rng, map_syn=self.pixel_mapper)


def split_records(data: Path, val_data: Path | None, cfg: RMTrainConfig) -> tuple[list[dict], list[dict], Path]:
    """Training and validation records. Held-out families are removed from training only."""
    from finpercep.data.dataset import read_manifest

    records = read_manifest(data)
    if not records:
        raise FileNotFoundError(f"{data} holds no samples (no manifest.jsonl); build one with `finpercep data build`")
    excluded = set(cfg.exclude_families)
    if val_data is not None:
        val = read_manifest(val_data)
        if not val:
            raise FileNotFoundError(f"--val-data {val_data} holds no samples")
        val_root = val_data
        train = records
    else:
        units = sorted({r["unit"] for r in records})
        n_val = int(round(len(units) * cfg.val_fraction))
        val_units = set(units[len(units) - n_val :]) if n_val else set()
        train = [r for r in records if r["unit"] not in val_units]
        val = [r for r in records if r["unit"] in val_units]
        val_root = data
    train = [r for r in train if r["sr_family"] not in excluded]
    if not train:
        raise ValueError("no training samples left after the validation split and --exclude-families")
    return train, val[: cfg.val_max], val_root


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def save_checkpoint(
    run: Path, model: FinPercepRM, opt: torch.optim.Optimizer, stage: int, step: int, extra: dict | None = None
) -> Path:
    """``RUN/ckpt/s{stage}-{step}/`` (model + ``trainer.pt``) + ``LATEST``; older checkpoints are
    removed afterwards (:func:`finpercep.runs.save_trainer_state`). ``extra``: more trainer state
    (``ema``, ``loss_norm``), tensors and plain values only."""
    folder = Path(run) / CKPT_DIR / f"s{stage}-{step:07d}"
    save_pretrained(model, folder)
    state = {"stage": stage, "step": step, "optimizer": opt.state_dict(), **(extra or {})}
    return save_trainer_state(run, folder, state)


V2_FIELDS = ("max_grad_norm", "ema_decay", "loss_norm_decay", "loss_norm_floor", "channels_last", "edit_negatives",
             "adversarial_weight", "adversarial_steps", "adversarial_eps")
"""Fields added to :class:`RMTrainConfig` after runs were already being saved (v2)."""


def run_record(cfg: RMTrainConfig) -> dict:
    """``cfg`` as saved in ``RUN/train_config.json`` and compared on resume: :func:`to_dict` without
    the fields of :data:`V2_FIELDS` (and the model's, :func:`finpercep.reward.model.config_record`)
    that are at their defaults, so a run folder started before they existed (its file lacks them)
    still resumes with the settings it was started with."""
    rec, ref = to_dict(cfg), to_dict(RMTrainConfig())
    for name in V2_FIELDS:
        if rec[name] == ref[name]:
            del rec[name]
    rec["model"] = config_record(cfg.model)
    return rec


class WeightEMA:
    """Exponential moving average of a model's weights (Polyak averaging; the "mean teacher" of
    Tarvainen & Valpola 2017), a v2 stabiliser of ours: ``module`` holds a frozen copy updated by
    ``w_ema <- d w_ema + (1 - d) w`` after every optimiser step, ``d = min(decay, (1 + n) / (10 + n))``
    after ``n`` updates (short stages are not dominated by the initial weights). Floating buffers are
    averaged too, the others copied. Its weights are what a stage saves (``RMTrainConfig.ema_decay``)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"WeightEMA: decay must be in (0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        mine, theirs = self.module.state_dict(), model.state_dict()
        for k, v in mine.items():
            if v.is_floating_point():
                v.lerp_(theirs[k].detach(), 1 - d)
            else:
                v.copy_(theirs[k])
        self.updates += 1

    def state_dict(self) -> dict:
        return {"weights": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])


def stage_dir(run: Path, k: int) -> Path:
    return run / f"stage_{k}"


def stage_done(run: Path, k: int) -> bool:
    return (stage_dir(run, k) / "val.json").exists()


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def validate(model: FinPercepRM, val: Triplets, device: torch.device, batch: int = 8) -> dict[str, float]:
    """Map quality (vs. ``M_gt`` and the swap mask) and triplet ordering on whole samples."""
    from finpercep.metrics import average_precision, map_mae, order_accuracy, pixel_auroc

    model.eval()
    s = {"hr": [], "syn": [], "sr": []}
    maps, gts, masks = [], [], []
    for i in range(0, len(val), batch):
        b = val.load(list(range(i, min(i + batch, len(val)))), None, np.random.default_rng(0))
        for k in s:
            out = model(getattr(b, k).to(device))
            s[k].append(out.score.float().cpu())
            if k == "syn" and out.map is not None:
                maps.append(out.map.float().cpu())
                gts.append(b.map_syn)
                masks.append(b.mask)
    res = {"val/order_acc": order_accuracy(*(torch.cat(s[k]) for k in ("hr", "syn", "sr"))),
           "val/score_hr": float(torch.cat(s["hr"]).mean()), "val/score_syn": float(torch.cat(s["syn"]).mean()),
           "val/score_sr": float(torch.cat(s["sr"]).mean()), "val/samples": len(val)}
    if maps:
        m, g, k = torch.cat(maps), torch.cat(gts), torch.cat(masks) > 0.5
        res["val/map_mae"] = map_mae(m, g)
        res["val/map_auroc"] = pixel_auroc(m.flatten(), k.flatten())
        res["val/map_ap"] = average_precision(m.flatten(), k.flatten())
    return res


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def build_optimizer(model: FinPercepRM, cfg: RMTrainConfig, stage: int) -> torch.optim.Optimizer:
    """AdamW for stage ``stage`` with two parameter groups, each with its ``base_lr`` (the warm-up
    scales ``lr`` from it): the decoder and score head at ``learning_rate``, the encoder at
    ``backbone_lr`` (stage 0) or ``grown_backbone_lr`` (later stages; 0 freezes it: its parameters
    get ``requires_grad = False`` and no group)."""
    enc_lr = cfg.backbone_lr if stage == 0 or cfg.grown_backbone_lr is None else cfg.grown_backbone_lr
    model.backbone.requires_grad_(enc_lr > 0)
    enc = [p for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    groups = [{"params": rest, "lr": cfg.learning_rate, "base_lr": cfg.learning_rate}]
    if enc:
        groups.append({"params": enc, "lr": enc_lr, "base_lr": enc_lr})
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def rm_train_step(
    model: torch.nn.Module,
    batch: Triplet,
    loss_cfg: RMLossConfig,
    opt: torch.optim.Optimizer,
    *,
    base: torch.nn.Module | None = None,
    max_grad_norm: float = 5.0,
    amp: torch.dtype | None = None,
    ddp: torch.nn.Module | None = None,
    loss_norm: LossNormalizer | None = None,
    channels_last: bool = False,
    edits: torch.Tensor | None = None,
    edit_weight: float = 0.0,
    adversarial_weight: float = 0.0,
    adversarial_steps: int = 1,
    adversarial_eps: float = 8 / 255,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One optimiser step of FinPercep-RM on ``B`` triplets (arXiv 2512.22647, Sec. 3): HR, syn and
    SR through the model in one pass, ``L = l_rank L_rank + l_map L_map + l_align |S(HR) -
    S_RM0(HR)|`` (:func:`finpercep.reward.losses.total_loss`), backward, gradient-norm clip, step.
    Used by :func:`train_reward_model` and by co-evolution's refreshes
    (:meth:`finpercep.curriculum.coevolve.Coevolver.refresh`).

    Args:
        model: the reward model (train mode; its trainable parameters are the optimiser's).
        batch: images ``(B, 3, H, W)`` in [0, 1] and ``map_syn`` ``(B, 1, H, W)``, on the model's device.
        loss_cfg: loss weights and ranking margins.
        opt: the optimiser; its learning rates are the caller's (warm-up).
        base: the frozen ``RM_0`` whose HR scores anchor the alignment term; ``None`` = no term.
        max_grad_norm: clip the gradient norm to this.
        amp: autocast dtype (``torch.bfloat16`` / ``torch.float16``); ``None`` = float32.
        ddp: ``model`` wrapped in ``DistributedDataParallel`` (multi-process training), used for
            the forward pass so gradients are averaged over processes.
        loss_norm: running means of the loss terms (``RMTrainConfig.loss_norm_decay``): the terms are
            divided by its ``scales()``, and it is updated with this step's terms after the step.
        channels_last: pass the images in the channels-last memory format (for a model converted
            with ``model.to(memory_format=torch.channels_last)``).
        edits: negative edits of ``batch.hr`` ``(B, 3, H, W)`` in [0, 1]
            (:func:`finpercep.data.negatives.random_negative_edits`), for ``L_edit`` with weight
            ``edit_weight`` (v2; :func:`finpercep.reward.losses.below_loss`, margin ``m1 + m2``).
        adversarial_weight, adversarial_steps, adversarial_eps: ``L_adv`` (v2): ``batch.sr`` after
            :func:`pixel_ascent` on the model must score ``m1 + m2`` below the HR; 0 = off.
        generator: the random start of :func:`pixel_ascent` (CPU generator; ``None`` = global RNG).

    Returns the loss terms as floats (``loss/total``, ``loss/rank``, ``loss/map``, ``loss/align``,
    ``loss/edit``, ``loss/adv`` when on,
    ``rank/ordered``, ``score/*``, with ``loss_norm`` also ``loss_scale/*``) and ``grad_norm``, the
    gradient norm before clipping.
    Raises :class:`NonFiniteError` (``non-finite loss/map``, naming the non-finite terms) before
    any gradient is taken, so the model and the optimiser are left as they were.
    """
    n = len(batch)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.autocast(batch.hr.device.type, dtype=amp, enabled=amp is not None):
        negatives: dict[str, tuple[float, torch.Tensor]] = {}  # v2 terms: name -> (weight, images)
        if edits is not None and edit_weight > 0:
            negatives["edit"] = (edit_weight, edits)
        if adversarial_weight > 0:
            adv = pixel_ascent(model, batch.sr.contiguous(memory_format=fmt), adversarial_eps, adversarial_steps,
                               generator)
            negatives["adv"] = (adversarial_weight, adv)
        # (3B + ..., 3, H, W): HR, syn, SR, then the negatives
        x = torch.cat([batch.hr, batch.syn, batch.sr] + [v for _, v in negatives.values()])
        x = x.contiguous(memory_format=fmt)
        out = (ddp or model)(x)
        outs = [_slice(out, i * n, (i + 1) * n) for i in range(3 + len(negatives))]
        base_gt = None
        if base is not None:
            with torch.no_grad():
                base_gt = base(x[:n]).score.float()  # RM_0's scale, the alignment target
        scales = loss_norm.scales() if loss_norm is not None else None
        loss, logs = total_loss(outs[0], outs[1], outs[2], batch.map_syn, base_gt, loss_cfg, scales)
        for (term, (weight, _)), o in zip(negatives.items(), outs[3:]):
            term_loss = below_loss(outs[0].score, o.score, loss_cfg.m1 + loss_cfg.m2)
            div = (scales or {}).get(term, 1.0)
            loss = loss + weight * term_loss / div
            logs[f"loss/{term}"] = float(term_loss.detach())
            logs[f"score/{term}"] = float(o.score.detach().float().mean())
            if scales is not None:
                logs[f"loss_scale/{term}"] = div
        logs["loss/total"] = float(loss.detach())
    if not bool(torch.isfinite(loss)):
        bad = [k for k, v in logs.items() if k.startswith("loss/") and not np.isfinite(v)] or ["loss/total"]
        raise NonFiniteError(f"non-finite {', '.join(bad)}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    if loss_norm is not None:
        loss_norm.update(logs)
    return {**logs, "grad_norm": float(grad_norm)}


def pixel_ascent(
    model: torch.nn.Module, x: torch.Tensor, eps: float, steps: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``x`` pushed up the model's score by signed-gradient ascent in pixel space (v2, ours): a random
    start ``x + U(-eps, eps)``, then ``steps`` steps of size ``1.25 eps / steps`` along
    ``sign(dS/dx)``, each projected back onto the L-inf ball of radius ``eps`` around ``x`` and onto
    [0, 1] (projected gradient ascent; with one step, the "fast" FGSM with random start of Wong et
    al., arXiv 2001.03994). The attack an RL policy can mount on a differentiable reward, in small.

    ``x`` ``(B, 3, H, W)`` in [0, 1]; ``eps`` > 0 in pixel units; ``generator`` a CPU generator for
    the start. Returns a detached tensor like ``x``; the model's parameters get no gradient.
    """
    if not eps > 0 or steps < 1:
        raise ValueError(f"pixel_ascent: eps must be > 0 and steps >= 1, got {eps}, {steps}")
    x = x.detach()
    start = (torch.rand(x.shape, generator=generator, dtype=torch.float32) * 2 - 1) * eps
    adv = (x + start.to(device=x.device, dtype=x.dtype)).clamp(0, 1)
    alpha = 1.25 * eps / steps
    for _ in range(steps):
        adv = adv.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(adv).score.float().sum(), adv)
        adv = torch.minimum(torch.maximum(adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return adv.detach()


def train_reward_model(
    data: str | Path,
    run: str | Path,
    cfg: RMTrainConfig = RMTrainConfig(),
    *,
    val_data: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
    stop_after_steps: int | None = None,
) -> list[Path]:
    """Train RM_0 .. RM_N into ``run`` (resuming whatever is there). Returns the stage folders.

    ``stop_after_steps`` ends the call after that many optimiser steps (for tests of resume).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    init_distributed(device)
    rank, world = dist_info()
    device = local_device(device)
    dev = torch.device(device)
    data, run = Path(data), Path(run)
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        check_config(run, TRAIN_CONFIG, {"config": run_record(cfg), "data": str(data)}, compare="config")
    barrier()
    train_recs, val_recs, val_root = split_records(data, Path(val_data) if val_data else None, cfg)
    pixel_only = cfg.gt_map == "pixel_only"
    train_set = Triplets(data, train_recs, pixel_only)
    val_set = Triplets(val_root, val_recs, pixel_only)
    resume = load_trainer_state(run, keys=("stage", "step", "optimizer"))
    if cfg.edit_negatives > 0:
        from finpercep.data.negatives import random_negative_edits
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    steps_done = 0
    base: FinPercepRM | None = None
    model: FinPercepRM | None = None
    folders = []
    for k in range(cfg.last_stage + 1):
        if stage_done(run, k):
            model = load_pretrained(stage_dir(run, k), map_location=dev)
            if k == 0:
                base = load_pretrained(stage_dir(run, 0), map_location=dev).requires_grad_(False).to(memory_format=fmt)
            folders.append(stage_dir(run, k))
            continue
        # A new stage: RM_0 from the pretrained encoder, RM_k grown from RM_{k-1}.
        torch.manual_seed(cfg.seed * 1000 + k)
        if model is None:
            model = FinPercepRM(replace(cfg.model, decoder_stage=0)).to(dev)
        else:
            model = model.grow()
        model = model.to(memory_format=fmt)
        opt = build_optimizer(model, cfg, k)
        # v2 stabilisers (module docstring); both are per stage, like the optimiser.
        ema = WeightEMA(model, cfg.ema_decay) if cfg.ema_decay is not None else None
        loss_norm = (LossNormalizer(cfg.loss_norm_decay, cfg.loss_norm_floor)
                     if cfg.loss_norm_decay is not None else None)
        start = 0
        if resume is not None and resume[1]["stage"] == k:
            folder, state = resume
            model.load_state_dict(load_pretrained(folder, map_location=dev).state_dict())
            opt = build_optimizer(model, cfg, k)
            opt.load_state_dict(state["optimizer"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            if loss_norm is not None:
                loss_norm.load_state_dict(state["loss_norm"])
            start = int(state["step"])
            log.info("resuming stage %d at step %d from %s", k, start, folder)
        if rank == 0:
            truncate_metrics(run, (k, start), keys=("stage", "step"))
        ddp = DDP(model) if dist.is_initialized() else None
        n_steps = cfg.steps(k)
        bar = progress_bar(n_steps, f"RM_{k}", initial=start, enabled=progress and rank == 0)
        model.train()
        t_last = time.perf_counter()
        for step in range(start, n_steps):
            # The global batch of this step, then this process's slice of it.
            rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, k, step]))
            idx = rng.integers(len(train_set), size=cfg.batch_size * world).tolist()
            b = train_set.load(idx[rank * cfg.batch_size : (rank + 1) * cfg.batch_size], cfg.crop, rng).to(dev)
            # v2 terms draw from the step's generator after the batch, so v1 runs keep their data stream.
            edits = random_negative_edits(b.hr, rng)[0] if cfg.edit_negatives > 0 else None
            gen = (torch.Generator().manual_seed(int(rng.integers(2**62)))
                   if cfg.adversarial_weight > 0 else None)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
            try:
                logs = rm_train_step(model, b, cfg.loss, opt, base=base, max_grad_norm=cfg.max_grad_norm, amp=amp,
                                     ddp=ddp, loss_norm=loss_norm, channels_last=cfg.channels_last, edits=edits,
                                     edit_weight=cfg.edit_negatives, adversarial_weight=cfg.adversarial_weight,
                                     adversarial_steps=cfg.adversarial_steps, adversarial_eps=cfg.adversarial_eps,
                                     generator=gen)
            except NonFiniteError as e:  # e.g. a NaN ground-truth map
                raise NonFiniteError(f"stage {k} step {step + 1}: {e}; the run stops here ({last_checkpoint_note(run)}; "
                                     "nothing was overwritten); check the data set (`finpercep data check`) or lower "
                                     "the learning rate") from None
            if ema is not None:
                ema.update(model)
            steps_done += 1
            bar.advance(loss=f"{logs['loss/total']:.3f}")
            if world > 1:  # log the global batch, not rank 0's slice of it
                keys = sorted(logs)
                logs = dict(zip(keys, all_reduce_mean(torch.tensor([logs[key] for key in keys], dtype=torch.float64)).tolist()))
            if rank == 0 and ((step + 1) % cfg.log_every == 0 or step + 1 == n_steps):
                now = time.perf_counter()
                append_metrics(run, {"stage": k, "step": step + 1, **logs, "lr": opt.param_groups[0]["lr"],
                                     "time/step": (now - t_last) / cfg.log_every})
                t_last = now
            # The stabilisers' state only when there is some: the call stays the v1 one otherwise.
            extra = _stabiliser_state(ema, loss_norm)
            ckpt = (run, model, opt, k, step + 1) + ((extra,) if extra else ())
            if (step + 1) % cfg.ckpt_every == 0 and step + 1 < n_steps:
                if rank == 0:
                    save_checkpoint(*ckpt)
                barrier()
            if stop_after_steps is not None and steps_done >= stop_after_steps:
                if rank == 0:
                    save_checkpoint(*ckpt)
                bar.close()
                destroy()
                return folders
        bar.close()
        if ema is not None:  # the stage's result is the averaged model: saved, validated, grown from
            model = ema.module
        model.eval()
        if rank == 0:
            save_pretrained(model, stage_dir(run, k))
            res = validate(model, val_set, dev) if len(val_set) else {}
            append_metrics(run, {"stage": k, "step": n_steps, **res})
            save_json(stage_dir(run, k) / "val.json", res)  # last: marks the stage done
            plot_metrics(run)
            log.info("stage %d done: %s", k, res)
        barrier()
        if k == 0:
            base = load_pretrained(stage_dir(run, 0), map_location=dev).requires_grad_(False).to(memory_format=fmt)
        folders.append(stage_dir(run, k))
    destroy()
    return folders


def _stabiliser_state(ema: WeightEMA | None, loss_norm: LossNormalizer | None) -> dict:
    """The trainer state of the v2 stabilisers that are on (``ema``, ``loss_norm``), for ``trainer.pt``."""
    state = {}
    if ema is not None:
        state["ema"] = ema.state_dict()
    if loss_norm is not None:
        state["loss_norm"] = loss_norm.state_dict()
    return state


def _slice(out: RewardOutput, a: int, b: int) -> RewardOutput:
    """Rows ``a:b`` of every tensor of ``out`` (the HR / syn / SR thirds of one forward pass)."""
    return RewardOutput(score=out.score[a:b], map=None if out.map is None else out.map[a:b],
                        map_logits=None if out.map_logits is None else out.map_logits[a:b])


def plot_metrics(run: Path) -> Path | None:
    """``RUN/loss.png``: training losses over global steps (stages shaded) and validation per stage."""
    recs = read_metrics(run)
    if not recs:
        return None
    from finpercep.viz import pyplot

    plt = pyplot()

    train = [r for r in recs if "loss/total" in r]
    val = [r for r in recs if any(k.startswith("val/") for k in r)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    offsets: dict[int, int] = {}
    total = 0
    for r in val:
        offsets[r["stage"]] = total
        total += r["step"]
    for key in ("loss/total", "loss/rank", "loss/map", "loss/align"):
        xs = [offsets.get(r["stage"], 0) + r["step"] for r in train if key in r]
        ys = [r[key] for r in train if key in r]
        if xs:
            axes[0].plot(xs, ys, label=key, lw=1)
    for s, off in offsets.items():
        axes[0].axvline(off, color="grey", lw=0.5, ls=":")
    axes[0].set_xlabel("step (all stages)")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[0].set_title("training loss")
    for key in ("val/order_acc", "val/map_auroc", "val/map_ap", "val/map_mae"):
        pts = [(r["stage"], r[key]) for r in val if key in r]
        if pts:
            axes[1].plot(*zip(*pts), marker="o", label=key)
    axes[1].set_xlabel("stage k (RM_k)")
    axes[1].set_ylim(0, 1.02)
    axes[1].legend(fontsize=8)
    axes[1].set_title("validation per stage")
    fig.tight_layout()
    out = run / "loss.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

