"""Tests for the Real-ESRGAN second-order degradation pipeline (finpercep.data.degradations)."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace

import cv2
import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from finpercep.data.degradations import (
    ISOTROPIC_KINDS,
    KERNEL_KINDS,
    DegradationConfig,
    KernelConfig,
    RoundConfig,
    add_gaussian_noise,
    add_poisson_noise,
    circular_lowpass_kernel,
    degrade,
    filter2d,
    gaussian_kernel,
    jpeg_compress,
    make_kernel,
    random_kernel,
    resize,
)
from finpercep.io import to_tensor


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    """(3, 128, 128) crop of skimage's astronaut (face and suit: edges and texture)."""
    return to_tensor(skimage.data.astronaut()[40:296:2, 150:406:2].copy())


@pytest.fixture(scope="module")
def chelsea_small() -> torch.Tensor:
    """(3, 64, 96) non-square crop of skimage's chelsea (fur texture)."""
    return to_tensor(skimage.data.chelsea()[100:164, 100:196].copy())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def is_plain_json(x: object) -> bool:
    """True if x is built only from dict/list/str/int/float/bool/None (no numpy scalars, no tuples)."""
    if x is None or type(x) in (str, int, float, bool):
        return True
    if type(x) is list:
        return all(is_plain_json(v) for v in x)
    if type(x) is dict:
        return all(type(k) is str and is_plain_json(v) for k, v in x.items())
    return False


# ---------------------------------------------------------------------------- determinism


def test_same_seed_gives_bit_identical_output(astronaut: torch.Tensor) -> None:
    for seed in range(5):
        lr1, p1 = degrade(astronaut, 4, np.random.default_rng(seed))
        lr2, p2 = degrade(astronaut, 4, np.random.default_rng(seed))
        assert torch.equal(lr1, lr2)
        assert p1 == p2


def test_different_seeds_give_different_outputs(astronaut: torch.Tensor) -> None:
    outs = [degrade(astronaut, 4, np.random.default_rng(seed))[0] for seed in range(6)]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert not torch.equal(outs[i], outs[j])


def test_input_is_not_modified(astronaut: torch.Tensor) -> None:
    before = astronaut.clone()
    degrade(astronaut, 4, np.random.default_rng(0))
    assert torch.equal(astronaut, before)


# ---------------------------------------------------------------------------- shape and range


@pytest.mark.parametrize("scale,h,w", [(4, 128, 128), (2, 128, 128), (4, 64, 96), (4, 96, 64), (2, 34, 50), (4, 8, 8)])
def test_output_shape_range_and_8bit(scale: int, h: int, w: int) -> None:
    hr = to_tensor(skimage.data.coffee()[:h, :w].copy())
    for seed in range(4):
        lr, params = degrade(hr, scale, np.random.default_rng(seed))
        assert lr.shape == (3, h // scale, w // scale)
        assert lr.dtype == torch.float32
        assert float(lr.min()) >= 0.0 and float(lr.max()) <= 1.0
        # final quantisation: every value is k/255 exactly, ready for a lossless PNG
        assert torch.equal(lr, (lr * 255).round() / 255)
        assert params["scale"] == scale and params["hr_size"] == [h, w]


# ---------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("kind", sorted(KERNEL_KINDS))
@pytest.mark.parametrize("size", [7, 13, 21])
def test_kernel_contract(kind: str, size: int) -> None:
    cfg = KernelConfig()
    for seed in range(10):
        kernel, params = KERNEL_KINDS[kind](np.random.default_rng(seed), size, cfg)
        assert kernel.shape == (size, size) and kernel.dtype == np.float32
        assert abs(float(kernel.sum(dtype=np.float64)) - 1.0) < 1e-5
        c = size // 2
        assert kernel[c, c] == kernel.max()  # peak at the centre
        # point symmetry: correlation == convolution, so no sub-pixel shift is introduced
        np.testing.assert_allclose(kernel, kernel[::-1, ::-1], atol=1e-7)
        if kind != "sinc":  # Gaussian/generalised/plateau are non-negative (tails may underflow to 0)
            assert float(kernel.min()) >= 0.0
        if kind in ISOTROPIC_KINDS:
            np.testing.assert_allclose(kernel, kernel.T, atol=1e-7)
            np.testing.assert_allclose(kernel, kernel[::-1, :], atol=1e-7)
        assert params["kind"] == kind and params["size"] == size
        assert is_plain_json(params)
        np.testing.assert_array_equal(make_kernel(params), kernel)  # params suffice to rebuild it


def test_sinc_kernel_has_negative_lobes() -> None:
    """An ideal circular low-pass (2-D jinc) rings: its lobes alternate in sign, that is correct."""
    k = circular_lowpass_kernel(21, math.pi / 3)
    assert float(k.min()) < 0.0
    assert abs(float(k.sum(dtype=np.float64)) - 1.0) < 1e-5


def test_gaussian_kernel_spread_matches_sigma() -> None:
    size = 21
    ax = np.arange(size) - size // 2
    k = gaussian_kernel(size, 1.5, 1.5, 0.0).astype(np.float64)
    var_x = float((k.sum(0) * ax**2).sum())
    var_y = float((k.sum(1) * ax**2).sum())
    assert var_x == pytest.approx(1.5**2, rel=0.02) and var_y == pytest.approx(1.5**2, rel=0.02)
    # anisotropic: sigma_x acts along columns (x); rotating by 90 degrees swaps the axes
    wide = gaussian_kernel(size, 3.0, 0.5, 0.0)
    assert float((wide.sum(0) * ax**2).sum()) > 10 * float((wide.sum(1) * ax**2).sum())
    np.testing.assert_allclose(gaussian_kernel(size, 3.0, 0.5, math.pi / 2), wide.T, atol=1e-6)


def test_random_kernel_follows_config() -> None:
    only_plateau = KernelConfig(kinds=("plateau_iso",), kind_probs=(1.0,), sizes=(9,), sinc_prob=0.0)
    for seed in range(20):
        k, p = random_kernel(np.random.default_rng(seed), only_plateau)
        assert p["kind"] == "plateau_iso" and k.shape == (9, 9)
    always_sinc = KernelConfig(sinc_prob=1.0)
    assert {random_kernel(np.random.default_rng(s), always_sinc)[1]["kind"] for s in range(20)} == {"sinc"}


# ---------------------------------------------------------------------------- parameter ranges


def _check_kernel_params(p: dict, kcfg: KernelConfig) -> None:
    assert p["size"] in kcfg.sizes
    if p["kind"] == "sinc":
        rng = kcfg.sinc_omega_small if p["size"] < kcfg.sinc_size_threshold else kcfg.sinc_omega_large
        assert rng[0] <= p["omega_c"] <= rng[1]
        return
    assert p["kind"] in kcfg.kinds
    for s in ("sigma_x", "sigma_y"):
        assert kcfg.sigma_range[0] <= p[s] <= kcfg.sigma_range[1]
    if p["kind"].endswith("iso") and not p["kind"].endswith("aniso"):
        assert p["sigma_x"] == p["sigma_y"] and p["theta"] == 0.0
    else:
        assert kcfg.rotation_range[0] <= p["theta"] <= kcfg.rotation_range[1]
    if p["kind"].startswith("generalized"):
        assert kcfg.betag_range[0] <= p["beta"] <= kcfg.betag_range[1]
    if p["kind"].startswith("plateau"):
        assert kcfg.betap_range[0] <= p["beta"] <= kcfg.betap_range[1]


def _check_round(r: dict, rcfg: RoundConfig, base: tuple[int, int]) -> None:
    if r["blur"] is not None:
        _check_kernel_params(r["blur"], rcfg.kernel)
    rs = r["resize"]
    lo, hi = rcfg.resize_range
    bounds = {"up": (1.0, hi), "down": (lo, 1.0), "keep": (1.0, 1.0)}[rs["direction"]]
    assert bounds[0] <= rs["factor"] <= bounds[1]
    assert rs["mode"] in rcfg.resize_modes
    assert rs["size"] == [max(1, int(base[0] * rs["factor"])), max(1, int(base[1] * rs["factor"]))]
    n = r["noise"]
    assert isinstance(n["gray"], bool)
    if n["kind"] == "gaussian":
        assert rcfg.noise_sigma_range[0] <= n["sigma"] <= rcfg.noise_sigma_range[1]
    else:
        assert n["kind"] == "poisson"
        assert rcfg.poisson_scale_range[0] <= n["scale"] <= rcfg.poisson_scale_range[1]


def test_params_within_ranges_and_every_choice_occurs() -> None:
    cfg = DegradationConfig()
    hr = to_tensor(skimage.data.coffee()[:64, :64].copy())
    seen: Counter[str] = Counter()
    for seed in range(200):
        _, p = degrade(hr, 4, np.random.default_rng(seed))
        assert is_plain_json(p)
        json.dumps(p)
        r1, r2, fin = p["round1"], p["round2"], p["final"]
        assert r1["blur"] is not None  # round 1 always blurs (blur_prob 1)
        _check_round(r1, cfg.round1, (64, 64))
        _check_round(r2, cfg.round2, (16, 16))  # round 2 resizes relative to the LR size
        assert cfg.round1.jpeg_range[0] <= r1["jpeg"]["quality"] <= cfg.round1.jpeg_range[1]
        assert type(r1["jpeg"]["quality"]) is int
        assert cfg.round2.jpeg_range[0] <= fin["jpeg"]["quality"] <= cfg.round2.jpeg_range[1]
        assert fin["order"] in (["resize", "sinc", "jpeg"], ["jpeg", "resize", "sinc"])
        assert fin["resize_mode"] in cfg.final_resize_modes
        if fin["sinc"] is not None:
            assert fin["sinc"]["kind"] == "sinc" and fin["sinc"]["size"] in cfg.final_sinc_sizes
            assert cfg.final_sinc_omega_range[0] <= fin["sinc"]["omega_c"] <= cfg.final_sinc_omega_range[1]
        for r in (r1, r2):
            seen["kernel:" + (r["blur"]["kind"] if r["blur"] else "none")] += 1
            seen["noise:" + r["noise"]["kind"] + (":gray" if r["noise"]["gray"] else ":colour")] += 1
            seen["resize:" + r["resize"]["direction"]] += 1
            seen["mode:" + r["resize"]["mode"]] += 1
        seen["mode:" + fin["resize_mode"]] += 1
        seen["order:" + fin["order"][0]] += 1
        seen["final_sinc:" + ("yes" if fin["sinc"] else "no")] += 1
    expected = (
        [f"kernel:{k}" for k in KERNEL_KINDS]
        + ["kernel:none"]
        + [f"noise:{n}:{g}" for n in ("gaussian", "poisson") for g in ("gray", "colour")]
        + [f"resize:{d}" for d in ("up", "down", "keep")]
        + [f"mode:{m}" for m in ("area", "bilinear", "bicubic")]
        + ["order:jpeg", "order:resize", "final_sinc:yes", "final_sinc:no"]
    )
    missing = [e for e in expected if seen[e] == 0]
    assert not missing, f"never drawn in 200 seeds: {missing}"


# ---------------------------------------------------------------------------- degradation happens


def test_lr_is_degraded_but_still_the_same_picture(astronaut: torch.Tensor) -> None:
    area = F.interpolate(astronaut[None], scale_factor=0.25, mode="area")[0]
    bicubic = F.interpolate(astronaut[None], scale_factor=0.25, mode="bicubic", align_corners=False)[0]
    psnrs = []
    for seed in range(16):
        lr, _ = degrade(astronaut, 4, np.random.default_rng(seed))
        assert psnr(lr, bicubic.clamp(0, 1)) < 40.0  # something happened
        corr = np.corrcoef(lr.flatten().numpy(), area.flatten().numpy())[0, 1]
        assert corr > 0.6  # but it is still the same picture
        psnrs.append(psnr(lr, area))
    # default config over seeds: Real-ESRGAN degradations are strong but not destructive
    # (measured mean ~22 dB on this crop)
    assert 17.0 < float(np.mean(psnrs)) < 30.0


def test_degradation_free_config_reduces_to_area_downscale(astronaut: torch.Tensor) -> None:
    """With blur, noise, resize and sinc switched off and JPEG at 100 the pipeline is a plain
    area downscale: checks the geometry (no pixel shift, right target size)."""
    clean = RoundConfig(
        blur_prob=0.0,
        resize_probs=(0.0, 0.0, 1.0),
        resize_modes=("area",),
        gaussian_noise_prob=1.0,
        noise_sigma_range=(0.0, 0.0),
        jpeg_range=(100, 100),
    )
    cfg = DegradationConfig(round1=clean, round2=clean, final_sinc_prob=0.0, final_resize_modes=("area",))
    lr, p = degrade(astronaut, 4, np.random.default_rng(0), cfg)
    area = F.interpolate(astronaut[None], scale_factor=0.25, mode="area")[0]
    assert p["round1"]["blur"] is None and p["round2"]["blur"] is None and p["final"]["sinc"] is None
    assert psnr(lr, area) > 35.0


def test_stronger_settings_degrade_more(astronaut: torch.Tensor) -> None:
    """Raising the noise and lowering JPEG quality moves the LR further from a clean downscale.

    Only ranges differ, so each seed makes the same discrete choices (kernels, resizes) in both
    configs: a paired comparison."""
    area = F.interpolate(astronaut[None], scale_factor=0.25, mode="area")[0]
    mild_round = RoundConfig(noise_sigma_range=(1.0, 2.0), poisson_scale_range=(0.05, 0.1), jpeg_range=(90, 95))
    harsh_round = RoundConfig(noise_sigma_range=(25.0, 30.0), poisson_scale_range=(2.5, 3.0), jpeg_range=(30, 35))
    mild = DegradationConfig(round1=mild_round, round2=mild_round)
    harsh = DegradationConfig(round1=harsh_round, round2=harsh_round)
    p_mild = np.array([psnr(degrade(astronaut, 4, np.random.default_rng(s), mild)[0], area) for s in range(8)])
    p_harsh = np.array([psnr(degrade(astronaut, 4, np.random.default_rng(s), harsh)[0], area) for s in range(8)])
    assert (p_mild > p_harsh).all()
    assert float((p_mild - p_harsh).mean()) > 1.0


# ---------------------------------------------------------------------------- building blocks


def test_gray_noise_is_equal_on_all_channels() -> None:
    img = torch.full((3, 32, 32), 0.5)
    g = add_gaussian_noise(img, 10.0, True, np.random.default_rng(0)) - img
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2]) and float(g.std()) > 0.02
    c = add_gaussian_noise(img, 10.0, False, np.random.default_rng(0)) - img
    assert not torch.equal(c[0], c[1])
    assert float(c.std()) == pytest.approx(10 / 255, rel=0.1)
    pg = add_poisson_noise(img, 1.0, True, np.random.default_rng(0)) - img
    assert torch.equal(pg[0], pg[2]) and float(pg.std()) > 0.01


def test_poisson_noise_grows_with_brightness_and_scale() -> None:
    """Shot noise: variance proportional to intensity, amplitude proportional to ``scale``."""

    def std_at(level: float, scale: float) -> float:
        img = torch.full((3, 65, 256), level)
        img[:, 0, :] = torch.linspace(0, 1, 256)  # all 256 grey levels present, as in a photo
        noisy = add_poisson_noise(img, scale, False, np.random.default_rng(0))
        return float((noisy - img)[:, 1:, :].std())

    assert std_at(0.6, 1.0) > 1.5 * std_at(0.15, 1.0)
    assert std_at(0.15, 1.0) == pytest.approx(math.sqrt(0.15 / 256), rel=0.15)
    assert std_at(0.15, 0.5) == pytest.approx(0.5 * std_at(0.15, 1.0), rel=0.05)


def test_jpeg_quality_orders_error(astronaut: torch.Tensor) -> None:
    x = astronaut
    errs = [float((jpeg_compress(x, q) - x).abs().mean()) for q in (20, 50, 95)]
    assert errs[0] > errs[1] > errs[2] > 0
    assert errs[2] < 0.02  # high quality is near-lossless: channels not swapped, no shift
    assert torch.equal(jpeg_compress(x, 50), jpeg_compress(x, 50))
    with pytest.raises(ValueError, match="quality"):
        jpeg_compress(x, 0)


@pytest.mark.parametrize("mode", ["area", "bilinear", "bicubic"])
@pytest.mark.parametrize("size", [(48, 80), (17, 23), (128, 128), (200, 151), (1, 3)])
def test_resize_matches_torch_interpolate(mode: str, size: tuple[int, int]) -> None:
    """Our thread-independent resize reproduces F.interpolate (Real-ESRGAN's resize) up to float error."""
    x = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(0))
    ours = resize(x, size, mode)
    ref = F.interpolate(x[None], size=size, mode=mode, align_corners=None if mode == "area" else False)[0]
    assert ours.shape == (3, *size)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=0)


def test_filter2d_matches_reflect_padded_convolution(astronaut: torch.Tensor) -> None:
    """Same result as BasicSR's filter2D (reflect padding + conv2d), for a direct and a DFT-sized kernel."""
    for kernel in (make_kernel({"kind": "aniso", "size": 7, "sigma_x": 2.0, "sigma_y": 0.7, "theta": 0.4}),
                   circular_lowpass_kernel(21, 1.2)):
        k = kernel.shape[0]
        padded = F.pad(astronaut[None], (k // 2,) * 4, mode="reflect")
        ref = F.conv2d(padded, torch.from_numpy(kernel).expand(3, 1, k, k), groups=3)[0]
        torch.testing.assert_close(filter2d(astronaut, kernel), ref, atol=1e-5, rtol=0)


def test_output_does_not_depend_on_thread_counts(astronaut: torch.Tensor) -> None:
    """A parallel data-set build (workers with 1 thread each) must give the same bits as a serial one."""
    torch_threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    try:
        results = []
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            cv2.setNumThreads(n)
            results.append([degrade(astronaut, 4, np.random.default_rng(s))[0] for s in range(8)])
    finally:
        torch.set_num_threads(torch_threads)
        cv2.setNumThreads(cv2_threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("scale", [1, 3, 8, 0, -4])
def test_unsupported_scale_raises(astronaut: torch.Tensor, scale: int) -> None:
    with pytest.raises(ValueError, match="scale must be one of"):
        degrade(astronaut, scale, np.random.default_rng(0))


def test_non_divisible_size_raises() -> None:
    hr = torch.rand(3, 66, 64)
    with pytest.raises(ValueError, match="not divisible by scale 4"):
        degrade(hr, 4, np.random.default_rng(0))
    degrade(hr, 2, np.random.default_rng(0))  # 66 and 64 are fine at x2


@pytest.mark.parametrize(
    "bad,match",
    [
        (torch.rand(64, 64), r"shape \(3, H, W\)"),
        (torch.rand(1, 3, 64, 64), r"shape \(3, H, W\)"),
        (torch.rand(4, 64, 64), r"shape \(3, H, W\)"),
        (torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8), "float"),
        (torch.rand(3, 64, 64) * 255, r"\[0, 1\]"),
        (torch.full((3, 64, 64), float("nan")), "NaN"),
        (np.zeros((3, 64, 64), np.float32), "torch.Tensor"),
    ],
)
def test_wrong_input_raises(bad: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        degrade(bad, 4, np.random.default_rng(0))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: KernelConfig(sigma_range=(3.0, 0.2)), "sigma_range"),
        (lambda: KernelConfig(kind_probs=(0.5, 0.5, 0.0, 0.0, 0.0, 0.1)), "sum to 1"),
        (lambda: KernelConfig(kinds=("box",), kind_probs=(1.0,)), "unknown kernel kinds"),
        (lambda: KernelConfig(sizes=(7, 8)), "odd"),
        (lambda: KernelConfig(sinc_omega_small=(1.0, 4.0)), "sinc_omega_small"),
        (lambda: RoundConfig(resize_range=(1.2, 1.5)), "contain 1"),
        (lambda: RoundConfig(jpeg_range=(95, 30)), "jpeg_range"),
        (lambda: RoundConfig(gray_noise_prob=1.5), "gray_noise_prob"),
        (lambda: RoundConfig(resize_modes=("nearest",)), "resize_modes"),
        (lambda: DegradationConfig(final_sinc_prob=-0.1), "final_sinc_prob"),
    ],
)
def test_invalid_config_raises(make, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        make()


def test_config_dict_round_trip_and_unknown_keys() -> None:
    cfg = DegradationConfig(round2=replace(DegradationConfig().round2, jpeg_range=(50, 60)))
    d = cfg.to_dict()
    assert is_plain_json(d)
    assert DegradationConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert DegradationConfig.from_dict({"round1": {"kernel": {"sinc_prob": 0.0}}}).round1.kernel.sinc_prob == 0.0
    with pytest.raises(ValueError, match="unknown key"):
        DegradationConfig.from_dict({"round1": {"blur_sigma": [0.2, 3]}})


def test_defaults_are_real_esrgan_x4plus() -> None:
    cfg = DegradationConfig()
    r1, r2 = cfg.round1, cfg.round2
    assert r1.kernel.sigma_range == (0.2, 3.0) and r2.kernel.sigma_range == (0.2, 1.5)
    assert r1.resize_range == (0.15, 1.5) and r2.resize_range == (0.3, 1.2)
    assert r1.resize_probs == (0.2, 0.7, 0.1) and r2.resize_probs == (0.3, 0.4, 0.3)
    assert r1.noise_sigma_range == (1.0, 30.0) and r2.noise_sigma_range == (1.0, 25.0)
    assert r1.poisson_scale_range == (0.05, 3.0) and r2.poisson_scale_range == (0.05, 2.5)
    assert r1.blur_prob == 1.0 and r2.blur_prob == 0.8 and cfg.final_sinc_prob == 0.8
    assert r1.kernel.kind_probs == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03) and r1.kernel.sinc_prob == 0.1
