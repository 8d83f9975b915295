"""Bootstrap confidence intervals for the hacking experiment: means over seeds and images.

An arm of the experiment gives one value per (seed, evaluation image): a ``(S, N)`` array. Its
mean's interval comes from a two-way bootstrap that resamples the seeds and the images
independently (both are random draws: training runs and photos), so the interval covers the
spread between training runs as well as between images. Arms share seeds and images, so the
difference of two arms is taken per (seed, image) first and bootstrapped the same way
(:func:`paired_difference`). Percentile intervals (Efron and Tibshirani 1993, ch. 13).

A statistic with one value per seed (a reward curve's stability) has only a handful of values,
too few for a percentile bootstrap (with 3 values it covers far less than its level), so its
interval is Student's t (:func:`seed_interval`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

N_BOOT = 10_000
"""Bootstrap resamples per interval."""


@dataclass(frozen=True)
class Interval:
    """A mean and its bootstrap confidence interval ``[lo, hi]`` at ``level``."""

    mean: float
    lo: float
    hi: float
    level: float = 0.95

    def excludes_zero(self) -> bool:
        """Whether the interval lies strictly on one side of 0."""
        return self.lo > 0 or self.hi < 0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def bootstrap_ci(values: np.ndarray | list, *, level: float = 0.95, n_boot: int = N_BOOT, seed: int = 0) -> Interval:
    """Mean of ``values`` and its percentile bootstrap interval.

    Args:
        values: ``(S, N)`` (seeds x images: seeds and images resampled independently, the same
            image draw for every seed) or ``(S,)`` (one value per seed: seeds resampled).
        level: coverage of the interval, in (0, 1).
        n_boot: resamples. seed: of the resampling, so an interval is reproducible.

    Returns:
        :class:`Interval`; with a single seed and a single image, ``lo == hi == mean``.

    Raises:
        ValueError: for an empty array, more than 2 dimensions, a non-finite value or a level
            outside (0, 1).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = v[:, None]
    if v.ndim != 2 or v.size == 0:
        raise ValueError(f"bootstrap_ci: values must be (seeds,) or (seeds, images) and non-empty, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("bootstrap_ci: values must be finite")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_ci: level must be in (0, 1), got {level}")
    s, n = v.shape
    rng = np.random.default_rng(seed)
    # a resample draws S seeds and N images with replacement: as counts, (n_boot, S) and (n_boot, N);
    # its mean over the crossed (seed, image) table is cs @ v @ cn / (S N)
    cs = rng.multinomial(s, np.full(s, 1 / s), size=n_boot)
    cn = rng.multinomial(n, np.full(n, 1 / n), size=n_boot)
    means = np.einsum("bs,sn,bn->b", cs, v, cn) / (s * n)
    a = (1 - level) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    return Interval(float(v.mean()), float(lo), float(hi), level)


def seed_interval(values: np.ndarray | list, *, level: float = 0.95) -> Interval:
    """Mean of one value per seed with Student's t interval ``mean +- t_{S-1} s / sqrt(S)``.

    Args:
        values: ``(S,)``, ``S >= 2`` finite values (one per seed). level: in (0, 1).

    Raises:
        ValueError: for fewer than 2 values, another shape, a non-finite value or a bad level.
    """
    from scipy.stats import t

    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size < 2:
        raise ValueError(f"seed_interval: needs (seeds,) with at least 2 seeds, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("seed_interval: values must be finite")
    if not 0 < level < 1:
        raise ValueError(f"seed_interval: level must be in (0, 1), got {level}")
    half = float(t.ppf((1 + level) / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return Interval(float(v.mean()), float(v.mean()) - half, float(v.mean()) + half, level)


def paired_difference(a: np.ndarray | list, b: np.ndarray | list, **kwargs) -> Interval:
    """Interval of ``mean(a - b)`` for arms measured on the same seeds and images: ``a`` and
    ``b`` of one shape ``(S, N)`` or ``(S,)``, differenced per entry, then :func:`bootstrap_ci`.
    Raises ``ValueError`` for different shapes."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: the arms must share seeds and images, got shapes {a.shape} and {b.shape}")
    return bootstrap_ci(a - b, **kwargs)
