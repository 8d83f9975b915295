"""One-step diffusion SR through ``diffusers``, OSEDiff style: the kind of model arXiv 2512.22647
fine-tunes (Stable-Diffusion backbones for real-world SR), as a policy of this library.

OSEDiff (Wu et al. 2024, "One-Step Effective Diffusion Network for Real-World Image
Super-Resolution", arXiv 2406.08177, sec. 3.2) runs a Stable Diffusion UNet once, at the fixed
timestep ``T_L`` (999), on the VAE latent of the upsampled LR image, and decodes its clean-latent
estimate::

    u   = bicubic_s(lr)                         (B, 3, H, W) in [0, 1]
    z_L = E(2 u - 1) * c                        the VAE posterior mean, c = vae.config.scaling_factor
    e   = UNet(z_L, T_L, prompt_embeds)         the UNet's prediction at T_L
    z_H = (z_L - sqrt(1 - a) e) / sqrt(a)       a = alpha_bar(T_L); the epsilon case; v_prediction:
                                                z_H = sqrt(a) z_L - sqrt(1 - a) e; sample: z_H = e
    sr  = clamp01((D(z_H / c) + 1) / 2)         (B, 3, H, W) in [0, 1], straight-through clamp

(what ``DDPMScheduler.step`` returns at ``T_L`` with one inference step: its ``prev_sample`` there is
the clean-latent estimate, clipped only when the scheduler config says ``clip_sample``; Stable
Diffusion's do not). Differences from OSEDiff's code: the VAE posterior **mean** instead
of a sample (a policy's forward is deterministic) and no LoRA on the VAE encoder (the UNet's
only). Inputs whose size the VAE and UNet cannot divide are padded (replicate) and cropped back.

**Training.** The weights stay frozen; :meth:`OneStepDiffusionSR.add_lora` puts ``peft`` LoRA
adapters (Hu et al. 2022) on the UNet's ``lora_targets``, the only trainable parameters. The
reference policy of a KL / DPO term is the same network with the adapters disabled
(:meth:`~OneStepDiffusionSR.adapters_disabled`): no second copy. ReFL backpropagates the reward
straight through the forward; DPO and GRPO sample it as the Gaussian policy ``N(sr, sigma^2)``
(:class:`finpercep.policies.gaussian.GaussianPolicy`), like every one-step network.

**Checkpoint** (:meth:`~OneStepDiffusionSR.save_checkpoint`): ``config.json`` with ``arch:
diffusers-onestep`` and the LoRA files in diffusers' format, as
:mod:`finpercep.policies.diffusion_base` describes (shared with the multi-step policy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from finpercep.checks import check_image_batch
from finpercep.config import check_at_least
from finpercep.policies import diffusers_folder as folder_io
from finpercep.policies.diffusers_folder import NoiseSchedule
from finpercep.policies.diffusion_base import (  # noqa: F401  (PREFIX, TRAIN_ADAPTER re-exported for older imports)
    DEFAULT_LORA_TARGETS,
    PREFIX,
    TRAIN_ADAPTER,
    DiffusersPolicy,
    config_of,
    fuse_adapters,
    load_parts,
    read_source,
)
from finpercep.policies.tiny import bicubic_upscale, clamp01_st

ARCH = "diffusers-onestep"
"""The ``arch`` of a fine-tuned one-step diffusion policy's ``config.json``."""


@dataclass(frozen=True)
class OneStepConfig:
    """How a UNet + VAE pair is run as a one-step SR policy (saved with every checkpoint)."""

    scale: int = 4
    """Upscaling factor s: the LR image is bicubic-upsampled by s before the VAE (OSEDiff: 4)."""
    timestep: int = 999
    """``T_L``, the one fixed timestep the UNet runs at (OSEDiff: 999); in ``[0, num_train_timesteps)``."""
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    """Module-name suffixes of the UNet that :meth:`OneStepDiffusionSR.add_lora` adapts (peft ``target_modules``)."""

    def __post_init__(self) -> None:
        check_at_least("OneStepConfig", 1, scale=self.scale)
        check_at_least("OneStepConfig", 0, timestep=self.timestep)
        if not self.lora_targets:
            raise ValueError("OneStepConfig.lora_targets must name at least one module")


class OneStepDiffusionSR(DiffusersPolicy):
    """The one-step diffusion SR policy of the module docstring.

    ``forward(lr (B, 3, h, w) in [0, 1]) -> sr (B, 3, h*s, w*s) in [0, 1]``, differentiable w.r.t.
    the LoRA adapters. Build it with :func:`load_diffusers_policy`. LoRA, the reference, autocast
    (``mixed_precision``), gradient checkpointing and checkpoints:
    :class:`~finpercep.policies.diffusion_base.DiffusersPolicy`.
    """

    arch = ARCH

    def __init__(self, unet: nn.Module, vae: nn.Module, prompt_embeds: torch.Tensor, schedule: NoiseSchedule,
                 cfg: OneStepConfig = OneStepConfig(), *, base_model: Path,
                 mixed_precision: str = "no", gradient_checkpointing: bool = False) -> None:
        super().__init__(unet, vae, prompt_embeds, base_model=base_model, mixed_precision=mixed_precision,
                         gradient_checkpointing=gradient_checkpointing)
        c_lat, c_in = int(vae.config.latent_channels), int(unet.config.in_channels)
        if c_in != c_lat:
            raise ValueError(f"{base_model}: the UNet takes {c_in} channels, a one-step policy needs the latent's "
                             f"{c_lat} (an x4-upscaler layout is the multi-step policy: --policy diffusers:PATH)")
        alphas_cumprod, prediction_type = schedule.alphas_cumprod, schedule.prediction_type
        if cfg.timestep >= alphas_cumprod.numel():
            raise ValueError(f"OneStepConfig.timestep {cfg.timestep} is outside the scheduler's "
                             f"{alphas_cumprod.numel()} training timesteps")
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"scheduler prediction_type {prediction_type!r} is not supported "
                             "(epsilon, v_prediction or sample)")
        self.clip_sample = schedule.clip_sample
        self.cfg, self.scale = cfg, cfg.scale
        self.name = f"{self.base_model.name}-onestep-x{cfg.scale}"
        a = float(alphas_cumprod[cfg.timestep])
        self.sqrt_a, self.sqrt_1ma = math.sqrt(a), math.sqrt(1.0 - a)
        self.prediction_type = prediction_type
        self.multiple = self.vae_factor * 2 ** int(unet.num_upsamplers)  # H and W must be multiples of this

    # -- the model ----------------------------------------------------------------------------

    def clean_latent(self, z: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """The clean-latent estimate ``z_H`` from ``z_L`` and the UNet's prediction (same shape),
        clamped to ``[-r, r]`` when the scheduler config clips samples (as ``DDPMScheduler.step``)."""
        if self.prediction_type == "epsilon":
            z0 = (z - self.sqrt_1ma * pred) / self.sqrt_a
        elif self.prediction_type == "v_prediction":
            z0 = self.sqrt_a * z - self.sqrt_1ma * pred
        else:
            z0 = pred
        return z0 if self.clip_sample is None else z0.clamp(-self.clip_sample, self.clip_sample)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        lr = check_image_batch(lr, f"{self.name}: lr", dtype=self.prompt_embeds.dtype)
        u = bicubic_upscale(lr, self.scale)
        H, W = u.shape[-2:]
        m = self.multiple
        u = F.pad(u, (0, -W % m, 0, -H % m), mode="replicate")
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        with self.autocast(u.device):
            z = (self.vae.encode(2.0 * u - 1.0).latent_dist.mode() - shift) * cfg.scaling_factor
            t = torch.full((u.shape[0],), self.cfg.timestep, dtype=torch.long, device=u.device)
            emb = self.prompt_embeds.expand(u.shape[0], -1, -1)
            pred = self.unet(z, t, encoder_hidden_states=emb).sample
            img = self.vae.decode(self.clean_latent(z, pred) / cfg.scaling_factor + shift).sample
        return clamp01_st((img.float()[..., :H, :W] + 1.0) / 2.0)


# ---------------------------------------------------------------------------------------------
# Loading


def load_diffusers_policy(path: str | Path, *, mixed_precision: str = "no", gradient_checkpointing: bool = False,
                          base_model: str | Path | None = None) -> OneStepDiffusionSR:
    """The one-step policy of a local model folder (module docstring of
    :mod:`finpercep.policies.diffusers_folder`; an optional ``finpercep_policy.json`` there sets
    :class:`OneStepConfig` fields), or of a checkpoint folder written by
    :meth:`~OneStepDiffusionSR.save_checkpoint` (its adapters fused into the UNet; ``base_model``
    replaces the model folder it records, e.g. after moving it). Float32, CPU, eval mode.

    Raises ImportError naming the ``diffusers`` extra when it is missing, FileNotFoundError in one
    line for a missing folder or part, ValueError for a config or file that does not fit."""
    source = read_source(Path(path), ARCH, base_model)
    cfg = config_of(OneStepConfig, source, {})
    unet, vae, emb = load_parts(source.base)
    policy = OneStepDiffusionSR(unet, vae, emb, folder_io.load_schedule(source.base), cfg,
                                base_model=source.base.resolve(), mixed_precision=mixed_precision,
                                gradient_checkpointing=gradient_checkpointing)
    return fuse_adapters(policy, source)
