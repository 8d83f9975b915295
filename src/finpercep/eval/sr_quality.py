"""Quality of an SR policy on held-out LR/HR pairs, by measures RL never optimises directly:
full reference against HR (PSNR, SSIM, ST-LPIPS), no
reference (NIQE, BRISQUE, PIQE) and a FinPercep-RM (its score and its map: mean and the area
above a threshold).

PSNR and SSIM twice: ``psnr`` / ``ssim`` on RGB over the whole image (the columns of our earlier
results), and ``psnr_y`` / ``ssim_y`` as SR papers report them (BT.601 luma, the scale factor
cropped at each edge; :mod:`finpercep.metrics`). Every value is a mean over images;
:data:`DIRECTION` says which way is better.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from finpercep.metrics import psnr, psnr_y, ssim, ssim_y  # noqa: F401 (psnr kept importable here)

log = logging.getLogger(__name__)

MAP_THRESHOLD = 0.5
"""A map pixel above this counts as degraded for ``rm/map_area``."""

DIRECTION: dict[str, str] = {
    "psnr": "up", "ssim": "up", "psnr_y": "up", "ssim_y": "up", "stlpips": "down",
    "niqe": "down", "brisque": "down", "piqe": "down",
    "rm/score": "up", "rm/map_mean": "down", "rm/map_area": "down",
}
"""Metric -> ``up`` (higher is better) or ``down``."""


@torch.no_grad()
def evaluate_sr(
    policy: nn.Module,
    pairs: Any,
    indices: list[int],
    *,
    judge: nn.Module | None = None,
    device: str = "cpu",
    batch: int = 4,
    sample: torch.Generator | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Upscale the LR of ``pairs.pair(i)`` for ``i`` in ``indices`` with ``policy`` and measure
    the outputs against HR (means over images; :data:`DIRECTION`). ``judge``: the FinPercep-RM
    whose score and map are reported (default: the embedded final stage). ``sample``: for a
    stochastic policy, draw one sample per image with this generator instead of the
    deterministic mean path."""
    from finpercep.baselines import STLPIPS, brisque, niqe, piqe
    from finpercep.reward.api import load_reward

    judge = (judge or load_reward()).to(device).eval()
    lpips = STLPIPS("alex").to(device).eval()
    policy = policy.to(device).eval()
    sums: dict[str, float] = {}
    n = 0
    it = range(0, len(indices), batch)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"eval {getattr(policy, 'name', '')}", unit="batch")
    for a in it:
        lr, hr = (torch.stack(t).to(device) for t in zip(*(pairs.pair(i) for i in indices[a : a + batch])))
        sr = (policy.sample(lr, sample).sr if sample is not None else policy(lr)).clamp(0, 1)
        out = judge(sr)
        border = hr.shape[-1] // lr.shape[-1]  # SR papers crop the scale factor at each edge
        vals = {"psnr": psnr(sr, hr), "ssim": ssim(sr, hr), "psnr_y": psnr_y(sr, hr, crop_border=border),
                "ssim_y": ssim_y(sr, hr, crop_border=border), "stlpips": lpips(sr, hr),
                "niqe": niqe(sr.cpu()), "brisque": brisque(sr.cpu()), "piqe": piqe(sr.cpu()),
                "rm/score": out.score.float()}
        if out.map is not None:
            vals["rm/map_mean"] = out.map.flatten(1).mean(1)
            vals["rm/map_area"] = (out.map > MAP_THRESHOLD).float().flatten(1).mean(1)
        for k, v in vals.items():
            sums[k] = sums.get(k, 0.0) + float(v.double().cpu().sum())
        n += lr.shape[0]
    res = {k: v / n for k, v in sums.items()}
    bad = [k for k, v in res.items() if not math.isfinite(v)]
    if bad:
        log.warning("non-finite means for %s (a metric failed on some image)", bad)
    res["images"] = n
    return res
