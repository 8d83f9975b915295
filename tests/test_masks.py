"""Swap masks B (arXiv 2512.22647, the region swap of FGR-30k): one contract for every kind in MASK_KINDS."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage import data

from finpercep.data.masks import MASK_KINDS, make_mask
from finpercep.io import to_tensor

KINDS = list(MASK_KINDS)
SEMANTIC = ["superpixel", "segment"]
EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity for component counts


def _crop(arr: np.ndarray, h: int, w: int, y: int = 0, x: int = 0) -> torch.Tensor:
    return to_tensor(np.ascontiguousarray(arr[y : y + h, x : x + w]))


@pytest.fixture(scope="module")
def photos() -> list[torch.Tensor]:
    """Small real-photo crops (96x128) plus a flat grey image, for the many-seed sweeps."""
    flat = torch.full((3, 96, 128), 0.5)
    return [
        _crop(data.astronaut(), 96, 128, 20, 150),
        _crop(data.chelsea(), 96, 128, 40, 120),
        _crop(data.coffee(), 96, 128, 150, 250),
        flat,
    ]


def _two_halves(h: int, w: int, noise: float, seed: int) -> torch.Tensor:
    """Left half dark blue, right half orange, split by a sharp vertical edge, plus noise."""
    img = np.empty((3, h, w), dtype=np.float32)
    img[:, :, : w // 2] = np.array([0.1, 0.2, 0.6], dtype=np.float32)[:, None, None]
    img[:, :, w // 2 :] = np.array([0.9, 0.6, 0.2], dtype=np.float32)[:, None, None]
    img += noise * np.random.default_rng(seed).standard_normal(img.shape).astype(np.float32)
    return torch.from_numpy(np.clip(img, 0.0, 1.0))


def _check_mask(
    mask: torch.Tensor, params: dict, shape: tuple[int, int], lo: float, hi: float, kind: str
) -> None:
    assert mask.shape == shape and mask.dtype == torch.float32
    assert set(torch.unique(mask).tolist()) <= {0.0, 1.0}
    frac = int(mask.sum()) / mask.numel()
    assert lo <= frac <= hi, f"{kind}: area {frac:.4f} outside [{lo}, {hi}] ({params})"
    assert params["kind"] == kind and params["area"] == pytest.approx(frac)
    assert lo <= params["target_area"] <= hi
    # the kinds meet the bounds themselves; the dilate/erode safety net stays unused
    assert params["area_fix"] is None
    assert json.loads(json.dumps(params)) == params  # plain JSON types only


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(37, 53), (53, 37), (256, 256), (64, 200)])
def test_contract_binary_shape_area(kind: str, shape: tuple[int, int]) -> None:
    image = _crop(data.astronaut(), *shape, 30, 100)
    mask, params = make_mask(kind, image, np.random.default_rng(0))
    _check_mask(mask, params, shape, 0.03, 0.30, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bounds,seeds", [((0.03, 0.30), 50), ((0.01, 0.02), 25), ((0.25, 0.30), 25)])
def test_area_within_bounds_over_seeds(kind: str, bounds: tuple[float, float], seeds: int, photos):
    for seed in range(seeds):
        image = photos[seed % len(photos)]
        mask, params = make_mask(kind, image, np.random.default_rng(seed), area=bounds)
        _check_mask(mask, params, tuple(image.shape[1:]), *bounds, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_area_bounds_on_tiny_odd_image(kind: str) -> None:
    image = _crop(data.coffee(), 37, 53, 200, 300)
    for seed in range(10):
        for bounds in [(0.01, 0.02), (0.25, 0.3), (0.5, 0.9)]:
            mask, params = make_mask(kind, image, np.random.default_rng(seed), area=bounds)
            _check_mask(mask, params, (37, 53), *bounds, kind)


@pytest.mark.parametrize("kind", SEMANTIC)
def test_large_image_segmented_at_reduced_resolution(kind: str) -> None:
    image = to_tensor(data.astronaut())  # 512 x 512
    image = torch.cat([image, image.flip(1)[:, :188]], dim=1)  # 700 x 512 > the segmentation cap
    mask, params = make_mask(kind, image, np.random.default_rng(3), area=(0.05, 0.1))
    _check_mask(mask, params, (700, 512), 0.05, 0.1, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_and_seed_dependent(kind: str, photos) -> None:
    image = photos[0]
    m1, p1 = make_mask(kind, image, np.random.default_rng(7))
    m2, p2 = make_mask(kind, image, np.random.default_rng(7))
    assert torch.equal(m1, m2) and p1 == p2
    masks = [make_mask(kind, image, np.random.default_rng(s))[0] for s in range(6)]
    distinct = {m.numpy().tobytes() for m in masks}
    assert len(distinct) == len(masks), f"{kind}: different seeds gave identical masks"


@pytest.mark.parametrize("kind", ["blob", "ellipse"])
def test_shapes_are_few_solid_components(kind: str, photos) -> None:
    """A blob / ellipse mask has no more pieces than shapes drawn, and no holes."""
    key = {"blob": "blobs", "ellipse": "ellipses"}[kind]
    for seed in range(20):
        mask, params = make_mask(kind, photos[0], np.random.default_rng(seed))
        m = mask.numpy() > 0
        _, n_components = ndimage.label(m, structure=EIGHT)
        assert 1 <= n_components <= len(params[key])
        # no holes: filling holes adds no pixels (allowing a few for shapes that touch)
        assert ndimage.binary_fill_holes(m).sum() - m.sum() <= 0.01 * m.sum()


def test_strokes_stay_strokes() -> None:
    """Large stroke areas come from more strokes, not from one stroke as wide as a blob."""
    image = torch.zeros(3, 128, 128)
    for seed in range(20):
        mask, params = make_mask("stroke", image, np.random.default_rng(seed), area=(0.25, 0.3))
        if len(params["strokes"]) < 6:  # the stroke cap was not hit
            assert params["width"] <= 0.12 * 128 * math.sqrt(2)
        assert params["width"] >= 2.0
    mask, params = make_mask("stroke", image, np.random.default_rng(0), area=(0.01, 0.02))
    assert params["width"] >= 0.02 * 128 - 1e-6  # small areas give a shorter stroke, not a hairline


@pytest.mark.parametrize("kind", SEMANTIC)
@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_semantic_masks_follow_a_sharp_edge(kind: str, noise: float) -> None:
    """On two flat regions split by an edge, a small semantic mask stays on one side."""
    for seed in range(15):
        image = _two_halves(96, 128, noise, seed)
        mask, params = make_mask(kind, image, np.random.default_rng(seed), area=(0.03, 0.10))
        m = mask.numpy()
        left, right = m[:, :64].sum(), m[:, 64:].sum()
        assert max(left, right) >= 0.97 * m.sum(), f"{kind} seed {seed}: {left} left, {right} right"


@pytest.mark.parametrize("kind", SEMANTIC)
def test_semantic_masks_are_connected(kind: str, photos) -> None:
    for seed in range(20):
        mask, _ = make_mask(kind, photos[seed % 3], np.random.default_rng(seed))
        labels, n = ndimage.label(mask.numpy() > 0, structure=EIGHT)
        largest = np.bincount(labels.ravel())[1:].max()
        assert largest >= 0.99 * mask.sum().item(), f"{kind} seed {seed}: {n} pieces"


@pytest.mark.parametrize("kind", SEMANTIC)
def test_one_giant_segment_falls_back_gracefully(kind: str) -> None:
    image = torch.full((3, 64, 64), 0.3)  # felzenszwalb: a single segment covering everything
    for seed in range(5):
        mask, params = make_mask(kind, image, np.random.default_rng(seed), area=(0.05, 0.1))
        _check_mask(mask, params, (64, 64), 0.05, 0.1, kind)


def test_bad_kind_lists_valid_kinds() -> None:
    with pytest.raises(ValueError, match="valid kinds: blob, ellipse, stroke, superpixel, segment"):
        make_mask("sam", torch.zeros(3, 16, 16), np.random.default_rng(0))


@pytest.mark.parametrize(
    "area",
    [(0.0, 0.1), (-0.1, 0.2), (0.2, 0.1), (0.1, 0.95), (float("nan"), 0.2), (0.1,), "abc", None, (0.1, 0.2, 0.3)],
)
def test_bad_area_raises(area) -> None:
    with pytest.raises(ValueError, match="area"):
        make_mask("blob", torch.zeros(3, 16, 16), np.random.default_rng(0), area=area)


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((3, 16, 16), dtype=np.float32),  # not a tensor
        torch.zeros(16, 16),  # no channel axis
        torch.zeros(1, 16, 16),  # grey
        torch.zeros(16, 16, 3),  # channels last
        torch.zeros(3, 16, 16, dtype=torch.uint8),  # not float
        torch.full((3, 16, 16), 2.0),  # out of range
        torch.full((3, 16, 16), float("nan")),
        torch.zeros(3, 0, 16),  # empty
        torch.zeros(3, 4, 4),  # 16 pixels: no count gives an area in [0.01, 0.02]
    ],
)
def test_bad_image_raises(image) -> None:
    with pytest.raises(ValueError):
        make_mask("ellipse", image, np.random.default_rng(0), area=(0.01, 0.02))


def test_rng_must_be_a_generator() -> None:
    with pytest.raises(TypeError, match="Generator"):
        make_mask("blob", torch.zeros(3, 16, 16), 0)  # type: ignore[arg-type]


@pytest.mark.parametrize("fill,fix", [(0.0, "dilate"), (1.0, "erode"), (0.5, "erode")])
def test_safety_net_brings_any_mask_into_bounds(monkeypatch, fill: float, fix: str) -> None:
    """Should a kind ever miss the bounds, make_mask grows or shrinks its mask to fit."""

    def off_target(image, rng, area):
        mask = torch.zeros(image.shape[1:])
        mask[: int(fill * image.shape[1])] = 1.0  # empty, full, or the top half
        return mask, {"target_area": float(rng.uniform(*area))}

    monkeypatch.setitem(MASK_KINDS, "blob", off_target)
    mask, params = make_mask("blob", torch.zeros(3, 40, 50), np.random.default_rng(0), area=(0.1, 0.2))
    assert 0.1 <= int(mask.sum()) / mask.numel() <= 0.2 and params["area_fix"] == fix
    if fill == 0.5:  # shrinking erodes the half towards its inside: nothing outside the half appears
        assert mask[20:].sum() == 0
