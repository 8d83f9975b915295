"""Edit checks and the whole-SR check: does a reward rank a clean photo above simple edits of it and
above a real SR network's output? (needs no data set, only photos.)

A reward that is to steer an SR policy must never prefer an image that carries *less* of the photo:
the photo darkened, its mid-tones crushed, over-saturated, blurred, flattened to its mean colour or
black. Nor may it prefer a whole real-SR output over the HR it was made from: the ranking loss of
arXiv 2512.22647 (Sec. 3, ``L_rank``: ``S(I_SR) < S(I_syn) < S(I_GT)``) asks exactly that.

Pieces (all pure functions of tensors and explicit generators):

- :data:`EDITS` / :func:`edit_images`: the six fixed edits of a ``(B, 3, H, W)`` batch;
- :func:`lr_of` / :func:`sr_scale` / :func:`real_sr_outputs`: the LR of an HR crop (bicubic,
  anti-aliased, 8-bit) and the whole SR output of each real SR family;
- :func:`check_variants`: per variant (an edit, an SR family), the fraction of images whose score
  is strictly below the reference's and the mean score gap, with 95 % bootstrap intervals
  (:func:`bootstrap_ci`).

``ScoreFn``: ``fn(x (B, 3, H, W) in [0, 1]) -> (B,)`` scores, higher = better (for a FinPercep-RM:
``lambda x: model(x).score``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from finpercep.checks import check_image_batch
from finpercep.types import SRFamily

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
"""``fn(x (B, 3, H, W) float in [0, 1]) -> (B,)`` scores, higher = better."""

EDIT_TARGET = 0.98
"""Issue #11, must reach: the clean photo scores strictly above each edit on at least this share of
photos (goal: all of them)."""

WHOLE_SR_TARGET = 0.95
"""Issue #11, must reach: the HR scores strictly above the whole output of every real SR family on at
least this share of photos (goal: all of them)."""

DARKEN_FACTOR = 0.5
GAMMA = 2.2
SATURATION_FACTOR = 1.6
BLUR_SIZE = 5
_LUMA = (0.299, 0.587, 0.114)  # BT.601, as finpercep.data.negatives


def darken(x: torch.Tensor) -> torch.Tensor:
    """Half the exposure: ``0.5 * x``."""
    return x * DARKEN_FACTOR


def gamma(x: torch.Tensor) -> torch.Tensor:
    """Gamma 2.2 on the encoded values: ``x ** 2.2`` (mid-tones darker, black and white kept)."""
    return x.clamp(0, 1) ** GAMMA


def saturate(x: torch.Tensor) -> torch.Tensor:
    """Chroma x1.6 around the BT.601 luma ``Y``: ``clamp(Y + 1.6 (x - Y), 0, 1)`` (grey pixels kept)."""
    y = sum(w * x[:, c : c + 1] for c, w in enumerate(_LUMA))  # (B, 1, H, W)
    return (y + SATURATION_FACTOR * (x - y)).clamp(0, 1)


def box_blur(x: torch.Tensor) -> torch.Tensor:
    """5x5 box blur, reflected border (a zero border would also darken the edges)."""
    p = BLUR_SIZE // 2
    return F.avg_pool2d(F.pad(x, (p, p, p, p), mode="reflect"), BLUR_SIZE, stride=1)


def mean_colour(x: torch.Tensor) -> torch.Tensor:
    """Every pixel set to the image's mean colour (all structure gone, photometry kept)."""
    return x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()


def black(x: torch.Tensor) -> torch.Tensor:
    """All zeros."""
    return torch.zeros_like(x)


EDITS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "darken x0.5": darken,
    "gamma 2.2": gamma,
    "saturate x1.6": saturate,
    "blur 5x5 box": box_blur,
    "mean colour": mean_colour,
    "black": black,
}
"""Name -> edit, one literal dict: the photometric and information-removing edits a reward must rank
below the photo. Each maps ``(B, 3, H, W)`` in [0, 1] to the same shape in [0, 1], per image (no batch
statistics), deterministically."""


def edit_images(
    x: torch.Tensor, edits: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] = EDITS
) -> dict[str, torch.Tensor]:
    """Every edit of the batch ``x`` ``(B, 3, H, W)`` float in [0, 1] (H, W >= 3 for the blur's
    reflection): ``{name: (B, 3, H, W)}`` in [0, 1], same dtype. Raises ValueError for a bad batch."""
    x = check_image_batch(x, "edit_images", min_size=BLUR_SIZE // 2 + 1)
    return {name: fn(x) for name, fn in edits.items()}


# ---------------------------------------------------------------------------------------------
# Statistics


def bootstrap_ci(
    values: torch.Tensor, generator: torch.Generator | None = None, n_boot: int = 1000, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` ``(N,)``: ``n_boot`` resamples of N
    with replacement drawn from ``generator``; returns ``(lo, hi)``, the ``(1 -+ level) / 2``
    quantiles of the resampled means. One value gives ``(v, v)``; an empty tensor raises ValueError."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() == 0:
        raise ValueError("bootstrap_ci: no values")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_ci: level must be in (0, 1), got {level}")
    idx = torch.randint(v.numel(), (n_boot, v.numel()), generator=generator)
    means = v[idx].mean(dim=1)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(means, q).tolist()
    return float(lo), float(hi)


@dataclass(frozen=True)
class ScoreCheck:
    """How often a variant scores strictly below its reference, over ``n`` images.

    ``below``: fraction with ``S(variant) < S(reference)`` (ties fail), ``below_ci`` its 95 %
    bootstrap interval. ``gap``: mean ``S(reference) - S(variant)`` (positive = ranked right),
    ``gap_ci`` its interval. ``score_ref`` / ``score_variant``: the mean scores.
    """

    n: int
    below: float
    below_ci: tuple[float, float]
    gap: float
    gap_ci: tuple[float, float]
    score_ref: float
    score_variant: float

    def to_json(self) -> dict[str, object]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def compare_scores(
    s_ref: torch.Tensor, s_variant: torch.Tensor, generator: torch.Generator | None = None, n_boot: int = 1000
) -> ScoreCheck:
    """:class:`ScoreCheck` of paired scores ``s_ref``, ``s_variant`` ``(N,)`` (image i's reference and
    variant). Raises ValueError for unpaired or empty inputs."""
    a = torch.as_tensor(s_ref, dtype=torch.float64).flatten()
    b = torch.as_tensor(s_variant, dtype=torch.float64).flatten()
    if a.numel() == 0 or a.shape != b.shape:
        raise ValueError(f"compare_scores: need paired non-empty scores, got {tuple(a.shape)} and {tuple(b.shape)}")
    below = (b < a).double()
    gap = a - b
    return ScoreCheck(
        n=a.numel(), below=float(below.mean()), below_ci=bootstrap_ci(below, generator, n_boot),
        gap=float(gap.mean()), gap_ci=bootstrap_ci(gap, generator, n_boot),
        score_ref=float(a.mean()), score_variant=float(b.mean()),
    )


@torch.no_grad()
def score_batches(score_fn: ScoreFn, x: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """``score_fn`` over ``x`` ``(N, 3, H, W)`` in chunks of ``batch_size``, without gradients:
    ``(N,)`` float64 on the CPU. Raises ValueError when ``score_fn`` does not return one score per image."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for i in range(0, x.shape[0], batch_size):
        chunk = x[i : i + batch_size]
        s = torch.as_tensor(score_fn(chunk))
        if s.shape != (chunk.shape[0],):
            raise ValueError(f"score_fn must return ({chunk.shape[0]},) scores for a batch of {chunk.shape[0]}, "
                             f"got shape {tuple(s.shape)}")
        out.append(s.detach().double().cpu())
    return torch.cat(out)


def check_variants(
    score_fn: ScoreFn,
    ref: torch.Tensor,
    variants: Mapping[str, torch.Tensor],
    *,
    batch_size: int = 16,
    generator: torch.Generator | None = None,
    n_boot: int = 1000,
) -> dict[str, ScoreCheck]:
    """Score ``ref`` ``(N, 3, H, W)`` and each variant batch (same shape, image i a version of
    ``ref[i]``) and compare: ``{name: ScoreCheck}`` (the fraction strictly below the reference).

    The edit check is ``check_variants(fn, x, edit_images(x))``; the whole-SR check
    ``check_variants(fn, hr, real_sr_outputs(hr, families, rng))``. Raises ValueError for a variant
    of another shape.
    """
    ref = check_image_batch(ref, "check_variants: ref")
    for name, v in variants.items():
        if tuple(v.shape) != tuple(ref.shape):
            raise ValueError(f"check_variants: variant {name!r} has shape {tuple(v.shape)}, ref {tuple(ref.shape)}")
    s_ref = score_batches(score_fn, ref, batch_size)
    return {name: compare_scores(s_ref, score_batches(score_fn, v, batch_size), generator, n_boot)
            for name, v in variants.items()}


# ---------------------------------------------------------------------------------------------
# Whole real-SR outputs

WHOLE_SR_SCALES: dict[str, int] = {"waifu2x": 2}
"""SR family -> the scale of its whole-SR check where it is not x4: waifu2x is a native x2 network
(x4 would be two passes), so it gets an x2 LR. Every other family: x4 (or its largest scale)."""


def sr_scale(family: SRFamily) -> int:
    """The upscaling factor :func:`real_sr_outputs` uses for ``family`` (:data:`WHOLE_SR_SCALES`)."""
    want = WHOLE_SR_SCALES.get(family.name, 4)
    return want if want in family.scales else max(family.scales)


def lr_of(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """The LR of an HR batch ``(B, 3, H, W)`` in [0, 1], H and W divisible by ``scale``: bicubic,
    anti-aliased downscale by ``scale``, clamped and rounded to 8 bits as an LR file would be.
    Returns ``(B, 3, H / scale, W / scale)`` float32. Raises ValueError for a size not divisible."""
    hr = check_image_batch(hr, "lr_of")
    h, w = hr.shape[-2:]
    if scale < 1 or h % scale or w % scale:
        raise ValueError(f"lr_of: HR size {h}x{w} must be divisible by the scale {scale}")
    lr = F.interpolate(hr.float(), size=(h // scale, w // scale), mode="bicubic", antialias=True, align_corners=False)
    return lr.clamp(0, 1).mul(255).round().div(255)


def real_sr_outputs(
    hr: torch.Tensor,
    families: Sequence[SRFamily],
    rng: np.random.Generator,
    on_image: Callable[[str, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """The whole SR output of each family for each HR image: ``{family name: (B, 3, H, W)}`` in
    [0, 1]. Image i of family f is ``f.fn(lr_of(hr, s)[i], hr[i], s, rng)`` with ``s = sr_scale(f)``;
    ``rng`` feeds the families' random choices (waifu2x's denoise level). ``on_image(name, i)`` is
    called after each image (progress). Raises ValueError when a family returns another size."""
    hr = check_image_batch(hr, "real_sr_outputs")
    out: dict[str, torch.Tensor] = {}
    for fam in families:
        s = sr_scale(fam)
        lr = lr_of(hr, s)
        srs = []
        for i in range(hr.shape[0]):
            sr, _ = fam.fn(lr[i], hr[i], s, rng)
            if tuple(sr.shape) != tuple(hr.shape[1:]):
                raise ValueError(f"SR family {fam.name!r} returned {tuple(sr.shape)} for HR {tuple(hr.shape[1:])}")
            srs.append(sr.float().clamp(0, 1))
            if on_image is not None:
                on_image(fam.name, i)
        out[fam.name] = torch.stack(srs)
    return out


__all__ = [
    "EDITS", "EDIT_TARGET", "WHOLE_SR_SCALES", "WHOLE_SR_TARGET", "ScoreCheck", "ScoreFn", "black", "bootstrap_ci", "box_blur",
    "check_variants", "compare_scores", "darken", "edit_images", "gamma", "lr_of", "mean_colour", "real_sr_outputs",
    "saturate", "score_batches", "sr_scale",
]
