"""Confidence intervals of the hacking experiment on known cases."""

from __future__ import annotations

import numpy as np
import pytest

from finpercep.eval.stats import Interval, bootstrap_ci, mean_interval, paired_difference, seed_interval


def test_bootstrap_of_a_large_sample_is_the_normal_interval():
    v = np.random.default_rng(1).normal(2.0, 1.5, size=4000)
    iv = bootstrap_ci(v, n_boot=4000)
    half = 1.96 * v.std() / np.sqrt(v.size)
    assert iv.mean == pytest.approx(v.mean())
    assert iv.lo == pytest.approx(v.mean() - half, abs=0.15 * half)
    assert iv.hi == pytest.approx(v.mean() + half, abs=0.15 * half)


def test_bootstrap_coverage_is_about_the_level():
    rng = np.random.default_rng(2)
    covered = 0
    for i in range(200):
        iv = bootstrap_ci(rng.normal(0.0, 1.0, size=60), n_boot=1000, seed=i)
        covered += iv.lo < 0 < iv.hi
    assert 0.88 <= covered / 200 <= 0.99


@pytest.mark.parametrize("seed_sd, image_sd", [(1.0, 1.0), (1.0, 0.1), (0.1, 1.0)])
def test_seeds_x_images_coverage_with_three_seeds(seed_sd, image_sd):
    """v[s, n] = seed effect + image effect + noise: the true mean 0 is covered about 95 % of the
    time, also when the spread between the 3 training runs dominates (a bootstrap over 3 seeds
    would cover far less)."""
    rng = np.random.default_rng(3)
    covered = 0
    for i in range(200):
        v = rng.normal(0, seed_sd, (3, 1)) + rng.normal(0, image_sd, (1, 64)) + rng.normal(0, 0.3, (3, 64))
        iv = mean_interval(v, n_boot=500, seed=i)
        covered += iv.lo < 0 < iv.hi
    assert covered / 200 >= 0.92


def test_seed_spread_widens_the_interval():
    images = np.random.default_rng(4).normal(0, 1, size=64)
    same = np.tile(images, (3, 1))
    shifted = same + np.array([[-1.0], [0.0], [1.0]])  # the seeds disagree by a whole unit
    a, b = mean_interval(same), mean_interval(shifted)
    assert a.mean == pytest.approx(b.mean)
    assert (b.hi - b.lo) > 5 * (a.hi - a.lo)


def test_paired_difference_cancels_what_the_arms_share():
    rng = np.random.default_rng(5)
    base = rng.normal(0, 5, size=(1, 64)) + rng.normal(0, 2, size=(3, 1))  # images and seeds shared by both arms
    better = base + 0.3 + rng.normal(0, 0.05, size=base.shape)
    d = paired_difference(better, base)
    assert d.mean == pytest.approx(0.3, abs=0.02) and d.lo > 0.2 and d.excludes_zero()
    unpaired = mean_interval(better)
    assert unpaired.hi - unpaired.lo > 10 * (d.hi - d.lo)  # the shared spread would swamp the difference
    assert paired_difference(base, base) == Interval(0.0, 0.0, 0.0)


def test_seed_interval_is_students_t():
    iv = seed_interval([1.0, 2.0, 3.0])
    # mean 2, s = 1, t_{0.975, 2} = 4.303: half-width 4.303 / sqrt(3) = 2.484
    assert iv.mean == 2.0 and iv.lo == pytest.approx(2 - 2.4843, abs=1e-3) and iv.hi == pytest.approx(2 + 2.4843, abs=1e-3)
    assert mean_interval([1.0, 2.0, 3.0]) == iv
    wide = seed_interval([1.0, 2.0, 3.0], level=0.99)
    assert wide.lo < iv.lo and wide.hi > iv.hi


def test_degenerate_cases():
    assert mean_interval([[5.0]]) == Interval(5.0, 5.0, 5.0) == mean_interval([5.0])
    one_seed = mean_interval(np.arange(10.0)[None])  # one seed: the images' interval only
    assert one_seed == bootstrap_ci(np.arange(10.0))
    assert mean_interval(np.ones((3, 4))) == Interval(1.0, 1.0, 1.0)


@pytest.mark.parametrize("fn, values, words", [
    (mean_interval, np.zeros((0, 3)), "non-empty"), (mean_interval, np.zeros((2, 2, 2)), "seeds, images"),
    (mean_interval, [[1.0, np.nan]], "finite"), (bootstrap_ci, np.zeros((2, 2)), "images"),
    (seed_interval, [1.0], "at least 2 seeds"), (seed_interval, [1.0, np.inf], "finite"),
])
def test_bad_input(fn, values, words):
    with pytest.raises(ValueError, match=words):
        fn(values)


def test_bad_level_and_unpaired_arms():
    with pytest.raises(ValueError, match="level"):
        mean_interval([[1.0, 2.0]], level=1.5)
    with pytest.raises(ValueError, match="share seeds and images"):
        paired_difference(np.zeros((3, 4)), np.zeros((2, 4)))
