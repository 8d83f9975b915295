"""Confidence intervals for the hacking experiment: means over training seeds and evaluation images.

An arm of the experiment gives one value per (seed, evaluation image): a ``(S, N)`` array. Both
are random draws (training runs, photos), so the interval of its mean must cover the spread between
runs as well as between images. With the few seeds CPU budgets allow (3), a bootstrap that
resamples the seeds is far too narrow (3 values have 10 distinct resamples and their spread is
underestimated by ``(S - 1) / S``), so
:func:`mean_interval` adds the two parts of the variance instead:

- the **seed** part, Student's t over the per-seed means (``S - 1`` degrees of freedom);
- the **image** part, a percentile bootstrap over the per-image means (averaged over seeds;
  :func:`bootstrap_ci`, Efron and Tibshirani 1993, ch. 13);

and takes ``mean -+ sqrt(seed half-width^2 + image half-width^2)`` on each side. The per-seed
means also carry image noise, so the sum errs wide. Arms share seeds and images, so the
difference of two arms is taken per (seed, image) first (:func:`paired_difference`). A statistic
with one value per seed (a reward curve's stability) gets the t interval alone
(:func:`seed_interval`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

N_BOOT = 10_000
"""Bootstrap resamples per interval."""


@dataclass(frozen=True)
class Interval:
    """A mean and its confidence interval ``[lo, hi]`` at ``level``."""

    mean: float
    lo: float
    hi: float
    level: float = 0.95

    def excludes_zero(self) -> bool:
        """Whether the interval lies strictly on one side of 0."""
        return self.lo > 0 or self.hi < 0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _check(v: np.ndarray, who: str, level: float) -> None:
    if v.size == 0:
        raise ValueError(f"{who}: values must be non-empty, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError(f"{who}: values must be finite")
    if not 0 < level < 1:
        raise ValueError(f"{who}: level must be in (0, 1), got {level}")


def bootstrap_ci(values: np.ndarray | list, *, level: float = 0.95, n_boot: int = N_BOOT, seed: int = 0) -> Interval:
    """Mean of ``values`` ``(N,)`` and its percentile bootstrap interval (the values resampled
    with replacement ``n_boot`` times; ``seed`` makes it reproducible). One value: ``lo == hi``.
    Raises ``ValueError`` for an empty or non-1-D array, a non-finite value or a level outside (0, 1)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"bootstrap_ci: values must be (images,), got shape {v.shape}")
    _check(v, "bootstrap_ci", level)
    counts = np.random.default_rng(seed).multinomial(v.size, np.full(v.size, 1 / v.size), size=n_boot)
    means = counts @ v / v.size
    a = (1 - level) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    return Interval(float(v.mean()), float(min(lo, v.mean())), float(max(hi, v.mean())), level)


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
    _check(v, "seed_interval", level)
    half = float(t.ppf((1 + level) / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return Interval(float(v.mean()), float(v.mean()) - half, float(v.mean()) + half, level)


def mean_interval(values: np.ndarray | list, *, level: float = 0.95, n_boot: int = N_BOOT, seed: int = 0) -> Interval:
    """Mean of a ``(S, N)`` table (seeds x images) with the interval of the module docstring:
    the t half-width over the ``S`` per-seed means (0 for one seed, which then covers the images
    only) and the bootstrap half-widths over the ``N`` per-image means, added in quadrature.
    ``(S,)`` (one value per seed) gives :func:`seed_interval`. Raises ``ValueError`` for an empty
    array, more than 2 dimensions, a non-finite value or a level outside (0, 1)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1 and v.size != 1:
        return seed_interval(v, level=level)
    if v.ndim == 1:
        _check(v, "mean_interval", level)
        return Interval(float(v[0]), float(v[0]), float(v[0]), level)
    if v.ndim != 2:
        raise ValueError(f"mean_interval: values must be (seeds,) or (seeds, images), got shape {v.shape}")
    _check(v, "mean_interval", level)
    m = float(v.mean())
    seeds = seed_interval(v.mean(1), level=level) if v.shape[0] > 1 else Interval(m, m, m, level)
    images = bootstrap_ci(v.mean(0), level=level, n_boot=n_boot, seed=seed)
    hs = seeds.hi - m
    lo = m - float(np.hypot(hs, m - images.lo))
    hi = m + float(np.hypot(hs, images.hi - m))
    return Interval(m, lo, hi, level)


def paired_difference(a: np.ndarray | list, b: np.ndarray | list, **kwargs) -> Interval:
    """Interval of ``mean(a - b)`` for arms measured on the same seeds and images: ``a`` and
    ``b`` of one shape ``(S, N)`` or ``(S,)``, differenced per entry, then :func:`mean_interval`.
    Raises ``ValueError`` for different shapes."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: the arms must share seeds and images, got shapes {a.shape} and {b.shape}")
    return mean_interval(a - b, **kwargs)
