"""DPO on a stochastic multi-step SR policy, Diffusion-DPO style (online: pairs come from the
policy's own samples, ranked by the reward).

Wallace et al. 2024, "Diffusion Model Alignment Using Direct Preference Optimization", eq. 14:
for a preferred output ``w`` and a rejected one ``l`` of the same LR image, one time ``t`` and one
noise draw shared by both,

    L = -log sigmoid( -beta/2 * [ (e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l)) ] )

where ``e(x) = policy.denoising_error(lr, x, t, noise)`` is the policy's own training error on
target ``x`` (a flow-matching velocity error for flow-x4) and ``ref`` the frozen reference
policy (with LoRA: adapters off, no second copy). Lowering the error on ``w`` relative to the
reference, and raising it on ``l``, makes ``w`` more likely under the policy.

Each step samples ``group_size`` outputs per LR image, scores them with the reward (which need
not be differentiable) and pairs the best with the worst. When the two are identical the loss
is ``log 2`` and the gradient zero (tested).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finpercep.config import check_positive
from finpercep.rl.common import (
    PairData,
    RunConfig,
    StepTimer,
    as_reward_source,
    attach_rewards,
    check_finite,
    end_step,
    finish,
    make_reference,
    observe_rewards,
    optimizer_step,
    run_progress,
    seeded_generator,
    start_run,
)
from finpercep.types import Reward, RewardOutput, RewardSource, Rollout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DPOConfig:
    """DPO settings."""

    group_size: int = 4
    """Outputs sampled per LR image; the best and the worst by reward form the pair."""
    beta: float = 1000.0
    """beta of Diffusion-DPO eq. 14 (it multiplies per-pixel mean errors, hence its size;
    Diffusion-DPO used 2000-5000 on Stable Diffusion)."""

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"dpo.group_size must be >= 2 (a pair needs two samples), got {self.group_size}")
        check_positive("dpo", beta=self.beta)


def dpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float) -> torch.Tensor:
    """Per-pair Diffusion-DPO loss (eq. 14), ``(B,)``."""
    inside = -0.5 * beta * ((err_w - ref_w) - (err_l - ref_l))
    return -F.logsigmoid(inside)


def best_and_worst(scores: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (into the flat ``(B*G,)`` batch) of the best and the worst sample of each group."""
    s = scores.detach().view(-1, group_size)
    base = torch.arange(s.shape[0], device=s.device) * group_size
    return base + s.argmax(dim=1), base + s.argmin(dim=1)


def train(
    policy: nn.Module,
    reward: Reward | RewardSource,
    data: PairData,
    run: str | Path,
    cfg: RunConfig,
    algo: DPOConfig = DPOConfig(),
    *,
    meta: dict[str, Any],
    device: str = "cpu",
    progress: bool = True,
    stop_after_steps: int | None = None,
) -> Path:
    """Fine-tune a stochastic ``policy`` (changed in place) with online Diffusion-DPO into ``run``
    (resuming). Returns ``run / "final"`` (or the newest checkpoint when stopped early)."""
    if cfg.dense_credit:
        raise ValueError("run.dense_credit is implemented for ReFL and GRPO, not DPO")
    s = start_run(policy, data, run, meta, cfg, device, needs_samples="DPO")
    rewards = attach_rewards(s, as_reward_source(reward))
    reference = make_reference(policy)
    G = algo.group_size
    per_rank = cfg.batch // s.world
    micro = per_rank // cfg.grad_accum
    bar = run_progress(s, cfg, "DPO", progress)
    done = 0
    for step in range(s.start_step, cfg.steps):
        timer = StepTimer(s.device)
        t0 = time.perf_counter()
        lr_all, hr_all = data.batch(cfg.seed, step, cfg.batch, cfg.crop)
        reward = rewards.reward  # a curriculum may have moved to another stage
        scores, gaps, losses, accs = [], [], [], []
        for m in range(cfg.grad_accum):
            a = s.rank * per_rank + m * micro
            lr, hr = lr_all[a : a + micro].to(s.device), hr_all[a : a + micro].to(s.device)
            lr_g, hr_g = lr.repeat_interleave(G, dim=0), hr.repeat_interleave(G, dim=0)
            gen = seeded_generator(cfg.seed, step, a, device=s.device)
            with timer("policy_sample"), torch.no_grad():
                traj = policy.sample(lr_g, gen)
            with timer("reward_forward"), torch.no_grad():
                ro = Rollout(lr=lr_g, hr=hr_g, traj=traj, reward=reward(traj.sr, lr=lr_g, hr=hr_g), group_size=G)
            check_finite(step + 1, s.run, reward=ro.reward.score)
            rewards.add_rollout(hr_g, traj.sr)
            iw, il = best_and_worst(ro.reward.score, G)
            sr_w, sr_l = traj.sr[iw], traj.sr[il]
            t = torch.rand(lr.shape[0], generator=gen, device=s.device)
            noise = torch.randn(traj.states[iw, -1].shape, generator=gen, device=s.device)  # shaped like the state
            with timer("policy_forward"):
                with torch.no_grad(), reference() as ref:
                    ref_w, ref_l = ref.denoising_error(lr, sr_w, t, noise), ref.denoising_error(lr, sr_l, t, noise)
                err_w, err_l = policy.denoising_error(lr, sr_w, t, noise), policy.denoising_error(lr, sr_l, t, noise)
                loss = dpo_loss(err_w, err_l, ref_w, ref_l, algo.beta).mean()
            check_finite(step + 1, s.run, loss=loss.detach())
            with timer("policy_backward"):
                (loss / cfg.grad_accum).backward()
            scores.append(ro.reward.score.float())
            gaps.append((ro.reward.score[iw] - ro.reward.score[il]).float())
            losses.append(float(loss.detach()))
            accs.append(float(((err_w - ref_w) < (err_l - ref_l)).float().mean()))
        with timer("optimizer"):
            gn = optimizer_step(s, cfg)
        check_finite(step + 1, s.run, grad_norm=gn)
        sc = torch.cat(scores)
        logs = {"reward/mean": float(sc.mean()), "reward/std": float(sc.std(unbiased=False)),
                "reward/pair_gap": float(torch.cat(gaps).mean()), "loss": sum(losses) / len(losses),
                "dpo/implicit_acc": sum(accs) / len(accs), "grad_norm": gn,
                "fidelity/l1": float((ro.traj.sr - ro.hr).abs().mean()), "time/step": time.perf_counter() - t0,
                **timer.logs()}
        logs.update(observe_rewards(rewards, step + 1, logs["reward/mean"]))
        out = ro.reward
        best = RewardOutput(score=out.score[iw], map=None if out.map is None else out.map[iw])
        end_step(s, cfg, step + 1, logs, samples=(lr, sr_w, hr, best), extra={"curriculum": rewards.state_dict()})
        bar.advance(reward=f"{logs['reward/mean']:.3f}", loss=f"{logs['loss']:.3f}")
        done += 1
        if stop_after_steps is not None and done >= stop_after_steps and step + 1 < cfg.steps:
            return finish(s, bar, stopped_at=step + 1, extra={"curriculum": rewards.state_dict()})
    return finish(s, bar)
