"""RL fine-tuning of SR policies with a reward (arXiv 2512.22647 uses ReFL; DPO and GRPO are ours).

One file per algorithm, each a loop you read top to bottom, sharing data types and the run folder
(:mod:`finpercep.rl.common`):

- :mod:`finpercep.rl.refl`: ReFL, direct reward backpropagation (the paper's main method);
- :mod:`finpercep.rl.dpo`: online Diffusion-DPO on a stochastic policy;
- :mod:`finpercep.rl.grpo`: Flow-GRPO on a stochastic policy.

:data:`ALGORITHMS` maps the CLI's ``--algo`` to the loops; :class:`RLConfig` gathers the shared
:class:`RunConfig` and each algorithm's own config (a YAML file fills it: top-level keys ``run``,
``refl``, ``dpo``, ``grpo``, ``curriculum``; unknown keys are errors; read it with
``finpercep.config.load_config(RLConfig, path, run={...})``). With a curriculum
(:mod:`finpercep.curriculum`, the CCL of arXiv 2512.22647) the reward is the fused reward of the reward
model's current stage, switched by a fixed schedule, automatically, or with online co-evolution.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from finpercep.curriculum.schedule import CurriculumConfig
from finpercep.rl import dpo, grpo, refl
from finpercep.rl.common import PairData, RunConfig, is_stochastic, run_meta
from finpercep.rl.dpo import DPOConfig
from finpercep.rl.grpo import GRPOConfig
from finpercep.rl.refl import ReFLConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RLConfig:
    """Everything ``finpercep rl train`` is configured by."""

    run: RunConfig = field(default_factory=RunConfig)
    """Shared settings (steps, batch, crop, learning rate, LoRA, seed, ...)."""
    refl: ReFLConfig = field(default_factory=ReFLConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    """How the reward moves through the reward model's stages (``mode: none`` = the fixed
    ``--reward``); :mod:`finpercep.curriculum`."""

    def algo_config(self, algo: str) -> Any:
        return getattr(self, algo)


ALGORITHMS: dict[str, Callable[..., Path]] = {
    "refl": refl.train,
    "dpo": dpo.train,
    "grpo": grpo.train,
}
"""``--algo`` name -> training loop ``train(policy, reward, data, run, run_cfg, algo_cfg, *, meta, device, progress)``."""


def fine_tune(
    policy: str,
    algo: str,
    reward: str | None,
    data: str | Path,
    out: str | Path,
    cfg: RLConfig = RLConfig(),
    *,
    checkpoint: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
    stop_after_steps: int | None = None,
    policy_options: dict[str, Any] | None = None,
) -> Path:
    """Load ``policy`` (a name of :data:`finpercep.policies.POLICIES`, ``diffusers:PATH`` or a
    checkpoint folder; ``policy_options`` such as ``mixed_precision`` / ``gradient_checkpointing``
    go to :func:`finpercep.policies.load_policy` and are recorded in ``run_config.json``) and
    the reward: the spec ``reward`` (:func:`finpercep.rewards.create_reward`; ``None`` =
    ``finpercep``) when ``cfg.curriculum.mode`` is ``none``, else a
    :class:`finpercep.curriculum.Curriculum` over the stages of the reward-model run
    ``checkpoint`` (``None``: the embedded default); then run ``algo`` on the pairs of the data
    set ``data`` into ``out``. DPO and GRPO on a one-step policy sample from it as the Gaussian
    policy ``N(f(lr), run.gaussian_sigma^2)``. Returns the final policy checkpoint folder."""
    from finpercep.curriculum import Curriculum
    from finpercep.policies import load_policy
    from finpercep.rewards import create_reward

    if algo not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algo!r}; choose one of {sorted(ALGORITHMS)}")
    pairs = PairData(data)
    net = load_policy(policy, **(policy_options or {}))
    if algo in ("dpo", "grpo") and not is_stochastic(net):
        from finpercep.policies.gaussian import GaussianPolicy

        log.info("%s is a one-step policy: %s samples from it as N(f(lr), %g^2)", policy, algo, cfg.run.gaussian_sigma)
        net = GaussianPolicy(net, cfg.run.gaussian_sigma)
    if cfg.curriculum.mode == "none":
        reward = reward or "finpercep"
        rew = create_reward(reward, checkpoint=checkpoint, device=device)
    else:
        if reward is not None:
            raise ValueError(f"curriculum mode {cfg.curriculum.mode!r} uses the fused reward of each reward-model "
                             f"stage; drop the reward spec {reward!r} (or use curriculum mode 'none')")
        reward = f"curriculum:{cfg.curriculum.mode}"
        rew = Curriculum(cfg.curriculum, checkpoint, device, total_steps=cfg.run.steps, data=data)
    meta = run_meta(algo, policy, reward, data, cfg)
    meta["reward_checkpoint"] = None if checkpoint is None else str(checkpoint)
    if policy_options:  # only when given, so runs saved without them resume unchanged
        meta["policy_options"] = dict(policy_options)
    try:
        return ALGORITHMS[algo](net, rew, pairs, out, cfg.run, cfg.algo_config(algo), meta=meta, device=device,
                                progress=progress, stop_after_steps=stop_after_steps)
    except BaseException:
        from finpercep.distributed import destroy

        destroy(sync=False)  # under torchrun: leave the group so this process can exit with its error
        raise
