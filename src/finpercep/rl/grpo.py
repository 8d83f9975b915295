"""GRPO on a stochastic multi-step SR policy, Flow-GRPO style.

Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL", eqs. 3-4 (after Shao
et al. 2024, DeepSeekMath, GRPO): for each LR image, sample a group of ``G`` outputs; the reward of
each output, normalised within its group, is the advantage of every transition of its chain:

    A_i = (R_i - mean(R_group)) / (std(R_group) + eps)
    L   = -1/(G K') sum_i sum_k min(rho_ik A_i, clip(rho_ik, 1 - c, 1 + c) A_i) + beta * KL_ik
    rho_ik = p_theta(x_{k+1} | x_k) / p_old(x_{k+1} | x_k)

over ``K'`` of the ``K`` transitions (``timestep_fraction``). The KL to the frozen reference uses
the k3 estimator of the per-transition log-probabilities (Schulman 2020, "Approximating KL
divergence"): ``exp(l_ref - l) - (l_ref - l) - 1`` (>= 0, zero when the two agree). With LoRA the
reference is the same policy with its adapters off.

A constant reward gives zero advantages, hence a zero gradient, and (Adam, no weight decay) an
unchanged policy: tested. Dense credit (ours, ``run.dense_credit > 0``) weights each pixel's
log-probability by ``w = 1 + a * M / mean(M)`` from the reward's map of the final image, so the
advantage acts mostly where the reward model sees artifacts. The reward need not be
differentiable (NIQE, BRISQUE, PIQE work).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finpercep.config import check_at_least, check_between, check_positive
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
    group_advantages,
    make_reference,
    observe_rewards,
    optimizer_step,
    run_progress,
    seeded_generator,
    start_run,
)
from finpercep.types import Reward, RewardSource, Rollout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO settings."""

    group_size: int = 4
    """Outputs sampled per LR image (G)."""
    clip_range: float = 0.2
    """c of the clipped importance ratio."""
    kl_beta: float = 0.0
    """Weight of the KL term to the frozen reference policy (0 = off)."""
    timestep_fraction: float = 1.0
    """Fraction of the K transitions trained on each step (drawn at random; Flow-GRPO trains on
    a subset to save time)."""
    inner_epochs: int = 1
    """Optimiser updates per sampled batch (> 1 makes the importance ratio differ from 1)."""
    adv_eps: float = 1e-6
    """eps of the group-normalised advantage."""

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"grpo.group_size must be >= 2 (advantages compare samples), got {self.group_size}")
        check_positive("grpo", timestep_fraction=self.timestep_fraction, clip_range=self.clip_range, adv_eps=self.adv_eps)
        check_between("grpo", 0, 1, timestep_fraction=self.timestep_fraction)
        check_at_least("grpo", 0, kl_beta=self.kl_beta)
        check_at_least("grpo", 1, inner_epochs=self.inner_epochs)


def clipped_objective(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, clip: float) -> torch.Tensor:
    """Per-sample PPO/GRPO loss ``-min(rho A, clip(rho, 1-c, 1+c) A)``, ``rho = exp(logp - logp_old)``."""
    ratio = torch.exp(logp - logp_old)
    return -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)


def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(p_theta || p_ref) from log-probs of samples: ``exp(d) - d - 1``, ``d = l_ref - l``."""
    d = logp_ref - logp
    return torch.exp(d) - d - 1


def train(
    policy: nn.Module,
    reward: Reward | RewardSource,
    data: PairData,
    run: str | Path,
    cfg: RunConfig,
    algo: GRPOConfig = GRPOConfig(),
    *,
    meta: dict[str, Any],
    device: str = "cpu",
    progress: bool = True,
    stop_after_steps: int | None = None,
) -> Path:
    """Fine-tune a stochastic ``policy`` (changed in place) with GRPO into ``run`` (resuming).
    Returns ``run / "final"`` (or the newest checkpoint when ``stop_after_steps`` ends early)."""
    rewards = as_reward_source(reward)
    check_dense_credit(cfg, rewards)
    s = start_run(policy, data, run, meta, cfg, device, needs_samples="GRPO")
    rewards = attach_rewards(s, rewards)
    reference = make_reference(policy) if algo.kl_beta > 0 else None
    G, K = algo.group_size, policy.num_steps
    n_k = max(1, math.ceil(algo.timestep_fraction * K))
    per_rank = cfg.batch // s.world
    micro = per_rank // cfg.grad_accum
    bar = run_progress(s, cfg, "GRPO", progress)
    done = 0
    for step in range(s.start_step, cfg.steps):
        timer = StepTimer(s.device)
        t0 = time.perf_counter()
        lr_all, hr_all = data.batch(cfg.seed, step, cfg.batch, cfg.crop)
        reward = rewards.reward  # a curriculum may have moved to another stage
        # 1) Rollouts: G samples per LR image, their rewards and group-normalised advantages.
        rollouts: list[Rollout] = []
        for m in range(cfg.grad_accum):
            a = s.rank * per_rank + m * micro
            lr = lr_all[a : a + micro].to(s.device).repeat_interleave(G, dim=0)  # (micro*G, 3, h, w)
            hr = hr_all[a : a + micro].to(s.device).repeat_interleave(G, dim=0)
            gen = seeded_generator(cfg.seed, step, a, device=s.device)
            with timer("policy_sample"), torch.no_grad():
                traj = policy.sample(lr, gen)
            with timer("reward_forward"), torch.no_grad():
                out = reward(traj.sr, lr=lr, hr=hr)
            check_finite(step + 1, s.run, reward=out.score)
            adv = group_advantages(out.score, G, algo.adv_eps)
            weight = credit_weight(out.map, cfg.dense_credit) if cfg.dense_credit and out.map is not None else None
            rewards.add_rollout(hr, traj.sr)
            ks = torch.randperm(K, generator=gen, device=s.device)[:n_k].tolist()
            with torch.no_grad():  # log-probs under the sampling parameters (the "old" policy)
                # the sampler recorded them; with dense credit they are re-weighted, so recompute
                old = {k: traj.log_probs[:, k] if weight is None else
                       policy.step_log_prob(lr, traj.states[:, k], k, traj.states[:, k + 1], weight) for k in ks}
                ref = {}
                if reference is not None:
                    with reference() as ref_policy:
                        ref = {k: ref_policy.step_log_prob(lr, traj.states[:, k], k, traj.states[:, k + 1], weight) for k in ks}
            rollouts.append(Rollout(lr=lr, hr=hr, traj=traj, reward=out, group_size=G, advantages=adv,
                                    pixel_weight=weight, steps=tuple(ks), old_log_probs=old, ref_log_probs=ref))
        # 2) Policy updates on the stored rollouts.
        losses, kls = [], []
        for _ in range(algo.inner_epochs):
            for ro in rollouts:
                states = ro.traj.states
                for k in ro.steps:
                    with timer("policy_forward"):
                        logp = policy.step_log_prob(ro.lr, states[:, k], k, states[:, k + 1], ro.pixel_weight)
                        loss = clipped_objective(logp, ro.old_log_probs[k], ro.advantages, algo.clip_range).mean()
                        if ro.ref_log_probs:
                            kl = kl_k3(logp, ro.ref_log_probs[k]).mean()
                            loss = loss + algo.kl_beta * kl
                            kls.append(float(kl.detach()))
                    check_finite(step + 1, s.run, loss=loss.detach())
                    with timer("policy_backward"):
                        (loss / (len(ro.steps) * cfg.grad_accum)).backward()
                    losses.append(float(loss.detach()))
            with timer("optimizer"):
                gn = optimizer_step(s, cfg)
            check_finite(step + 1, s.run, grad_norm=gn)
        scores = torch.cat([ro.reward.score.float() for ro in rollouts])
        group_std = scores.view(-1, G).std(dim=1, unbiased=False).mean()
        l1 = torch.cat([(ro.traj.sr - ro.hr).abs().flatten(1).mean(1) for ro in rollouts]).mean()
        logs = {"reward/mean": float(scores.mean()), "reward/std": float(scores.std(unbiased=False)),
                "reward/group_std": float(group_std), "loss": sum(losses) / len(losses), "grad_norm": gn,
                "fidelity/l1": float(l1), "time/step": time.perf_counter() - t0, **timer.logs()}
        if kls:
            logs["kl"] = sum(kls) / len(kls)
        logs.update(observe_rewards(rewards, step + 1, logs["reward/mean"]))
        end_step(s, cfg, step + 1, logs, samples=rollouts[-1].group_firsts(), extra={"curriculum": rewards.state_dict()})
        bar.advance(reward=f"{logs['reward/mean']:.3f}")
        done += 1
        if stop_after_steps is not None and done >= stop_after_steps and step + 1 < cfg.steps:
            return finish(s, bar, stopped_at=step + 1, extra={"curriculum": rewards.state_dict()})
    return finish(s, bar)
