"""ReFL: reward feedback learning by direct reward backpropagation (the main RL method of
arXiv 2512.22647).

Xu et al. 2023, "ImageReward", eq. 3 (ReFL): ``L = -lambda * R(x_hat)`` where ``x_hat`` is the
generator's prediction of the final image from a randomly chosen late step, plus a fidelity term
against HR as in SR fine-tuning with a reward (e.g. DP²O-SR; arXiv 2512.22647 uses one too):

    L = -reward_weight * mean_i R(sr_i) + fidelity_weight * mean |sr - hr|

- a one-step policy (RRDBNet, UpConv7, tiny-x4): ``sr = policy(lr)``;
- a multi-step policy (flow-x4): the chain is sampled without gradient up to a step ``k`` drawn
  from the last ``late_steps`` steps, and ``sr = policy.predict_sr(lr, x_k, k)`` carries the
  gradient (ReFL's late-step prediction);
- a policy whose sampler carries the gradient (:class:`finpercep.types.TruncatedBackpropPolicy`,
  the multi-step diffusers policy): DRaFT-K (Clark et al. 2024, arXiv 2309.17400),
  ``sr = policy.sample_with_grad(lr, generator)`` with the gradient through its last K steps.

The reward must be differentiable; a metric that is not (NIQE, BRISQUE, PIQE) is refused with a
clear error (use DPO or GRPO with it).

The gradient is taken in two halves, which also gives the step-time breakdown: the reward's
gradient with respect to ``sr`` first (``reward_forward`` / ``reward_backward``), then the policy's
backward from ``sr`` (``policy_backward``). Dense credit (ours, ``run.dense_credit > 0``) scales
the reward's gradient at each pixel by ``w = 1 + a * M / mean(M)`` from the reward's own map, so
the update concentrates where the reward model sees artifacts.
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

from finpercep.config import check_at_least
from finpercep.rl.common import (
    PairData,
    RunConfig,
    StepTimer,
    as_reward_source,
    attach_rewards,
    check_dense_credit,
    check_finite,
    credit_weight,
    end_step,
    finish,
    is_stochastic,
    observe_rewards,
    optimizer_step,
    run_progress,
    seeded_generator,
    start_run,
)
from finpercep.types import Reward, RewardSource, TruncatedBackpropPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReFLConfig:
    """ReFL settings."""

    reward_weight: float = 1e-3
    """lambda of ``-lambda * R(sr)`` (ImageReward eq. 3). Small because FinPercep-RM scores are in
    margin units that differ by several units between images, so their gradient per pixel is far
    larger than the L1 term's (which is divided by the number of pixels); raise it for rewards on a
    [0, 1]-like scale (``ssim``, ``l1``)."""
    fidelity_weight: float = 1.0
    """Weight of the L1 fidelity term ``mean |sr - hr|`` that keeps the output faithful to HR."""
    late_steps: int = 2
    """Multi-step policies: ``k`` is drawn uniformly from the last ``late_steps`` steps
    ``K - late_steps .. K - 1`` (ReFL's late-step range). Not used by a DRaFT-K policy (its own
    ``grad_steps``)."""

    def __post_init__(self) -> None:
        check_at_least("refl", 0, reward_weight=self.reward_weight, fidelity_weight=self.fidelity_weight)
        check_at_least("refl", 1, late_steps=self.late_steps)


def train(
    policy: nn.Module,
    reward: Reward | RewardSource,
    data: PairData,
    run: str | Path,
    cfg: RunConfig,
    algo: ReFLConfig = ReFLConfig(),
    *,
    meta: dict[str, Any],
    device: str = "cpu",
    progress: bool = True,
    stop_after_steps: int | None = None,
) -> Path:
    """Fine-tune ``policy`` (pretrained, changed in place) on ``reward`` with ReFL into ``run``
    (resuming whatever is there). Returns ``run / "final"`` (or the newest checkpoint when
    ``stop_after_steps`` ends the call early, for tests of resume)."""
    rewards = as_reward_source(reward)
    first = rewards.reward
    if not first.differentiable:
        raise ValueError(f"ReFL backpropagates the reward, but {first.name!r} is not differentiable; "
                         "use --algo dpo or --algo grpo with it, or a differentiable reward (finpercep, l1, ssim, stlpips)")
    check_dense_credit(cfg, rewards)
    s = start_run(policy, data, run, meta, cfg, device)
    rewards = attach_rewards(s, rewards)
    multi = is_stochastic(policy)
    per_rank = cfg.batch // s.world
    micro = per_rank // cfg.grad_accum
    bar = run_progress(s, cfg, "ReFL", progress)
    done = 0
    for step in range(s.start_step, cfg.steps):
        timer = StepTimer(s.device)
        t0 = time.perf_counter()
        lr_all, hr_all = data.batch(cfg.seed, step, cfg.batch, cfg.crop)
        reward = rewards.reward  # a curriculum may have moved to another stage
        scores, fids = [], []
        for m in range(cfg.grad_accum):
            a = s.rank * per_rank + m * micro
            lr, hr = lr_all[a : a + micro].to(s.device), hr_all[a : a + micro].to(s.device)
            with timer("policy_forward"):
                if isinstance(policy, TruncatedBackpropPolicy):  # DRaFT-K
                    sr = policy.sample_with_grad(lr, seeded_generator(cfg.seed, step, a, device=s.device))
                elif multi:
                    gen = seeded_generator(cfg.seed, step, a, device=s.device)
                    k_max = policy.num_steps - 1
                    k = k_max - int(torch.randint(min(algo.late_steps, policy.num_steps), (1,), generator=gen, device=s.device))
                    with torch.no_grad():
                        traj = policy.sample(lr, gen)
                    sr = policy.predict_sr(lr, traj.states[:, k], k)
                else:
                    sr = policy(lr)
            # 1) the reward's gradient with respect to the image
            sr_in = sr.detach().requires_grad_(True)
            with timer("reward_forward"):
                out = reward(sr_in, lr=lr, hr=hr)
                r_loss = -algo.reward_weight * out.score.mean()
            with timer("reward_backward"):
                (g_sr,) = torch.autograd.grad(r_loss, sr_in)
            if cfg.dense_credit and out.map is not None:  # (no map at curriculum stage 0)
                g_sr = g_sr * credit_weight(out.map, cfg.dense_credit)
            fid = F.l1_loss(sr, hr)
            check_finite(step + 1, s.run, loss=r_loss.detach(), fidelity=fid.detach(), reward_grad=g_sr)
            # 2) the policy's backward: a surrogate whose gradient w.r.t. sr is g_sr, plus fidelity
            with timer("policy_backward"):
                ((sr * g_sr).sum() + algo.fidelity_weight * fid).div(cfg.grad_accum).backward()
            scores.append(out.score.detach().float())
            fids.append(float(fid.detach()))
            rewards.add_rollout(hr, sr.detach())
        with timer("optimizer"):
            gn = optimizer_step(s, cfg)
        check_finite(step + 1, s.run, grad_norm=gn)
        sc = torch.cat(scores)
        step_time = time.perf_counter() - t0
        rt = timer.times.get("reward_forward", 0.0) + timer.times.get("reward_backward", 0.0)
        logs = {"reward/mean": float(sc.mean()), "reward/std": float(sc.std(unbiased=False)),
                "fidelity/l1": sum(fids) / len(fids), "grad_norm": gn, "time/step": step_time,
                "time/reward_share": rt / step_time, **timer.logs()}
        logs.update(observe_rewards(rewards, step + 1, logs["reward/mean"]))
        end_step(s, cfg, step + 1, logs, samples=(lr, sr.detach(), hr, out), extra={"curriculum": rewards.state_dict()})
        bar.advance(reward=f"{logs['reward/mean']:.3f}", l1=f"{logs['fidelity/l1']:.4f}")
        done += 1
        if stop_after_steps is not None and done >= stop_after_steps and step + 1 < cfg.steps:
            return finish(s, bar, stopped_at=step + 1, extra={"curriculum": rewards.state_dict()})
    return finish(s, bar)
