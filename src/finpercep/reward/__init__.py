"""FinPercep-RM: the fine-grained reward model (``model``) and its training losses (``losses``).

arXiv 2512.22647: the encoder-decoder model with its map-modulated score, the losses ``L_map``,
``L_rank`` and ``L_align``, and the staged growth ``RM_0 .. RM_N`` of the co-evolutionary curriculum.

The names below load their submodule on first access (module ``__getattr__``), so importing a light
submodule such as ``finpercep.reward.losses`` does not import the network code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "RMLossConfig": "losses",
    "align_loss": "losses",
    "map_loss": "losses",
    "rank_loss": "losses",
    "total_loss": "losses",
    "BACKBONES": "model",
    "BackboneSpec": "model",
    "FinPercepRM": "model",
    "RewardOutput": "model",
    "RMConfig": "model",
    "load_pretrained": "model",
    "save_pretrained": "model",
    "score_image_tiled": "model",
}
"""Public name -> the submodule that defines it."""


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "FinPercepRM",
    "RMConfig",
    "RMLossConfig",
    "RewardOutput",
    "align_loss",
    "load_pretrained",
    "map_loss",
    "rank_loss",
    "save_pretrained",
    "score_image_tiled",
    "total_loss",
]
