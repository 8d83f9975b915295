"""Reading a local ``diffusers`` model folder, and LoRA adapter files in the format diffusers reads.

A **model folder** is the layout ``save_pretrained`` writes (one sub-folder per part)::

    MODEL/
      unet/        config.json + diffusion_pytorch_model.safetensors   (UNet2DConditionModel)
      vae/         config.json + diffusion_pytorch_model.safetensors   (AutoencoderKL)
      scheduler/   scheduler_config.json                               (its noise schedule)
      prompt_embeds.safetensors                                        (text conditioning, or:)
      text_encoder/ + tokenizer/                                       (CLIP; the empty prompt is embedded once)

Everything is read from disk (``local_files_only``, safetensors only: a pickled ``.bin`` is never
loaded); nothing is downloaded. A missing folder or part is a one-line ``FileNotFoundError``
naming what is missing; a config that is not JSON or a weights file that is not a complete
safetensors file (truncated, empty, damaged) is a one-line ``ValueError`` naming the file.

A **LoRA file** is what ``StableDiffusionPipeline.save_lora_weights(dir, unet_lora_layers=...,
unet_lora_adapter_metadata=...)`` writes: one safetensors file whose keys are peft's
(``unet.<module>.lora_A.weight`` / ``lora_B.weight``) and whose metadata ``lora_adapter_metadata``
holds the ``peft.LoraConfig`` (keys prefixed ``unet.``). ``pipe.load_lora_weights(dir,
weight_name=...)`` and ``unet.load_lora_adapter(file, prefix="unet")`` read it (tested).

``diffusers``, ``peft`` and ``transformers`` are the ``diffusers`` extra
(``pip install 'finpercep[diffusers]'``): imported inside the functions that need them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finpercep.checks import require
from finpercep.io import read_json_object

EXTRA = "diffusers"
"""The ``pip install 'finpercep[diffusers]'`` extra."""
PROMPT_EMBEDS = "prompt_embeds.safetensors"
"""The text-conditioning file of a model folder: one tensor ``prompt_embeds`` ``(1, L, D)``, ``D`` the
UNet's ``cross_attention_dim``."""
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""The file name ``pipe.load_lora_weights(folder)`` looks for by default."""
LORA_METADATA_KEY = "lora_adapter_metadata"
"""The safetensors metadata key diffusers stores the LoRA config under."""
WEIGHTS = "diffusion_pytorch_model.safetensors"
LAYOUT = "unet/, vae/, scheduler/ and prompt_embeds.safetensors (or text_encoder/ + tokenizer/)"


def diffusers() -> Any:
    """The ``diffusers`` module, or ImportError naming the extra."""
    return require("diffusers", extra=EXTRA)


def check_model_folder(folder: str | Path) -> Path:
    """``folder`` as a model folder with every part present and readable; returns it. Raises
    FileNotFoundError in one line naming the first missing part (the folder, ``unet/config.json``,
    ``unet/`` weights, ``vae/...``, ``scheduler/scheduler_config.json``, or the text conditioning),
    ValueError in one line naming a config file that is not a JSON object or a weights file that is
    not a complete safetensors file (only its header is read: cheap for multi-GB weights)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"diffusers model folder {folder} not found (expected a folder with {LAYOUT})")
    for part, files in (("unet", ("config.json", WEIGHTS)), ("vae", ("config.json", WEIGHTS)),
                        ("scheduler", ("scheduler_config.json",))):
        if not (folder / part).is_dir():
            raise FileNotFoundError(f"diffusers model folder {folder}: {part}/ is missing (expected {LAYOUT})")
        for name in files:
            if not (folder / part / name).is_file():
                raise FileNotFoundError(f"diffusers model folder {folder}: {part}/{name} is missing"
                                        + (" (only safetensors weights are read)" if name == WEIGHTS else ""))
    if not (folder / PROMPT_EMBEDS).is_file():
        missing = [p for p in ("text_encoder", "tokenizer") if not (folder / p).is_dir()]
        if missing:
            raise FileNotFoundError(f"diffusers model folder {folder}: no text conditioning: {PROMPT_EMBEDS} is missing "
                                    f"and so is {' and '.join(m + '/' for m in missing)}")
    for part, name in (("unet", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json")):
        read_json_object(folder / part / name)
    for part in ("unet", "vae"):
        check_safetensors(folder / part / WEIGHTS)
    return folder


def check_safetensors(path: Path) -> None:
    """Raise ValueError in one line naming ``path`` when it is not a complete safetensors file
    (empty, truncated, damaged or another format), the wording of :func:`finpercep.io._read_safetensors`.
    Only the header is read (and checked against the file's size), not the tensors: diffusers then
    loads them, but its own error for a bad file is vague and repeats the path."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            f.keys()
    except SafetensorError as e:
        raise ValueError(f"{path}: not a complete safetensors file ({e}); the file is damaged or was cut short: "
                         "copy or save it again") from None


def load_unet(folder: Path) -> nn.Module:
    """``folder/unet`` as a ``UNet2DConditionModel`` (float32, CPU, eval)."""
    return diffusers().UNet2DConditionModel.from_pretrained(
        folder / "unet", local_files_only=True, use_safetensors=True).eval()


def load_vae(folder: Path) -> nn.Module:
    """``folder/vae`` as an ``AutoencoderKL`` (float32, CPU, eval)."""
    return diffusers().AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True, use_safetensors=True).eval()


@dataclass(frozen=True)
class NoiseSchedule:
    """What the one-step policy needs of a scheduler config."""

    alphas_cumprod: torch.Tensor
    """``alpha_bar_t`` ``(T,)`` float64 in (0, 1]."""
    prediction_type: str
    """What the UNet predicts: ``epsilon``, ``v_prediction`` or ``sample``."""
    clip_sample: float | None
    """``clip_sample_range`` when the config clips the clean-sample estimate (``clip_sample: true``,
    DDPMScheduler's default), else None (Stable Diffusion's configs)."""


def load_schedule(folder: Path, part: str = "scheduler") -> NoiseSchedule:
    """The noise schedule of ``folder/part`` (``scheduler``; the x4 upscaler's ``low_res_scheduler``).
    Any scheduler of the DDPM family (DDPM, DDIM, ...) is read through ``DDPMScheduler``'s config
    keys (``num_train_timesteps``, ``beta_schedule``, ``beta_start``, ``beta_end``,
    ``trained_betas``, ``prediction_type``, ``clip_sample``, ``clip_sample_range``). Raises ValueError
naming ``scheduler_config.json`` when it is not a JSON object."""
    read_json_object(folder / part / "scheduler_config.json")  # a one-line error naming the file, not diffusers'
    d = diffusers()
    sched = d.DDPMScheduler.from_config(d.DDPMScheduler.load_config(folder / part, local_files_only=True))
    c = sched.config
    clip = float(c.clip_sample_range) if c.clip_sample else None
    return NoiseSchedule(sched.alphas_cumprod.double(), str(c.prediction_type), clip)


def load_prompt_embeds(folder: Path, cross_attention_dim: int) -> torch.Tensor:
    """The text conditioning ``(1, L, D)`` float32: ``folder/prompt_embeds.safetensors``, else the
    empty prompt embedded once by ``folder/text_encoder`` (a ``CLIPTextModel``) with
    ``folder/tokenizer`` (``CLIPTokenizer``, padded to its ``model_max_length``) as Stable Diffusion
    does. Raises ValueError when the file holds no ``prompt_embeds`` tensor of 3 dimensions or ``D``
    differs from the UNet's ``cross_attention_dim``."""
    path = folder / PROMPT_EMBEDS
    if path.is_file():
        from finpercep.io import _read_safetensors

        emb = _read_safetensors(path)[1].get("prompt_embeds")
        where = str(path)
    else:
        emb = _embed_empty_prompt(folder)
        where = str(folder / "text_encoder")
    if emb is None or emb.ndim != 3 or emb.shape[0] != 1:
        raise ValueError(f"{where}: expected a tensor 'prompt_embeds' of shape (1, L, D), got "
                         f"{None if emb is None else tuple(emb.shape)}")
    if emb.shape[2] != cross_attention_dim:
        raise ValueError(f"{where}: prompt embeddings have width {emb.shape[2]}, the UNet expects "
                         f"cross_attention_dim {cross_attention_dim}")
    return emb.float()


@torch.no_grad()
def _embed_empty_prompt(folder: Path) -> torch.Tensor:
    transformers = require("transformers", extra=EXTRA)
    tok = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    enc = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True,
                                                     use_safetensors=True).eval()
    ids = tok([""], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    return enc(ids)[0]


def write_prompt_embeds(path: str | Path, embeds: torch.Tensor) -> Path:
    """Write ``embeds`` ``(1, L, D)`` as a ``prompt_embeds.safetensors`` file (atomically); returns ``path``."""
    from safetensors.torch import save

    from finpercep.io import atomic_write_bytes

    if embeds.ndim != 3 or embeds.shape[0] != 1:
        raise ValueError(f"prompt embeddings must be (1, L, D), got {tuple(embeds.shape)}")
    atomic_write_bytes(path, save({"prompt_embeds": embeds.detach().float().cpu().contiguous()}))
    return Path(path)


# ---------------------------------------------------------------------------------------------
# LoRA files (peft adapters of the UNet, in diffusers' pipeline format)


def lora_file_bytes(unet: nn.Module, adapter: str) -> bytes:
    """The LoRA file (module docstring) of adapter ``adapter`` of ``unet``, as bytes."""
    from safetensors.torch import save

    state = require("peft.utils", extra=EXTRA).get_peft_model_state_dict(unet, adapter_name=adapter)
    cfg = {k: sorted(v) if isinstance(v, set) else v for k, v in unet.peft_config[adapter].to_dict().items()}
    meta = {f"unet.{k}": v for k, v in cfg.items()}
    tensors = {f"unet.{k}": v.detach().float().cpu().contiguous() for k, v in state.items()}
    return save(tensors, metadata={"format": "pt", LORA_METADATA_KEY: json.dumps(meta, sort_keys=True, default=str)})


def read_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state, config)`` of a LoRA file: peft state-dict keys without the ``unet.`` prefix, and the
    ``LoraConfig`` fields. Raises FileNotFoundError when it is missing, ValueError when it is not a
    complete safetensors file or carries no UNet LoRA config."""
    from finpercep.io import _read_safetensors

    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} is missing")
    meta, tensors = _read_safetensors(path)
    try:
        packed = json.loads(meta.get(LORA_METADATA_KEY, "{}"))
    except json.JSONDecodeError:
        packed = {}
    cfg = {k.removeprefix("unet."): v for k, v in packed.items() if k.startswith("unet.")}
    state = {k.removeprefix("unet."): v for k, v in tensors.items() if k.startswith("unet.")}
    if not cfg or "r" not in cfg or not state:
        raise ValueError(f"{path}: not a UNet LoRA file with its config in the metadata "
                         f"(expected the format StableDiffusionPipeline.save_lora_weights writes with unet_lora_adapter_metadata)")
    return state, cfg


def add_lora_from_file(unet: nn.Module, path: Path, adapter: str) -> None:
    """Inject the LoRA of file ``path`` into ``unet`` as adapter ``adapter`` and load its weights
    (strictly: a file that names modules ``unet`` lacks is a ValueError)."""
    peft = require("peft", extra=EXTRA)
    LoraConfig, set_peft_model_state_dict = peft.LoraConfig, peft.set_peft_model_state_dict

    state, cfg = read_lora_file(path)
    known = LoraConfig.__dataclass_fields__
    unet.add_adapter(LoraConfig(**{k: v for k, v in cfg.items() if k in known}), adapter_name=adapter)
    result = set_peft_model_state_dict(unet, state, adapter_name=adapter)
    unexpected = getattr(result, "unexpected_keys", []) or []
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} LoRA tensors match no module of the UNet, e.g. {unexpected[0]!r}")
