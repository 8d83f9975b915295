"""Progressive training of FinPercep-RM: RM_0 .. RM_N (PAPER.md sections 3 and 4).

Read top to bottom, the loop is:

    RM_0 = FinPercepRM(stage 0)                      global score only, trained with L_rank
    for k in 1..N:  RM_k = RM_{k-1}.grow()           one more (finer) decoder level
                    train with L = l_map L_map + l_rank L_rank + l_align |S(HR) - S_RM0(HR)|
    every RM_k is saved as RUN/stage_k/ (config.json + model.safetensors)

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
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from finpercep.config import check_at_least, check_positive, from_dict, load_yaml, to_dict
from finpercep.distributed import all_reduce_mean, barrier, destroy, dist_info, init_distributed, local_device
from finpercep.io import (
    CKPT_DIR,
    append_jsonl,
    atomic_write_bytes,
    filter_jsonl,
    latest_checkpoint,
    mark_latest_checkpoint,
    read_latest_checkpoint,
    save_json,
)
from finpercep.reward.losses import RMLossConfig, total_loss
from finpercep.reward.model import FinPercepRM, RMConfig, load_pretrained, save_pretrained
from finpercep.types import NonFiniteError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RMTrainConfig:
    """How RM_0 .. RM_N are trained. YAML files fill it (``--config``); unknown keys are errors."""

    model: RMConfig = field(default_factory=lambda: RMConfig(decoder_stage=0))
    """Architecture. ``decoder_stage`` is ignored: training starts at 0 and grows to ``stages``."""
    loss: RMLossConfig = field(default_factory=RMLossConfig)
    """Loss weights and ranking margins (PAPER.md section 3)."""
    stages: int | None = None
    """N, the last stage; ``None`` = ``len(model.levels)`` (all decoder levels)."""
    steps_per_stage: tuple[int, ...] = (300,)
    """Optimiser steps per stage; one number for all stages, or one per stage 0..N."""
    batch_size: int = 8
    """Triplets per step per process (each triplet is 3 images through the model)."""
    lr: float = 1e-3
    """Learning rate of the decoder and score head (AdamW)."""
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
        check_positive("RMTrainConfig", lr=self.lr)
        if self.grown_backbone_lr is not None:
            check_at_least("RMTrainConfig", 0, grown_backbone_lr=self.grown_backbone_lr)
        if self.crop is not None and self.crop < 32:
            raise ValueError(f"crop must be >= 32 or None, got {self.crop}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    @property
    def last_stage(self) -> int:
        return len(self.model.levels) if self.stages is None else self.stages

    def steps(self, stage: int) -> int:
        return self.steps_per_stage[0] if len(self.steps_per_stage) == 1 else self.steps_per_stage[stage]


def load_train_config(path: str | Path | None, **overrides: Any) -> RMTrainConfig:
    """An :class:`RMTrainConfig` from a YAML file (``yaml.safe_load``), then ``overrides`` (``None``
    values ignored). Raises FileNotFoundError for a missing file and ValueError (one line) for a
    YAML syntax error, an unknown key, a value of the wrong type or out of range."""
    data = load_yaml(path) if path is not None else {}
    cfg = from_dict(RMTrainConfig, data, where=f"{path}:" if path is not None else "RMTrainConfig")
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


class Triplets:
    """The training / validation triplets of an FGR data set, read on demand through :class:`FGRDataset`."""

    def __init__(self, root: Path, records: list[dict], pixel_only: bool) -> None:
        from finpercep.data.dataset import FGRDataset
        from finpercep.data.gt_maps import GTMapConfig, GTMapper

        keys = ("hr", "syn", "sr", "mask") + (() if pixel_only else ("map_syn",))
        self.dataset = FGRDataset(root, keys=keys, records=records)
        self.pixel_mapper = GTMapper(GTMapConfig(pixel_only=True)) if pixel_only else None

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, idx: list[int], crop: int | None, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Stack samples ``idx``: ``hr, syn, sr (B, 3, h, w)``, ``map_syn, mask (B, 1, h, w)``."""
        out: dict[str, list[torch.Tensor]] = {k: [] for k in ("hr", "syn", "sr", "map_syn", "mask")}
        for i in idx:
            item = self.dataset[i]
            item.pop("meta")
            if self.pixel_mapper is not None:
                item["map_syn"] = self.pixel_mapper(item["hr"][None], item["syn"][None])[0]
            if crop is not None:
                h, w = item["hr"].shape[-2:]
                c = min(crop, h, w)
                y, x = int(rng.integers(h - c + 1)), int(rng.integers(w - c + 1))
                item = {k: v[..., y : y + c, x : x + c] for k, v in item.items()}
            for k, v in item.items():
                out[k].append(v)
        return {k: torch.stack(v) for k, v in out.items()}


def split_records(data: Path, val_data: Path | None, cfg: RMTrainConfig) -> tuple[list[dict], list[dict], Path]:
    """Training and validation records. Held-out families are removed from training only."""
    from finpercep.data.builder import read_manifest

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


def save_checkpoint(run: Path, model: FinPercepRM, opt: torch.optim.Optimizer, stage: int, step: int) -> Path:
    """``RUN/ckpt/s{stage}-{step}/`` + ``LATEST``; older checkpoints are removed afterwards."""
    import io

    root = Path(run) / CKPT_DIR
    folder = root / f"s{stage}-{step:07d}"
    save_pretrained(model, folder)
    buf = io.BytesIO()
    torch.save({"stage": stage, "step": step, "optimizer": opt.state_dict()}, buf)
    atomic_write_bytes(folder / "trainer.pt", buf.getvalue())
    mark_latest_checkpoint(run, folder)
    for old in root.iterdir():
        if old.is_dir() and old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)
    return folder


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
    from finpercep.eval.metrics import average_precision, map_mae, order_accuracy, pixel_auroc

    model.eval()
    s = {"hr": [], "syn": [], "sr": []}
    maps, gts, masks = [], [], []
    for i in range(0, len(val), batch):
        b = val.load(list(range(i, min(i + batch, len(val)))), None, np.random.default_rng(0))
        for k in s:
            out = model(b[k].to(device))
            s[k].append(out.score.float().cpu())
            if k == "syn" and out.map is not None:
                maps.append(out.map.float().cpu())
                gts.append(b["map_syn"])
                masks.append(b["mask"])
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


def _optimizer(model: FinPercepRM, cfg: RMTrainConfig, stage: int) -> torch.optim.Optimizer:
    enc_lr = cfg.backbone_lr if stage == 0 or cfg.grown_backbone_lr is None else cfg.grown_backbone_lr
    model.backbone.requires_grad_(enc_lr > 0)
    enc = [p for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    groups = [{"params": rest, "lr": cfg.lr, "base_lr": cfg.lr}]
    if enc:
        groups.append({"params": enc, "lr": enc_lr, "base_lr": enc_lr})
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def _append_metrics(run: Path, rec: dict) -> None:
    append_jsonl(run / "metrics.jsonl", rec)


def _truncate_metrics(run: Path, stage: int, step: int) -> None:
    """Before training ``stage`` from ``step`` (0: from scratch), drop its metric lines logged after
    that step (they will be logged again); earlier, finished stages keep theirs. Torn lines go too."""
    filter_jsonl(run / "metrics.jsonl",
                 lambda r: (r.get("stage", 0), r.get("step", 0)) <= (stage, step) or r.get("stage", 0) < stage)


def _check_finite(run: Path, stage: int, step: int, loss: torch.Tensor, logs: dict[str, float]) -> None:
    """Raise :class:`NonFiniteError` naming the stage, the step (1-based), the non-finite loss terms
    and the last good checkpoint when ``loss`` is NaN or infinite (e.g. a NaN ground-truth map)."""
    if bool(torch.isfinite(loss)):
        return
    bad = [k for k, v in logs.items() if k.startswith("loss/") and not np.isfinite(v)] or ["loss/total"]
    last = latest_checkpoint(run)
    where = f"last good checkpoint: {last[0]}" if last else "no checkpoint was written yet"
    raise NonFiniteError(f"stage {stage} step {step}: non-finite {', '.join(bad)}; the run stops here ({where}; "
                         "nothing was overwritten); check the data set (`finpercep data check`) or lower the learning rate")


def _check_run_config(run: Path, cfg: RMTrainConfig, data: Path) -> None:
    path = run / "train_config.json"
    new = {"config": to_dict(cfg), "data": str(data)}
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("config") != new["config"]:
            diff = sorted(k for k in new["config"] if old.get("config", {}).get(k) != new["config"][k])
            raise ValueError(f"{run} was started with other settings ({', '.join(diff)} differ); "
                             "resume with the same arguments or choose a new --out")
    else:
        save_json(path, new)


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
        _check_run_config(run, cfg, data)
    barrier()
    train_recs, val_recs, val_root = split_records(data, Path(val_data) if val_data else None, cfg)
    pixel_only = cfg.gt_map == "pixel_only"
    train_set = Triplets(data, train_recs, pixel_only)
    val_set = Triplets(val_root, val_recs, pixel_only)
    resume = read_latest_checkpoint(run, keys=("stage", "step", "optimizer"))
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    steps_done = 0
    base: FinPercepRM | None = None
    model: FinPercepRM | None = None
    folders = []
    for k in range(cfg.last_stage + 1):
        if stage_done(run, k):
            model = load_pretrained(stage_dir(run, k), map_location=dev)
            if k == 0:
                base = load_pretrained(stage_dir(run, 0), map_location=dev).requires_grad_(False)
            folders.append(stage_dir(run, k))
            continue
        # A new stage: RM_0 from the pretrained encoder, RM_k grown from RM_{k-1}.
        torch.manual_seed(cfg.seed * 1000 + k)
        if model is None:
            model = FinPercepRM(replace(cfg.model, decoder_stage=0)).to(dev)
        else:
            model = model.grow()
        opt = _optimizer(model, cfg, k)
        start = 0
        if resume is not None and resume[1]["stage"] == k:
            folder, state = resume
            model.load_state_dict(load_pretrained(folder, map_location=dev).state_dict())
            opt = _optimizer(model, cfg, k)
            opt.load_state_dict(state["optimizer"])
            start = int(state["step"])
            log.info("resuming stage %d at step %d from %s", k, start, folder)
        if rank == 0:
            _truncate_metrics(run, k, start)
        net = DDP(model) if dist.is_initialized() else model
        n_steps = cfg.steps(k)
        bar = None
        if progress and rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=n_steps, initial=start, desc=f"RM_{k}", unit="step")
        model.train()
        t_last = time.perf_counter()
        for step in range(start, n_steps):
            # The global batch of this step, then this process's slice of it.
            rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, k, step]))
            idx = rng.integers(len(train_set), size=cfg.batch_size * world).tolist()
            batch = train_set.load(idx[rank * cfg.batch_size : (rank + 1) * cfg.batch_size], cfg.crop, rng)
            b = {key: v.to(dev) for key, v in batch.items()}
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                n = b["hr"].shape[0]
                out = net(torch.cat([b["hr"], b["syn"], b["sr"]]))
                outs = [_slice(out, i * n, (i + 1) * n) for i in range(3)]
                base_gt = None
                if base is not None:
                    with torch.no_grad():
                        base_gt = base(b["hr"]).score.float()
                loss, logs = total_loss(outs[0], outs[1], outs[2], b["map_syn"], base_gt, cfg.loss)
            _check_finite(run, k, step + 1, loss, logs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            steps_done += 1
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss):.3f}")
            if world > 1:  # log the global batch, not rank 0's slice of it
                vals = all_reduce_mean(torch.tensor([float(gn)] + [logs[key] for key in sorted(logs)], dtype=torch.float64))
                gn = vals[0]
                logs = dict(zip(sorted(logs), vals[1:].tolist()))
            if rank == 0 and ((step + 1) % cfg.log_every == 0 or step + 1 == n_steps):
                now = time.perf_counter()
                _append_metrics(run, {"stage": k, "step": step + 1, **logs, "grad_norm": float(gn),
                                      "lr": opt.param_groups[0]["lr"], "time/step": (now - t_last) / cfg.log_every})
                t_last = now
            if (step + 1) % cfg.ckpt_every == 0 and step + 1 < n_steps:
                if rank == 0:
                    save_checkpoint(run, model, opt, k, step + 1)
                barrier()
            if stop_after_steps is not None and steps_done >= stop_after_steps:
                if rank == 0:
                    save_checkpoint(run, model, opt, k, step + 1)
                if bar:
                    bar.close()
                destroy()
                return folders
        if bar:
            bar.close()
        model.eval()
        if rank == 0:
            save_pretrained(model, stage_dir(run, k))
            res = validate(model, val_set, dev) if len(val_set) else {}
            _append_metrics(run, {"stage": k, "step": n_steps, **res})
            save_json(stage_dir(run, k) / "val.json", res)  # last: marks the stage done
            plot_metrics(run)
            log.info("stage %d done: %s", k, res)
        barrier()
        if k == 0:
            base = load_pretrained(stage_dir(run, 0), map_location=dev).requires_grad_(False)
        folders.append(stage_dir(run, k))
    destroy()
    return folders


def _slice(out, a: int, b: int):
    from finpercep.reward.model import RewardOutput

    return RewardOutput(score=out.score[a:b], map=None if out.map is None else out.map[a:b],
                        map_logits=None if out.map_logits is None else out.map_logits[a:b])


def plot_metrics(run: Path) -> Path | None:
    """``RUN/loss.png``: training losses over global steps (stages shaded) and validation per stage."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
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

