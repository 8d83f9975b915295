"""Evaluation: metric math (``metrics``), shared by the reward benchmarks and RL evaluation."""

from finpercep.eval.metrics import (
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
