"""Contract tests for the negative edits (finpercep.data.negatives), parametrised over the catalogue."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from skimage import data

from finpercep.data.negatives import NEGATIVE_EDITS, NEGATIVE_FAMILIES
from finpercep.data.sr_zoo import resolve_families
from finpercep.io import to_tensor

NAMES = list(NEGATIVE_EDITS)


@pytest.fixture(scope="module")
def crop() -> torch.Tensor:
    """A 96x96 crop of scikit-image's astronaut (face, suit, background)."""
    return to_tensor(np.ascontiguousarray(data.astronaut()[40:136, 180:276]))


def _mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean())


@pytest.mark.parametrize("name", NAMES)
def test_severity_zero_is_the_identity(name: str, crop: torch.Tensor) -> None:
    out, _ = NEGATIVE_EDITS[name](crop, 0.0, np.random.default_rng(0))
    assert torch.equal(out, crop)


@pytest.mark.parametrize("name", NAMES)
def test_change_grows_with_severity_for_a_fixed_draw(name: str, crop: torch.Tensor) -> None:
    for seed in range(4):  # each random direction (darker / brighter, up / down ...) grows too
        changes = [_mean_abs(NEGATIVE_EDITS[name](crop, s, np.random.default_rng(seed))[0], crop)
                   for s in (0.1, 0.4, 0.7, 1.0)]
        assert all(b > a for a, b in zip(changes, changes[1:])), (name, seed, changes)
        assert changes[0] > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_output_contract_and_determinism(name: str, crop: torch.Tensor) -> None:
    out, params = NEGATIVE_EDITS[name](crop, 0.6, np.random.default_rng(3))
    again, params2 = NEGATIVE_EDITS[name](crop, 0.6, np.random.default_rng(3))
    assert out.dtype == torch.float32 and out.shape == crop.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(out, again) and params == params2
    assert json.loads(json.dumps(params)) == params


def test_strongest_edits_cover_the_shipped_model_checks(crop: torch.Tensor) -> None:
    """At severity 1 each edit goes at least as far as the checks the shipped model must pass."""
    rng = lambda: np.random.default_rng(0)  # noqa: E731  (seed 0 draws the darker directions)
    assert NEGATIVE_EDITS["exposure"](crop, 1.0, rng())[1]["factor"] <= 0.5
    assert NEGATIVE_EDITS["gamma"](crop, 1.0, rng())[1]["gamma"] >= 2.2
    flat, _ = NEGATIVE_EDITS["flatten"](crop, 1.0, rng())
    assert float(flat.std(dim=(1, 2)).max()) < 1e-6  # one colour: the mean colour
    torch.testing.assert_close(flat[:, 0, 0], crop.mean(dim=(1, 2)), atol=1e-5, rtol=0)


def test_families_are_a_group_of_their_own() -> None:
    picked = resolve_families("negative", scale=4)
    assert [f.name for f in picked] == NAMES and all(f.kind == "negative" and f.uses_hr for f in picked)
    assert not any(f.kind == "negative" for f in resolve_families("all", scale=4))


def test_family_edits_the_hr_with_a_drawn_severity(crop: torch.Tensor) -> None:
    lr = torch.nn.functional.avg_pool2d(crop[None], 4)[0]
    sr, params = NEGATIVE_FAMILIES["blur"].fn(lr, crop, 4, np.random.default_rng(1))
    assert 0.1 <= params["severity"] <= 1.0 and params["artifact"] == "blur"
    assert sr.shape == crop.shape and _mean_abs(sr, crop) > 0
