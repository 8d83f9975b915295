"""SR policies: the networks RL fine-tunes (PAPER.md section 5, issue #4).

One literal dict, :data:`POLICIES`, maps the names the CLI and the tests use to factories:

- ``realesrgan-x4``, ``realsr-x4``: RRDBNet (:mod:`finpercep.policies.rrdbnet`) with the real
  pretrained weights converted once from the ncnn packages (:mod:`finpercep.policies.convert`);
- ``waifu2x-photo-x2``: UpConv7 (:mod:`finpercep.policies.upconv7`), converted the same way;
- ``tiny-x4``: a small fast x4 network trained by a project recipe (:mod:`finpercep.policies.tiny`);
- ``flow-x4``: a stochastic multi-step policy with Gaussian transitions
  (:mod:`finpercep.policies.flow`), the one DPO and GRPO sample from.

A path to a saved checkpoint works wherever a name does. A policy checkpoint is a folder with
``config.json`` (``{"arch": ..., "config": {...}, "name": ..., "format_version": 1}``) and
``model.safetensors``; :data:`ARCHS` maps ``arch`` to the module class and its config dataclass.

Every policy module is an ``nn.Module`` with ``arch`` (key of ARCHS), ``cfg`` (frozen config
dataclass), ``scale`` (int) and ``name`` (str), and ``forward(lr (B,3,h,w) in [0,1]) -> sr
(B,3,h*s,w*s) in [0,1]`` (see :class:`finpercep.types.Policy`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
CUSTOM = "custom"


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
    # Imported here so `import finpercep.policies` stays light (STYLE.md habit 7).
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


def save_policy(model: nn.Module, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as a checkpoint folder (``config.json`` + ``model.safetensors``), atomically
    file by file. ``dtype`` casts floating tensors (e.g. float16 for a shipped checkpoint).

    A network of :data:`ARCHS` is saved with its config and loads anywhere by path; any other
    network (a user's own) is saved as ``arch: "custom"`` with its weights only: rebuild it in your
    code and load them with :func:`load_policy_weights` (nothing in a checkpoint is run as code)."""
    from safetensors.torch import save

    from finpercep.config import to_dict
    from finpercep.io import atomic_write_bytes, save_json

    if getattr(model, "arch", None) in _archs() and hasattr(model, "cfg"):
        meta = {"arch": model.arch, "config": to_dict(model.cfg), "name": getattr(model, "name", model.arch),
                "format_version": FORMAT_VERSION}
    else:  # a user's own network: its weights, and its class name for the record
        cls = type(model)
        meta = {"arch": CUSTOM, "config": {}, "name": str(getattr(model, "name", cls.__name__)),
                "class": f"{cls.__module__}.{cls.__qualname__}", "format_version": FORMAT_VERSION}
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().to("cpu").contiguous()
        for k, v in model.state_dict().items()
    }
    folder = Path(folder)
    atomic_write_bytes(folder / WEIGHTS_NAME, save(tensors, metadata={"finpercep_policy": json.dumps(meta, sort_keys=True)}))
    save_json(folder / CONFIG_NAME, meta)
    return folder


def load_policy_checkpoint(folder: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a folder written by :func:`save_policy` (weights strictly, through safetensors).
    Returns the policy in eval mode, float32, on ``map_location``.

    Raises FileNotFoundError for a missing file, and ValueError in one line for a config that is
    not valid JSON, has wrong types or sizes out of bounds, a weights file that is truncated,
    damaged or not safetensors (a pickle is never unpickled), or weights whose shapes do not
    match the config (compared on the meta device, before the network is allocated)."""
    from finpercep.config import from_dict

    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"not a policy checkpoint: {p} is missing (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    archs = _archs()
    if isinstance(meta, dict) and meta.get("arch") == CUSTOM:
        raise ValueError(f"{folder} holds the weights of a custom network ({meta.get('class')}): build it in your "
                         "code and call finpercep.policies.load_policy_weights(net, folder)")
    if not isinstance(meta, dict) or meta.get("arch") not in archs:
        raise ValueError(f"{cfg_path}: not a policy config (arch must be one of {sorted(archs)})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: format_version {meta.get('format_version')} is not supported (expected {FORMAT_VERSION})")
    cls, cfg_cls = archs[meta["arch"]]
    cfg = from_dict(cfg_cls, meta.get("config", {}), where=f"{cfg_path}: config")
    state = {k: v.float() if v.is_floating_point() else v for k, v in _read_weights(w_path).items()}
    _check_shapes(cls, cfg, state, w_path)
    model = cls(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{w_path}: weights do not match {CONFIG_NAME}: {e}") from None
    model.name = str(meta.get("name", model.name))
    return model.to(map_location).eval()


def load_policy_weights(model: nn.Module, folder: str | Path) -> nn.Module:
    """Load the weights of a checkpoint folder into ``model`` (strictly; e.g. a custom network's
    fine-tuned weights from ``RUN/final``). Returns ``model``. Raises ValueError for a weights file
    that is not a complete safetensors file or does not match ``model``."""
    w_path = Path(folder) / WEIGHTS_NAME
    if not w_path.is_file():
        raise FileNotFoundError(f"not a policy checkpoint: {w_path} is missing")
    ref = next(iter(model.state_dict().values()), None)
    state = {k: v.to(ref.dtype) if ref is not None and v.is_floating_point() else v for k, v in _read_weights(w_path).items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{w_path}: weights do not match {type(model).__name__}: {e}") from None
    return model


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path``; ValueError (one line) for a file that is
    truncated, damaged or of another format (never unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path}: not a complete safetensors file ({e}); the checkpoint is damaged or was "
                         "not written by finpercep: save or copy it again") from None


def _check_shapes(cls: type, cfg: Any, state: dict[str, torch.Tensor], w_path: Path) -> None:
    """Compare the tensors ``cfg`` describes (``cls(cfg)`` built on the meta device: nothing is
    allocated) with those of the weights file, so a damaged or hand-edited ``config.json``
    (``channels: 200000``, 1.4 TB) fails in one line instead of allocating first."""
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in cls(cfg).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    diff = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
    if diff:
        raise ValueError(f"{w_path}: weights do not match {CONFIG_NAME}: {len(diff)} tensors differ, e.g. {diff[0]!r} "
                         f"is {want.get(diff[0])} in the config and {have.get(diff[0])} in the file")


def load_policy(name_or_path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A policy by name (a key of :data:`POLICIES`) or by checkpoint folder path, on ``device``,
    in eval mode. Raises ValueError for an unknown name that is not a folder either."""
    key = str(name_or_path)
    if key in POLICIES:
        model = POLICIES[key]()
    elif Path(key).is_dir():
        model = load_policy_checkpoint(key)
    else:
        raise ValueError(
            f"unknown policy {key!r}: not a name ({', '.join(list_policies())}) and not a checkpoint folder"
        )
    return model.to(device).eval()
