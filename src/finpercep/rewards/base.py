"""Input checks shared by every reward in :mod:`finpercep.rewards`.

One tolerance for all rewards: values may stray :data:`INPUT_TOL` outside [0, 1] (an SR network's
raw output overshoots slightly; the reward model accepts the same), while images in [0, 255] or
[-1, 1] are refused with a message saying how to fix them.
"""

from __future__ import annotations

import torch

from finpercep.checks import check_image_batch

INPUT_TOL = 0.5
"""How far ``sr`` / ``hr`` values may lie outside [0, 1] (same as FinPercep-RM's own check)."""


def check_sr(sr: object, who: str, min_size: int = 1) -> torch.Tensor:
    """``sr`` checked as a ``(B, 3, H, W)`` float batch in [0, 1] (``who``: the reward's name).

    float16 / bfloat16 come back as float32 (differentiably): differences of near-equal pixels need
    more than their 8-11 mantissa bits (SSIM in bfloat16 is off by ~0.04); float32 / float64 are kept.
    Integer, bool and complex batches are refused (:func:`finpercep.checks.check_image_batch`)."""
    sr = check_image_batch(sr, f"reward {who!r}: sr", min_size=min_size, tol=INPUT_TOL)
    return sr.to(torch.promote_types(sr.dtype, torch.float32))


def check_hr(sr: torch.Tensor, hr: object, who: str) -> torch.Tensor:
    """``hr`` checked for a full-reference reward: given, same shape and device as ``sr``, and
    returned in ``sr``'s dtype.

    Raises ValueError naming the reward when ``hr`` is missing (the :class:`finpercep.types.Reward`
    contract for ``needs_reference``)."""
    if hr is None:
        raise ValueError(
            f"reward {who!r} is full-reference: call it as reward(sr, hr=hr) with the HR image batch "
            "(a no-reference reward such as 'finpercep' or 'niqe' needs no hr)"
        )
    hr = check_image_batch(hr, f"reward {who!r}: hr", tol=INPUT_TOL, dtype=sr.dtype)
    if hr.shape != sr.shape:
        raise ValueError(f"reward {who!r}: hr must have the shape of sr {tuple(sr.shape)}, got {tuple(hr.shape)}")
    if hr.device != sr.device:
        raise ValueError(f"reward {who!r}: sr is on {sr.device} but hr on {hr.device}; move both to one device")
    return hr
