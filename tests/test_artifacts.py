"""Contract tests for the procedural artifacts and the interpolation families.

Every entry of ``ARTIFACTS`` is tested by the same parametrised tests, so adding an artifact to
the dict puts it under test.
"""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from finpercep.data.artifacts import (
    ARTIFACTS,
    DEFAULT_SEVERITY_RANGE,
    INTERPOLATION_FAMILIES,
    PROCEDURAL_FAMILIES,
    procedural_family,
)
from finpercep.io import to_tensor

NAMES = list(ARTIFACTS)
SEVERITIES = (0.1, 0.3, 0.6, 1.0)


def _crop(arr: np.ndarray, top: int, left: int, size: int) -> torch.Tensor:
    return to_tensor(np.ascontiguousarray(arr[top:top + size, left:left + size]))


@pytest.fixture(scope="module")
def natural() -> list[torch.Tensor]:
    """Three natural 128x128 crops: a face, fur, a cup (different textures and colours)."""
    return [
        _crop(data.astronaut(), 30, 170, 128),
        _crop(data.chelsea(), 60, 100, 128),
        _crop(data.coffee(), 60, 180, 128),
    ]


def _plain_json(obj: object) -> bool:
    """True if ``obj`` is built only of plain JSON types (no numpy scalars)."""
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain_json(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_plain_json(v) for v in obj)
    return obj is None or type(obj) in (bool, int, float, str)


def _mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean())


# ------------------------------------------------------------------ the artifact contract


@pytest.mark.parametrize("name", NAMES)
def test_shape_range_dtype_params(name: str, natural: list[torch.Tensor]) -> None:
    img = natural[0]
    for severity in (0.5, 1.0):
        out, params = ARTIFACTS[name](img, severity, np.random.default_rng(0))
        assert out.shape == img.shape and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        assert _plain_json(params), params
        json.dumps(params)
    assert ARTIFACTS[name].__doc__, "each artifact documents its look and where it comes from"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("hw", [(8, 8), (9, 13), (31, 17), (8, 65)])
def test_small_and_odd_sizes(name: str, hw: tuple[int, int]) -> None:
    img = torch.rand(3, *hw, generator=torch.Generator().manual_seed(0))
    out, _ = ARTIFACTS[name](img, 1.0, np.random.default_rng(1))
    assert out.shape == img.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert _mean_abs(out, img) > 0.0


@pytest.mark.parametrize("name", NAMES)
def test_severity_zero_is_identity(name: str, natural: list[torch.Tensor]) -> None:
    img = natural[1]
    before = img.clone()
    out, _ = ARTIFACTS[name](img, 0.0, np.random.default_rng(0))
    assert float((out - img).abs().max()) <= 1.0 / 255.0
    assert torch.equal(img, before), "the input must not be modified in place"


@pytest.mark.parametrize("name", NAMES)
def test_effect_grows_with_severity(name: str, natural: list[torch.Tensor]) -> None:
    for img in natural:
        effect = [_mean_abs(ARTIFACTS[name](img, s, np.random.default_rng(3))[0], img) for s in SEVERITIES]
        assert all(a < b for a, b in zip(effect, effect[1:])), (name, effect)
        # Severity 1 is clearly visible: at least ~1.5 grey levels on average over the whole image.
        assert effect[-1] > 1.5 / 255.0, (name, effect)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_given_rng(name: str, natural: list[torch.Tensor]) -> None:
    img = natural[2]
    a, pa = ARTIFACTS[name](img, 0.7, np.random.default_rng(5))
    b, pb = ARTIFACTS[name](img, 0.7, np.random.default_rng(5))
    assert torch.equal(a, b) and pa == pb
    # An artifact that draws from the rng must give different outputs for different seeds; one that
    # does not draw (a fixed filter) must give the same output.
    rng = np.random.default_rng(6)
    state = rng.bit_generator.state
    c, _ = ARTIFACTS[name](img, 0.7, rng)
    if rng.bit_generator.state != state:
        assert not torch.equal(a, c)
    else:
        assert torch.equal(a, c)


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_raise(name: str) -> None:
    fn, rng = ARTIFACTS[name], np.random.default_rng(0)
    img = torch.rand(3, 16, 16)
    for bad in (torch.rand(16, 16), torch.rand(1, 3, 16, 16), torch.rand(4, 16, 16), torch.rand(3, 7, 16)):
        with pytest.raises(ValueError):
            fn(bad, 0.5, rng)
    with pytest.raises(ValueError):
        fn(img * 2.0 + 0.5, 0.5, rng)  # values outside [0, 1]
    with pytest.raises(ValueError):
        fn((img * 255).to(torch.uint8), 0.5, rng)
    for severity in (-0.1, 1.1, math.nan):
        with pytest.raises(ValueError):
            fn(img, severity, rng)
    with pytest.raises(TypeError):
        fn(img, 0.5, 0)  # type: ignore[arg-type]


# ------------------------------------------------------------------ procedural families


def _lr_hr(scale: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    hr = _crop(data.astronaut(), 40, 180, size)
    lr = torch.nn.functional.avg_pool2d(hr[None], scale)[0]
    return lr, hr


def test_procedural_families_cover_every_artifact() -> None:
    assert list(PROCEDURAL_FAMILIES) == NAMES
    for name, family in PROCEDURAL_FAMILIES.items():
        assert family.name == name and family.kind == "procedural" and family.uses_hr
        assert family.description


@pytest.mark.parametrize("name", NAMES)
def test_procedural_family_applies_artifact_to_hr(name: str) -> None:
    lr, hr = _lr_hr(4)
    out, params = PROCEDURAL_FAMILIES[name].fn(lr, hr, 4, np.random.default_rng(0))
    assert out.shape == hr.shape and out.dtype == torch.float32
    lo, hi = DEFAULT_SEVERITY_RANGE
    assert lo <= params["severity"] <= hi and params["artifact"] == name
    assert _plain_json(params)
    # A fixed severity gives exactly the artifact applied to HR with the same rng.
    fixed = procedural_family(name, severity_range=(0.5, 0.5))
    out, params = fixed.fn(lr, hr, 4, np.random.default_rng(7))
    expected, expected_params = ARTIFACTS[name](hr, 0.5, np.random.default_rng(7))
    assert params["severity"] == 0.5 and params["artifact_params"] == expected_params
    assert torch.equal(out, expected)


def test_procedural_family_draws_severity_within_range() -> None:
    family = procedural_family("halo", severity_range=(0.2, 0.4))
    lr, hr = _lr_hr(2, 32)
    drawn = [family.fn(lr, hr, 2, np.random.default_rng(s))[1]["severity"] for s in range(20)]
    assert all(0.2 <= s <= 0.4 for s in drawn) and len(set(drawn)) > 1


def test_procedural_family_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown artifact"):
        procedural_family("not-an-artifact")
    for bad_range in ((0.5, 0.2), (-0.1, 0.5), (0.5, 1.5)):
        with pytest.raises(ValueError):
            procedural_family("halo", severity_range=bad_range)
    lr, hr = _lr_hr(4)
    with pytest.raises(ValueError, match="hr must be"):
        PROCEDURAL_FAMILIES["halo"].fn(lr, hr[:, :-1], 4, np.random.default_rng(0))


# ------------------------------------------------------------------ interpolation families


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / ((a - b) ** 2).mean()))


def _area_down(hr: torch.Tensor, scale: int) -> torch.Tensor:
    return torch.nn.functional.avg_pool2d(hr[None], scale)[0]


@pytest.fixture(scope="module")
def hr256() -> torch.Tensor:
    return _crop(data.astronaut(), 0, 128, 256)


def test_interpolation_families_metadata() -> None:
    assert set(INTERPOLATION_FAMILIES) == {"bicubic", "lanczos"}
    for name, family in INTERPOLATION_FAMILIES.items():
        assert family.name == name and family.kind == "interpolation" and not family.uses_hr


@pytest.mark.parametrize("name", list(INTERPOLATION_FAMILIES))
@pytest.mark.parametrize("scale", [2, 4])
def test_interpolation_exact_size_and_range(name: str, scale: int) -> None:
    lr = torch.rand(3, 17, 23, generator=torch.Generator().manual_seed(0))
    hr = torch.zeros(3, 17 * scale, 23 * scale)
    sr, params = INTERPOLATION_FAMILIES[name].fn(lr, hr, scale, np.random.default_rng(0))
    assert sr.shape == (3, 17 * scale, 23 * scale) and sr.dtype == torch.float32
    assert float(sr.min()) >= 0.0 and float(sr.max()) <= 1.0
    assert _plain_json(params)


@pytest.mark.parametrize("name", list(INTERPOLATION_FAMILIES))
@pytest.mark.parametrize("scale", [2, 4])
def test_interpolation_no_pixel_shift_and_sane_psnr(name: str, scale: int, hr256: torch.Tensor) -> None:
    lr = _area_down(hr256, scale)
    sr, _ = INTERPOLATION_FAMILIES[name].fn(lr, hr256, scale, np.random.default_rng(0))
    m = 4  # compare away from the borders so rolled-in pixels do not count
    core = (slice(None), slice(m, -m), slice(m, -m))
    aligned = _psnr(sr[core], hr256[core])
    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        shifted = torch.roll(sr, shifts=(dy, dx), dims=(1, 2))
        assert aligned > _psnr(shifted[core], hr256[core]) + 0.3, (dy, dx)
    assert aligned > (26.0 if scale == 2 else 22.0), aligned


@pytest.mark.parametrize(("name", "flag"), [("bicubic", cv2.INTER_CUBIC), ("lanczos", cv2.INTER_LANCZOS4)])
@pytest.mark.parametrize("scale", [2, 4])
def test_interpolation_agrees_with_opencv(name: str, flag: int, scale: int, hr256: torch.Tensor) -> None:
    """OpenCV (half-pixel centres, slightly different kernels: cubic a = -0.75, Lanczos-4) must
    nearly agree; a sub-pixel misalignment (e.g. align_corners) would fall far below 40 dB."""
    lr = _area_down(hr256, scale)
    sr, _ = INTERPOLATION_FAMILIES[name].fn(lr, hr256, scale, np.random.default_rng(0))
    ref = cv2.resize(lr.permute(1, 2, 0).numpy(), (256, 256), interpolation=flag)
    ref = torch.from_numpy(np.clip(ref, 0, 1)).permute(2, 0, 1)
    assert _psnr(sr, ref) > 40.0


def test_interpolation_rejects_mismatched_hr() -> None:
    lr = torch.rand(3, 16, 16)
    with pytest.raises(ValueError, match="hr must be"):
        INTERPOLATION_FAMILIES["bicubic"].fn(lr, torch.rand(3, 32, 32), 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="scale"):
        INTERPOLATION_FAMILIES["lanczos"].fn(lr, torch.rand(3, 64, 64), 0, np.random.default_rng(0))
