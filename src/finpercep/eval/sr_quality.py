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
    "rm/score": "up", "rm/map_mean": "down", "rm/map_area": "down", "damage/area": "down", "damage/mean": "down",
}
"""Metric -> ``up`` (higher is better) or ``down``. ``damage/*`` only come from
:func:`evaluate_sr_per_image` with a ``reference``."""


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
    deterministic mean path. The values per image: :func:`evaluate_sr_per_image`."""
    per = evaluate_sr_per_image(policy, pairs, indices, judge=judge, device=device, batch=batch, sample=sample,
                                progress=progress)
    res = {k: float(sum(v) / len(v)) for k, v in per.items()}
    bad = [k for k, v in res.items() if not math.isfinite(v)]
    if bad:
        log.warning("non-finite means for %s (a metric failed on some image)", bad)
    res["images"] = len(indices)
    return res


@torch.no_grad()
def evaluate_sr_per_image(
    policy: nn.Module,
    pairs: Any,
    indices: list[int],
    *,
    judge: nn.Module | None = None,
    reference: nn.Module | None = None,
    device: str = "cpu",
    batch: int = 4,
    sample: torch.Generator | None = None,
    progress: bool = False,
) -> dict[str, list[float]]:
    """:func:`evaluate_sr`'s measures, one value per image (in the order of ``indices``).

    ``reference``: a policy whose output on the same LR (the same sampling noise for a
    stochastic one) is the baseline of the independent local-damage judge
    (:mod:`finpercep.eval.damage`): adds ``damage/area`` (share of pixels clearly less faithful
    to HR than the reference's) and ``damage/mean`` (mean of the map). Raises ``ValueError`` for
    an empty ``indices``."""
    from finpercep.baselines import STLPIPS, brisque, niqe, piqe
    from finpercep.eval.damage import damaged_area, local_damage_map
    from finpercep.reward.api import load_reward

    if not indices:
        raise ValueError("evaluate_sr: no images to evaluate (indices is empty)")
    judge = (judge or load_reward()).to(device).eval()
    lpips = STLPIPS("alex").to(device).eval()
    policy = policy.to(device).eval()
    if reference is not None:
        reference = reference.to(device).eval()
    vals: dict[str, list[float]] = {}
    it = range(0, len(indices), batch)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"eval {getattr(policy, 'name', '')}", unit="batch")
    for a in it:
        lr, hr = (torch.stack(t).to(device) for t in zip(*(pairs.pair(i) for i in indices[a : a + batch])))
        noise = sample.get_state() if sample is not None else None
        sr = (policy.sample(lr, sample).sr if sample is not None else policy(lr)).clamp(0, 1)
        out = judge(sr)
        border = hr.shape[-1] // lr.shape[-1]  # SR papers crop the scale factor at each edge
        v = {"psnr": psnr(sr, hr), "ssim": ssim(sr, hr), "psnr_y": psnr_y(sr, hr, crop_border=border),
             "ssim_y": ssim_y(sr, hr, crop_border=border), "stlpips": lpips(sr, hr),
             "niqe": niqe(sr.cpu()), "brisque": brisque(sr.cpu()), "piqe": piqe(sr.cpu()),
             "rm/score": out.score.float()}
        if out.map is not None:
            v["rm/map_mean"] = out.map.flatten(1).mean(1)
            v["rm/map_area"] = (out.map > MAP_THRESHOLD).float().flatten(1).mean(1)
        if reference is not None:
            if noise is not None:  # the reference draws the same noise as the policy did
                ref = reference.sample(lr, torch.Generator(device=sample.device).set_state(noise)).sr.clamp(0, 1)
            else:
                ref = reference(lr).clamp(0, 1)
            damage = local_damage_map(sr, ref, hr)
            v["damage/area"] = damaged_area(damage)
            v["damage/mean"] = damage.flatten(1).mean(1)
        for k, t in v.items():
            vals.setdefault(k, []).extend(float(x) for x in t.double().cpu().reshape(-1))
    return vals
