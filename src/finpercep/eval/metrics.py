"""Old import path of the metric math, kept for users: it now lives in :mod:`finpercep.metrics`
(a leaf, so the reward model and the curriculum can use it without importing ``eval``).
Nothing inside the package imports through this module."""

from finpercep.metrics import (
    DEFAULT_IOU_THRESHOLD,
    MSE_FLOOR,
    SSIM_SIGMA,
    SSIM_WINDOW,
    ArrayLike,
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
    ssim_downsample,
    ssim_downsample_factor,
    ssim_y,
)

__all__ = [
    "DEFAULT_IOU_THRESHOLD",
    "MSE_FLOOR",
    "SSIM_SIGMA",
    "SSIM_WINDOW",
    "ArrayLike",
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
    "ssim_downsample",
    "ssim_downsample_factor",
    "ssim_y",
]
