"""Negative edits: photometric changes and information removal that a reward must never prefer.

A reward model trained only on SR artifacts can learn photo statistics instead ("texture and grain
are bad"), and then rates a darker, blurrier, more saturated or even constant image above the
photo: exactly what an RL policy learns to exploit. These edits enter the data engine as SR
families of kind ``"negative"``: the "SR output" is the HR photo with the edit, so the region swap
``I_syn = B * I_edit + (1 - B) * I_GT`` (arXiv 2512.22647, Sec. 3.1) gives a regional edit, the
whole edited image gives the whole-image version, and the ranking loss asks for
``S(HR) > S(syn) > S(edit)`` like for any family. Their ground-truth maps come from the same
pixel + feature difference as every family.

Every edit follows the artifact contract of :mod:`finpercep.data.artifacts`:
``fn(img (3, H, W) float in [0, 1], severity in [0, 1], rng) -> (out, params)``; severity 0 is the
identity; the mean absolute change grows with severity; random choices (direction, target colour)
do not depend on severity; ``params`` holds every choice as JSON values. At severity 1 each edit is
stronger than the checks the shipped model must pass (darkening x0.5, gamma 2.2, saturation x1.6,
a 5x5 blur, the mean colour, black), so those checks lie inside the training range.
"""

from __future__ import annotations

import numpy as np
import torch

from finpercep.checks import require
from finpercep.data.artifacts import _check, _gauss, _identity, _luma, _to_tensor, procedural_family
from finpercep.types import Params, SRFamily

# The families are drawn with severity ~ U[NEGATIVE_SEVERITY_RANGE]: weak edits are the hard cases
# (a 10 % darkening is what a policy tries first), strong ones anchor the direction.
NEGATIVE_SEVERITY_RANGE = (0.1, 1.0)


def exposure(img: torch.Tensor, severity: float, rng: np.random.Generator) -> tuple[torch.Tensor, Params]:
    """Exposure change: the image scaled by ``1 - 0.7 s`` (darker, 9 in 10 draws) or ``1 + s``
    (brighter, clipped: highlights lose detail)."""
    x = _check(img, severity, rng)
    darker = bool(rng.random() < 0.9)
    factor = 1.0 - 0.7 * severity if darker else 1.0 + severity
    params: Params = {"direction": "darker" if darker else "brighter", "factor": float(factor)}
    return (_identity(img) if severity == 0 else _to_tensor(x * factor, img)), params


def gamma(img: torch.Tensor, severity: float, rng: np.random.Generator) -> tuple[torch.Tensor, Params]:
    """Gamma curve ``x ** g`` with ``g = 1 + 2 s`` (darker mid-tones, 3 in 4 draws) or ``1 / (1 + 2 s)``."""
    x = _check(img, severity, rng)
    darker = bool(rng.random() < 0.75)
    g = 1.0 + 2.0 * severity if darker else 1.0 / (1.0 + 2.0 * severity)
    params: Params = {"gamma": float(g)}
    return (_identity(img) if severity == 0 else _to_tensor(np.power(np.clip(x, 0, 1), g), img)), params


def saturation(img: torch.Tensor, severity: float, rng: np.random.Generator) -> tuple[torch.Tensor, Params]:
    """Saturation change around the BT.601 luma: chroma scaled by ``1 + 1.5 s`` (3 in 4 draws) or
    ``1 - s`` (towards grey)."""
    x = _check(img, severity, rng)
    up = bool(rng.random() < 0.75)
    factor = 1.0 + 1.5 * severity if up else 1.0 - severity
    params: Params = {"factor": float(factor)}
    if severity == 0:
        return _identity(img), params
    y = _luma(x)[..., None]
    return _to_tensor(y + factor * (x - y), img), params


def contrast(img: torch.Tensor, severity: float, rng: np.random.Generator) -> tuple[torch.Tensor, Params]:
    """Contrast change around the image's mean luma: scaled by ``1 - 0.7 s`` (flatter, 2 in 3
    draws) or ``1 + s`` (harsher, clipped)."""
    x = _check(img, severity, rng)
    lower = bool(rng.random() < 2 / 3)
    factor = 1.0 - 0.7 * severity if lower else 1.0 + severity
    params: Params = {"factor": float(factor)}
    if severity == 0:
        return _identity(img), params
    m = float(_luma(x).mean())
    return _to_tensor(m + factor * (x - m), img), params


def blur(img: torch.Tensor, severity: float, rng: np.random.Generator) -> tuple[torch.Tensor, Params]:
    """Gaussian blur with sigma ``0.6 + 2.4 s`` pixels (a 5x5 box blur is about sigma 1.4): lost
    detail. Below sigma ~0.6 a blur changes little more than rounding, so the range starts there."""
    x = _check(img, severity, rng)
    sigma = 0.6 + 2.4 * severity
    params: Params = {"sigma": float(sigma)}
    return (_identity(img) if severity == 0 else _to_tensor(_gauss(x, sigma), img)), params


def plastic(img: torch.Tensor, severity: float, rng: np.random.Generator) -> tuple[torch.Tensor, Params]:
    """Denoiser-style "plastic" texture: an edge-preserving bilateral filter, applied twice, that
    wipes fine texture and keeps edges (over-smoothed SR and strong denoising), blended in with
    weight ``s``."""
    x = _check(img, severity, rng)
    cv2 = require("cv2", extra="data")
    sigma_color = float(rng.uniform(0.08, 0.2))
    params: Params = {"sigma_color": sigma_color, "sigma_space": 5.0, "passes": 2, "weight": float(severity)}
    if severity == 0:
        return _identity(img), params
    smooth = x
    for _ in range(2):
        smooth = cv2.bilateralFilter(np.ascontiguousarray(smooth), d=9, sigmaColor=sigma_color, sigmaSpace=5.0)
    return _to_tensor(x + severity * (smooth - x), img), params


def flatten(img: torch.Tensor, severity: float, rng: np.random.Generator) -> tuple[torch.Tensor, Params]:
    """Flat colour: the image pulled towards its own mean colour with weight ``s`` (at 1 every pixel
    is the mean colour: all information gone)."""
    x = _check(img, severity, rng)
    mean = x.reshape(-1, 3).mean(0)
    params: Params = {"mean": [float(v) for v in mean], "weight": float(severity)}
    return (_identity(img) if severity == 0 else _to_tensor(x + severity * (mean - x), img)), params


_CONSTANTS = {"black": (0.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0), "grey": (0.5, 0.5, 0.5)}


def constant(img: torch.Tensor, severity: float, rng: np.random.Generator) -> tuple[torch.Tensor, Params]:
    """A constant colour (black, white, grey or a random colour) blended in with weight ``s``."""
    x = _check(img, severity, rng)
    kind = str(rng.choice(["black", "white", "grey", "random"]))
    colour = np.array(_CONSTANTS.get(kind) or rng.uniform(0, 1, 3), dtype=np.float32)
    params: Params = {"kind": kind, "colour": [float(v) for v in colour], "weight": float(severity)}
    return (_identity(img) if severity == 0 else _to_tensor(x + severity * (colour - x), img)), params


NEGATIVE_EDITS = {
    "exposure": exposure,
    "gamma": gamma,
    "saturation": saturation,
    "contrast": contrast,
    "blur": blur,
    "plastic": plastic,
    "flatten": flatten,
    "constant": constant,
}
"""Name -> edit, one literal dict (read by the SR zoo and the contract tests)."""


def negative_family(name: str, severity_range: tuple[float, float] = NEGATIVE_SEVERITY_RANGE) -> SRFamily:
    """The SR family of negative edit ``name`` (kind ``"negative"``), severity ~ U(severity_range)."""
    if name not in NEGATIVE_EDITS:
        raise ValueError(f"unknown negative edit {name!r}; choose one of {sorted(NEGATIVE_EDITS)}")
    fam = procedural_family(name, severity_range, artifacts=NEGATIVE_EDITS)
    return SRFamily(name=fam.name, kind="negative", description=fam.description, fn=fam.fn, scales=fam.scales,
                    uses_hr=True, cost="cheap", licence=fam.licence)


NEGATIVE_FAMILIES: dict[str, SRFamily] = {name: negative_family(name) for name in NEGATIVE_EDITS}
"""One SR family per negative edit, severity ~ U[0.1, 1.0]."""


def random_negative_edits(
    hr: torch.Tensor, rng: np.random.Generator, severity_range: tuple[float, float] = NEGATIVE_SEVERITY_RANGE
) -> tuple[torch.Tensor, list[str]]:
    """One random negative edit of every image of a batch, for the reward model's edit-ranking term
    (``RMTrainConfig.edit_negatives``; ours).

    ``hr`` ``(B, 3, H, W)`` float in [0, 1] (H, W >= 16); for each image an edit of
    :data:`NEGATIVE_EDITS` (uniform) at severity ~ ``U(severity_range)``, all drawn from ``rng`` in
    image order, so the result depends only on ``rng``'s state and the images. Returns the edited
    batch ``(B, 3, H, W)`` float32 in [0, 1] on ``hr``'s device and the edit names.
    """
    if not isinstance(hr, torch.Tensor) or hr.ndim != 4 or hr.shape[1] != 3:
        raise ValueError(f"random_negative_edits: expected a (B, 3, H, W) tensor, got {getattr(hr, 'shape', type(hr))}")
    names = list(NEGATIVE_EDITS)
    out, chosen = [], []
    for img in hr.detach().float().cpu():
        name = names[int(rng.integers(len(names)))]
        severity = float(rng.uniform(*severity_range))
        out.append(NEGATIVE_EDITS[name](img, severity, rng)[0])
        chosen.append(name)
    return torch.stack(out).to(hr.device), chosen
