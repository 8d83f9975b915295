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

**Checkpoint** (:meth:`~OneStepDiffusionSR.save_checkpoint`): a folder with ``config.json``
(``{"arch": "diffusers-onestep", "config": {...}, "name", "base_model": absolute path of the model
folder, "adapters": [file names], "format_version": 1}``) and the LoRA files in diffusers' format
(:mod:`finpercep.policies.diffusers_folder`): ``pytorch_lora_weights.safetensors`` (this run's
adapter, what ``pipe.load_lora_weights(folder)`` reads) after ``lora_0.safetensors``, ... (the
adapters the policy was loaded with, already fused). Loading fuses them in that order. The base
weights are not copied: the checkpoint needs its ``base_model`` folder.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from finpercep.checks import check_image_batch, require
from finpercep.config import check_at_least, from_dict, to_dict
from finpercep.policies import diffusers_folder as folder_io
from finpercep.policies.diffusers_folder import NoiseSchedule
from finpercep.policies.tiny import bicubic_upscale, clamp01_st

ARCH = "diffusers-onestep"
"""The ``arch`` of a fine-tuned one-step diffusion policy's ``config.json``."""
PREFIX = "diffusers:"
"""``--policy diffusers:PATH``: PATH is a model folder or a checkpoint of this module."""
POLICY_CARD = "finpercep_policy.json"
"""Optional file in a model folder with :class:`OneStepConfig` fields (e.g. ``{"scale": 2}``)."""
TRAIN_ADAPTER = "finpercep"
"""The peft adapter name of the adapter being trained."""
MIXED_PRECISION = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
"""``mixed_precision`` option -> autocast dtype (``no``: float32 throughout)."""

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                        "conv1", "conv2", "conv_shortcut", "time_emb_proj")
"""UNet modules that get LoRA adapters (attention, feed-forward and ResNet convolutions, as OSEDiff)."""


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


class OneStepDiffusionSR(nn.Module):
    """The one-step diffusion SR policy of the module docstring.

    ``forward(lr (B, 3, h, w) in [0, 1]) -> sr (B, 3, h*s, w*s) in [0, 1]``, differentiable w.r.t.
    the LoRA adapters. Build it with :func:`load_diffusers_policy`.

    ``mixed_precision``: ``no``, ``fp16`` or ``bf16``: the UNet and VAE run under
    ``torch.autocast`` of that dtype on the input's device (weights and output stay float32).
    ``gradient_checkpointing``: recompute UNet and VAE activations in the backward pass (less
    memory, about one more forward of time); only active in training mode.
    """

    arch = ARCH

    def __init__(self, unet: nn.Module, vae: nn.Module, prompt_embeds: torch.Tensor, schedule: NoiseSchedule,
                 cfg: OneStepConfig = OneStepConfig(), *, base_model: Path,
                 mixed_precision: str = "no", gradient_checkpointing: bool = False) -> None:
        super().__init__()
        alphas_cumprod, prediction_type = schedule.alphas_cumprod, schedule.prediction_type
        if cfg.timestep >= alphas_cumprod.numel():
            raise ValueError(f"OneStepConfig.timestep {cfg.timestep} is outside the scheduler's "
                             f"{alphas_cumprod.numel()} training timesteps")
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"scheduler prediction_type {prediction_type!r} is not supported "
                             "(epsilon, v_prediction or sample)")
        self.clip_sample = schedule.clip_sample
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {sorted(MIXED_PRECISION)}, got {mixed_precision!r}")
        self.cfg, self.scale, self.base_model = cfg, cfg.scale, Path(base_model)
        self.name = f"{self.base_model.name}-onestep-x{cfg.scale}"
        self.unet, self.vae = unet.requires_grad_(False), vae.requires_grad_(False)
        self.register_buffer("prompt_embeds", prompt_embeds.float(), persistent=False)  # (1, L, D)
        a = float(alphas_cumprod[cfg.timestep])
        self.sqrt_a, self.sqrt_1ma = math.sqrt(a), math.sqrt(1.0 - a)
        self.prediction_type = prediction_type
        self.mixed_precision = mixed_precision
        vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.multiple = vae_factor * 2 ** int(unet.num_upsamplers)  # H and W must be multiples of this
        self.fused_adapters: list[bytes] = []  # LoRA files fused into the weights at load, in order
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.vae.enable_gradient_checkpointing()

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
        dtype = MIXED_PRECISION[self.mixed_precision]
        with torch.autocast(u.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            z = (self.vae.encode(2.0 * u - 1.0).latent_dist.mode() - shift) * cfg.scaling_factor
            t = torch.full((u.shape[0],), self.cfg.timestep, dtype=torch.long, device=u.device)
            emb = self.prompt_embeds.expand(u.shape[0], -1, -1)
            pred = self.unet(z, t, encoder_hidden_states=emb).sample
            img = self.vae.decode(self.clean_latent(z, pred) / cfg.scaling_factor + shift).sample
        return clamp01_st((img.float()[..., :H, :W] + 1.0) / 2.0)

    # -- LoRA (the adapter-policy contract of finpercep.types.AdapterPolicy) --------------------

    def add_lora(self, rank: int, alpha: float | None = None, generator: torch.Generator | None = None) -> list[str]:
        """Put a trainable peft LoRA adapter of rank ``rank`` (scale ``alpha / rank``, ``alpha``
        defaults to ``rank``) on the UNet modules of ``cfg.lora_targets``; every other parameter
        stays frozen. ``lora_A`` is Kaiming-uniform from ``generator`` (a CPU generator; ``None``:
        torch's global RNG), ``lora_B`` zero, so the policy starts exactly as before. Returns the
        trainable parameter names. Raises ValueError for ``rank < 1`` or a second call."""
        LoraConfig = require("peft", extra=folder_io.EXTRA).LoraConfig

        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if TRAIN_ADAPTER in getattr(self.unet, "peft_config", {}):
            raise ValueError(f"{self.name} already has a trainable LoRA adapter")
        alpha = float(rank if alpha is None else alpha)
        self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(self.cfg.lora_targets),
                                         init_lora_weights=True), adapter_name=TRAIN_ADAPTER)
        names = []
        for name, p in self.named_parameters():
            if f".{TRAIN_ADAPTER}." not in name:
                continue
            names.append(name)
            if ".lora_A." in name:  # redraw from the generator: a pure function of the run's seed
                w = torch.empty(p.shape, dtype=torch.float32)
                nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
                with torch.no_grad():
                    p.copy_(w)
        return names

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[OneStepDiffusionSR]:
        """Within the block the policy computes its base (the reference): the trainable adapter
        off. Raises ValueError without one."""
        if TRAIN_ADAPTER not in getattr(self.unet, "peft_config", {}):
            raise ValueError(f"adapters_disabled: {self.name} has no LoRA adapter")
        self.unet.disable_adapters()
        try:
            yield self
        finally:
            self.unet.enable_adapters()

    def save_checkpoint(self, folder: str | Path) -> Path:
        """Write the checkpoint of the module docstring into ``folder`` (complete or not at all,
        :func:`finpercep.io.save_pretrained`'s folder writer). Returns ``folder``."""
        from finpercep.io import CONFIG_NAME, FORMAT_VERSION, _write_folder

        files = {f"lora_{i}.safetensors": data for i, data in enumerate(self.fused_adapters)}
        if TRAIN_ADAPTER in getattr(self.unet, "peft_config", {}):
            files[folder_io.LORA_WEIGHT_NAME] = folder_io.lora_file_bytes(self.unet, TRAIN_ADAPTER)
        meta = {"arch": ARCH, "config": to_dict(self.cfg), "name": self.name, "base_model": str(self.base_model),
                "adapters": list(files), "format_version": FORMAT_VERSION}
        files[CONFIG_NAME] = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()  # written last
        _write_folder(Path(folder), files)
        return Path(folder)


# ---------------------------------------------------------------------------------------------
# Loading


def is_checkpoint(path: str | Path) -> bool:
    """True when ``path`` is a folder written by :meth:`OneStepDiffusionSR.save_checkpoint`."""
    cfg = Path(path) / "config.json"
    try:
        return cfg.is_file() and json.loads(cfg.read_text(encoding="utf-8")).get("arch") == ARCH
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def load_diffusers_policy(path: str | Path, *, mixed_precision: str = "no", gradient_checkpointing: bool = False,
                          base_model: str | Path | None = None) -> OneStepDiffusionSR:
    """The one-step policy of a local model folder (module docstring of
    :mod:`finpercep.policies.diffusers_folder`; an optional ``finpercep_policy.json`` there sets
    :class:`OneStepConfig` fields), or of a checkpoint folder written by
    :meth:`~OneStepDiffusionSR.save_checkpoint` (its adapters fused into the UNet; ``base_model``
    replaces the model folder it records, e.g. after moving it). Float32, CPU, eval mode.

    Raises ImportError naming the ``diffusers`` extra when it is missing, FileNotFoundError in one
    line for a missing folder or part, ValueError for a config or file that does not fit."""
    path = Path(path)
    adapters: list[Path] = []
    name = None
    if is_checkpoint(path):
        meta = json.loads((path / "config.json").read_text(encoding="utf-8"))
        cfg = from_dict(OneStepConfig, meta.get("config", {}), where=f"{path / 'config.json'}: config")
        names = meta.get("adapters", [])
        if not isinstance(names, list) or any(not isinstance(n, str) or Path(n).name != n for n in names):
            raise ValueError(f"{path / 'config.json'}: adapters must be a list of file names in the folder")
        adapters = [path / n for n in names]
        name = str(meta.get("name", ""))
        base = Path(base_model or meta.get("base_model", ""))
        if not base.is_dir():
            raise FileNotFoundError(f"{path}: its base model folder {base} (recorded in config.json) is missing; "
                                    "pass base_model= the model folder it was fine-tuned from")
    else:
        base = Path(base_model or path)
        card = base / POLICY_CARD
        cfg = OneStepConfig()
        if card.is_file():
            try:
                cfg = from_dict(OneStepConfig, json.loads(card.read_text(encoding="utf-8")), where=f"{card}:")
            except json.JSONDecodeError as e:
                raise ValueError(f"{card}: not valid JSON ({e})") from None
    folder_io.check_model_folder(base)
    unet, vae = folder_io.load_unet(base), folder_io.load_vae(base)
    schedule = folder_io.load_schedule(base)
    emb = folder_io.load_prompt_embeds(base, int(unet.config.cross_attention_dim))
    policy = OneStepDiffusionSR(unet, vae, emb, schedule, cfg, base_model=base.resolve(),
                                mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing)
    for i, f in enumerate(adapters):  # one at a time: fused into the weights, then the LoRA layers removed
        folder_io.add_lora_from_file(unet, f, f"fused_{i}")
        unet.fuse_lora(adapter_names=[f"fused_{i}"])
        unet.unload_lora()
        policy.fused_adapters.append(f.read_bytes())
    unet.requires_grad_(False)
    policy.name = name or policy.name
    return policy.eval()
