"""Ground-truth degradation maps: locality, calibration, monotonicity, invariants."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from skimage import data

from finpercep.backbones.efficientnet_lite import efficientnet_lite0
from finpercep.data.gt_maps import (
    GTMapConfig,
    GTMapper,
    feature_distance,
    feature_reach_px,
    normalize,
    pixel_distance,
    upsample_to,
)


@pytest.fixture(scope="module")
def net():
    return efficientnet_lite0()


@pytest.fixture(scope="module")
def mapper(net) -> GTMapper:
    return GTMapper(backbone=net)


@pytest.fixture(scope="module")
def pixel_mapper() -> GTMapper:
    return GTMapper(GTMapConfig(pixel_only=True))


def _img(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1).float().div(255)


@pytest.fixture(scope="module")
def astro() -> torch.Tensor:
    """A textured 256x256 crop, (3, 256, 256) in [0, 1]."""
    return _img(data.astronaut()[100:356, 150:406])


def _noise(x: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)  # same pattern for every sigma
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(np.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = F.pad(x[None], (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    y = F.conv2d(y, k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)
    return y[0]


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    buf = io.BytesIO()
    Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return _img(np.asarray(Image.open(buf)))


def _square(h: int, w: int, top: int, left: int, size: int) -> torch.Tensor:
    m = torch.zeros(h, w)
    m[top : top + size, left : left + size] = 1
    return m


def _blob(h: int, w: int, seed: int) -> torch.Tensor:
    """A random smooth blob (thresholded low-pass noise), roughly 10 % of the image."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma=min(h, w) / 12)
    return torch.from_numpy((field > np.quantile(field, 0.9)).astype(np.float32))


def _swap(ref: torch.Tensor, dist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return mask * dist + (1 - mask) * ref


def _chebyshev_distance_to(mask: torch.Tensor) -> np.ndarray:
    return ndimage.distance_transform_cdt(mask.numpy() == 0, metric="chessboard")


@pytest.mark.parametrize(
    "size, mask_kind",
    [((256, 256), "square"), ((256, 256), "blob"), ((131, 97), "blob"), ((200, 173), "square")],
)
def test_map_is_zero_beyond_reach(mapper: GTMapper, size: tuple[int, int], mask_kind: str) -> None:
    H, W = size
    ref = _img(data.astronaut()[60 : 60 + H, 120 : 120 + W])
    dist = _jpeg(_noise(_blur(ref, 1.5), 0.08), 20)  # a strong, mixed artifact
    mask = _square(H, W, H // 3, W // 4, min(H, W) // 4) if mask_kind == "square" else _blob(H, W, seed=3)
    m = mapper(ref, _swap(ref, dist, mask))[0]

    far = torch.from_numpy(_chebyshev_distance_to(mask) > mapper.reach_px)
    assert far.any()
    assert m[far].abs().max() < 1e-6
    # Not vacuous: the map is strong inside the mask and reaches outside it, but not much
    # less far than reach_px claims (the bound is tight within one stride).
    assert m[mask > 0].mean() > 0.5
    near = _chebyshev_distance_to(mask)
    assert near[(m > 0).numpy()].max() > mapper.reach_px - 8


def test_reach_values(mapper: GTMapper, pixel_mapper: GTMapper) -> None:
    assert (feature_reach_px(1), feature_reach_px(2), feature_reach_px(3)) == (12, 40, 88)
    assert mapper.reach_px == 40
    assert pixel_mapper.reach_px == 0


def test_identical_images_give_an_all_zero_map(mapper: GTMapper, astro: torch.Tensor) -> None:
    m = mapper(astro[None], astro[None].clone())
    assert m.shape == (1, 1, 256, 256) and m.dtype == torch.float32
    assert torch.count_nonzero(m) == 0


def test_pixel_only_is_exactly_zero_outside_the_mask(pixel_mapper: GTMapper, astro: torch.Tensor) -> None:
    mask = _blob(256, 256, seed=1)
    m = pixel_mapper(astro, _swap(astro, _noise(astro, 0.1), mask))[0]
    assert torch.count_nonzero(m[mask == 0]) == 0
    assert m[mask > 0].mean() > 0.5
    assert pixel_mapper.net is None  # the ablation needs no network


def test_pixel_only_differs_from_default_near_the_mask(
    mapper: GTMapper, pixel_mapper: GTMapper, astro: torch.Tensor
) -> None:
    mask = _square(256, 256, 96, 96, 64)
    syn = _swap(astro, _blur(astro, 2.0), mask)
    full, pix = mapper(astro, syn)[0], pixel_mapper(astro, syn)[0]
    ring = (torch.from_numpy(_chebyshev_distance_to(mask)) > 0) & (torch.from_numpy(_chebyshev_distance_to(mask)) <= 8)
    assert full[ring].mean() > 0.01 and pix[ring].max() == 0


@pytest.mark.parametrize("kind", ["noise", "blur", "jpeg"])
def test_map_increases_with_artifact_strength(mapper: GTMapper, astro: torch.Tensor, kind: str) -> None:
    mask = _square(256, 256, 80, 80, 96)
    strengths = {"noise": [0.02, 0.05, 0.1, 0.2], "blur": [0.5, 1.0, 2.0, 3.0], "jpeg": [90, 50, 25, 10]}[kind]
    make = {"noise": _noise, "blur": _blur, "jpeg": _jpeg}[kind]
    batch = torch.stack([_swap(astro, make(astro, s), mask) for s in strengths])
    maps = mapper(astro.expand_as(batch), batch)
    inside = maps[:, 0][:, mask > 0].mean(dim=1)
    assert (inside.diff() > 0).all(), inside.tolist()


def test_pixel_only_map_increases_with_noise(pixel_mapper: GTMapper, astro: torch.Tensor) -> None:
    mask = _square(256, 256, 80, 80, 96)
    means = [
        float(pixel_mapper(astro, _swap(astro, _noise(astro, s), mask))[0][mask > 0].mean())
        for s in (0.02, 0.05, 0.1, 0.2)
    ]
    assert all(b > a for a, b in zip(means, means[1:])), means


def test_faint_stays_faint_and_strong_is_strong(mapper: GTMapper, astro: torch.Tensor) -> None:
    """No per-image normalisation: a faint artifact must not be stretched to the top of [0, 1]."""
    mask = _square(256, 256, 80, 80, 96)
    for faint in (_noise(astro, 0.01), _jpeg(astro, 95)):
        assert mapper(astro, _swap(astro, faint, mask))[0][mask > 0].mean() < 0.2
    for strong in (_noise(astro, 0.15), _jpeg(astro, 10), _blur(astro, 3.0)):
        assert mapper(astro, _swap(astro, strong, mask))[0][mask > 0].mean() > 0.6


def test_range_and_shapes_for_odd_sizes(mapper: GTMapper) -> None:
    g = torch.Generator().manual_seed(0)
    for H, W in [(1, 1), (3, 7), (37, 53)]:
        ref = torch.rand(2, 3, H, W, generator=g)
        dist = torch.rand(2, 3, H, W, generator=g)
        m = mapper(ref, dist)
        assert m.shape == (2, 1, H, W) and m.dtype == torch.float32
        assert m.min() >= 0 and m.max() <= 1 and m.max() > 0.5


def test_batch_equals_single_calls(mapper: GTMapper, astro: torch.Tensor) -> None:
    mask = _blob(256, 256, seed=2)
    refs = torch.stack([astro, astro.flip(-1)])
    dists = torch.stack(
        [_swap(astro, _blur(astro, 2.0), mask), _swap(astro.flip(-1), _noise(astro.flip(-1), 0.05), mask)]
    )
    both = mapper(refs, dists)
    for i in range(2):
        assert torch.allclose(both[i], mapper(refs[i : i + 1], dists[i : i + 1])[0], atol=1e-5)
    # (3, H, W) inputs are accepted and give (1, H, W).
    assert torch.allclose(mapper(refs[0], dists[0]), both[0], atol=1e-5)


def test_a_map_does_not_depend_on_its_batch(mapper: GTMapper, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bit-identical maps whatever shares the call: a data set grown in steps (a unit finished with
    fewer masks) must equal one built at once, on every CPU (AVX2-only kernels round by batch size)."""
    import finpercep.data.gt_maps as gm

    g = torch.Generator().manual_seed(0)
    ref = torch.rand(1, 3, 40, 48, generator=g)
    dist = (ref + 0.1 * torch.randn(3, 3, 40, 48, generator=g)).clamp(0, 1)
    batches: list[int] = []

    def spy(fn):
        def wrapped(x, *args, **kw):
            batches.append(x.shape[0])
            return fn(x, *args, **kw)
        return wrapped

    for name in ("pixel_distance", "upsample_to", "normalize"):
        monkeypatch.setattr(gm, name, spy(getattr(gm, name)))
    monkeypatch.setattr(mapper.net, "features", spy(mapper.net.features))
    together = mapper(ref, dist)
    assert batches and set(batches) == {1}  # every step sees one sample
    for k in range(3):
        assert torch.equal(together[k], mapper(ref, dist[k : k + 1])[0])
    assert torch.equal(together[[2, 0]], mapper(ref, dist[[2, 0]]))
    assert torch.equal(together, mapper(ref.expand(3, -1, -1, -1), dist))  # shared or repeated reference


def test_no_gradients_and_deterministic(mapper: GTMapper, astro: torch.Tensor) -> None:
    x = astro[None].clone().requires_grad_(True)
    m1 = mapper(x, _noise(astro, 0.05)[None])
    assert not m1.requires_grad
    assert torch.equal(m1, mapper(astro[None], _noise(astro, 0.05)[None]))


def test_upsampling_is_aligned_to_the_feature_grid() -> None:
    d = torch.rand(1, 1, 5, 4)
    up = upsample_to(d, 8, (37, 30))
    assert up.shape == (1, 1, 37, 30)
    # Cell (i, j) sits on pixel (8 i, 8 j) and is reproduced exactly there.
    assert torch.allclose(up[0, 0, ::8, ::8], d[0, 0], atol=1e-6)
    assert torch.allclose(upsample_to(torch.full((1, 1, 5, 4), 0.3), 8, (37, 30)), torch.tensor(0.3))
    with pytest.raises(ValueError, match="grid"):
        upsample_to(d, 8, (64, 30))


def test_pure_functions(astro: torch.Tensor) -> None:
    ref, dist = astro[None], _noise(astro, 0.1)[None]
    dp = pixel_distance(ref, dist)
    assert dp.shape == (1, 1, 256, 256)
    assert torch.allclose(dp, (dist - ref).abs().mean(1, keepdim=True))
    f = [torch.randn(1, 8, 64, 64), torch.randn(1, 8, 32, 32)]
    assert torch.count_nonzero(feature_distance(f, [t.clone() for t in f], (256, 256), (4, 8))) == 0
    df = feature_distance(f, [-t for t in f], (256, 256), (4, 8))
    assert torch.allclose(df, torch.tensor(2.0))  # opposite vectors: cosine distance 2
    d = torch.linspace(0, 1, 50)
    n = normalize(d, tau=0.06, gamma=2.0)
    assert n[0] == 0 and (n.diff() >= 0).all() and n[-1] <= 1


def test_bad_inputs_and_configs_are_rejected(mapper: GTMapper) -> None:
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="same shape"):
        mapper(x, torch.rand(1, 3, 16, 17))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mapper(x, x * 255)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        mapper(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="alpha"):
        GTMapConfig(alpha=1.5)
    with pytest.raises(ValueError, match="layer_weights"):
        GTMapConfig(layers=(1, 2), layer_weights=(1.0,))
    with pytest.raises(ValueError, match="stage 9"):
        GTMapConfig(layers=(9,), layer_weights=(1.0,))


def test_a_shared_backbone_is_not_modified() -> None:
    trainable = efficientnet_lite0().train()
    GTMapper(backbone=trainable)
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())
