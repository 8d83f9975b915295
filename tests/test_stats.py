"""Bootstrap intervals of the hacking experiment on known cases."""

from __future__ import annotations

import numpy as np
import pytest

from finpercep.eval.stats import Interval, bootstrap_ci, paired_difference, seed_interval


def test_large_sample_interval_is_the_normal_one():
    v = np.random.default_rng(1).normal(2.0, 1.5, size=(1, 4000))
    iv = bootstrap_ci(v, n_boot=4000)
    half = 1.96 * v.std() / np.sqrt(v.size)
    assert iv.mean == pytest.approx(v.mean())
    assert iv.lo == pytest.approx(v.mean() - half, abs=0.15 * half)
    assert iv.hi == pytest.approx(v.mean() + half, abs=0.15 * half)


def test_coverage_is_about_the_level():
    rng = np.random.default_rng(2)
    covered = 0
    for i in range(300):
        iv = bootstrap_ci(rng.normal(0.0, 1.0, size=(1, 60)), n_boot=1000, seed=i)
        covered += iv.lo < 0 < iv.hi
    assert 0.90 <= covered / 300 <= 0.98


def test_seed_spread_widens_the_interval():
    rng = np.random.default_rng(3)
    images = rng.normal(0, 1, size=64)
    same = np.tile(images, (3, 1))
    shifted = same + np.array([[-1.0], [0.0], [1.0]])  # the seeds disagree by a whole unit
    a, b = bootstrap_ci(same), bootstrap_ci(shifted)
    assert a.mean == pytest.approx(b.mean)
    assert (b.hi - b.lo) > 2 * (a.hi - a.lo)


def test_paired_difference_cancels_what_the_arms_share():
    rng = np.random.default_rng(4)
    base = rng.normal(0, 5, size=(3, 64))  # large spread between images, shared by both arms
    better = base + 0.3 + rng.normal(0, 0.05, size=base.shape)
    d = paired_difference(better, base)
    assert d.mean == pytest.approx(0.3, abs=0.02) and d.lo > 0.25 and d.excludes_zero()
    unpaired = bootstrap_ci(better)
    assert unpaired.hi - unpaired.lo > 10 * (d.hi - d.lo)  # the images' spread would swamp the difference
    assert paired_difference(base, base) == Interval(0.0, 0.0, 0.0)


def test_one_value_per_seed_and_degenerate_cases():
    iv = bootstrap_ci([1.0, 2.0, 3.0], n_boot=2000)
    assert iv.mean == 2.0 and 1.0 <= iv.lo < 2.0 < iv.hi <= 3.0
    assert bootstrap_ci([[5.0]]) == Interval(5.0, 5.0, 5.0)
    assert bootstrap_ci(np.ones((3, 4)), seed=7) == bootstrap_ci(np.ones((3, 4)), seed=7)


@pytest.mark.parametrize("values, words", [
    (np.zeros((0, 3)), "non-empty"), (np.zeros((2, 2, 2)), "seeds, images"), ([1.0, np.nan], "finite"),
])
def test_bad_input(values, words):
    with pytest.raises(ValueError, match=words):
        bootstrap_ci(values)


def test_bad_level_and_unpaired_arms():
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([1.0, 2.0], level=1.5)
    with pytest.raises(ValueError, match="share seeds and images"):
        paired_difference(np.zeros((3, 4)), np.zeros((2, 4)))


def test_seed_interval_is_students_t():
    iv = seed_interval([1.0, 2.0, 3.0])
    # mean 2, s = 1, t_{0.975, 2} = 4.303: half-width 4.303 / sqrt(3) = 2.484
    assert iv.mean == 2.0 and iv.lo == pytest.approx(2 - 2.4843, abs=1e-3) and iv.hi == pytest.approx(2 + 2.4843, abs=1e-3)
    wide = seed_interval([1.0, 2.0, 3.0], level=0.99)
    assert wide.lo < iv.lo and wide.hi > iv.hi
    with pytest.raises(ValueError, match="at least 2 seeds"):
        seed_interval([1.0])
    with pytest.raises(ValueError, match="finite"):
        seed_interval([1.0, np.inf])
