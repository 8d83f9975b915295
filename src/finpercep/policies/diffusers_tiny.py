"""Tiny random-weight ``diffusers`` model folders, for tests and command-line smoke runs (the way
diffusers tests itself: tiny configs, no pretrained weights).

:func:`write_tiny_model` writes the layout :mod:`finpercep.policies.diffusers_folder` reads: a
``UNet2DConditionModel`` with 8 and 16 channels in two levels (one cross-attention level), an
``AutoencoderKL`` with 8 and 16 channels (latent downsampling 2, 4 latent channels), a
``DDPMScheduler`` config and either a ``prompt_embeds.safetensors`` file or a tiny CLIP text
encoder with a 10-token tokenizer. About 0.1 M parameters: a 32x32 image (16x16 latent) runs in
milliseconds on a CPU. The outputs mean nothing: it checks plumbing, not quality.

``upscaler=True`` writes the Stable Diffusion x4 upscaler layout instead (the multi-step policy of
:mod:`finpercep.policies.diffusion_multistep`): the UNet takes the 4 latent channels + 3 LR image
channels and the noise level as class label (``num_class_embeds=1000``), the VAE downsamples by 4
(three levels, ``scaling_factor`` 0.08333 as the real one), ``scheduler/`` is a ``DDIMScheduler``
config and ``low_res_scheduler/`` the ``DDPMScheduler`` of the LR augmentation (the real model's
betas). An 8x8 LR image is an 8x8 latent, decoded to 32x32.

:func:`write_full_size_model` writes the same one-step layout at Stable Diffusion 2.1-base sizes
(the backbone OSEDiff fine-tunes): an 866 M-parameter UNet, an 84 M-parameter VAE, SD 2.1-base's
DDPM scheduler config and a zero prompt embedding ``(1, 77, 1024)``, all random weights (about 3.8 GB
of float32 safetensors). It exists to time and size a training step on a GPU
(``benchmarks/gpu_check.py``, check 6) without downloading a model; its outputs mean nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from finpercep.checks import require
from finpercep.policies import diffusers_folder as folder_io

CROSS_ATTENTION_DIM = 16
"""Width of the tiny text conditioning."""
PROMPT_LENGTH = 8
"""Tokens of the tiny prompt embedding (Stable Diffusion's is 77)."""


def write_tiny_model(folder: str | Path, *, seed: int = 0, text_encoder: bool = False,
                     prediction_type: str = "epsilon", upscaler: bool = False) -> Path:
    """Write a tiny random model folder (module docstring) into ``folder``, its weights a function
    of ``seed``. ``text_encoder``: a CLIP text encoder and tokenizer instead of the embedding file.
    ``prediction_type``: the scheduler's (``epsilon``, ``v_prediction``, ``sample``). ``upscaler``:
    the x4-upscaler layout (multi-step policy) instead of the one-step one. Returns ``folder``."""
    folder = Path(folder)
    levels = 3 if upscaler else 2  # VAE downsampling 4 (the x4 upscaler's) or 2
    _write_unet_vae(folder, seed, unet=dict(
        sample_size=16, in_channels=4 + 3 * upscaler, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM, attention_head_dim=4, norm_num_groups=4,
        num_class_embeds=1000 if upscaler else None), vae=dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16)[:levels], layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        norm_num_groups=4, sample_size=32, **({"scaling_factor": 0.08333} if upscaler else {})))
    d = require("diffusers", extra=folder_io.EXTRA)
    if upscaler:  # the x4 upscaler's schedulers (its scheduler is v-prediction; ours follows prediction_type)
        d.DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02,
                        prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False,
                        ).save_pretrained(folder / "scheduler")
        d.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                        ).save_pretrained(folder / "low_res_scheduler")
    else:
        d.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        prediction_type=prediction_type, clip_sample=False).save_pretrained(folder / "scheduler")
    if text_encoder:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 2)
            _write_text_encoder(folder)
    else:
        g = torch.Generator().manual_seed(seed + 1)
        folder_io.write_prompt_embeds(folder / folder_io.PROMPT_EMBEDS,
                                      torch.randn(1, PROMPT_LENGTH, CROSS_ATTENTION_DIM, generator=g))
    return folder


def write_full_size_model(folder: str | Path, *, seed: int = 0) -> Path:
    """Write a random one-step model folder of Stable Diffusion 2.1-base sizes (module docstring)
    into ``folder``, its weights a function of ``seed`` (diffusers' default initialisation, from
    torch's CPU generator; the caller's RNG state is left as it was). A 512x512 image is a 64x64
    latent, the UNet's ``sample_size``. Needs about 5 GB of memory and 4 GB of disk; about 20 s to
    write on one CPU thread. Returns ``folder``."""
    folder = Path(folder)
    _write_unet_vae(folder, seed, unet=dict(  # SD 2.1-base unet/config.json (the rest are diffusers' defaults)
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True), vae=dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=512, scaling_factor=0.18215))
    d = require("diffusers", extra=folder_io.EXTRA)
    d.DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                    prediction_type="epsilon", clip_sample=False, steps_offset=1).save_pretrained(folder / "scheduler")
    folder_io.write_prompt_embeds(folder / folder_io.PROMPT_EMBEDS, torch.zeros(1, 77, 1024))
    return folder


def _write_unet_vae(folder: Path, seed: int, *, unet: dict, vae: dict) -> None:
    """Build a ``UNet2DConditionModel(**unet)`` then an ``AutoencoderKL(**vae)`` from torch's RNG
    seeded with ``seed`` (diffusers initialises from the global RNG; the caller's is restored) and
    save both as safetensors in ``folder/unet`` and ``folder/vae``."""
    d = require("diffusers", extra=folder_io.EXTRA)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet_model, vae_model = d.UNet2DConditionModel(**unet), d.AutoencoderKL(**vae)
    unet_model.save_pretrained(folder / "unet", safe_serialization=True)
    vae_model.save_pretrained(folder / "vae", safe_serialization=True)


def _write_text_encoder(folder: Path) -> None:
    """A 2-layer CLIP text encoder (width 16) and a CLIP tokenizer of 10 tokens and no merges."""
    transformers = require("transformers", extra=folder_io.EXTRA)
    tok_dir = folder / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    words = ["<|startoftext|>", "<|endoftext|>", "a</w>", "b</w>", "c</w>", "a", "b", "c", "!</w>", "!"]
    (tok_dir / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(words)}))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"),
                                     model_max_length=PROMPT_LENGTH)
    tok.save_pretrained(tok_dir)
    enc = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(words), hidden_size=CROSS_ATTENTION_DIM, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=PROMPT_LENGTH, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    hf_logging = transformers.utils.logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Writing model shards" bar (one shard): a library prints no bars
    try:
        enc.save_pretrained(folder / "text_encoder", safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
