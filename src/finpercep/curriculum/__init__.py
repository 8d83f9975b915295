"""Co-evolutionary curriculum learning (CCL, arXiv 2512.22647), with automatic switching and online
co-evolution beyond the paper.

The policy trains on the fused reward of reward-model stage ``k``,
``R_k = l1 * S_k + l2 * (1 - softmax_max(M_k))`` (:class:`finpercep.rewards.FusedReward`), and
moves ``RM_0 -> RM_1 -> ... -> RM_N`` by a fixed schedule (the paper), automatically on a reward
plateau (beyond the paper), or automatically while the reward model keeps training on the
policy's own outputs (online co-evolution, beyond the paper).

- :mod:`finpercep.curriculum.schedule`: the pure scheduler (:class:`CurriculumConfig`,
  :class:`CurriculumState`, :func:`advance`) and the meaning of its thresholds;
- :mod:`finpercep.curriculum.coevolve`: the online reward-model training (:class:`CoevolveConfig`,
  :func:`make_triplets`, :class:`Coevolver`);
- :class:`Curriculum` (here): what an RL loop holds. Per policy step::

      reward = curriculum.reward                      # the current stage's reward
      out = reward(sr)                                # ... policy update ...
      curriculum.add_rollout(hr, sr)                  # coevolve mode: feed the buffer (else no-op)
      curriculum.observe(step, float(out.score.mean()))   # may switch stage / refresh the RM
      metrics.update(curriculum.logs())
      checkpoint["curriculum"] = curriculum.state_dict()  # restore with load_state_dict

  ``reward`` may be another object after ``observe`` (a new stage), so fetch it every step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from finpercep.config import to_dict
from finpercep.curriculum.coevolve import (
    CoevolveConfig,
    Coevolver,
    heldout_from_dataset,
    make_triplets,
    order_accuracy_of,
)
from finpercep.curriculum.schedule import (
    MODES,
    CurriculumConfig,
    CurriculumState,
    Switch,
    advance,
    resolve_config,
    stage_weights,
    switch_reason,
    trend,
)
from finpercep.types import Reward

log = logging.getLogger(__name__)


class Curriculum:
    """The curriculum an RL loop holds (module docstring): the current reward, stage switching,
    and in mode ``coevolve`` the online reward-model refreshes.

    Args:
        cfg: the settings (:class:`CurriculumConfig`).
        checkpoint: the FinPercep-RM training run folder holding ``stage_k/`` (``None`` = the
            embedded default, :func:`finpercep.reward.api.embedded_checkpoint_dir`). Mode ``none``
            also accepts a single checkpoint folder.
        device: where the reward models run (and train, in mode ``coevolve``).
        base_spec: mode ``none`` only: the fixed reward as a spec for
            :func:`finpercep.rewards.create_reward` (``"finpercep"``, ``"niqe"``, ...), instead of
            the last stage's fused reward.
        total_steps: the run's policy steps; only needed by mode ``fixed`` with an empty
            ``schedule`` (split evenly over the stages).
        data: an FGR data set (``finpercep data build``; the RL run's data) whose last
            ``cfg.coevolve.heldout`` samples form the held-out set of mode ``coevolve``; ``None`` =
            the first rollouts.

    Construction only lists the run's stage folders; each stage's model is loaded the first time
    its reward is asked for, and kept (one per stage).
    """

    def __init__(
        self,
        cfg: CurriculumConfig,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
        base_spec: str | None = None,
        *,
        total_steps: int | None = None,
        data: str | Path | None = None,
    ) -> None:
        from finpercep.reward import api

        if not isinstance(cfg, CurriculumConfig):
            raise ValueError(f"Curriculum expects a CurriculumConfig, got {type(cfg).__name__}")
        if base_spec is not None and cfg.mode != "none":
            raise ValueError(f"base_spec={base_spec!r} is only for curriculum mode 'none' (got mode {cfg.mode!r}); "
                             "the other modes use the fused reward of each RM stage")
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        self.base_spec = base_spec
        self._rm_cache: dict = {}
        self._rewards: dict[int, Reward] = {}
        self._fixed: Reward | None = None
        self._single: int | None = None  # stage of a single checkpoint folder (mode none)
        self._logs: dict[str, float] = {}
        if base_spec is not None:
            self.cfg = cfg  # no RM stages: the scheduler only counts steps
        else:
            folder = api.embedded_checkpoint_dir() if checkpoint is None else Path(checkpoint).expanduser()
            api.resolve_checkpoint(checkpoint)  # a clear error when there is no checkpoint at all
            stages = list(api.list_stages(folder))
            if not stages:  # a single checkpoint folder
                if cfg.mode != "none":
                    raise ValueError(f"curriculum mode {cfg.mode!r} needs a reward-model run folder with stage_K/ "
                                     f"subfolders; {folder} is a single checkpoint (use it with mode 'none')")
                import json

                self._single = int(json.loads((folder / "config.json").read_text())["config"]["decoder_stage"])
                stages = [self._single]
            self.cfg = resolve_config(cfg, stages, total_steps)
        self.state = CurriculumState()
        self.coevolver: Coevolver | None = None
        if self.cfg.mode == "coevolve":
            self.coevolver = Coevolver(self.cfg.coevolve, base=lambda: self._load(0), load_stage=self._load,
                                       device=self.device)
            if data is not None and self.cfg.coevolve.heldout > 0:
                self.coevolver.set_heldout(heldout_from_dataset(data, self.cfg.coevolve.heldout))

    # -- models and rewards --------------------------------------------------------------------

    def _load(self, k: int) -> torch.nn.Module:
        """The frozen shipped model of stage ``k`` (loaded once)."""
        from finpercep.rewards.finpercep_rm import load_rm

        return load_rm(self.checkpoint, None if self._single is not None else k, self.device, self._rm_cache)

    @property
    def stage(self) -> int:
        """The current RM stage ``k`` (-1 for a ``base_spec`` reward)."""
        if self.cfg.stages is None:
            return -1
        return self.cfg.stages[self.state.stage_index]

    @property
    def reward(self) -> Reward:
        """The current stage's reward: ``FusedReward`` over ``RM_k`` with the stage's ``l1, l2`` and
        ``tau`` (in mode ``coevolve`` over the live, refreshed copy of ``RM_k``); in mode ``none``
        the last stage's fused reward, or the ``base_spec`` reward."""
        from finpercep.rewards import FusedReward, create_reward

        if self.base_spec is not None:
            if self._fixed is None:
                self._fixed = create_reward(self.base_spec, self.checkpoint, self.device)
            return self._fixed
        k = self.stage
        if k not in self._rewards:
            l1, l2 = stage_weights(self.cfg, self.state.stage_index)
            model = self.coevolver.model(k) if self.coevolver is not None else self._load(k)
            self._rewards[k] = FusedReward(k, l1=l1, l2=l2, tau=self.cfg.tau, model=model, name=f"fused:{k}")
        return self._rewards[k]

    def loaded_stages(self) -> list[int]:
        """The RM stages whose models are loaded so far (construction loads none)."""
        return sorted({m.stage for m in self._rm_cache.values()})

    # -- the loop's calls ---------------------------------------------------------------------

    def add_rollout(self, hr: torch.Tensor, sr: torch.Tensor) -> int:
        """Mode ``coevolve``: turn the policy's outputs ``sr`` on training images ``hr`` (both
        ``(B, 3, H, W)`` in [0, 1]) into reward-model triplets for the replay buffer; returns how
        many were added. A no-op returning 0 in the other modes, so a loop may always call it."""
        if self.coevolver is None:
            return 0
        return self.coevolver.add(hr, sr)

    def observe(self, step: int, reward_mean: float) -> str | None:
        """Policy step ``step`` (1-based, increasing) was taken on :attr:`reward`, whose batch-mean
        score was ``reward_mean``: advance the scheduler (returns the switch reason, or ``None``)
        and, in mode ``coevolve``, refresh the current stage's reward model when due (every
        ``refresh_every`` steps, once the buffer holds a batch; after a switch, the new stage's).
        """
        self.state, reason = advance(self.state, self.cfg, step, reward_mean)
        self._logs = {}
        if reason is not None:
            sw = self.state.switches[-1]
            log.info("curriculum: step %d, RM_%d -> RM_%d (%s)", step, sw.from_stage, sw.to_stage, reason)
            self._logs["curriculum/switch"] = 1.0
        cv = self.coevolver
        if cv is not None and step % cv.cfg.refresh_every == 0:
            if cv.ready():
                self._logs.update(cv.refresh(self.stage, step))
            else:
                log.info("co-evolution: refresh at step %d skipped, the buffer holds %d < %d triplets",
                         step, len(cv.buffer), cv.cfg.batch)
        return reason

    def logs(self) -> dict[str, float]:
        """Metrics of the latest :meth:`observe`: ``curriculum/stage`` (``k``), ``curriculum/step_in_stage``,
        ``curriculum/stage_index``; in modes ``auto`` / ``coevolve`` once two rewards are in the
        window ``curriculum/rel_slope`` and ``curriculum/rel_std`` (the switching statistics);
        ``curriculum/switch`` = 1 on a switch; in mode ``coevolve`` ``coevolve/buffer`` and, after a
        refresh, its ``coevolve/*`` logs."""
        out = {"curriculum/stage": float(self.stage), "curriculum/step_in_stage": float(self.state.step_in_stage),
               "curriculum/stage_index": float(self.state.stage_index)}
        if self.cfg.mode in ("auto", "coevolve") and len(self.state.history) >= 2:
            rel_slope, rel_std = trend(self.state.history, self.cfg.scale_floor)
            out["curriculum/rel_slope"], out["curriculum/rel_std"] = rel_slope, rel_std
        if self.coevolver is not None:
            out["coevolve/buffer"] = float(len(self.coevolver.buffer))
        out.update(self._logs)
        return out

    # -- resume --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"config", "state", "coevolve"}``: the resolved config and scheduler state (JSON types)
        and, in mode ``coevolve``, the refreshed reward-model weights and optimiser states
        (tensors); ``torch.save`` it, ``torch.load(weights_only=True)`` reads it back."""
        return {
            "config": to_dict(self.cfg),
            "state": self.state.to_dict(),
            "coevolve": self.coevolver.state_dict() if self.coevolver is not None else None,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the stage, step in stage, reward history and switches
        (and the refreshed reward models). Raises ValueError when it was saved with other
        curriculum settings (another mode, stage list, schedule, ...)."""
        if not isinstance(d, dict) or not {"config", "state"} <= set(d):
            raise ValueError("curriculum state: expected the dict Curriculum.state_dict() returns")
        if d["config"] != to_dict(self.cfg):
            mine = to_dict(self.cfg)
            diff = sorted(k for k in mine if d["config"].get(k) != mine[k])
            raise ValueError(f"curriculum state was saved with other settings ({', '.join(diff)} differ); "
                             "resume with the same curriculum configuration")
        state = CurriculumState.from_dict(d["state"])
        if not 0 <= state.stage_index < len(self.cfg.stages or (None,)):
            raise ValueError(f"curriculum state: stage_index {state.stage_index} out of range")
        self.state = state
        if self.coevolver is not None:
            if d.get("coevolve") is None:
                raise ValueError("curriculum state has no co-evolution state, but the mode is 'coevolve'")
            self.coevolver.load_state_dict(d["coevolve"])
        self._logs = {}

    def __repr__(self) -> str:
        return (f"Curriculum(mode={self.cfg.mode!r}, stages={self.cfg.stages}, stage={self.stage}, "
                f"step_in_stage={self.state.step_in_stage})")


__all__ = [
    "MODES",
    "CoevolveConfig",
    "Coevolver",
    "Curriculum",
    "CurriculumConfig",
    "CurriculumState",
    "Switch",
    "advance",
    "heldout_from_dataset",
    "make_triplets",
    "order_accuracy_of",
    "resolve_config",
    "stage_weights",
    "switch_reason",
    "trend",
]
