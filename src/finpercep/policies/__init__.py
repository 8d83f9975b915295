"""SR policies: the SR networks that RL fine-tunes against a reward (arXiv 2512.22647, RL for SR).

One literal dict, :data:`POLICIES`, maps the names the CLI and the tests use to factories:

- ``realesrgan-x4``, ``realsr-x4``: RRDBNet (:mod:`finpercep.policies.rrdbnet`) with the real
  pretrained weights converted once from the ncnn packages (:mod:`finpercep.policies.convert`);
- ``waifu2x-photo-x2``: UpConv7 (:mod:`finpercep.policies.upconv7`), converted the same way;
- ``tiny-x4``: a small fast x4 network trained by a project recipe (:mod:`finpercep.policies.tiny`);
- ``flow-x4``: a stochastic multi-step policy with Gaussian transitions
  (:mod:`finpercep.policies.flow`), the one DPO and GRPO sample from.

``diffusers:PATH`` loads a diffusion SR model from a local ``diffusers`` model folder (the
``diffusers`` extra): a one-step OSEDiff-style model (:mod:`finpercep.policies.diffusion_onestep`) or
a multi-step Stable Diffusion x4 upscaler layout run as an SDE
(:mod:`finpercep.policies.diffusion_multistep`), told apart by the folder rule of
:mod:`finpercep.policies.diffusion_base`; their fine-tuned checkpoints (LoRA files + the base
folder's path) load by path like any other.

A path to a saved checkpoint works wherever a name does. A policy checkpoint is a folder with
``config.json`` (``{"arch": ..., "config": {...}, "name": ..., "format_version": 1}``) and
``model.safetensors`` (:mod:`finpercep.policies.checkpoint`); :func:`_archs` maps ``arch`` to the
module class and its config dataclass.

Every policy module is an ``nn.Module`` with ``arch`` (key of ARCHS), ``cfg`` (frozen config
dataclass), ``scale`` (int) and ``name`` (str), and ``forward(lr (B,3,h,w) in [0,1]) -> sr
(B,3,h*s,w*s) in [0,1]`` (see :class:`finpercep.types.Policy`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from finpercep.policies.checkpoint import load_checkpoint
from finpercep.policies.checkpoint import load_policy_weights as load_policy_weights  # re-exported
from finpercep.policies.checkpoint import save_policy as save_policy  # re-exported

log = logging.getLogger(__name__)


def _converted(name: str) -> Callable[..., nn.Module]:
    def factory(**kwargs: Any) -> nn.Module:
        from finpercep.policies.convert import load_converted

        return load_converted(name, **kwargs)

    return factory


def _tiny(**kwargs: Any) -> nn.Module:
    from finpercep.policies.tiny import load_tiny

    return load_tiny(**kwargs)


def _flow(**kwargs: Any) -> nn.Module:
    from finpercep.policies.flow import load_flow

    return load_flow(**kwargs)


POLICIES: dict[str, Callable[..., nn.Module]] = {
    "realesrgan-x4": _converted("realesrgan-x4"),
    "realsr-x4": _converted("realsr-x4"),
    "waifu2x-photo-x2": _converted("waifu2x-photo-x2"),
    "tiny-x4": _tiny,
    "flow-x4": _flow,
}
"""Policy name -> factory returning the pretrained policy (eval mode, on CPU)."""


def _archs() -> dict[str, tuple[type, type]]:
    """``arch -> (module class, config dataclass)`` of every policy a checkpoint path may hold."""
    # Imported here so `import finpercep.policies` stays light.
    from finpercep.policies.flow import FlowConfig, FlowSR
    from finpercep.policies.rrdbnet import RRDBConfig, RRDBNet
    from finpercep.policies.tiny import TinyConfig, TinySR
    from finpercep.policies.upconv7 import UpConv7, UpConv7Config

    return {
        "rrdbnet": (RRDBNet, RRDBConfig),
        "upconv7": (UpConv7, UpConv7Config),
        "tiny": (TinySR, TinyConfig),
        "flow": (FlowSR, FlowConfig),
    }


def list_policies() -> list[str]:
    """The names :func:`load_policy` accepts (besides checkpoint paths)."""
    return sorted(POLICIES)


def load_policy_checkpoint(folder: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a policy checkpoint folder of any architecture of :func:`_archs` (written by
    :func:`~finpercep.policies.checkpoint.save_policy`): eval mode, float32, on ``map_location``.
    Errors as :func:`finpercep.policies.checkpoint.load_checkpoint`."""
    return load_checkpoint(folder, _archs(), map_location)


def load_policy(name_or_path: str | Path, device: str | torch.device = "cpu", **options: Any) -> nn.Module:
    """A policy by name (a key of :data:`POLICIES`), ``diffusers:PATH`` (a local diffusers model
    folder or a checkpoint fine-tuned from one) or checkpoint folder path, on ``device``, in eval mode.

    ``options`` go to :func:`finpercep.policies.diffusion_base.load_diffusers` (``mixed_precision``,
    ``gradient_checkpointing``; ``num_steps``, ``grad_steps``, ``eta`` for a multi-step one) and apply
    to diffusers policies only. Raises ValueError for an unknown name that is not a folder either,
    or for options given to another policy."""
    from finpercep.policies import diffusion_base  # light: diffusers itself is imported lazily

    key = str(name_or_path)
    if key.startswith(diffusion_base.PREFIX) or (Path(key).is_dir() and diffusion_base.is_checkpoint(key)):
        model = diffusion_base.load_diffusers(key.removeprefix(diffusion_base.PREFIX), **options)
        return model.to(device).eval()
    if options:
        raise ValueError(f"{sorted(options)} apply to diffusers policies (--policy diffusers:PATH) only, not {key!r}")
    if key in POLICIES:
        model = POLICIES[key]()
    elif Path(key).is_dir():
        model = load_policy_checkpoint(key)
    else:
        raise ValueError(
            f"unknown policy {key!r}: not a name ({', '.join(list_policies())}), not diffusers:PATH "
            "and not a checkpoint folder"
        )
    return model.to(device).eval()
