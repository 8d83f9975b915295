"""What the three RL loops (ReFL, DPO, GRPO) share: the run configuration, the training pairs,
the run folder (config, metrics, samples, checkpoints, resume; the bookkeeping itself is
:mod:`finpercep.runs`, shared with every trainer), the reference policy, the reward source, and
small pure helpers (dense credit, finiteness guard). Each algorithm's loop lives in its own file
and reads top to bottom; this module holds no control flow of theirs.

A run folder ``RUN/`` holds

- ``run_config.json``: the resolved configuration, the policy, the reward spec and the data;
  resuming with other settings is an error;
- ``metrics.jsonl``: one line per logged step (``reward/mean``, ``reward/std``, ``fidelity/l1``,
  ``kl``, ``grad_norm``, ``time/*``, ...);
- ``samples/step_XXXXXXX.png``: LR | SR | reward map over SR | HR for a few training images;
- ``ckpt/step_XXXXXXX/``: ``policy/`` (a plain policy checkpoint, LoRA merged, loadable wherever a
  policy name works) and ``trainer.pt`` (trainable tensors, optimiser, step, extra state), with
  ``ckpt/LATEST`` naming the newest; ``final/``: the policy at the end of the run.

Randomness is a pure function of ``(seed, step)``: the batch of step ``s`` and every noise draw in
it come from generators seeded with ``SeedSequence([seed, s, ...])``, and LoRA adapters are
initialised from ``seeded_generator(seed, LORA_INIT_KEY)``, so two runs with the same seed are
identical and a resumed run repeats an uninterrupted one exactly.

A killed run is rerun with the same command: it resumes from ``ckpt/LATEST`` (or step 0), cuts
``metrics.jsonl`` back to that point, and writes ``final/`` even when the kill came after the last
checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from finpercep.config import check_at_least, check_positive, to_dict
from finpercep.io import CKPT_DIR
from finpercep.runs import (
    RUN_CONFIG,
    Progress,
    append_metrics,
    check_config,
    last_checkpoint_note,
    load_trainer_state,
    progress_bar,
    save_trainer_state,
    truncate_metrics,
)
from finpercep.types import AdapterPolicy, NonFiniteError, Reward, RewardOutput, RewardSource, StochasticPolicy

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class RunConfig:
    """Settings every algorithm shares."""

    steps: int = 100
    """Optimiser steps."""
    batch: int = 4
    """LR images per optimiser step, over all processes together (GRPO / DPO: prompts, each
    sampled ``group_size`` times)."""
    grad_accum: int = 1
    """Split each process's share of the batch into this many micro-batches whose gradients are
    accumulated (same update, less memory)."""
    crop: int = 128
    """HR crop size in pixels (the LR crop is ``crop / scale``); 0 = whole images."""
    learning_rate: float = 1e-4
    """Adam learning rate (no weight decay: a zero gradient must leave the policy unchanged).
    Saved runs whose ``run_config.json`` still says ``lr`` resume (:func:`finpercep.runs.check_config`)."""
    lora_rank: int = 0
    """0 = fine-tune every parameter; r >= 1 = LoRA adapters of rank r on every convolution,
    the base frozen (:mod:`finpercep.policies.lora`). A ``diffusers:`` policy needs r >= 1: peft
    adapters on its UNet (:mod:`finpercep.policies.diffusion_onestep`)."""
    lora_alpha: float | None = None
    """LoRA scale numerator (scale = alpha / rank); ``None`` = rank."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    dense_credit: float = 0.0
    """Dense credit (ours, beyond the paper): strength ``a`` of the per-pixel weight
    ``w = 1 + a * M / mean(M)`` built from the reward's map ``M``; 0 = off. ReFL scales the
    reward's gradient at each pixel by ``w``; GRPO weights each pixel's log-probability by ``w``.
    Needs a reward with a map."""
    seed: int = 0
    """Seed of the data order and of every noise draw."""
    log_every: int = 1
    """Write a metrics line every N steps."""
    sample_every: int = 50
    """Write a sample grid every N steps (and at the last step); 0 = never."""
    ckpt_every: int = 50
    """Checkpoint every N steps (and at the end); a killed run resumes from the newest."""
    num_samples: int = 4
    """Images in each sample grid."""
    gaussian_sigma: float = 0.02
    """DPO / GRPO on a one-step policy (RealSR, Real-ESRGAN, waifu2x, tiny-x4): it is wrapped as
    the Gaussian policy ``N(f(lr), sigma^2)`` (:mod:`finpercep.policies.gaussian`); the std in
    [0, 1] pixel units."""

    def __post_init__(self) -> None:
        check_at_least("run", 1, steps=self.steps, batch=self.batch, grad_accum=self.grad_accum,
                       log_every=self.log_every, ckpt_every=self.ckpt_every)
        check_at_least("run", 0, crop=self.crop, lora_rank=self.lora_rank, dense_credit=self.dense_credit,
                       max_grad_norm=self.max_grad_norm, seed=self.seed, sample_every=self.sample_every,
                       num_samples=self.num_samples)
        check_positive("run", learning_rate=self.learning_rate, gaussian_sigma=self.gaussian_sigma)
        if self.lora_alpha is not None:
            check_positive("run", lora_alpha=self.lora_alpha)


LORA_INIT_KEY = 0x4C6F5241  # "LoRA"
"""``seeded_generator(seed, LORA_INIT_KEY)`` initialises a run's LoRA adapters (a key no step reaches)."""


def seeded_generator(*key: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator whose state is a pure function of ``key`` (e.g. ``seed, step, purpose``)."""
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Training pairs


class PairData:
    """The (LR, HR) pairs of an FGR data set (``finpercep data build``), read by its
    :class:`~finpercep.data.dataset.FGRDataset`: each LR/HR pair once (the first record naming its
    LR), however many masks were drawn on it. ``batch(...)`` is a pure function of its arguments.

    Raises ``FileNotFoundError`` without a manifest, ``ValueError`` for an empty data set or a
    record without ``lr`` / ``hr``."""

    def __init__(self, root: str | Path) -> None:
        from finpercep.data.dataset import FGRDataset

        self.dataset = FGRDataset(root, keys=("lr", "hr"), record_keys=())
        first: dict[str, dict] = {}
        for r in self.dataset.records:
            first.setdefault(r["lr"], r)
        self.dataset.records = list(first.values())
        if not len(self.dataset):
            raise ValueError(f"{self.dataset.root}: the data set is empty")
        self.root, self.scale = self.dataset.root, self.dataset.scale
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def pair(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lr (3, h, w), hr (3, h*s, w*s))`` of pair ``i``, float32 in [0, 1]."""
        if i not in self._cache:
            item = self.dataset[i]
            lr, hr = item["lr"], item["hr"]
            if hr.shape[1] != lr.shape[1] * self.scale or hr.shape[2] != lr.shape[2] * self.scale:
                raise ValueError(f"{self.root}: sample {item['meta']['id']} has LR {tuple(lr.shape)} and HR "
                                 f"{tuple(hr.shape)}, not x{self.scale}")
            self._cache[i] = (lr, hr)
        return self._cache[i]

    def batch(self, seed: int, step: int, n: int, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``n`` pairs of step ``step``: ``(lr (n, 3, c/s, c/s), hr (n, 3, c, c))`` with
        aligned random crops of HR size ``crop`` (0 = whole images)."""
        rng = np.random.default_rng(np.random.SeedSequence([seed, step, 7]))
        idx = rng.integers(len(self), size=n)
        s = self.scale
        lrs, hrs = [], []
        for i in idx:
            lr, hr = self.pair(int(i))
            if crop:
                c = crop // s
                if c < 1 or c > lr.shape[1] or c > lr.shape[2]:
                    raise ValueError(f"crop {crop} does not fit the LR images {tuple(lr.shape[1:])} at x{s}")
                y = int(rng.integers(lr.shape[1] - c + 1))
                x = int(rng.integers(lr.shape[2] - c + 1))
                lr, hr = lr[:, y : y + c, x : x + c], hr[:, y * s : (y + c) * s, x * s : (x + c) * s]
            lrs.append(lr)
            hrs.append(hr)
        return torch.stack(lrs), torch.stack(hrs)


# ---------------------------------------------------------------------------------------------
# Pure helpers


def is_stochastic(policy: nn.Module) -> bool:
    """True for a multi-step policy with per-step log-probabilities (what DPO and GRPO need)."""
    return isinstance(policy, StochasticPolicy)


def credit_weight(reward_map: torch.Tensor, strength: float) -> torch.Tensor:
    """Dense credit weight ``w = 1 + a * M / mean(M)`` per image, ``(B, 1, H, W)``, detached.
    Its mean over an image is ``1 + a``: the total credit grows with ``a`` and concentrates where
    the map says the image is degraded."""
    m = reward_map.detach().float()
    return 1.0 + strength * m / m.mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages (Shao et al. 2024, DeepSeekMath, section 4.1.2; Flow-GRPO eq. 4):
    ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)`` over consecutive groups of
    ``group_size``. A group whose rewards are all equal gets zero advantages."""
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (B*G,) with G={group_size}, got {tuple(rewards.shape)}")
    r = rewards.detach().float().view(-1, group_size)
    std = r.std(dim=1, keepdim=True, unbiased=False)
    return ((r - r.mean(dim=1, keepdim=True)) / (std + eps)).flatten()


def check_finite(step: int, run: Path, **values: torch.Tensor | float) -> None:
    """Raise :class:`NonFiniteError` naming the step, the offending values and the last good
    checkpoint if any value is NaN or infinite."""
    bad = [k for k, v in values.items() if not bool(torch.isfinite(torch.as_tensor(v)).all())]
    if bad:
        raise NonFiniteError(f"step {step}: non-finite {', '.join(bad)}; the run stops here "
                             f"({last_checkpoint_note(run)}; nothing was overwritten)")


# ---------------------------------------------------------------------------------------------
# Reference policy


def make_reference(policy: nn.Module) -> Callable[[], contextlib.AbstractContextManager[nn.Module]]:
    """A context-manager factory yielding the frozen reference policy: with LoRA the same module
    with its adapters off (no second copy; for an :class:`~finpercep.types.AdapterPolicy`, its own
    peft adapters off, yielded inside its Gaussian wrapper if any), else a frozen copy taken now."""
    from finpercep.policies.gaussian import unwrap
    from finpercep.policies.lora import adapters_disabled, has_lora

    net = unwrap(policy)
    if isinstance(net, AdapterPolicy):  # its own (peft) adapters: off in the net, yield the policy as wrapped

        @contextlib.contextmanager
        def base_of_policy() -> Iterator[nn.Module]:
            with net.adapters_disabled():
                yield policy

        return base_of_policy
    if has_lora(policy):
        return lambda: adapters_disabled(policy)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)

    @contextlib.contextmanager
    def frozen() -> Iterator[nn.Module]:
        yield ref

    return frozen


# ---------------------------------------------------------------------------------------------
# The run folder


def trainable_state(policy: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in policy.named_parameters() if p.requires_grad}


def save_checkpoint(run: Path, policy: nn.Module, opt: torch.optim.Optimizer, step: int,
                    extra: dict[str, Any] | None = None) -> Path:
    """``RUN/ckpt/step_XXXXXXX/``: ``policy/`` and ``trainer.pt`` (trainable tensors, optimiser,
    step, ``extra``), then ``LATEST``; the older checkpoint is removed only after the new one is
    complete (:func:`finpercep.runs.save_trainer_state`)."""
    folder = Path(run) / CKPT_DIR / f"step_{step:07d}"
    save_plain_policy(policy, folder / "policy")
    state = {"step": step, "trainable": trainable_state(policy), "optimizer": opt.state_dict(), "extra": extra or {}}
    return save_trainer_state(run, folder, state)


def save_plain_policy(policy: nn.Module, folder: Path) -> Path:
    """Save the SR network as a plain policy checkpoint: LoRA merged, a Gaussian wrapper removed
    (a :class:`~finpercep.types.AdapterPolicy` writes its own checkpoint: base reference + adapters)."""
    from finpercep.policies import save_policy
    from finpercep.policies.gaussian import unwrap
    from finpercep.policies.lora import has_lora, merge_lora

    if isinstance(unwrap(policy), AdapterPolicy):
        return unwrap(policy).save_checkpoint(folder)
    return save_policy(unwrap(merge_lora(policy) if has_lora(policy) else policy), folder)


def save_samples(run: Path, step: int, lr: torch.Tensor, sr: torch.Tensor, hr: torch.Tensor,
                 out: RewardOutput | None, n: int) -> Path:
    """``RUN/samples/step_XXXXXXX.png``: one row per image, LR (nearest-upsampled) | SR | the
    reward's map over SR (where the reward has a map) | HR."""
    import torch.nn.functional as F

    from finpercep.io import save_png
    from finpercep.viz import heatmap_overlay

    rows = []
    for i in range(min(n, sr.shape[0])):
        s = sr[i].detach().float().cpu().clamp(0, 1)
        cells = [F.interpolate(lr[i : i + 1].float().cpu(), size=s.shape[1:], mode="nearest")[0], s]
        if out is not None and out.map is not None:
            cells.append(heatmap_overlay(s, out.map[i, 0].detach().float().cpu()))
        cells.append(hr[i].float().cpu())
        gap = torch.ones(3, s.shape[1], 4)
        rows.append(torch.cat([c for cell in cells for c in (cell, gap)][:-1], dim=2))
    grid = torch.cat([c for r in rows for c in (r, torch.ones(3, 4, r.shape[2]))][:-1], dim=1)
    path = run / "samples" / f"step_{step:07d}.png"
    save_png(path, grid)
    return path


@dataclass
class StepTimer:
    """Wall time of named sections of one step (CUDA-synchronised on GPU), for the step-time
    breakdown ``time/<section>`` in the metrics."""

    device: torch.device
    times: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t

    def logs(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.times.items()}


# ---------------------------------------------------------------------------------------------
# Setting up and finishing a run


@dataclass
class Session:
    """The state a loop works with, made by :func:`start_run`."""

    run: Path
    policy: nn.Module
    params: list[nn.Parameter]
    opt: torch.optim.Optimizer
    start_step: int
    extra: dict[str, Any]
    device: torch.device
    rank: int
    world: int


def start_run(policy: nn.Module, data: PairData, run: str | Path, meta: dict[str, Any], cfg: RunConfig,
              device: str = "cpu", *, needs_samples: str | None = None) -> Session:
    """Check that ``policy`` fits ``data`` (same scale) and, with ``needs_samples`` (the
    algorithm's name), that it is a stochastic policy; join the process group (torchrun),
    check/write the run config, put LoRA adapters on
    ``policy`` (a pretrained policy, changed in place) if asked, build the optimiser and resume
    from the newest checkpoint. The trainable parameters start identical on every process: the
    adapters are initialised from a generator seeded by ``cfg.seed`` alone, so two runs with the
    same seed are identical from step 1.

    ``metrics.jsonl`` is cut to what the resumed checkpoint had logged (nothing when the run
    starts at step 0), so a run killed before or while writing a checkpoint logs each step once.
    Raises ValueError for an unreadable checkpoint or one that does not fit ``policy``."""
    from finpercep.distributed import barrier, dist_info, init_distributed, local_device
    from finpercep.policies.gaussian import unwrap
    from finpercep.policies.lora import apply_lora

    if needs_samples and not is_stochastic(policy):
        raise ValueError(f"{needs_samples} needs a stochastic policy with per-step log-probabilities (flow-x4, or a "
                         f"one-step network wrapped by finpercep.policies.gaussian.GaussianPolicy as `rl train` does); "
                         f"{getattr(policy, 'name', type(policy).__name__)!r} is one-step: use --algo refl")
    if policy.scale != data.scale:
        raise ValueError(f"the policy upscales x{policy.scale} but the data set is x{data.scale}")
    net = unwrap(policy)
    if isinstance(net, AdapterPolicy) and not cfg.lora_rank:  # peft adapters of its own (diffusers): LoRA only
        raise ValueError(f"{net.name} is fine-tuned through LoRA adapters only: set --lora-rank (run.lora_rank) >= 1")
    init_distributed(device)
    rank, world = dist_info()
    dev = torch.device(local_device(device))
    run = Path(run)
    if cfg.batch % world:
        raise ValueError(f"run.batch ({cfg.batch}) must be divisible by the number of processes ({world})")
    if (cfg.batch // world) % cfg.grad_accum:
        raise ValueError(f"each process's batch ({cfg.batch // world}) must be divisible by run.grad_accum ({cfg.grad_accum})")
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        check_config(run, RUN_CONFIG, meta)
    barrier()
    if isinstance(net, AdapterPolicy):
        net.add_lora(cfg.lora_rank, cfg.lora_alpha, generator=seeded_generator(cfg.seed, LORA_INIT_KEY))
    elif cfg.lora_rank:
        apply_lora(policy, cfg.lora_rank, cfg.lora_alpha, generator=seeded_generator(cfg.seed, LORA_INIT_KEY))
    else:
        policy.requires_grad_(True)
    policy.to(dev).train()
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.learning_rate)
    start, extra = resume(run, policy, opt, dev)
    if rank == 0:
        truncate_metrics(run, (start,))
        if start:
            log.info("resuming %s at step %d", run, start)
    return Session(run=run, policy=policy, params=params, opt=opt, start_step=start, extra=extra,
                   device=dev, rank=rank, world=world)


def resume(run: Path, policy: nn.Module, opt: torch.optim.Optimizer, device: torch.device) -> tuple[int, dict[str, Any]]:
    """Load the newest checkpoint of ``run`` into ``policy``'s trainable parameters and ``opt``;
    returns ``(step, extra)``, ``(0, {})`` when there is none. Raises ValueError (one line) for a
    ``trainer.pt`` that is unreadable or was saved for another policy / LoRA rank."""
    found = load_trainer_state(run, keys=("step", "trainable", "optimizer"))
    if found is None:
        return 0, {}
    folder, state = found
    named = dict(policy.named_parameters())
    saved = state["trainable"]
    wanted = {n for n, p in named.items() if p.requires_grad}
    if not isinstance(saved, dict) or set(saved) != wanted or any(saved[n].shape != named[n].shape for n in wanted):
        raise ValueError(f"{folder / 'trainer.pt'} holds the trainable tensors of another policy or LoRA rank; "
                         "resume with the same --policy and --lora-rank, or choose a new --out")
    with torch.no_grad():
        for n, t in saved.items():
            named[n].copy_(t.to(device))
    opt.load_state_dict(state["optimizer"])
    return int(state["step"]), dict(state.get("extra", {}))


def optimizer_step(s: Session, cfg: RunConfig) -> float:
    """Average gradients over processes, clip, step; returns the gradient norm before clipping."""
    from finpercep.distributed import average_gradients

    average_gradients(s.params)
    grads = [p.grad for p in s.params if p.grad is not None]
    gn = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) if grads else torch.zeros(())
    if cfg.max_grad_norm > 0 and grads:
        torch.nn.utils.clip_grad_norm_(s.params, cfg.max_grad_norm)
    s.opt.step()
    s.opt.zero_grad(set_to_none=True)
    return float(gn)


def end_step(s: Session, cfg: RunConfig, step: int, logs: dict[str, float], *,
             samples: tuple[torch.Tensor, torch.Tensor, torch.Tensor, RewardOutput | None] | None = None,
             extra: dict[str, Any] | None = None) -> None:
    """After optimiser step ``step`` (1-based count of steps done): log (rank 0, values averaged
    over processes), write samples and checkpoints when due (always at the last step; ``final/``
    is written by :func:`finish`)."""
    from finpercep.distributed import all_reduce_mean, barrier

    if s.world > 1:
        keys = sorted(logs)
        vals = all_reduce_mean(torch.tensor([logs[k] for k in keys], dtype=torch.float64))
        logs = dict(zip(keys, vals.tolist()))
    last = step == cfg.steps
    if s.rank == 0:
        if step % cfg.log_every == 0 or last:
            append_metrics(s.run, {"step": step, **logs})
        if samples is not None and cfg.sample_every and (step % cfg.sample_every == 0 or last or step == 1):
            save_samples(s.run, step, *samples, n=cfg.num_samples)
        if step % cfg.ckpt_every == 0 or last:
            save_checkpoint(s.run, s.policy, s.opt, step, extra)
    if step % cfg.ckpt_every == 0 or last:
        barrier()


def run_meta(algo: str, policy: str, reward: str, data: str | Path, cfg: Any) -> dict[str, Any]:
    """What ``run_config.json`` records."""
    return {"algo": algo, "policy": str(policy), "reward": reward, "data": str(data), "config": to_dict(cfg)}


def run_progress(s: Session, cfg: RunConfig, desc: str, enabled: bool) -> Progress:
    """The loop's progress bar (:func:`finpercep.runs.progress_bar`): on rank 0 when ``enabled``."""
    return progress_bar(cfg.steps, desc, initial=s.start_step, enabled=enabled and s.rank == 0)


def finish(s: Session, bar: Progress, stopped_at: int | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Close the bar, write ``RUN/final`` (rank 0) and leave the process group; returns ``RUN/final``.

    ``final/`` is written here, after the loop, from the policy as it is: the last step's weights,
    or, when the run had already reached its last step (a rerun, or a run killed after its last
    checkpoint but before ``final/`` was complete), the weights restored from that checkpoint,
    which are the same. ``stopped_at``: the run is being ended early after that many steps
    (``stop_after_steps``, for tests of resume): checkpoint it and return the checkpoint instead."""
    from finpercep.distributed import destroy

    bar.close()
    out = s.run / "final"
    if stopped_at is not None:
        out = save_checkpoint(s.run, s.policy, s.opt, stopped_at, extra) if s.rank == 0 else s.run
    elif s.rank == 0:
        save_plain_policy(s.policy, out)
    destroy()
    return out


# ---------------------------------------------------------------------------------------------
# The reward source: a fixed reward, or a curriculum that moves through reward-model stages


class FixedReward:
    """A reward seen as a one-stage curriculum (a :class:`finpercep.types.RewardSource` whose
    reward never changes), so the loops treat a reward and a curriculum alike."""

    def __init__(self, reward: Reward) -> None:
        self.reward = reward

    def add_rollout(self, hr: torch.Tensor, sr: torch.Tensor) -> int:
        return 0

    def observe(self, step: int, reward_mean: float) -> str | None:
        return None

    def logs(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        pass


def as_reward_source(reward: Reward | RewardSource) -> RewardSource:
    """What a loop is given, as a reward source: a curriculum (or any :class:`RewardSource`) as
    it is, a plain :class:`Reward` wrapped in :class:`FixedReward`."""
    return reward if isinstance(reward, RewardSource) else FixedReward(reward)


def check_dense_credit(cfg: RunConfig, src: RewardSource) -> None:
    """Dense credit needs a map: from the reward, or from a curriculum's later stages. Raises
    ValueError when ``run.dense_credit > 0`` and neither has one."""
    from finpercep.curriculum import Curriculum

    later_map = isinstance(src, Curriculum) and src.cfg.stages is not None and max(src.cfg.stages) > 0
    if cfg.dense_credit and not (src.reward.has_map or later_map):
        raise ValueError(f"run.dense_credit needs a reward with a map; {src.reward.name!r} has none")


def attach_rewards(s: Session, src: RewardSource) -> RewardSource:
    """``src`` ready for the loop: restored from the checkpoint a resumed run started from, its
    reward on the run's device. Raises ValueError for co-evolution under torchrun."""
    from finpercep.curriculum import Curriculum

    if s.world > 1 and isinstance(src, Curriculum) and src.coevolver is not None:
        raise ValueError("curriculum mode 'coevolve' trains the reward model in one process; run it without torchrun")
    if s.extra.get("curriculum"):
        src.load_state_dict(s.extra["curriculum"])
    src.reward.to(s.device)
    return src


def observe_rewards(src: RewardSource, step: int, reward_mean: float) -> dict[str, float]:
    """Tell the reward source step ``step`` is done (the mean reward over all processes, so they
    switch stages together); returns its logs (``curriculum/stage`` ...)."""
    from finpercep.distributed import all_reduce_mean

    mean = float(all_reduce_mean(torch.tensor([reward_mean], dtype=torch.float64))[0])
    trained_on = src.logs().get("curriculum/stage")
    src.observe(step, mean)
    logs = src.logs()
    if trained_on is not None:  # log the stage this step trained on, not the one the next step will use
        logs["curriculum/stage"] = trained_on
    return logs
