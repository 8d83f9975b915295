"""``flow-x4``: a stochastic multi-step SR policy (flow matching on the residual over bicubic), the
:class:`finpercep.types.StochasticPolicy` that DPO and GRPO sample from.

**State and flow.** With ``u = bicubic_s(lr)`` and the scaled residual ``r = (hr - u) / res_scale``,
the state ``x`` lives in residual space, shaped like the SR image ``(B, 3, H, W)``. Rectified flow /
flow matching (Lipman et al. 2023, "Flow Matching for Generative Modeling"; Liu et al. 2023,
"Flow Straight and Fast") with ``t`` running from noise (0) to data (1)::

    x_t = (1 - t) * eps + t * r,    eps ~ N(0, I),    target velocity  v = r - eps.

The network ``v_theta(x_t, t, u)`` is trained with ``E || v_theta - (r - eps) ||^2`` over
``t ~ U(0, 1)`` (:meth:`FlowSR.denoising_error`). Its one-step estimates are
``x1_hat = x_t + (1 - t) v`` (the final residual) and ``eps_hat = x_t - t v`` (the noise), and the
decoded image is ``sr = clamp01(u + res_scale * x)``.

**Sampler (Flow-GRPO's ODE-to-SDE conversion).** Liu et al. 2025, "Flow-GRPO: Training Flow
Matching Models via Online RL", eq. 8 turns the flow ODE ``dx = v dt`` into the SDE with the same
marginals for any noise schedule ``sigma_t``::

    dx = [v + (sigma_t^2 / 2) grad log p_t(x)] dt + sigma_t dw,   grad log p_t(x) = -eps_hat / (1 - t)

(written here in our time direction; for this Gaussian path the score is ``-E[eps | x_t] / (1 -
t)``). Flow-GRPO takes ``sigma_t = a sqrt(t' / (1 - t'))`` in its own time ``t' = 1 - t``, which
diverges at pure noise and needs a special case there; we take ``sigma_t = a sqrt(1 - t)``
(``a`` = ``noise_level``), which makes the correction term bounded, ``(sigma_t^2 / 2) grad log p =
-(a^2 / 2) eps_hat``. Euler-Maruyama on the uniform grid ``t_k = k / K``, ``dt = 1 / K`` gives the
Gaussian transition ``k = 0 .. K-1``::

    x_{k+1} ~ N(mu_k, s_k^2 I),   mu_k = x_k + [v - (a^2 / 2)(x_k - t_k v)] dt,   s_k = a sqrt((1 - t_k) dt)

with ``v = v_theta(x_k, t_k, u)`` and ``x_0 ~ N(0, I)``. Every ``s_k >= a / K > 0``, so every step
has a log-probability; the final state keeps a little noise (``s_{K-1} = a / K``), which is the
policy's last stochastic choice.

**Log-probabilities** are the per-pixel **mean** of the Gaussian log-density of ``x_{k+1}`` (over
``C x H x W``), as in Flow-GRPO, so their scale does not depend on the image size:
``mean(-(x_{k+1} - mu_k)^2 / (2 s_k^2) - log s_k - log(2 pi) / 2)``.

**Deterministic path.** ``forward(lr)`` runs the same chain with all noise set to 0 (``x_0 = 0``,
``x_{k+1} = mu_k``): the mean path.

**The network** works at LR resolution: ``x_t`` and ``u`` are pixel-unshuffled (``s^2`` times the
channels at ``h x w``), a head convolution, ``num_blocks`` residual blocks whose hidden features
are modulated by the time embedding (FiLM, Perez et al. 2018: ``h * (1 + gamma(t)) + beta(t)``,
zero-initialised), a tail convolution and PixelShuffle back to ``(B, 3, H, W)``, minus ``x_t``:
``v_theta = D_theta(x_t, t, u) - x_t``. At ``t = 0`` the target ``r - eps = r - x_0`` then asks ``D``
for ``E[r | u]`` alone instead of also copying the unit-variance noise through the network.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from finpercep.checks import check_image_batch
from finpercep.config import check_between, check_positive
from finpercep.policies.recipe import RecipeConfig, train_recipe
from finpercep.policies.tiny import (
    MAX_CHANNELS,
    MAX_LAYERS,
    WEIGHTS_DIR,
    bicubic_upscale,
    clamp01_st,
    resolve_checkpoint,
)
from finpercep.types import Trajectory

log = logging.getLogger(__name__)

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)

MAX_FLOW_STEPS = 1000
"""Bound on ``FlowConfig.num_steps`` (8 by default)."""


@dataclass(frozen=True)
class FlowConfig:
    """Architecture and sampler of :class:`FlowSR`."""

    channels: int = 48
    """Feature channels of the residual blocks (at LR resolution)."""
    num_blocks: int = 4
    """Residual blocks (two 3x3 convolutions each, FiLM-modulated by the time embedding)."""
    time_dim: int = 64
    """Width of the sinusoidal time embedding and its MLP."""
    scale: int = 4
    """Upscaling factor s."""
    num_steps: int = 8
    """K, the transitions of the sampler (uniform grid ``t_k = k / K``)."""
    res_scale: float = 0.1
    """The state is ``(hr - bicubic(lr)) / res_scale``; 0.1 gives it roughly unit scale on
    Real-ESRGAN-degraded photos (the recipe logs the batch's ``residual/std`` in metrics.jsonl)."""
    noise_level: float = 0.7
    """``a`` in ``sigma_t = a sqrt(1 - t)`` (Flow-GRPO's default noise level is 0.7); > 0."""

    def __post_init__(self) -> None:
        check_between("FlowConfig", 1, MAX_CHANNELS, channels=self.channels, time_dim=self.time_dim)
        check_between("FlowConfig", 1, MAX_LAYERS, num_blocks=self.num_blocks)
        check_between("FlowConfig", 1, MAX_FLOW_STEPS, num_steps=self.num_steps)
        if self.time_dim % 2:
            raise ValueError(f"time_dim must be even, got {self.time_dim}")
        if self.scale not in (2, 3, 4, 8):
            raise ValueError(f"scale must be 2, 3, 4 or 8, got {self.scale}")
        check_positive("FlowConfig", res_scale=self.res_scale, noise_level=self.noise_level)


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding ``(B,) -> (B, dim)`` of ``t`` in [0, 1] (Vaswani et al. 2017, on
    ``1000 t``, as diffusion models do)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    arg = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([arg.sin(), arg.cos()], dim=1)


class FiLMBlock(nn.Module):
    """``x + conv2(act(FiLM_t(conv1(act(x)))))``; the FiLM projection starts at zero (identity)."""

    def __init__(self, channels: int, time_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.film = nn.Linear(time_dim, 2 * channels)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(x))
        gamma, beta = self.film(temb)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        h = h * (1 + gamma) + beta
        return x + self.conv2(F.silu(h))


class FlowSR(nn.Module):
    """Stochastic multi-step x``s`` SR policy; see the module docstring for the equations.

    - ``forward(lr) -> sr``: the mean path (all noise 0), ``(B, 3, h*s, w*s)`` in [0, 1];
    - ``sample(lr, generator) -> Trajectory``: ``states (B, K+1, 3, H, W)``, ``log_probs (B, K)``,
      ``sr``; no gradient;
    - ``step_log_prob(lr, x_k, k, x_next, pixel_weight=None) -> (B,)``: differentiable;
    - ``predict_sr(lr, x_k, k) -> sr``: decoded ``x1_hat``, differentiable; ``k`` in ``0 .. K``;
    - ``denoising_error(lr, sr, t, noise) -> (B,)``: the flow-matching loss per sample;
    - ``velocity(x, t, u)``: the network itself.

    Images are decoded with a straight-through clamp (value in [0, 1], identity gradient).
    """

    arch = "flow"

    def __init__(self, cfg: FlowConfig = FlowConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.scale = cfg.scale
        self.num_steps = cfg.num_steps
        self.name = f"flow-x{cfg.scale}"
        s2, c = cfg.scale**2, cfg.channels
        self.time_mlp = nn.Sequential(nn.Linear(cfg.time_dim, cfg.time_dim), nn.SiLU(), nn.Linear(cfg.time_dim, cfg.time_dim))
        self.head = nn.Conv2d(2 * 3 * s2, c, 3, padding=1)
        self.blocks = nn.ModuleList(FiLMBlock(c, cfg.time_dim) for _ in range(cfg.num_blocks))
        self.tail = nn.Conv2d(c, 3 * s2, 3, padding=1)

    # -- the network ---------------------------------------------------------------------------

    def velocity(self, x: torch.Tensor, t: torch.Tensor | float, u: torch.Tensor) -> torch.Tensor:
        """``v_theta(x_t, t, u)``: ``x (B, 3, H, W)`` state, ``t`` float or ``(B,)`` in [0, 1],
        ``u (B, 3, H, W)`` the bicubic upscale; returns ``(B, 3, H, W)``."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = self.time_mlp(time_embedding(t, self.cfg.time_dim)).to(x.dtype)
        z = torch.cat([F.pixel_unshuffle(x, self.scale), F.pixel_unshuffle(u, self.scale)], dim=1)  # (B, 6 s^2, h, w)
        h = self.head(z)
        for block in self.blocks:
            h = block(h, temb)
        return F.pixel_shuffle(self.tail(F.silu(h)), self.scale) - x  # skip: see the module docstring

    def t_of(self, k: int) -> float:
        """``t_k = k / K``."""
        return k / self.num_steps

    def decode(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """State -> image: ``clamp01(u + res_scale * x)`` (straight-through clamp)."""
        return clamp01_st(u + self.cfg.res_scale * x)

    def transition(self, u: torch.Tensor, x_k: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
        """Mean ``mu_k (B, 3, H, W)`` and std ``s_k`` (float) of ``p(x_{k+1} | x_k)``."""
        t, dt, a = self.t_of(k), 1.0 / self.num_steps, self.cfg.noise_level
        v = self.velocity(x_k, t, u)
        drift = v - 0.5 * a * a * (x_k - t * v)  # v + (sigma_t^2 / 2) * score, sigma_t^2 = a^2 (1 - t)
        return x_k + drift * dt, a * math.sqrt((1.0 - t) * dt)

    # -- the Policy / StochasticPolicy contract -----------------------------------------------

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        u = self._upscale(lr, "forward")
        x = torch.zeros_like(u)
        for k in range(self.num_steps):
            x, _ = self.transition(u, x, k)
        return self.decode(u, x)

    @torch.no_grad()
    def sample(self, lr: torch.Tensor, generator: torch.Generator | None = None) -> Trajectory:
        u = self._upscale(lr, "sample")
        x = torch.randn(u.shape, generator=generator, device=u.device, dtype=u.dtype)
        states, log_probs = [x], []
        for k in range(self.num_steps):
            mean, std = self.transition(u, x, k)
            x = mean + std * torch.randn(u.shape, generator=generator, device=u.device, dtype=u.dtype)
            log_probs.append(gaussian_log_prob(x, mean, std))
            states.append(x)
        return Trajectory(states=torch.stack(states, dim=1), log_probs=torch.stack(log_probs, dim=1), sr=self.decode(u, x))

    def step_log_prob(
        self,
        lr: torch.Tensor,
        x_k: torch.Tensor,
        k: int,
        x_next: torch.Tensor,
        pixel_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        u = self._upscale(lr, "step_log_prob")
        self._check_step(k, self.num_steps - 1, "step_log_prob")
        self._check_state(x_k, u, "step_log_prob: x_k")
        self._check_state(x_next, u, "step_log_prob: x_next")
        if pixel_weight is not None:
            _check_weight(pixel_weight, u)
        mean, std = self.transition(u, x_k, k)
        return gaussian_log_prob(x_next, mean, std, pixel_weight)

    def predict_sr(self, lr: torch.Tensor, x_k: torch.Tensor, k: int) -> torch.Tensor:
        u = self._upscale(lr, "predict_sr")
        self._check_step(k, self.num_steps, "predict_sr")
        self._check_state(x_k, u, "predict_sr: x_k")
        t = self.t_of(k)
        x1_hat = x_k + (1.0 - t) * self.velocity(x_k, t, u)
        return self.decode(u, x1_hat)

    def denoising_error(self, lr: torch.Tensor, sr: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        u = self._upscale(lr, "denoising_error")
        check_image_batch(sr, f"{self.name}.denoising_error: sr")
        if sr.shape != u.shape:
            raise ValueError(f"{self.name}.denoising_error: sr must be {tuple(u.shape)} (lr upscaled x{self.scale}), got {tuple(sr.shape)}")
        self._check_state(noise, u, "denoising_error: noise")
        if not torch.is_tensor(t) or t.shape != (u.shape[0],):
            raise ValueError(f"{self.name}.denoising_error: t must be a tensor of shape ({u.shape[0]},), got {getattr(t, 'shape', t)}")
        r = (sr - u) / self.cfg.res_scale
        tt = t.to(u.dtype)[:, None, None, None]
        x_t = (1 - tt) * noise + tt * r
        v = self.velocity(x_t, t.to(u.dtype), u)
        return ((v - (r - noise)) ** 2).mean(dim=(1, 2, 3))

    # -- input checks ---------------------------------------------------------------------------

    def _upscale(self, lr: torch.Tensor, who: str) -> torch.Tensor:
        check_image_batch(lr, f"{self.name}.{who}: lr")
        return bicubic_upscale(lr, self.scale)

    def _check_state(self, x: object, u: torch.Tensor, who: str) -> None:
        if not torch.is_tensor(x) or x.shape != u.shape:
            raise ValueError(f"{self.name}.{who}: expected a state of shape {tuple(u.shape)}, got {getattr(x, 'shape', type(x).__name__)}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{self.name}.{who}: contains NaN or infinite values")

    def _check_step(self, k: object, last: int, who: str) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= last:
            raise ValueError(f"{self.name}.{who}: k must be an int in [0, {last}], got {k!r}")


def gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, std: float, pixel_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-element ``log N(x; mean, std^2)`` averaged over ``(C, H, W)`` -> ``(B,)``; with
    ``pixel_weight (B, 1, H, W) >= 0`` the weighted mean (weights broadcast over channels,
    normalised by their sum; an all-zero weight gives 0)."""
    lp = -((x - mean) ** 2) / (2.0 * std * std) - math.log(std) - _HALF_LOG_2PI
    if pixel_weight is None:
        return lp.mean(dim=(1, 2, 3))
    w = pixel_weight.to(lp.dtype)
    return (lp * w).sum(dim=(1, 2, 3)) / (w.sum(dim=(1, 2, 3)) * lp.shape[1]).clamp_min(1e-12)


def _check_weight(w: object, u: torch.Tensor) -> None:
    want = (u.shape[0], 1, u.shape[2], u.shape[3])
    if not torch.is_tensor(w) or tuple(w.shape) != want:
        raise ValueError(f"pixel_weight must be a tensor of shape {want}, got {getattr(w, 'shape', type(w).__name__)}")
    if not torch.isfinite(w).all() or bool((w < 0).any()):
        raise ValueError("pixel_weight must be finite and >= 0")


def load_flow(path: str | Path | None = None) -> FlowSR:
    """The shipped ``flow-x4`` (``path=None``; ``finpercep/policies/weights/flow-x4/``), or the
    checkpoint / training run folder ``path``. Eval mode, CPU, float32."""
    from finpercep.policies.checkpoint import load_checkpoint

    return load_checkpoint(resolve_checkpoint(path, WEIGHTS_DIR / "flow-x4", "flow"), {FlowSR.arch: (FlowSR, FlowConfig)})


# ----------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowTrainConfig(RecipeConfig):
    """How ``flow-x4`` is trained (flow matching on degraded real-photo crops, each with its own
    ``t`` and noise): the shared recipe settings (:class:`finpercep.policies.recipe.RecipeConfig`),
    the architecture and sampler, and a lower peak learning rate than ``tiny-x4``'s. YAML fills
    it; unknown keys are errors."""

    model: FlowConfig = field(default_factory=FlowConfig)
    """Architecture and sampler."""
    learning_rate: float = 1e-3
    """Peak learning rate (AdamW), reached after ``warmup`` steps, then cosine decay to 0."""


def flow_matching_loss(model: nn.Module, lr: torch.Tensor, hr: torch.Tensor,
                       generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    """The flow recipe's loss: conditional flow matching (Lipman et al. 2023, eq. 23, with the
    rectified path ``x_t = (1 - t) eps + t r``), ``mean_i model.denoising_error(lr, hr, t, eps)``
    with ``t ~ U(0, 1)`` ``(B,)`` and ``eps ~ N(0, I)`` shaped like ``hr (B, 3, H, W)``, drawn from
    ``generator`` in that order. Logs ``loss/fm`` and ``residual/std``, the standard deviation of
    the batch's scaled residual ``(hr - bicubic(lr)) / res_scale`` (about 1 when ``res_scale`` fits)."""
    t = torch.rand(hr.shape[0], generator=generator)
    noise = torch.randn(hr.shape, generator=generator)
    loss = model.denoising_error(lr, hr, t, noise).mean()
    res_std = float(((hr - bicubic_upscale(lr, model.scale)) / model.cfg.res_scale).std())
    return loss, {"loss/fm": loss.item(), "residual/std": res_std}


def train_flow(cfg: FlowTrainConfig, photos: Path, out: Path, progress: bool = True) -> Path:
    """Train :class:`FlowSR` (initialised from ``cfg.seed``) with :func:`flow_matching_loss`
    through :func:`finpercep.policies.recipe.train_recipe`: ``out/train_config.json``,
    ``out/metrics.jsonl`` (``loss/fm``, ``residual/std``, ``lr``, ``time/step``) and the checkpoint
    ``out/model/``, which is returned. Not resumable (minutes long)."""
    torch.manual_seed(cfg.seed)
    return train_recipe(cfg, FlowSR(cfg.model), flow_matching_loss, photos, out, recipe="flow", progress=progress)
