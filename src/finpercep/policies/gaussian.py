"""A one-step SR network as a stochastic policy, so DPO and GRPO can fine-tune real pretrained
models (RealSR, Real-ESRGAN, waifu2x) too.

``GaussianPolicy(base, sigma)`` samples ``sr = f(lr) + sigma * eps`` (one Gaussian transition,
``K = 1``): the state chain is ``x_0 = 0`` (nothing) and ``x_1 = f(lr) + sigma * eps``, decoded
by a clamp to [0, 1]. Its log-probability is the Gaussian density of ``x_1`` around ``f(lr)``
(per-pixel mean, as :class:`finpercep.policies.flow.FlowSR`), ``predict_sr`` is ``f(lr)`` itself
(ReFL needs no wrapper), and ``denoising_error(lr, sr, t, noise)`` is ``mean (f(lr) - sr)^2``:
with a Gaussian policy, Diffusion-DPO's error difference is exactly the log-likelihood ratio of
DPO (Rafailov et al. 2023) up to the factor ``1 / (2 sigma^2)``, so ``t`` and ``noise`` are unused.

The wrapper holds the network as ``base``: LoRA adapters, optimisers and checkpoints act on it
(:func:`unwrap` gives the network a checkpoint stores).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from finpercep.types import Trajectory

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class GaussianPolicy(nn.Module):
    """``N(f(lr), sigma^2 I)`` around a one-step SR network ``f`` (module docstring)."""

    num_steps = 1

    def __init__(self, base: nn.Module, sigma: float) -> None:
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"the Gaussian policy's sigma must be > 0, got {sigma}")
        self.base = base
        self.sigma = float(sigma)
        self.scale = base.scale
        self.name = f"{getattr(base, 'name', 'policy')}+gauss{sigma:g}"

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return self.base(lr)

    @torch.no_grad()
    def sample(self, lr: torch.Tensor, generator: torch.Generator | None = None) -> Trajectory:
        mean = self.base(lr)
        x1 = mean + self.sigma * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        states = torch.stack([torch.zeros_like(x1), x1], dim=1)  # (B, 2, 3, H, W)
        return Trajectory(states=states, log_probs=self._log_prob(x1, mean, None)[:, None], sr=x1.clamp(0, 1))

    def step_log_prob(self, lr: torch.Tensor, x_k: torch.Tensor, k: int, x_next: torch.Tensor,
                      pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
        if k != 0:
            raise ValueError(f"a Gaussian policy has one step (k = 0), got k = {k}")
        return self._log_prob(x_next, self.base(lr), pixel_weight)

    def predict_sr(self, lr: torch.Tensor, x_k: torch.Tensor, k: int) -> torch.Tensor:
        return self.base(lr)

    def denoising_error(self, lr: torch.Tensor, sr: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (self.base(lr) - sr).pow(2).flatten(1).mean(1)

    def _log_prob(self, x: torch.Tensor, mean: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        lp = -((x - mean) ** 2) / (2 * self.sigma**2) - math.log(self.sigma) - _HALF_LOG_2PI
        if w is None:
            return lp.flatten(1).mean(1)
        w = w.expand_as(lp)
        return (lp * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1e-12)


def unwrap(policy: nn.Module) -> nn.Module:
    """The SR network inside a :class:`GaussianPolicy` (else ``policy`` itself)."""
    return policy.base if isinstance(policy, GaussianPolicy) else policy
