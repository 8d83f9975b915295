"""The SR zoo: every SR family the data engine can draw from, by name.

Families come from three literal dicts (real ncnn networks, interpolation, procedural artifacts);
a user's own model joins through :func:`user_family`. Group names select several at once.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from finpercep.types import Params, SRFamily


def sr_families() -> dict[str, SRFamily]:
    """All built-in SR families, name -> :class:`SRFamily` (real, interpolation, procedural)."""
    from finpercep.data.artifacts import INTERPOLATION_FAMILIES, PROCEDURAL_FAMILIES
    from finpercep.data.ncnn_models import REAL_FAMILIES
    from finpercep.data.negatives import NEGATIVE_FAMILIES

    return {**REAL_FAMILIES, **INTERPOLATION_FAMILIES, **PROCEDURAL_FAMILIES, **NEGATIVE_FAMILIES}


# Group names usable wherever a list of families is asked for.
FAMILY_GROUPS: dict[str, str] = {
    "all": "every built-in SR family (real, interpolation, procedural; not the negative edits)",
    "real": "real pretrained SR networks (ncnn)",
    "interpolation": "classic interpolation",
    "procedural": "procedural generative-SR artifacts",
    "negative": "negative edits of the HR photo (darker, blurred, flat, ...) a reward must rank below it",
}


def resolve_families(spec: str | list[str] | tuple[str, ...], scale: int) -> list[SRFamily]:
    """Turn ``"realesrgan,halo"`` / ``["real", "bicubic"]`` into families, checking names and scale.

    Raises ValueError naming the unknown entry and listing the valid names.
    """
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    if not names:
        raise ValueError("no SR family given; use e.g. --families all or --families realesrgan,bicubic")
    zoo = sr_families()
    out: list[SRFamily] = []
    for name in names:
        if name in FAMILY_GROUPS:
            picked = [f for f in zoo.values() if (name == "all" and f.kind != "negative") or f.kind == name]
        elif name in zoo:
            picked = [zoo[name]]
        else:
            valid = ", ".join(list(FAMILY_GROUPS) + sorted(zoo))
            raise ValueError(f"unknown SR family {name!r}; valid names: {valid}")
        for fam in picked:
            if fam not in out:
                out.append(fam)
    bad = [f.name for f in out if scale not in f.scales]
    if bad:
        raise ValueError(f"SR families {bad} do not support scale {scale}")
    return out


def user_family(
    name: str, model: Callable[[torch.Tensor], torch.Tensor], scales: tuple[int, ...] = (4,), description: str = ""
) -> SRFamily:
    """Wrap any ``model(lr (B,3,h,w)) -> sr (B,3,h*s,w*s)`` callable (in [0,1]) as an SR family.

    This is how the project's own policies (or any user network) feed the data engine.
    """

    def fn(lr: torch.Tensor, hr: torch.Tensor, scale: int, rng: np.random.Generator) -> tuple[torch.Tensor, Params]:
        with torch.no_grad():
            sr = model(lr.unsqueeze(0))
        if sr.ndim != 4 or sr.shape[0] != 1 or tuple(sr.shape[1:]) != tuple(hr.shape):
            raise ValueError(
                f"user SR model {name!r} returned shape {tuple(sr.shape)} for LR {tuple(lr.shape)}; "
                f"expected (1, {hr.shape[0]}, {hr.shape[1]}, {hr.shape[2]}) at scale {scale}"
            )
        return sr[0].float().clamp(0, 1), {"model": name}

    return SRFamily(name=name, kind="user", description=description or f"user model {name}", fn=fn, scales=scales)
