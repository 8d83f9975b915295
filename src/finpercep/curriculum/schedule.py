"""The curriculum's scheduler: which reward stage ``RM_k`` the policy trains on, and when it moves on
(arXiv 2512.22647, co-evolutionary curriculum learning).

The policy goes through the reward-model stages listed in :attr:`CurriculumConfig.stages`
(``RM_0 -> RM_1 -> ... -> RM_N`` by default) with the fused reward
``R_k = l1_k * S_k + l2_k * (1 - softmax_max(M_k))`` (:mod:`finpercep.rewards.fused`). When it
moves on is decided by :func:`advance`, a pure function of the scheduler state and one step's mean
reward, in one of four modes:

- ``none``: no curriculum; one fixed reward for the whole run (never switches);
- ``fixed``: the paper's hand-set schedule, ``schedule[i]`` policy steps on ``stages[i]``, the last
  stage to the end of the run;
- ``auto`` (beyond the paper, which names hand-set switching as its limitation): move on once the
  reward of the current stage has **plateaued and is steady**, measured over the last ``window``
  steps:

      rel_slope = |slope| * (window - 1) / scale     the least-squares line's rise over the window
      rel_std   = std(r) / scale                      the spread of the window's rewards
      scale     = max(mean(|r|), scale_floor)

  and switch when ``rel_slope < plateau_tol`` and ``rel_std < var_tol``, never before
  ``min_steps`` (nor before the window is full) and always at ``max_steps`` steps in the stage;
- ``coevolve``: switches exactly like ``auto``; in addition the reward model keeps training on the
  policy's own outputs (:mod:`finpercep.curriculum.coevolve`).

The last stage never ends. Every switch is recorded as ``(step, from_stage, to_stage, reason)``
with RM stage numbers ``k``. The state (:class:`CurriculumState`) is plain JSON through
``to_dict`` / ``from_dict``, saved in every checkpoint, so a resumed run switches at the same
steps as an uninterrupted one.

The reward history is that of the *current* stage only: it is cleared at each switch, because
``R_{k+1}`` is a different function whose values are not comparable with ``R_k``'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple

from finpercep.curriculum.coevolve import CoevolveConfig
from finpercep.rewards.fused import DEFAULT_L1, DEFAULT_L2, DEFAULT_TAU

Mode = Literal["none", "fixed", "auto", "coevolve"]
MODES: tuple[str, ...] = ("none", "fixed", "auto", "coevolve")
"""The curriculum modes (module docstring), in the order the CLI lists them."""


@dataclass(frozen=True)
class CurriculumConfig:
    """How the policy moves through the reward stages (module docstring).

    The automatic-switching defaults are our choice, not tuned on a measurement: a reward whose
    fitted line rises by less than 5 % of its scale over 20 steps, and whose spread is below 10 %
    of its scale, counts as converged; no stage lasts longer than 200 steps. The spread of a
    step's mean reward includes batch sampling noise (each step sees other images), so a run with
    small batches may need a larger ``var_tol``: ``Curriculum.logs()`` reports ``rel_slope`` and
    ``rel_std`` for sizing both.
    """

    mode: Mode = "none"
    """``none`` (one fixed reward), ``fixed`` (hand-set schedule, the paper), ``auto`` (switch on
    plateau and low variance) or ``coevolve`` (``auto`` switching plus online reward-model
    training on the policy's outputs)."""

    stages: tuple[int, ...] | None = None
    """RM stages ``k`` to go through, strictly increasing (e.g. ``(0, 2, 4)``); ``None`` = every
    stage of the reward-model run, ``0..N``. In mode ``none`` only the last one is used."""

    schedule: tuple[int, ...] = ()
    """Mode ``fixed``: policy steps on each stage except the last (which runs to the end); one
    value = the same length for every stage, else one per stage but the last. Empty = split the
    run's ``total_steps`` evenly over the stages (``Curriculum(total_steps=...)`` needed)."""

    l1: float | tuple[float, ...] = DEFAULT_L1
    """Weight of the score ``S_k`` in ``R_k``: one value for every stage, or one per stage."""

    l2: float | tuple[float, ...] = DEFAULT_L2
    """Weight of the worst-defect term ``1 - softmax_max(M_k)``: one value, or one per stage
    (at ``RM_0``, which has no map, the term is the constant ``l2``)."""

    tau: float = DEFAULT_TAU
    """Temperature of ``softmax_max`` (:func:`finpercep.rewards.fused.softmax_max`)."""

    window: int = 20
    """Auto switching: number of most recent steps of the current stage over which the reward's
    trend (least-squares slope) and spread (standard deviation) are measured. No automatic
    switch happens before the window is full."""

    plateau_tol: float = 0.05
    """Auto switching: the reward has plateaued when its least-squares line rises (or falls) over
    the window by less than this fraction of the reward's scale, ``|slope| * (window - 1) /
    scale < plateau_tol``."""

    var_tol: float = 0.1
    """Auto switching: the reward is steady when its standard deviation over the window is below
    this fraction of its scale, ``std / scale < var_tol``. Both conditions must hold."""

    scale_floor: float = 1.0
    """Auto switching: the reward's scale is ``max(mean |r| over the window, scale_floor)``, so a
    reward hovering near 0 does not make every change look huge. 1.0 = one ranking margin, the
    unit of FinPercep-RM scores (``RMLossConfig.m1``)."""

    min_steps: int = 20
    """Auto switching: a stage never ends before this many steps (nor before ``window``)."""

    max_steps: int = 200
    """Auto switching: a stage always ends after this many steps, plateau or not (the last stage
    excepted, which runs to the end)."""

    coevolve: CoevolveConfig = field(default_factory=CoevolveConfig)
    """Mode ``coevolve``: the online reward-model training (:class:`CoevolveConfig`); ignored in
    the other modes."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"curriculum.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.stages is not None:
            st = tuple(self.stages)
            bad = any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in st)
            if not st or bad or list(st) != sorted(set(st)):
                raise ValueError("curriculum.stages must be a non-empty, strictly increasing tuple of stage numbers >= 0, "
                                 f"got {self.stages!r}")
            object.__setattr__(self, "stages", st)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.schedule):
            raise ValueError(f"curriculum.schedule must hold step counts >= 1, got {self.schedule!r}")
        for name in ("l1", "l2"):
            v = getattr(self, name)
            vals = v if isinstance(v, tuple) else (v,)
            if not vals or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in vals):
                raise ValueError(f"curriculum.{name} must be a finite number or a tuple of them, got {v!r}")
        if not (self.tau > 0 and math.isfinite(self.tau)):
            raise ValueError(f"curriculum.tau must be a finite number > 0, got {self.tau!r}")
        if self.window < 2:
            raise ValueError(f"curriculum.window must be >= 2 (a slope needs two points), got {self.window}")
        for name in ("plateau_tol", "var_tol", "scale_floor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"curriculum.{name} must be > 0, got {getattr(self, name)}")
        if self.min_steps < 1 or self.max_steps < self.min_steps:
            raise ValueError(f"curriculum needs 1 <= min_steps <= max_steps, "
                             f"got min_steps={self.min_steps}, max_steps={self.max_steps}")


def resolve_config(
    cfg: CurriculumConfig, available: list[int] | tuple[int, ...], total_steps: int | None = None
) -> CurriculumConfig:
    """``cfg`` with its stage list filled in and checked against the stages the reward-model run
    has (``available``, e.g. ``list(finpercep.reward.api.list_stages(run))``), per-stage weights
    checked, and an empty fixed schedule split evenly over ``total_steps``.

    Mode ``none`` keeps only the last stage. Raises ValueError naming what is wrong.
    """
    avail = sorted(int(k) for k in available)
    if not avail:
        raise ValueError("the reward-model run has no stages (no stage_K/ folder)")
    stages = tuple(avail) if cfg.stages is None else cfg.stages
    missing = [k for k in stages if k not in avail]
    if missing:
        raise ValueError(f"curriculum.stages {list(stages)}: stage(s) {missing} are not in the reward-model run "
                         f"(it has {avail})")
    if cfg.mode == "none":
        stages = stages[-1:]
    n = len(stages)
    for name in ("l1", "l2"):
        v = getattr(cfg, name)
        if isinstance(v, tuple) and len(v) not in (1, n):
            raise ValueError(f"curriculum.{name} needs one value or one per stage ({n} stages {list(stages)}), "
                             f"got {len(v)}: {v}")
    schedule = cfg.schedule
    if cfg.mode == "fixed" and n > 1:
        if not schedule:
            if total_steps is None:
                raise ValueError("curriculum mode 'fixed' needs curriculum.schedule (steps per stage but the last) "
                                 "or the run's total_steps to split evenly")
            per = total_steps // n
            if per < 1:
                raise ValueError(f"{total_steps} steps cannot be split over {n} stages; "
                                 "set curriculum.schedule or use fewer stages")
            schedule = (per,) * (n - 1)
        elif len(schedule) not in (1, n - 1):
            raise ValueError(f"curriculum.schedule needs one value or one per stage but the last ({n - 1} for stages "
                             f"{list(stages)}), got {len(schedule)}: {schedule}")
    return replace(cfg, stages=stages, schedule=schedule)


def _per_stage(v: float | tuple[float, ...], i: int) -> float:
    if isinstance(v, tuple):
        return float(v[0] if len(v) == 1 else v[i])
    return float(v)


def stage_weights(cfg: CurriculumConfig, i: int) -> tuple[float, float]:
    """``(l1, l2)`` of stage index ``i`` (an index into ``cfg.stages``)."""
    return _per_stage(cfg.l1, i), _per_stage(cfg.l2, i)


def stage_length(cfg: CurriculumConfig, i: int) -> int | None:
    """Fixed mode: steps of stage index ``i``; ``None`` for the last stage (runs to the end)."""
    assert cfg.stages is not None
    if i >= len(cfg.stages) - 1:
        return None
    return cfg.schedule[0] if len(cfg.schedule) == 1 else cfg.schedule[i]


class Switch(NamedTuple):
    """One stage change: after policy step ``step`` the reward moved from ``RM_{from_stage}`` to
    ``RM_{to_stage}`` because of ``reason``."""

    step: int
    from_stage: int
    to_stage: int
    reason: str


@dataclass
class CurriculumState:
    """Where the curriculum stands; JSON through :meth:`to_dict` / :meth:`from_dict`."""

    stage_index: int = 0
    """Index into ``CurriculumConfig.stages`` of the current stage."""
    step_in_stage: int = 0
    """Policy steps observed on the current stage."""
    last_step: int = 0
    """The last policy step observed (0 = none yet); steps must increase."""
    history: list[float] = field(default_factory=list)
    """Mean rewards of the current stage's most recent steps (at most ``window``, oldest first)."""
    switches: list[Switch] = field(default_factory=list)
    """Every stage change so far, oldest first."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (ints, floats, strings, lists)."""
        return {
            "stage_index": self.stage_index,
            "step_in_stage": self.step_in_stage,
            "last_step": self.last_step,
            "history": [float(r) for r in self.history],
            "switches": [list(s) for s in self.switches],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CurriculumState":
        """The inverse of :meth:`to_dict`; unknown or missing keys are errors."""
        keys = {"stage_index", "step_in_stage", "last_step", "history", "switches"}
        if not isinstance(d, dict) or set(d) != keys:
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"curriculum state: expected the keys {sorted(keys)}, got {got}")
        return cls(
            stage_index=int(d["stage_index"]),
            step_in_stage=int(d["step_in_stage"]),
            last_step=int(d["last_step"]),
            history=[float(r) for r in d["history"]],
            switches=[Switch(int(s[0]), int(s[1]), int(s[2]), str(s[3])) for s in d["switches"]],
        )


def trend(history: list[float], scale_floor: float) -> tuple[float, float]:
    """``(rel_slope, rel_std)`` of a reward history (module docstring): the least-squares line's
    rise over the history and its standard deviation, both divided by ``max(mean |r|,
    scale_floor)``. Needs at least two values."""
    n = len(history)
    if n < 2:
        raise ValueError(f"trend needs at least 2 rewards, got {n}")
    mx = (n - 1) / 2
    my = sum(history) / n
    sxx = sum((i - mx) ** 2 for i in range(n))
    slope = sum((i - mx) * (r - my) for i, r in enumerate(history)) / sxx
    std = math.sqrt(sum((r - my) ** 2 for r in history) / n)
    scale = max(sum(abs(r) for r in history) / n, scale_floor)
    return abs(slope) * (n - 1) / scale, std / scale


def switch_reason(state: CurriculumState, cfg: CurriculumConfig) -> str | None:
    """Why the current stage should end now (after ``state.step_in_stage`` steps), or ``None``.

    Pure; ``cfg`` must be resolved (:func:`resolve_config`). The last stage never ends."""
    if cfg.mode == "none":
        return None
    assert cfg.stages is not None, "resolve_config(cfg, ...) first"
    if state.stage_index >= len(cfg.stages) - 1:
        return None
    n = state.step_in_stage
    if cfg.mode == "fixed":
        length = stage_length(cfg, state.stage_index)
        return f"fixed schedule: {length} steps" if length is not None and n >= length else None
    # auto / coevolve
    if n >= cfg.max_steps:
        return f"max_steps: {cfg.max_steps} steps"
    if n < cfg.min_steps or len(state.history) < cfg.window:
        return None
    rel_slope, rel_std = trend(state.history, cfg.scale_floor)
    if rel_slope < cfg.plateau_tol and rel_std < cfg.var_tol:
        return f"plateau: rel_slope {rel_slope:.3g} < {cfg.plateau_tol:g}, rel_std {rel_std:.3g} < {cfg.var_tol:g}"
    return None


def advance(
    state: CurriculumState, cfg: CurriculumConfig, step: int, reward_mean: float
) -> tuple[CurriculumState, str | None]:
    """One policy step observed: the new state and the switch reason (``None`` = no switch).

    Call it after policy step ``step`` (1-based, strictly increasing) was taken on the current
    stage's reward, whose batch mean was ``reward_mean``. When the stage ends, the returned state
    is at step 0 of the next stage (its reward is used from step ``step + 1`` on) with an empty
    history, and the switch is appended to ``switches``. ``state`` is not modified. ``cfg`` must be
    resolved (:func:`resolve_config`).
    """
    if cfg.stages is None and cfg.mode != "none":
        raise ValueError("advance: cfg.stages is None; resolve the config first "
                         "(resolve_config(cfg, available_stages))")
    if isinstance(step, bool) or not isinstance(step, int) or step <= state.last_step:
        raise ValueError(f"advance: steps must increase (last observed {state.last_step}), got {step!r}; "
                         "call it once per policy step, after the step")
    r = float(reward_mean)
    if not math.isfinite(r):
        raise ValueError(f"advance: reward_mean must be finite, got {reward_mean!r} at step {step}")
    n_stages = 1 if cfg.stages is None else len(cfg.stages)
    if not 0 <= state.stage_index < n_stages:
        raise ValueError(f"advance: stage_index {state.stage_index} out of range for stages {cfg.stages}")
    new = CurriculumState(
        stage_index=state.stage_index,
        step_in_stage=state.step_in_stage + 1,
        last_step=step,
        history=(list(state.history) + [r])[-cfg.window :],
        switches=list(state.switches),
    )
    reason = switch_reason(new, cfg)
    if reason is None:
        return new, None
    i = new.stage_index
    new.switches.append(Switch(step, cfg.stages[i], cfg.stages[i + 1], reason))
    new.stage_index, new.step_in_stage, new.history = i + 1, 0, []
    return new, reason
