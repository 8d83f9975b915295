"""The policy checkpoint: :func:`finpercep.io.save_pretrained` with a policy's ``config.json``,

    {"arch": "tiny", "config": {...TinyConfig...}, "name": "tiny-x4", "format_version": 1}

(``arch: "custom"``, an empty ``config`` and the ``class`` name for a network of the user's own).

What the network modules (:mod:`~finpercep.policies.tiny`, :mod:`~finpercep.policies.flow`,
:mod:`~finpercep.policies.convert`) and the package's catalogue share lives here, and this module
imports none of them: a loader is handed the architectures it may build, ``{arch: (module class,
config dataclass)}`` (:data:`finpercep.policies.ARCHS` for any checkpoint, ``{"tiny": (TinySR,
TinyConfig)}`` inside ``tiny.py``), so no module of the package imports one that imports it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from finpercep.config import from_dict, to_dict
from finpercep.io import CONFIG_NAME, WEIGHTS_NAME, load_pretrained, read_weights, save_pretrained

Archs = Mapping[str, tuple[type[nn.Module], type]]
"""``arch -> (module class, config dataclass)``: what a loader may build; ``cls(cfg)`` builds it."""

CUSTOM = "custom"
"""The ``arch`` of a network that does not declare one (a user's own): weights only."""


def declares_arch(model: nn.Module) -> bool:
    """True when ``model`` says how to rebuild it: an ``arch`` name and a dataclass ``cfg`` (every
    network of :data:`finpercep.policies.ARCHS` does)."""
    arch = getattr(model, "arch", None)
    return isinstance(arch, str) and arch != CUSTOM and dataclasses.is_dataclass(getattr(model, "cfg", None))


def save_policy(model: nn.Module, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as a checkpoint folder (``config.json`` + ``model.safetensors``, complete or
    not at all, :func:`finpercep.io.save_pretrained`). ``dtype`` casts floating tensors (e.g.
    float16 for a shipped checkpoint). Returns ``folder``.

    A network that declares its architecture (:func:`declares_arch`) is saved with its config and
    loads anywhere by path; any other (a user's own) is saved as ``arch: "custom"`` with its weights
    only: rebuild it in your code and load them with :func:`load_policy_weights` (nothing in a
    checkpoint is run as code)."""
    if declares_arch(model):
        meta: dict[str, Any] = {"arch": model.arch, "config": to_dict(model.cfg), "name": getattr(model, "name", model.arch)}
    else:  # a user's own network: its weights, and its class name for the record
        cls = type(model)
        meta = {"arch": CUSTOM, "config": {}, "name": str(getattr(model, "name", cls.__name__)),
                "class": f"{cls.__module__}.{cls.__qualname__}"}
    return save_pretrained(model, folder, meta, dtype=dtype)


def load_checkpoint(folder: str | Path, archs: Archs, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a folder written by :func:`save_policy` whose ``arch`` is a key of ``archs`` (weights
    strictly, through safetensors). Returns the policy in eval mode, float32, on ``map_location``,
    named as saved.

    Raises FileNotFoundError for a missing file, and ValueError in one line for a config that is
    not valid JSON, holds another ``arch`` (a custom network's: with the call that loads it), has
    wrong types or sizes out of bounds, a weights file that is truncated, damaged or not safetensors
    (a pickle is never unpickled), or weights whose shapes do not match the config (compared on the
    meta device, before the network is allocated); see :func:`finpercep.io.load_pretrained`."""
    cfg_path = Path(folder) / CONFIG_NAME

    def build(meta: Any) -> nn.Module:
        if isinstance(meta, dict) and meta.get("arch") == CUSTOM:
            raise ValueError(f"{folder} holds the weights of a custom network ({meta.get('class')}): build it in "
                             "your code and call finpercep.policies.load_policy_weights(net, folder)")
        if not isinstance(meta, dict) or meta.get("arch") not in archs:
            raise ValueError(f"{cfg_path}: not a policy config of a known kind (arch must be one of {sorted(archs)}); "
                             "for a network of your own call finpercep.policies.load_policy_weights(net, folder)")
        cls, cfg_cls = archs[meta["arch"]]
        return cls(from_dict(cfg_cls, meta.get("config", {}), where=f"{cfg_path}: config"))

    model, meta = load_pretrained(folder, build, what="policy")
    model.name = str(meta.get("name", model.name))
    return model.to(map_location).eval()


def load_policy_weights(model: nn.Module, folder: str | Path) -> nn.Module:
    """Load the weights of a checkpoint folder into ``model`` (strictly, cast to its dtype; e.g. a
    custom network's fine-tuned weights from ``RUN/final``). Returns ``model``. Raises
    FileNotFoundError when ``model.safetensors`` is missing, ValueError for a file that is not a
    complete safetensors file or does not match ``model``."""
    state = read_weights(folder, what="policy")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{Path(folder) / WEIGHTS_NAME}: weights do not match {type(model).__name__}: {e}") from None
    return model
