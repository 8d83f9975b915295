"""What the two ``diffusers`` SR policies share: the one-step OSEDiff-style policy
(:mod:`finpercep.policies.diffusion_onestep`) and the multi-step x4-upscaler policy
(:mod:`finpercep.policies.diffusion_multistep`).

- :class:`DiffusersPolicy`: a UNet + VAE + prompt embedding held frozen, ``peft`` LoRA adapters
  (Hu et al. 2022, arXiv 2106.09685) on the UNet as the only trainable parameters, the reference
  policy as the same UNet with the adapters off, autocast and gradient checkpointing, and the
  checkpoint writer (the :class:`finpercep.types.AdapterPolicy` contract);
- :func:`load_diffusers`: ``--policy diffusers:PATH``: a model folder or a checkpoint of either
  policy, dispatched by :func:`policy_kind` (the folder rule) or the checkpoint's ``arch``.

**Checkpoint** (:meth:`DiffusersPolicy.save_checkpoint`): a folder with ``config.json``
(``{"arch": ..., "config": {...}, "name", "base_model": absolute path of the model folder,
"adapters": [file names], "format_version": 1}``) and the LoRA files in diffusers' format
(:mod:`finpercep.policies.diffusers_folder`): ``pytorch_lora_weights.safetensors`` (this run's
adapter, what ``pipe.load_lora_weights(folder)`` reads) after ``lora_0.safetensors``, ... (the
adapters the policy was loaded with, already fused). Loading fuses them in that order. The base
weights are not copied: the checkpoint needs its ``base_model`` folder.

**The folder rule** (:func:`policy_kind`): ``finpercep_policy.json``'s ``"policy"`` field
(``"onestep"`` or ``"multistep"``) when it has one; else the UNet's ``in_channels``: equal to the
VAE's ``latent_channels`` -> one-step (OSEDiff: the UNet sees the latent alone), ``latent_channels
+ 3`` -> multi-step (the Stable Diffusion x4 upscaler layout: the LR image concatenated to the
latent). Anything else is a ValueError naming both numbers.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from finpercep.checks import require
from finpercep.config import from_dict, to_dict
from finpercep.io import read_json_object
from finpercep.policies import diffusers_folder as folder_io

PREFIX = "diffusers:"
"""``--policy diffusers:PATH``: PATH is a model folder or a checkpoint of a diffusers policy."""
POLICY_CARD = "finpercep_policy.json"
"""Optional file in a model folder: ``"policy"`` (the folder rule) and the policy's config fields."""
TRAIN_ADAPTER = "finpercep"
"""The peft adapter name of the adapter being trained."""
MIXED_PRECISION = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
"""``mixed_precision`` option -> autocast dtype (``no``: float32 throughout)."""
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                        "conv1", "conv2", "conv_shortcut", "time_emb_proj")
"""UNet modules that get LoRA adapters (attention, feed-forward and ResNet convolutions, as OSEDiff)."""
KINDS = ("onestep", "multistep")
"""The values of the policy card's ``"policy"`` field."""
OPTION_FLAGS = {"mixed_precision": "--mixed-precision", "gradient_checkpointing": "--gradient-checkpointing",
                "num_steps": "--sampling-steps", "grad_steps": "--draft-k", "eta": "--eta"}
"""Load option (keyword of :func:`load_diffusers`) -> the command-line flag that sets it. Errors
about an option name both, ``--draft-k (grad_steps)``: the CLI user knows the flag, a Python caller
the keyword."""


def option_name(key: str) -> str:
    """``--draft-k (grad_steps)`` for a load option of :data:`OPTION_FLAGS`; other keys as they are."""
    return f"{OPTION_FLAGS[key]} ({key})" if key in OPTION_FLAGS else key


class DiffusersPolicy(nn.Module):
    """Base of the diffusers SR policies (module docstring). Subclasses set ``arch`` and ``cfg``
    (a frozen dataclass with a ``lora_targets`` field) and implement ``forward``.

    ``mixed_precision``: ``no``, ``fp16`` or ``bf16``: the UNet and VAE run under
    ``torch.autocast`` of that dtype on the input's device (:meth:`autocast`; weights and outputs
    stay float32). ``gradient_checkpointing``: recompute UNet and VAE activations in the backward
    pass (less memory, about one more forward of time); only active in training mode. Raises
    ValueError for an unknown ``mixed_precision``."""

    arch = ""
    cfg: Any

    def __init__(self, unet: nn.Module, vae: nn.Module, prompt_embeds: torch.Tensor, *, base_model: Path,
                 mixed_precision: str = "no", gradient_checkpointing: bool = False) -> None:
        super().__init__()
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"{option_name('mixed_precision')} must be one of {sorted(MIXED_PRECISION)}, "
                             f"got {mixed_precision!r}")
        self.base_model = Path(base_model)
        self.unet, self.vae = unet.requires_grad_(False), vae.requires_grad_(False)
        self.register_buffer("prompt_embeds", prompt_embeds.float(), persistent=False)  # (1, L, D)
        self.mixed_precision = mixed_precision
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)  # image pixels per latent pixel
        self.fused_adapters: list[bytes] = []  # LoRA files fused into the weights at load, in order
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            self.vae.enable_gradient_checkpointing()

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """``torch.autocast`` of the policy's ``mixed_precision`` on ``device`` (a no-op for ``no``)."""
        dtype = MIXED_PRECISION[self.mixed_precision]
        return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

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
    def adapters_disabled(self) -> Iterator[DiffusersPolicy]:
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
        meta = {"arch": self.arch, "config": to_dict(self.cfg), "name": self.name, "base_model": str(self.base_model),
                "adapters": list(files), "format_version": FORMAT_VERSION}
        files[CONFIG_NAME] = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()  # written last
        _write_folder(Path(folder), files)
        return Path(folder)


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class Source:
    """Where a diffusers policy comes from: the model folder, the policy's config fields, the LoRA
    files to fuse (in order), the name a checkpoint recorded (``None`` for a model folder) and the
    file ``config`` was read from (the policy card or the checkpoint's ``config.json``; ``None``
    when there is none)."""

    base: Path
    config: dict[str, Any]
    adapters: tuple[Path, ...] = ()
    name: str | None = None
    origin: Path | None = None


def checkpoint_arch(path: str | Path) -> str | None:
    """The ``arch`` of the policy checkpoint folder ``path`` (``config.json``), or None when it is
    not one (no such file, not JSON)."""
    cfg = Path(path) / "config.json"
    try:
        arch = json.loads(cfg.read_text(encoding="utf-8")).get("arch") if cfg.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return arch if isinstance(arch, str) else None


def read_source(path: Path, arch: str, base_model: str | Path | None = None) -> Source:
    """The :class:`Source` of a checkpoint of ``arch`` at ``path``, or (not a checkpoint) of the
    model folder ``base_model or path`` with its policy card's fields (``"policy"`` removed).
    Raises FileNotFoundError for a checkpoint whose base folder is gone, ValueError for a card or
    ``config.json`` that is not valid."""
    if checkpoint_arch(path) == arch:
        meta = json.loads((path / "config.json").read_text(encoding="utf-8"))
        names = meta.get("adapters", [])
        if not isinstance(names, list) or any(not isinstance(n, str) or Path(n).name != n for n in names):
            raise ValueError(f"{path / 'config.json'}: adapters must be a list of file names in the folder")
        base = Path(base_model or meta.get("base_model", ""))
        if not base.is_dir():
            where = "given as base_model" if base_model else f"recorded in {path / 'config.json'}"
            raise FileNotFoundError(f"{path}: its base model folder {base} ({where}) is missing; edit base_model in "
                                    f"{path / 'config.json'} to the folder it was fine-tuned from (or, from Python, "
                                    "pass base_model=)")
        config = meta.get("config", {})
        if not isinstance(config, dict):
            raise ValueError(f"{path / 'config.json'}: config must be a mapping")
        return Source(base, config, tuple(path / n for n in names), str(meta.get("name", "")) or None,
                      origin=path / "config.json")
    base = Path(base_model or path)
    card = read_card(base)
    card.pop("policy", None)
    return Source(base, card, origin=base / POLICY_CARD if (base / POLICY_CARD).is_file() else None)


def read_card(folder: Path) -> dict[str, Any]:
    """``folder/finpercep_policy.json`` as a dict (empty when there is none). Raises ValueError
    when it is not a JSON object."""
    card = folder / POLICY_CARD
    return read_json_object(card) if card.is_file() else {}


def policy_kind(folder: str | Path) -> str:
    """``"onestep"`` or ``"multistep"`` for the model folder ``folder``, by the folder rule of the
    module docstring. Raises FileNotFoundError for a missing folder or UNet / VAE config, ValueError
    for a card ``"policy"`` outside :data:`KINDS` or channel counts that fit neither layout."""
    folder = Path(folder)
    kind = read_card(folder).get("policy") if folder.is_dir() else None
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"{folder / POLICY_CARD}: policy must be one of {list(KINDS)}, got {kind!r}")
        return kind
    folder_io.check_model_folder(folder)
    unet = read_json_object(folder / "unet" / "config.json")
    vae = read_json_object(folder / "vae" / "config.json")
    c_in, c_lat = int(unet.get("in_channels", 4)), int(vae.get("latent_channels", 4))
    if c_in == c_lat:
        return "onestep"
    if c_in == c_lat + 3:
        return "multistep"
    raise ValueError(f"diffusers model folder {folder}: the UNet takes {c_in} channels and the VAE's latent has "
                     f"{c_lat}: neither a one-step layout ({c_lat}) nor an x4-upscaler layout ({c_lat} + 3); "
                     f"set \"policy\" in {POLICY_CARD}")


def config_of(cls: type, source: Source, overrides: dict[str, Any]) -> Any:
    """The policy config ``cls`` from ``source.config`` with ``overrides`` (options given at load,
    ``None`` values ignored) on top. Raises ValueError for unknown or invalid fields, naming where
    the bad value came from: an override by its flag and keyword (``--draft-k (grad_steps) must be
    in [1, 2], got 5``), a value of the card or checkpoint by that file (``M/finpercep_policy.json:
    grad_steps must be ...``)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return from_dict(cls, {**source.config, **given})  # messages say ``Cls.field ...``
    except ValueError as e:
        msg, by_option = str(e), False
        for field in sorted(set(source.config) | set(given), key=len, reverse=True):  # longest first
            at = f"{cls.__name__}.{field}"
            if at in msg:
                by_option |= field in given
                msg = msg.replace(at, option_name(field) if field in given else field)
        if source.origin is not None and not by_option:  # the value came from the card / checkpoint
            msg = f"{source.origin}: {msg}"
        raise ValueError(msg) from None


def load_parts(base: Path) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """``(unet, vae, prompt_embeds)`` of the model folder ``base`` (checked first: one-line
    FileNotFoundError naming a missing part)."""
    folder_io.check_model_folder(base)
    unet, vae = folder_io.load_unet(base), folder_io.load_vae(base)
    return unet, vae, folder_io.load_prompt_embeds(base, int(unet.config.cross_attention_dim))


def fuse_adapters(policy: DiffusersPolicy, source: Source) -> DiffusersPolicy:
    """Fuse ``source.adapters`` into ``policy``'s UNet one at a time (then the LoRA layers are
    removed), keep their bytes for the next checkpoint, set a checkpoint's recorded name; eval mode."""
    unet = policy.unet
    for i, f in enumerate(source.adapters):
        folder_io.add_lora_from_file(unet, f, f"fused_{i}")
        unet.fuse_lora(adapter_names=[f"fused_{i}"])
        unet.unload_lora()
        policy.fused_adapters.append(f.read_bytes())
    unet.requires_grad_(False)
    policy.name = source.name or policy.name
    return policy.eval()


def is_checkpoint(path: str | Path) -> bool:
    """True when ``path`` is a checkpoint folder of either diffusers policy."""
    from finpercep.policies import diffusion_multistep, diffusion_onestep

    return checkpoint_arch(path) in (diffusion_onestep.ARCH, diffusion_multistep.ARCH)


def load_diffusers(path: str | Path, **options: Any) -> DiffusersPolicy:
    """``--policy diffusers:PATH``: the policy of a model folder (one-step or multi-step by
    :func:`policy_kind`) or of a checkpoint of either (by its ``arch``). ``options`` go to
    :func:`finpercep.policies.diffusion_onestep.load_diffusers_policy` or
    :func:`finpercep.policies.diffusion_multistep.load_multistep_policy`; one the policy does not
    take (e.g. ``num_steps`` for a one-step folder) is a ValueError naming it."""
    from finpercep.policies import diffusion_multistep, diffusion_onestep

    if not str(path).strip():  # ``diffusers:`` alone; Path("") would be the working directory
        raise ValueError(f"{PREFIX.rstrip(':')}: needs a model folder path ({PREFIX}PATH)")
    arch = checkpoint_arch(path)
    multi = arch == diffusion_multistep.ARCH or (arch != diffusion_onestep.ARCH and policy_kind(
        options.get("base_model") or path) == "multistep")
    if multi:
        return diffusion_multistep.load_multistep_policy(path, **options)
    extra = sorted(set(options) - {"mixed_precision", "gradient_checkpointing", "base_model"})
    if extra:
        names = ", ".join(option_name(k) for k in extra)
        raise ValueError(f"{names} {'applies' if len(extra) == 1 else 'apply'} to multi-step diffusers policies "
                         f"(x4-upscaler layout) only; {path} is a one-step model")
    return diffusion_onestep.load_diffusers_policy(path, **options)
