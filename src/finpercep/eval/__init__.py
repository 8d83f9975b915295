"""Evaluation: the reward-model benchmark (``rm_benchmark``), SR quality (``sr_quality``), the
reward-hacking experiment (``hacking``) and the HTML report (``report``).

The metric math they share lives in the leaf :mod:`finpercep.metrics`; it is re-exported here (and
from ``finpercep.eval.metrics``) for code written against the old paths.
"""

from finpercep.metrics import (
    DEFAULT_IOU_THRESHOLD,
    average_precision,
    drop_fraction,
    iou_at,
    map_mae,
    order_accuracy,
    pixel_auroc,
    psnr,
    psnr_y,
    rgb_to_y,
    ssim,
    ssim_y,
)

__all__ = [
    "DEFAULT_IOU_THRESHOLD",
    "average_precision",
    "drop_fraction",
    "iou_at",
    "map_mae",
    "order_accuracy",
    "pixel_auroc",
    "psnr",
    "psnr_y",
    "rgb_to_y",
    "ssim",
    "ssim_y",
]
