"""The real SR families (ncnn on CPU): contract, fidelity to the LR, alignment, determinism, tiling."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from finpercep.data import ncnn_models as nm
from finpercep.io import to_tensor

THREADS = 2  # the test machine has 2 cores


def _lr_crop(size: int, scale: int, image: str = "astronaut", top: int = 96, left: int = 176) -> torch.Tensor:
    """A natural LR image: an HR crop of a skimage photo, area-downscaled by ``scale``."""
    img = to_tensor(getattr(skimage.data, image)())
    hr = img[:, top : top + size * scale, left : left + size * scale]
    return F.interpolate(hr[None], scale_factor=1 / scale, mode="area")[0].clamp(0, 1)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def _family(name: str):
    return functools.partial(nm.REAL_FAMILIES[name].fn, num_threads=THREADS)


@functools.lru_cache(maxsize=None)
def _family_output(family: str, scale: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(lr, sr, params) of one family on a 24x24 natural LR crop; cached (RRDBNets are slow on CPU)."""
    lr = _lr_crop(24, scale)
    hr = torch.zeros(3, 24 * scale, 24 * scale)
    sr, params = _family(family)(lr, hr, scale, np.random.default_rng(1))
    return lr, sr, params


@pytest.mark.parametrize("scale", [4, 2])
@pytest.mark.parametrize("family", sorted(nm.REAL_FAMILIES))
def test_family_shape_range_and_params(family: str, scale: int) -> None:
    lr, sr, params = _family_output(family, scale)
    assert sr.shape == (3, 24 * scale, 24 * scale)
    assert sr.dtype == torch.float32
    assert float(sr.min()) >= 0.0 and float(sr.max()) <= 1.0
    assert json.loads(json.dumps(params)) == params  # plain JSON types only
    assert params["model"] in nm.MODELS


@pytest.mark.parametrize("scale", [4, 2])
@pytest.mark.parametrize("family", sorted(nm.REAL_FAMILIES))
def test_family_agrees_with_bicubic_and_has_no_pixel_shift(family: str, scale: int) -> None:
    """An SR output of a natural image looks like a sharper bicubic upscale, at the same place.

    PSNR with the bicubic upscale of the same LR must be sane (> 20 dB) and highest at shift 0
    among all shifts of up to +-2 output pixels (an off-by-one crop or padding would move it).
    The GAN models invent texture that bicubic lacks, so at x4 on a 24 px crop the lead of shift 0
    is only 0.2-0.6 dB (measured on four skimage crops); waifu2x leads by 2-7 dB.
    """
    lr, sr, _ = _family_output(family, scale)
    bic = F.interpolate(lr[None], scale_factor=scale, mode="bicubic", align_corners=False)[0].clamp(0, 1)
    b = 8  # ignore borders (and what the roll wraps around)
    psnr = {
        (dy, dx): _psnr(torch.roll(sr, (dy, dx), (1, 2))[:, b:-b, b:-b], bic[:, b:-b, b:-b])
        for dy in range(-2, 3)
        for dx in range(-2, 3)
    }
    assert psnr[(0, 0)] > 20.0, psnr[(0, 0)]
    best_shifted = max(v for k, v in psnr.items() if k != (0, 0))
    assert psnr[(0, 0)] > best_shifted + 0.1, (psnr[(0, 0)], best_shifted)


def test_waifu2x_is_closer_to_hr_than_bicubic() -> None:
    """waifu2x x2 on an area-downscaled photo beats bicubic against the HR: inputs/outputs are in range."""
    img = to_tensor(skimage.data.astronaut())[:, 96:224, 176:304]
    lr = F.interpolate(img[None], scale_factor=0.5, mode="area")[0]
    sr = nm.load_upscaler("waifu2x-photo-x2", THREADS)(lr)
    bic = F.interpolate(lr[None], scale_factor=2, mode="bicubic", align_corners=False)[0].clamp(0, 1)
    assert _psnr(sr, img) > _psnr(bic, img) + 1.0


@pytest.mark.parametrize("family", sorted(nm.REAL_FAMILIES))
def test_family_is_deterministic(family: str) -> None:
    lr = _lr_crop(16, 4, image="coffee", top=100, left=200)
    a, pa = _family(family)(lr, None, 4, np.random.default_rng(7))
    b, pb = _family(family)(lr.clone(), None, 4, np.random.default_rng(7))
    assert torch.equal(a, b)
    assert pa == pb


def test_x4_models_at_scale_2_are_the_area_downscaled_x4_output() -> None:
    lr, sr, params = _family_output("realesrgan", 2)
    x4 = nm.load_upscaler("realesrgan-x4plus", THREADS)(lr)
    torch.testing.assert_close(sr, F.avg_pool2d(x4[None], 2)[0])
    assert params["downscale"] == "area x2" and params["native_scale"] == 4


def test_waifu2x_draws_and_records_the_denoise_level_and_chains_two_passes_for_x4() -> None:
    lr = _lr_crop(16, 4)
    levels = {_family("waifu2x")(lr, None, 2, np.random.default_rng(s))[1]["denoise"] for s in range(30)}
    assert levels == set(nm.WAIFU2X_DENOISE_LEVELS)

    sr, params = _family("waifu2x")(lr, None, 4, np.random.default_rng(3))
    first = nm.load_upscaler(nm.waifu2x_model_name(params["denoise"]), THREADS)(lr)
    second = nm.load_upscaler("waifu2x-photo-x2", THREADS)(first)
    assert torch.equal(sr, second)
    assert params["passes"] == [nm.waifu2x_model_name(params["denoise"]), "waifu2x-photo-x2"]


def test_denoise_levels_are_distinct_models() -> None:
    lr = _lr_crop(16, 2)
    outs = [nm.load_upscaler(nm.waifu2x_model_name(k), THREADS)(lr) for k in nm.WAIFU2X_DENOISE_LEVELS]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert not torch.equal(outs[i], outs[j])


def _upscaler(name: str, tile: int | None, tile_pad: int = nm.DEFAULT_TILE_PAD) -> nm.NCNNUpscaler:
    spec = nm.MODELS[name]
    param, weights = nm.model_files(name)
    return nm.NCNNUpscaler(
        param, weights, spec.native_scale, prepad=spec.prepad, num_threads=THREADS, tile=tile,
        tile_pad=tile_pad, input_blob=spec.input_blob, output_blob=spec.output_blob,
    )


def test_tiled_equals_whole_for_waifu2x() -> None:
    """waifu2x sees only 7 LR pixels around each output pixel, so with 16 px of context it is exact."""
    lr = _lr_crop(40, 2)[:, :37, :40]  # odd size: partial last tile
    whole = _upscaler("waifu2x-photo-x2", None)(lr)
    tiled = _upscaler("waifu2x-photo-x2", 16)(lr)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)


def test_tiled_close_to_whole_for_rrdb() -> None:
    """RRDBNet's receptive field is larger than the context margin: small differences only."""
    lr = _lr_crop(40, 4, image="coffee", top=100, left=200)[:, :20, :]
    whole = _upscaler("realesrgan-x4plus", None)(lr)
    tiled = _upscaler("realesrgan-x4plus", 20)(lr)  # 1 x 2 tiles, each with 16 px of context
    assert tiled.shape == whole.shape
    assert _psnr(tiled, whole) > 40.0
    assert float((tiled - whole).abs().mean()) < 0.005


def test_load_upscaler_is_cached_per_thread_count() -> None:
    a = nm.load_upscaler("waifu2x-photo-x2", 1)
    assert nm.load_upscaler("waifu2x-photo-x2", 1) is a
    b = nm.load_upscaler("waifu2x-photo-x2", 2)
    assert b is not a and b.num_threads == 2 and a.num_threads == 1


def test_catalogue_metadata() -> None:
    assert set(nm.REAL_FAMILIES) == {"realesrgan", "realsr", "waifu2x"}
    for key, fam in nm.REAL_FAMILIES.items():
        assert fam.name == key and fam.kind == "real" and fam.cost == "expensive"
        assert "MIT" in fam.licence and fam.scales == (2, 4) and not fam.uses_hr
    assert "Real-ESRGAN" in nm.REAL_FAMILIES["realesrgan"].description
    assert "RealSR" in nm.REAL_FAMILIES["realsr"].description
    assert "waifu2x" in nm.REAL_FAMILIES["waifu2x"].description
    for name in nm.MODELS:
        param, weights = nm.model_files(name)
        assert param.is_file() and weights.is_file()


@pytest.mark.parametrize(
    "bad",
    [
        torch.rand(24, 24),  # no channel axis
        torch.rand(1, 24, 24),  # grey
        torch.rand(1, 3, 24, 24),  # batched
        (torch.rand(3, 24, 24) * 255).to(torch.uint8),  # not float
        torch.rand(3, 24, 24) * 2,  # out of [0, 1]
        torch.full((3, 24, 24), float("nan")),
    ],
)
def test_bad_input_raises_value_error(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        nm.load_upscaler("waifu2x-photo-x2")(bad)
    with pytest.raises(ValueError):
        nm.waifu2x(bad, None, 2, np.random.default_rng(0))


def test_bad_arguments_raise_value_error() -> None:
    lr = torch.rand(3, 8, 8)
    with pytest.raises(ValueError, match="scale"):
        nm.realesrgan(lr, None, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="hr"):
        nm.realsr(lr, torch.rand(3, 16, 16), 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown ncnn model"):
        nm.load_upscaler("esrgan-x8")
    with pytest.raises(ValueError, match="denoise"):
        nm.waifu2x_model_name(4)
