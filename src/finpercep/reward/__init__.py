"""FinPercep-RM: the fine-grained reward model (``model``) and its training losses (``losses``).

PAPER.md sections 1 (model), 3 (losses) and 4 (staged growth RM_0 .. RM_N).
"""

from finpercep.reward.losses import RMLossConfig, align_loss, map_loss, rank_loss, total_loss
from finpercep.reward.model import (
    BACKBONES,
    BackboneSpec,
    FinPercepRM,
    RewardOutput,
    RMConfig,
    load_pretrained,
    save_pretrained,
    score_image_tiled,
)

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
