"""An independent judge of local damage: where an SR output is clearly worse than a reference
output of the same LR, measured against HR with no learned model.

The learned judge of the first hacking experiment was another FinPercep-RM, trained by the same
recipe as the reward, so it shared the reward's blind spots (it scored darkened, smeared GRPO
outputs as clean). Evaluation crops come with HR, so local damage can be measured instead:

    D(x) = max(0, SSIM_loc(ref, HR)(x) - SSIM_loc(sr, HR)(x))

with ``SSIM_loc`` the local SSIM, per RGB channel and averaged (:func:`finpercep.metrics.ssim_map`:
11x11 Gaussian window, sigma 1.5, Wang et al. 2004; on RGB rather than the luma so that colour and
saturation shifts count). ``D`` is 0 where the output is as faithful as the
reference or more, and up to 2 where it lost the local structure the reference had. A pixel is
**damaged** when ``D > threshold`` (:data:`DAMAGE_THRESHOLD`); the **damaged area** is the share of
such pixels. In the hacking experiment the reference is the pretrained policy's output, so a
fine-tune that trades its reward for local artifacts shows a growing damaged area even when its
PSNR barely moves. With ``ref = HR`` the map is ``1 - SSIM_loc(sr, HR)``: where ``sr`` differs
from HR at all, which is how it is validated on the data engine's region swaps
(``benchmarks/damage_validation.py``).
"""

from __future__ import annotations

import torch

from finpercep.metrics import ssim_map

DAMAGE_THRESHOLD = 0.1
"""A pixel whose local SSIM to HR fell by more than this (5 % of SSIM's range of 2) is damaged.
``docs/results/hacking/damage_validation.md`` reports, at this threshold, how much of the data
engine's swapped regions it finds and how little outside them."""


def local_damage_map(sr: torch.Tensor, reference: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """``D = max(0, SSIM_loc(reference, hr) - SSIM_loc(sr, hr))`` per pixel (module docstring).

    Args:
        sr, reference, hr: ``(B, 3, H, W)`` RGB in [0, 1], the same shape, ``H, W >= 11``.

    Returns:
        ``(B, 1, H, W)`` in [0, 2]; exactly 0 where ``sr == reference`` on the whole window.

    Raises:
        ValueError: for tensors of different shapes or smaller than the SSIM window.
    """
    if not (sr.shape == reference.shape == hr.shape):
        raise ValueError(f"local_damage_map: sr, reference and hr must have one shape, got {tuple(sr.shape)}, "
                         f"{tuple(reference.shape)} and {tuple(hr.shape)}")
    return (ssim_map(reference, hr) - ssim_map(sr, hr)).clamp_min(0)


def damaged_area(damage: torch.Tensor, threshold: float = DAMAGE_THRESHOLD) -> torch.Tensor:
    """Share of damaged pixels per image: ``(B, 1, H, W)`` -> ``(B,)`` in [0, 1]."""
    return (damage > threshold).float().flatten(1).mean(1)
