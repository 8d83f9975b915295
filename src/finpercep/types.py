"""Shared data types. Conventions used everywhere in finpercep:

- an image in the data engine is a float32 tensor ``(3, H, W)`` in [0, 1], RGB; batched code
  uses ``(B, 3, H, W)``;
- a mask is ``(H, W)`` float32 in {0, 1}; a map is ``(B, 1, H, W)`` (or ``(H, W)`` on disk) in
  [0, 1], higher = more degraded;
- randomness comes from an explicit ``numpy.random.Generator`` passed in, never from global state;
- every random choice is returned as a JSON-serialisable ``params`` dict so it can be recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    or a user-supplied callable (``user``).
    """

    name: str
    kind: Literal["real", "interpolation", "procedural", "user"]
    description: str
    fn: SRFn = field(repr=False, compare=False)
    scales: tuple[int, ...] = (2, 4)
    uses_hr: bool = False
    cost: Literal["cheap", "expensive"] = "cheap"
    licence: str = ""


# ---------------------------------------------------------------------------------------------
# Rewards (issue #4, ``finpercep.rewards``) and policies (``finpercep.policies``)


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


# ---------------------------------------------------------------------------------------------
# Training


class NonFiniteError(FloatingPointError, ValueError):
    """A loss, reward or gradient became NaN / infinite: a training loop (RL, reward model, policy
    recipes) stops with a message naming the step and the last good checkpoint; nothing is
    overwritten. A ValueError too, so the CLI prints it as one line."""
