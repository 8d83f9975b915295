"""Shared data types. Conventions used everywhere in finpercep:

- an image in the data engine is a float32 tensor ``(3, H, W)`` in [0, 1], RGB; batched code
  uses ``(B, 3, H, W)``;
- a mask is ``(H, W)`` float32 in {0, 1}; a map is ``(B, 1, H, W)`` (or ``(H, W)`` on disk) in
  [0, 1], higher = more degraded;
- randomness comes from an explicit ``numpy.random.Generator`` passed in, never from global state;
- every random choice is returned as a JSON-serialisable ``params`` dict so it can be recorded.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, runtime_checkable

import numpy as np
import torch

Params = dict[str, Any]

# fn(lr (3,h,w), hr (3,h*s,w*s), scale, rng) -> (sr (3,h*s,w*s) in [0,1], params)
SRFn = Callable[[torch.Tensor, torch.Tensor, int, np.random.Generator], tuple[torch.Tensor, Params]]


@dataclass(frozen=True)
class SRFamily:
    """One entry of the SR zoo: something that turns an LR image into an SR image.

    ``kind`` says what it is: a real pretrained network (``real``), classic interpolation
    (``interpolation``), a procedural injector of a typical generative-SR artifact
    (``procedural``; it works on the HR image, so its only difference from HR is the artifact),
    a negative edit of the HR image that removes information or changes its photometry
    (``negative``: darker, blurred, flat, ...; :mod:`finpercep.data.negatives`), or a user-supplied
    callable (``user``).
    """

    name: str
    kind: Literal["real", "interpolation", "procedural", "negative", "user"]
    description: str
    fn: SRFn = field(repr=False, compare=False)
    scales: tuple[int, ...] = (2, 4)
    uses_hr: bool = False
    cost: Literal["cheap", "expensive"] = "cheap"
    licence: str = ""


_TRIPLET_FIELDS = ("hr", "syn", "sr", "map_syn", "mask", "map_sr")


def _shape_of(t: Any) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


@dataclass(frozen=True)
class Triplet:
    """A batch of ``B`` reward-model triplets (arXiv 2512.22647, Sec. 2): the clean HR image, the
    region swap ``syn = B * SR + (1 - B) * HR`` and the whole SR output, which the ranking loss
    orders ``S(HR) > S(syn) > S(SR)`` (Sec. 3, L_rank).

    ``hr``, ``syn``, ``sr``: ``(B, 3, H, W)`` float in [0, 1]. ``map_syn``: ``(B, 1, H, W)`` in
    [0, 1], the ground-truth map of ``syn`` (higher = more degraded). ``mask`` (the swap mask, in
    {0, 1}) and ``map_sr`` (the map of ``sr``): ``(B, 1, H, W)`` where available, else ``None``.

    Only shapes are checked (``ValueError`` naming the field); value ranges are the producer's
    job (:class:`finpercep.data.dataset.FGRDataset` checks every map it reads).
    """

    hr: torch.Tensor
    syn: torch.Tensor
    sr: torch.Tensor
    map_syn: torch.Tensor
    mask: torch.Tensor | None = None
    map_sr: torch.Tensor | None = None

    def __post_init__(self) -> None:
        hr = self.hr
        if not isinstance(hr, torch.Tensor) or hr.ndim != 4 or hr.shape[1] != 3:
            raise ValueError(f"Triplet.hr must be a (B, 3, H, W) tensor, got {_shape_of(hr)}")
        b, _, h, w = hr.shape
        for name in _TRIPLET_FIELDS[1:]:
            t = getattr(self, name)
            if t is None and name in ("mask", "map_sr"):
                continue
            want = (b, 3 if name in ("syn", "sr") else 1, h, w)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
                raise ValueError(f"Triplet.{name} must be {want} to match hr {tuple(hr.shape)}, got {_shape_of(t)}")

    def __len__(self) -> int:
        return self.hr.shape[0]

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Triplet":
        """A Triplet with ``fn`` applied to every tensor (``None`` fields stay ``None``)."""
        return Triplet(**{k: None if (v := getattr(self, k)) is None else fn(v) for k in _TRIPLET_FIELDS})

    def to(self, device: str | torch.device) -> "Triplet":
        """Every tensor moved to ``device``."""
        return self._map(lambda t: t.to(device))

    def __getitem__(self, idx: int | slice | list[int] | torch.Tensor) -> "Triplet":
        """The triplets ``idx`` of the batch, still a batch (an ``int`` gives ``B = 1``)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1 if idx != -1 else None)
        return self._map(lambda t: t[idx])

    @staticmethod
    def cat(parts: "list[Triplet] | tuple[Triplet, ...]") -> "Triplet":
        """Concatenate batches along the batch axis. An optional field is kept only when every part
        has it. ``ValueError`` for no parts or parts of different image sizes."""
        if not parts:
            raise ValueError("Triplet.cat needs at least one triplet")
        sizes = sorted({tuple(p.hr.shape[-2:]) for p in parts})
        if len(sizes) > 1:
            raise ValueError(f"Triplet.cat: the triplets differ in size {sizes}; crop them to one size first")
        out = {}
        for k in _TRIPLET_FIELDS:
            vals = [getattr(p, k) for p in parts]
            out[k] = None if any(v is None for v in vals) else torch.cat(vals)
        return Triplet(**out)


# ---------------------------------------------------------------------------------------------
# Rewards (``finpercep.rewards``) and policies (``finpercep.policies``)


@dataclass
class RewardOutput:
    """What a reward returns for ``B`` images of size ``H x W``.

    ``score`` ``(B,)``: higher = better, always (a lower-is-better metric is negated).
    ``map`` ``(B, 1, H, W)`` in [0, 1], higher = more degraded; ``None`` for a reward without a
    map (global metrics, FinPercep-RM stage 0).
    ``map_logits`` ``(B, 1, H, W)`` with ``map = sigmoid(map_logits)`` where the reward has them
    (FinPercep-RM stages >= 1), else ``None``.
    """

    score: torch.Tensor
    map: torch.Tensor | None = None
    map_logits: torch.Tensor | None = None


@runtime_checkable
class Reward(Protocol):
    """One contract for every reward (FinPercep-RM stages, the fused curriculum reward, NR and FR
    metrics, weighted sums): a plain callable plus metadata.

    ``reward(sr, lr=None, hr=None) -> RewardOutput`` with ``sr`` ``(B, 3, H, W)`` in [0, 1]
    (``lr`` ``(B, 3, H/s, W/s)``, ``hr`` ``(B, 3, H, W)``, both in [0, 1], given where available).
    A reward with ``needs_reference`` raises ``ValueError`` when ``hr`` is missing. A
    ``differentiable`` reward's score has a gradient with respect to ``sr``; the others return
    a detached score (and may run on CPU / numpy internally).
    """

    name: str
    """The spec that builds it (``finpercep:2``, ``niqe``, ``finpercep+0.5*l1``)."""
    needs_reference: bool
    """True when ``hr`` must be passed (full-reference terms)."""
    differentiable: bool
    """True when ``score`` carries a gradient to ``sr`` (ReFL needs this)."""
    range: tuple[float, float]
    """Bounds of ``score`` (``-inf`` / ``inf`` where unbounded), documented per reward."""
    has_map: bool
    """True when ``RewardOutput.map`` is filled."""

    def __call__(
        self, sr: torch.Tensor, lr: torch.Tensor | None = None, hr: torch.Tensor | None = None
    ) -> RewardOutput: ...

    def to(self, device: str | torch.device) -> "Reward":
        """Move whatever runs on a device (a no-op for numpy metrics); returns ``self``."""
        ...


@runtime_checkable
class Policy(Protocol):
    """An SR network as a policy: ``policy(lr (B, 3, h, w) in [0, 1]) -> sr (B, 3, h*s, w*s) in
    [0, 1]`` (deterministic; for a stochastic policy this is its mean / ODE path). It is an
    ``nn.Module`` with ``scale`` (int, s) and ``name`` (str) attributes."""

    scale: int
    name: str

    def __call__(self, lr: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Trajectory:
    """One sampled run of a stochastic multi-step policy on a batch of ``B`` LR images.

    ``states`` ``(B, K+1, C, H, W)``: the chain ``x_0 .. x_K`` in the policy's own state space
    (``x_0`` the initial noise, ``x_K`` the final state); ``log_probs`` ``(B, K)``: ``log p(x_{k+1} |
    x_k)`` of each transition under the sampling parameters (the per-pixel mean of the Gaussian
    log-density, see the policy's docstring); ``sr`` ``(B, 3, h*s, w*s)`` in [0, 1], the image
    decoded from ``x_K``. Sampled without gradient.
    """

    states: torch.Tensor
    log_probs: torch.Tensor
    sr: torch.Tensor


@runtime_checkable
class StochasticPolicy(Policy, Protocol):
    """A multi-step SR policy with Gaussian transitions (flow/DDPM-style SDE sampler), so each
    step has a log-probability (what DPO and GRPO need). ``num_steps`` is ``K``.

    - ``sample(lr, generator) -> Trajectory`` (no grad);
    - ``step_log_prob(lr, x_k, k, x_next, pixel_weight=None) -> (B,)``: ``log p_theta(x_next |
      x_k)`` of transition ``k`` (0-based) under the current parameters, differentiable w.r.t. them;
      the per-pixel mean of the Gaussian log-density, or the ``pixel_weight``-weighted mean
      (``(B, 1, H, W)``, >= 0; dense credit) when given;
    - ``predict_sr(lr, x_k, k) -> sr (B, 3, H, W)`` in [0, 1]: the one-step estimate of the final
      image from state ``x_k``, differentiable w.r.t. the parameters (ReFL backpropagates the
      reward through it at a late step);
    - ``denoising_error(lr, sr, t, noise) -> (B,)``: the policy's own training loss (per-sample
      mean squared error of its prediction) on target ``sr`` at time ``t`` ``(B,)`` in [0, 1] with
      ``noise`` shaped like the state (Diffusion-DPO compares it between policy and reference).
    """

    num_steps: int

    def sample(self, lr: torch.Tensor, generator: torch.Generator | None = None) -> Trajectory: ...

    def step_log_prob(
        self,
        lr: torch.Tensor,
        x_k: torch.Tensor,
        k: int,
        x_next: torch.Tensor,
        pixel_weight: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def predict_sr(self, lr: torch.Tensor, x_k: torch.Tensor, k: int) -> torch.Tensor: ...

    def denoising_error(
        self, lr: torch.Tensor, sr: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor: ...


@runtime_checkable
class TruncatedBackpropPolicy(StochasticPolicy, Protocol):
    """A stochastic policy whose sampler can carry the gradient through its last ``grad_steps``
    transitions (DRaFT-K, Clark et al. 2024, arXiv 2309.17400): ReFL then backpropagates the reward
    through them instead of through a one-step ``predict_sr``.

    - ``sample_with_grad(lr, generator) -> sr (B, 3, h*s, w*s)`` in [0, 1]: the chain ``sample``
      draws, the first ``num_steps - grad_steps`` transitions without gradient, the rest with it.
    """

    grad_steps: int

    def sample_with_grad(self, lr: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor: ...


@runtime_checkable
class AdapterPolicy(Policy, Protocol):
    """A policy that brings its own LoRA adapters and checkpoint format (the ``diffusers`` policies
    of :mod:`finpercep.policies.diffusion_base`: peft adapters on a UNet whose multi-GB base
    weights are never copied). The RL loops call these instead of :mod:`finpercep.policies.lora`:

    - ``add_lora(rank, alpha, generator) -> names``: add trainable adapters (the only trainable
      parameters afterwards), starting as the identity, ``lora_A`` drawn from ``generator``;
    - ``adapters_disabled()``: a context manager within which the policy computes its base (the
      frozen reference of a KL / DPO term);
    - ``save_checkpoint(folder) -> folder``: write a checkpoint that ``finpercep.policies.load_policy``
      reads back.
    """

    def add_lora(self, rank: int, alpha: float | None = None, generator: torch.Generator | None = None) -> list[str]: ...

    def adapters_disabled(self) -> AbstractContextManager[Any]: ...

    def save_checkpoint(self, folder: str | Path) -> Path: ...


# ---------------------------------------------------------------------------------------------
# RL: what the loops sample and where their reward comes from


@dataclass
class Rollout:
    """``G`` samples of a stochastic policy for each of ``n`` LR images, scored by the reward: what
    DPO and GRPO learn from. ``N = n * G`` rows, grouped consecutively (rows ``i*G .. i*G + G-1``
    share LR image ``i``). Shapes are checked on construction (ValueError naming the field).

    ``lr`` ``(N, 3, h, w)`` and ``hr`` ``(N, 3, H, W)`` in [0, 1]: each row's input and HR image;
    ``traj``: the sampled chains (``states (N, K+1, ...)``, ``log_probs (N, K)``, ``sr (N, 3, H,
    W)``); ``reward``: the reward of ``traj.sr`` (``score (N,)``, ``map (N, 1, H, W)`` or None);
    ``group_size``: ``G``.

    GRPO fills the rest: ``advantages`` ``(N,)`` (group-normalised rewards); ``pixel_weight``
    ``(N, 1, H, W)`` (dense credit) or None; ``steps``, the transitions ``k`` it trains on;
    ``old_log_probs[k]`` ``(N,)``, ``log p(x_{k+1} | x_k)`` under the sampling parameters, for each
    ``k`` of ``steps``; ``ref_log_probs[k]`` ``(N,)`` under the reference policy (empty without a
    KL term).
    """

    lr: torch.Tensor
    hr: torch.Tensor
    traj: Trajectory
    reward: RewardOutput
    group_size: int
    advantages: torch.Tensor | None = None
    pixel_weight: torch.Tensor | None = None
    steps: tuple[int, ...] = ()
    old_log_probs: dict[int, torch.Tensor] = field(default_factory=dict)
    ref_log_probs: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.lr.shape[0]
        if self.lr.ndim != 4 or self.lr.shape[1] != 3:
            raise ValueError(f"Rollout.lr must be (N, 3, h, w), got {_shape_of(self.lr)}")
        if self.group_size < 1 or n % self.group_size:
            raise ValueError(f"Rollout: {n} rows do not form groups of group_size={self.group_size}")
        image = (n, 3, *self.hr.shape[-2:])
        _check_shape("hr", self.hr, image)
        _check_shape("traj.sr", self.traj.sr, image)
        _check_shape("traj.log_probs", self.traj.log_probs, (n, self.traj.states.shape[1] - 1))
        _check_shape("reward.score", self.reward.score, (n,))
        if self.reward.map is not None:
            _check_shape("reward.map", self.reward.map, (n, 1, *image[2:]))
        if self.advantages is not None:
            _check_shape("advantages", self.advantages, (n,))
        if self.pixel_weight is not None:
            _check_shape("pixel_weight", self.pixel_weight, (n, 1, *image[2:]))
        if set(self.old_log_probs) != set(self.steps) or not set(self.ref_log_probs) <= set(self.steps):
            raise ValueError(f"Rollout: log-probabilities for steps {sorted(self.old_log_probs)} (old) and "
                             f"{sorted(self.ref_log_probs)} (reference), expected {sorted(self.steps)}")
        for k in self.steps:
            _check_shape(f"old_log_probs[{k}]", self.old_log_probs[k], (n,))
            if k in self.ref_log_probs:
                _check_shape(f"ref_log_probs[{k}]", self.ref_log_probs[k], (n,))

    def __len__(self) -> int:
        return self.lr.shape[0]

    def group_firsts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, RewardOutput]:
        """``(lr, sr, hr, reward)`` of the first sample of each group (``n`` rows), for sample grids."""
        g, out = self.group_size, self.reward
        first = RewardOutput(score=out.score[::g], map=None if out.map is None else out.map[::g])
        return self.lr[::g], self.traj.sr[::g], self.hr[::g], first


def _check_shape(name: str, t: Any, want: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(want):
        raise ValueError(f"Rollout.{name} must be {tuple(want)}, got {_shape_of(t)}")


@runtime_checkable
class RewardSource(Protocol):
    """Where an RL loop's reward comes from: a reward or a curriculum
    (:class:`finpercep.curriculum.Curriculum`; a plain :class:`Reward` is wrapped by
    :class:`finpercep.rl.common.FixedReward`). What the loops call, per step::

        reward = source.reward               # the reward now in use (a curriculum may switch it)
        source.add_rollout(hr, sr)           # the policy's outputs (co-evolution's data; else no-op)
        source.observe(step, reward_mean)    # step done: may switch stage; returns the reason or None
        metrics.update(source.logs())
        checkpoint["curriculum"] = source.state_dict()   # restored with load_state_dict
    """

    @property
    def reward(self) -> Reward: ...

    def add_rollout(self, hr: torch.Tensor, sr: torch.Tensor) -> int: ...

    def observe(self, step: int, reward_mean: float) -> str | None: ...

    def logs(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, d: dict[str, Any]) -> None: ...


# ---------------------------------------------------------------------------------------------
# Training


class NonFiniteError(FloatingPointError, ValueError):
    """A loss, reward or gradient became NaN / infinite: a training loop (RL, reward model, policy
    recipes) stops with a message naming the step and the last good checkpoint; nothing is
    overwritten. A ValueError too, so the CLI prints it as one line."""
