"""Multi-step diffusion SR through ``diffusers``, Stable Diffusion x4 upscaler layout, run as an SDE:
a :class:`finpercep.types.StochasticPolicy` (per-step Gaussian transitions with exact
log-probabilities, what DPO and GRPO need) whose ReFL backpropagates through the last K steps.

**The model** (``StableDiffusionUpscalePipeline``'s computation, no classifier-free guidance): the
latent lives at the LR resolution and the VAE decodes it x``s`` (``s`` = the VAE's downsampling,
4 for the x4 upscaler). With ``lr (B, 3, h, w)`` in [0, 1]::

    c     = sqrt(ab_n) (2 lr - 1) + sqrt(1 - ab_n) n      the LR image, noise-augmented to level
                                                          n (low_res_scheduler's alpha_bar; class label n)
    pred  = UNet(cat[x_t, c], t, prompt_embeds, class_labels=n)          x_t (B, C, h, w) the latent
    sr    = clamp01((D(x_K / scaling_factor) + 1) / 2)                   (B, 3, h*s, w*s)

The augmentation noise ``n`` is a fixed pattern ``(1, 3, h, w)`` drawn from ``cfg.seed`` (a
function of the LR size only, shared by the batch), not a fresh draw as in the pipeline: the policy
must be a function of ``lr`` and its own chain for ``step_log_prob`` to recompute what ``sample``
did. Inputs the UNet cannot divide are padded (replicate) and cropped back.

**The sampler** is DDIM (Song et al. 2021, arXiv 2010.02502, eq. 12) with ``eta > 0`` on the
"trailing" grid ``t_k = round(T - k T / K) - 1`` (``k = 0 .. K-1``; it starts at ``T - 1``, Lin et
al. 2024, arXiv 2305.08891), ``x_0 ~ N(0, I)``. Transition ``k`` from ``t = t_k`` to ``t' = t_{k+1}``
(after the last step, ``alpha_bar_0``: diffusers' ``set_alpha_to_one=False``, so the last step keeps
a small positive variance) is the Gaussian::

    x_{k+1} ~ N(mu_k, s_k^2 I),  mu_k = sqrt(a') x0_hat + sqrt(1 - a' - s_k^2) eps_hat,
    s_k = eta * sqrt((1 - a') / (1 - a) * (1 - a / a'))                    a = alpha_bar_t, a' = alpha_bar_t'

with ``x0_hat`` / ``eps_hat`` from the UNet's epsilon, v or sample prediction (``x0_hat`` clipped
when the scheduler config says ``clip_sample``), exactly ``DDIMScheduler.step(..., eta)`` (tested);
``eta = 1`` is the DDPM posterior (eq. 16 there). Its per-step log-probability is the Gaussian
log-density, as DDPO computes it (Black et al. 2024, arXiv 2305.13301, sec. 4.3): here its per-element
mean over ``(C, h, w)``, the convention of :func:`finpercep.policies.flow.gaussian_log_prob`.

**Deterministic path** ``forward(lr)``: the DDIM ODE (``eta = 0``) from a fixed initial noise drawn
from ``cfg.seed + 1`` (``(1, C, h, w)``, a function of the LR size only).

**ReFL** through DRaFT-K (Clark et al. 2024, arXiv 2309.17400, sec. 4): :meth:`sample_with_grad`
runs the chain of ``sample`` with the first ``K - grad_steps`` transitions under ``torch.no_grad``
and the last ``grad_steps`` with gradient (their noise fixed, reparameterised), then decodes.

LoRA (reference = adapters off), autocast, gradient checkpointing and the checkpoint format
(``arch: diffusers-multistep``) are shared with the one-step policy:
:mod:`finpercep.policies.diffusion_base`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from finpercep.checks import check_image_batch
from finpercep.config import check_at_least, check_between
from finpercep.policies import diffusers_folder as folder_io
from finpercep.policies.diffusers_folder import NoiseSchedule
from finpercep.policies.diffusion_base import (
    DEFAULT_LORA_TARGETS,
    DiffusersPolicy,
    config_of,
    fuse_adapters,
    load_parts,
    read_source,
)
from finpercep.policies.flow import gaussian_log_prob
from finpercep.policies.tiny import clamp01_st
from finpercep.types import Trajectory

ARCH = "diffusers-multistep"
"""The ``arch`` of a fine-tuned multi-step diffusion policy's ``config.json``."""
LOW_RES_SCHEDULER = "low_res_scheduler"
"""The x4 upscaler's sub-folder with the noise schedule of the LR augmentation."""


@dataclass(frozen=True)
class MultiStepConfig:
    """How an x4-upscaler-layout UNet + VAE is run as a multi-step SR policy (saved with every checkpoint)."""

    num_steps: int = 20
    """K, the sampler's transitions (the pipeline's ``num_inference_steps``); at most the
    scheduler's ``num_train_timesteps``."""
    grad_steps: int = 1
    """DRaFT-K's K: ReFL backpropagates through the last ``grad_steps`` transitions; in ``[1, num_steps]``."""
    eta: float = 1.0
    """DDIM's eta in (0, 1]: the transitions' noise (1 = the DDPM posterior, DDPO's choice); > 0 so
    every step has a log-probability."""
    noise_level: int = 20
    """The LR image's noise augmentation level n (class label; the pipeline's default 20); 0 = none
    (then ``low_res_scheduler/`` is not needed)."""
    seed: int = 0
    """Seed of the fixed augmentation-noise pattern (``seed``) and of the deterministic path's initial noise (``seed + 1``)."""
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    """Module-name suffixes of the UNet that LoRA adapts (peft ``target_modules``)."""

    def __post_init__(self) -> None:
        check_between("MultiStepConfig", 1, 1000, num_steps=self.num_steps)
        check_between("MultiStepConfig", 1, self.num_steps, grad_steps=self.grad_steps)
        if not 0 < self.eta <= 1:
            raise ValueError(f"MultiStepConfig.eta must be in (0, 1] (eta = 0 has no log-probability), got {self.eta}")
        check_at_least("MultiStepConfig", 0, noise_level=self.noise_level, seed=self.seed)
        if not self.lora_targets:
            raise ValueError("MultiStepConfig.lora_targets must name at least one module")


def trailing_timesteps(num_train: int, num_steps: int) -> list[int]:
    """``t_k = round(T - k T / K) - 1`` for ``k = 0 .. K-1`` (diffusers' ``timestep_spacing="trailing"``)."""
    return [int(round(num_train - k * num_train / num_steps)) - 1 for k in range(num_steps)]


def fixed_noise(shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """``N(0, I)`` of ``shape`` from a CPU generator seeded with ``seed``: the same tensor every call."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)


class MultiStepDiffusionSR(DiffusersPolicy):
    """The multi-step diffusion SR policy of the module docstring (a StochasticPolicy).

    States are latents ``(B, C, h', w')`` (``h'``, ``w'``: the LR size padded to what the UNet
    divides); images ``(B, 3, h*s, w*s)`` in [0, 1], decoded with a straight-through clamp.

    - ``forward(lr) -> sr``: the DDIM ODE path from a fixed noise;
    - ``sample(lr, generator) -> Trajectory``: ``states (B, K+1, C, h', w')``, ``log_probs (B, K)``, ``sr``; no grad;
    - ``step_log_prob(lr, x_k, k, x_next, pixel_weight=None) -> (B,)``: differentiable; a
      ``pixel_weight (B, 1, H, W)`` is average-pooled to the latent grid;
    - ``predict_sr(lr, x_k, k) -> sr``: the decoded ``x0_hat`` of step ``k`` (``k = K``: ``x_K`` itself);
    - ``denoising_error(lr, sr, t, noise) -> (B,)``: the UNet's training loss on the VAE latent of
      ``sr`` at timestep ``round(t (T - 1))`` with ``noise (B, C, h', w')``;
    - ``sample_with_grad(lr, generator) -> sr``: DRaFT-K (``grad_steps`` transitions with gradient).

    Raises ValueError (at construction) for a UNet whose ``in_channels`` is not the latent's + 3,
    an unsupported prediction type, more steps than training timesteps, or a noise level outside
    the low-res schedule."""

    arch = ARCH

    def __init__(self, unet: nn.Module, vae: nn.Module, prompt_embeds: torch.Tensor, schedule: NoiseSchedule,
                 low_res: NoiseSchedule | None, cfg: MultiStepConfig = MultiStepConfig(), *, base_model: Path,
                 mixed_precision: str = "no", gradient_checkpointing: bool = False) -> None:
        super().__init__(unet, vae, prompt_embeds, base_model=base_model, mixed_precision=mixed_precision,
                         gradient_checkpointing=gradient_checkpointing)
        c_lat, c_in = int(vae.config.latent_channels), int(unet.config.in_channels)
        if c_in != c_lat + 3:
            raise ValueError(f"{base_model}: the UNet takes {c_in} channels, the x4-upscaler layout needs the "
                             f"latent's {c_lat} + 3 image channels")
        if schedule.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"scheduler prediction_type {schedule.prediction_type!r} is not supported "
                             "(epsilon, v_prediction or sample)")
        ab = schedule.alphas_cumprod
        if cfg.num_steps > ab.numel():
            raise ValueError(f"MultiStepConfig.num_steps {cfg.num_steps} exceeds the scheduler's {ab.numel()} timesteps")
        if cfg.noise_level and (low_res is None or cfg.noise_level >= low_res.alphas_cumprod.numel()):
            raise ValueError(f"MultiStepConfig.noise_level {cfg.noise_level} needs a low_res_scheduler with more timesteps")
        self.cfg, self.scale, self.num_steps, self.grad_steps = cfg, self.vae_factor, cfg.num_steps, cfg.grad_steps
        self.name = f"{self.base_model.name}-multistep-x{self.scale}"
        self.latent_channels, self.num_train = c_lat, ab.numel()
        self.prediction_type, self.clip_sample = schedule.prediction_type, schedule.clip_sample
        self.multiple = 2 ** int(unet.num_upsamplers)  # the latent (= LR) size must be a multiple of this
        self.register_buffer("alphas_cumprod", ab.float(), persistent=False)
        self.timesteps = trailing_timesteps(ab.numel(), cfg.num_steps)
        prev = [float(ab[t]) for t in self.timesteps[1:]] + [float(ab[0])]  # alpha_bar after each step
        self.alpha = [float(ab[t]) for t in self.timesteps]
        self.alpha_next = prev
        self.stds = [self.step_std(a, a2, cfg.eta) for a, a2 in zip(self.alpha, prev)]
        if min(self.stds) <= 0:
            raise ValueError(f"MultiStepConfig.num_steps {cfg.num_steps}: a transition of this grid has no noise "
                             "(so no log-probability); use fewer steps")
        ab_n = 1.0 if not cfg.noise_level else float(low_res.alphas_cumprod[cfg.noise_level])  # type: ignore[union-attr]
        self.cond_scale, self.cond_noise = math.sqrt(ab_n), math.sqrt(1.0 - ab_n)

    @staticmethod
    def step_std(a: float, a_next: float, eta: float) -> float:
        """``s_k = eta sqrt((1 - a') / (1 - a) (1 - a / a'))`` (DDIM eq. 16)."""
        return eta * math.sqrt((1.0 - a_next) / (1.0 - a) * (1.0 - a / a_next))

    # -- the model ----------------------------------------------------------------------------

    def condition(self, lr: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``(c (B, 3, h', w'), (h, w))``: the padded, noise-augmented LR image in [-1, 1]-ish scale
        and the LR size before padding. Raises ValueError for a bad ``lr`` batch."""
        lr = check_image_batch(lr, f"{self.name}: lr", dtype=self.prompt_embeds.dtype)
        h, w = lr.shape[-2:]
        m = self.multiple
        x = 2.0 * F.pad(lr, (0, -w % m, 0, -h % m), mode="replicate") - 1.0
        if self.cond_noise:
            x = self.cond_scale * x + self.cond_noise * fixed_noise((1, *x.shape[1:]), self.cfg.seed, x.device)
        return x, (h, w)

    def unet_output(self, x: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction ``(B, C, h', w')`` (float32) on latent ``x`` at timestep(s) ``t``."""
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device).long().expand(b)
        labels = torch.full((b,), self.cfg.noise_level, dtype=torch.long, device=x.device)
        with self.autocast(x.device):
            out = self.unet(torch.cat([x, cond], dim=1), t, encoder_hidden_states=self.prompt_embeds.expand(b, -1, -1),
                            class_labels=labels).sample
        return out.float()

    def split(self, x: torch.Tensor, pred: torch.Tensor, a: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0_hat, eps_hat)`` from the latent ``x`` at ``alpha_bar = a`` and the UNet's prediction
        (``x0_hat`` clipped as the scheduler config says; ``eps_hat`` from the unclipped one, as
        ``DDIMScheduler.step``)."""
        sa, s1a = (a**0.5, (1 - a) ** 0.5)
        if self.prediction_type == "epsilon":
            x0, eps = (x - s1a * pred) / sa, pred
        elif self.prediction_type == "v_prediction":
            x0, eps = sa * x - s1a * pred, sa * pred + s1a * x
        else:
            x0, eps = pred, (x - sa * pred) / s1a
        return (x0 if self.clip_sample is None else x0.clamp(-self.clip_sample, self.clip_sample)), eps

    def transition(self, cond: torch.Tensor, x_k: torch.Tensor, k: int, eta: float | None = None
                   ) -> tuple[torch.Tensor, float]:
        """Mean ``mu_k`` (like ``x_k``) and std ``s_k`` of ``p(x_{k+1} | x_k)`` (module docstring);
        ``eta`` other than the config's (0: the ODE) for the deterministic path."""
        a, a_next = self.alpha[k], self.alpha_next[k]
        std = self.stds[k] if eta is None else self.step_std(a, a_next, eta)
        x0, eps = self.split(x_k, self.unet_output(x_k, self.timesteps[k], cond), a)
        return math.sqrt(a_next) * x0 + math.sqrt(max(1.0 - a_next - std * std, 0.0)) * eps, std

    def decode(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Latent ``(B, C, h', w')`` -> image ``(B, 3, h*s, w*s)`` in [0, 1], cropped to the LR ``size`` x s."""
        with self.autocast(x.device):
            img = self.vae.decode(x / self.vae.config.scaling_factor).sample
        s = self.scale
        return clamp01_st((img.float()[..., : size[0] * s, : size[1] * s] + 1.0) / 2.0)

    # -- the Policy / StochasticPolicy contract -----------------------------------------------

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        cond, size = self.condition(lr)
        x = fixed_noise((1, self.latent_channels, *cond.shape[-2:]), self.cfg.seed + 1, cond.device)
        x = x.expand(cond.shape[0], -1, -1, -1)
        for k in range(self.num_steps):
            x, _ = self.transition(cond, x, k, eta=0.0)
        return self.decode(x, size)

    @torch.no_grad()
    def sample(self, lr: torch.Tensor, generator: torch.Generator | None = None) -> Trajectory:
        cond, size = self.condition(lr)
        x = self._noise(cond, generator)
        states, log_probs = [x], []
        for k in range(self.num_steps):
            mean, std = self.transition(cond, x, k)
            x = mean + std * self._noise(cond, generator)
            log_probs.append(gaussian_log_prob(x, mean, std))
            states.append(x)
        return Trajectory(states=torch.stack(states, dim=1), log_probs=torch.stack(log_probs, dim=1),
                          sr=self.decode(x, size))

    def sample_with_grad(self, lr: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """DRaFT-K: ``sr (B, 3, h*s, w*s)`` of the chain ``sample`` draws from ``generator`` (the
        same draws in the same order), differentiable w.r.t. the parameters through the last
        ``grad_steps`` transitions and the decoder only; the earlier ones run without gradient."""
        cond, size = self.condition(lr)
        x = self._noise(cond, generator)
        first = self.num_steps - self.grad_steps
        for k in range(self.num_steps):
            with torch.set_grad_enabled(k >= first and torch.is_grad_enabled()):
                mean, std = self.transition(cond, x, k)
                x = mean + std * self._noise(cond, generator)
        return self.decode(x, size)

    def step_log_prob(self, lr: torch.Tensor, x_k: torch.Tensor, k: int, x_next: torch.Tensor,
                      pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
        cond, size = self.condition(lr)
        self._check_step(k, self.num_steps - 1, "step_log_prob")
        self._check_state(x_k, cond, "step_log_prob: x_k")
        self._check_state(x_next, cond, "step_log_prob: x_next")
        weight = None
        if pixel_weight is not None:
            s = self.scale
            want = (lr.shape[0], 1, size[0] * s, size[1] * s)
            if not torch.is_tensor(pixel_weight) or tuple(pixel_weight.shape) != want:
                raise ValueError(f"{self.name}.step_log_prob: pixel_weight must be {want}, got "
                                 f"{getattr(pixel_weight, 'shape', type(pixel_weight).__name__)}")
            if not torch.isfinite(pixel_weight).all() or bool((pixel_weight < 0).any()):
                raise ValueError(f"{self.name}.step_log_prob: pixel_weight must be finite and >= 0")
            h2, w2 = cond.shape[-2:]
            padded = F.pad(pixel_weight.float(), (0, w2 * s - size[1] * s, 0, h2 * s - size[0] * s), mode="replicate")
            weight = F.avg_pool2d(padded, s)  # (B, 1, h', w'): the latent pixel's share of the image weight
        mean, std = self.transition(cond, x_k, k)
        return gaussian_log_prob(x_next, mean, std, weight)

    def predict_sr(self, lr: torch.Tensor, x_k: torch.Tensor, k: int) -> torch.Tensor:
        cond, size = self.condition(lr)
        self._check_step(k, self.num_steps, "predict_sr")
        self._check_state(x_k, cond, "predict_sr: x_k")
        if k == self.num_steps:
            return self.decode(x_k, size)
        x0, _ = self.split(x_k, self.unet_output(x_k, self.timesteps[k], cond), self.alpha[k])
        return self.decode(x0, size)

    def denoising_error(self, lr: torch.Tensor, sr: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        cond, (h, w) = self.condition(lr)
        s = self.scale
        check_image_batch(sr, f"{self.name}.denoising_error: sr")
        if sr.shape != (lr.shape[0], 3, h * s, w * s):
            raise ValueError(f"{self.name}.denoising_error: sr must be {(lr.shape[0], 3, h * s, w * s)} "
                             f"(lr upscaled x{s}), got {tuple(sr.shape)}")
        self._check_state(noise, cond, "denoising_error: noise")
        if not torch.is_tensor(t) or t.shape != (lr.shape[0],):
            raise ValueError(f"{self.name}.denoising_error: t must be a tensor of shape ({lr.shape[0]},), got "
                             f"{getattr(t, 'shape', t)}")
        h2, w2 = cond.shape[-2:]
        img = 2.0 * F.pad(sr.float(), (0, w2 * s - w * s, 0, h2 * s - h * s), mode="replicate") - 1.0
        with self.autocast(sr.device):
            z0 = self.vae.encode(img).latent_dist.mode().float() * self.vae.config.scaling_factor
        idx = (t.float().clamp(0, 1) * (self.num_train - 1)).round().long()
        a = self.alphas_cumprod[idx].view(-1, 1, 1, 1)
        x_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        pred = self.unet_output(x_t, idx, cond)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = a.sqrt() * noise - (1 - a).sqrt() * z0
        else:
            target = z0
        return ((pred - target) ** 2).mean(dim=(1, 2, 3))

    # -- helpers --------------------------------------------------------------------------------

    def _noise(self, cond: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        shape = (cond.shape[0], self.latent_channels, *cond.shape[-2:])
        return torch.randn(shape, generator=generator, device=cond.device, dtype=cond.dtype)

    def _check_state(self, x: object, cond: torch.Tensor, who: str) -> None:
        want = (cond.shape[0], self.latent_channels, *cond.shape[-2:])
        if not torch.is_tensor(x) or tuple(x.shape) != want:
            raise ValueError(f"{self.name}.{who}: expected a latent of shape {want}, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{self.name}.{who}: contains NaN or infinite values")

    def _check_step(self, k: object, last: int, who: str) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= last:
            raise ValueError(f"{self.name}.{who}: k must be an int in [0, {last}], got {k!r}")


def load_multistep_policy(path: str | Path, *, mixed_precision: str = "no", gradient_checkpointing: bool = False,
                          base_model: str | Path | None = None, num_steps: int | None = None,
                          grad_steps: int | None = None, eta: float | None = None) -> MultiStepDiffusionSR:
    """The multi-step policy of a local x4-upscaler-layout model folder (``unet/``, ``vae/``,
    ``scheduler/``, ``low_res_scheduler/`` when ``noise_level > 0``, text conditioning; an optional
    ``finpercep_policy.json`` sets :class:`MultiStepConfig` fields), or of a checkpoint written by
    its ``save_checkpoint`` (adapters fused; ``base_model`` replaces the folder it records).
    ``num_steps``, ``grad_steps``, ``eta`` override the config when given. Float32, CPU, eval.

    Raises ImportError naming the ``diffusers`` extra when it is missing, FileNotFoundError in one
    line for a missing folder or part, ValueError for a config or model that does not fit."""
    source = read_source(Path(path), ARCH, base_model)
    overrides: dict[str, Any] = dict(num_steps=num_steps, grad_steps=grad_steps, eta=eta)
    cfg = config_of(MultiStepConfig, source, overrides)
    unet, vae, emb = load_parts(source.base)
    low = None
    if cfg.noise_level:
        if not (source.base / LOW_RES_SCHEDULER / "scheduler_config.json").is_file():
            raise FileNotFoundError(f"diffusers model folder {source.base}: {LOW_RES_SCHEDULER}/scheduler_config.json "
                                    f"is missing (the LR image's noise augmentation; or set noise_level 0)")
        low = folder_io.load_schedule(source.base, LOW_RES_SCHEDULER)
    policy = MultiStepDiffusionSR(unet, vae, emb, folder_io.load_schedule(source.base), low, cfg,
                                  base_model=source.base.resolve(), mixed_precision=mixed_precision,
                                  gradient_checkpointing=gradient_checkpointing)
    return fuse_adapters(policy, source)
