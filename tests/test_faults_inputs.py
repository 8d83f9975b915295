"""What users hand the library and the CLI: rotated phone JPEGs, transparent PNGs, float64 /
integer / bool / complex tensors, NaN float TIFFs, decompression bombs, killed writers, full disks
and ``--out`` paths that name a file."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finpercep import io as fio
from finpercep.cli import main
from finpercep.io import ImageReadError, WriteError, atomic_write_bytes, read_image, read_image_rgba

# ------------------------------------------------------------------------------------ helpers


def _noise(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8).squeeze()


def _rotated_jpeg(path: Path) -> np.ndarray:
    """Write a JPEG stored 160 wide x 96 high with EXIF Orientation=6 (a phone held upright);
    return its stored pixels as decoded, ignoring the tag."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_noise(96, 160)).save(path, quality=95, exif=exif)
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _float_tiff(path: Path, value: float) -> Path:
    Image.fromarray(np.full((16, 16), value, np.float32)).save(path)
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def _host() -> str:
    return fio._host_tag()


# ------------------------------------------------------------------------- 1. EXIF orientation


def test_exif_orientation_is_applied_when_reading(tmp_path):
    stored = _rotated_jpeg(tmp_path / "phone.jpg")
    arr, notes = read_image(tmp_path / "phone.jpg")
    assert arr.shape == (160, 96, 3)  # upright: H=160, W=96
    # Orientation 6: the stored picture is turned 90 degrees clockwise for display.
    assert np.array_equal(arr, np.rot90(stored, k=-1))
    assert any("EXIF orientation 6" in n for n in notes)


def test_score_and_sr_see_the_upright_image(tmp_path, tiny_rm_run, capsys):
    stored = _rotated_jpeg(tmp_path / "phone.jpg")
    Image.fromarray(np.ascontiguousarray(np.rot90(stored, k=-1))).save(tmp_path / "upright.png")
    rc = main(["-q", "score", str(tmp_path / "phone.jpg"), str(tmp_path / "upright.png"), "--json",
               "--checkpoint", str(tiny_rm_run)])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0 and [(r["height"], r["width"]) for r in rows] == [(160, 96), (160, 96)]
    assert rows[0]["score"] == pytest.approx(rows[1]["score"], abs=1e-6)

    assert main(["-q", "sr", str(tmp_path / "phone.jpg"), "--policy", "tiny-x4", "--out", str(tmp_path / "sr")]) == 0
    with Image.open(tmp_path / "sr" / "phone.png") as im:
        assert im.size == (384, 640) and im.mode == "RGB"


# ----------------------------------------------------------------------------------- 2. alpha


def test_sr_keeps_alpha_and_rgb_stays_rgb(tmp_path, capsys):
    from finpercep.policies.upscale import upscale_alpha

    rgba = _noise(12, 20, 4)
    rgba[:, :10, 3], rgba[:, 10:, 3] = 0, 255  # left half transparent, right half opaque
    Image.fromarray(rgba).save(tmp_path / "logo.png")
    Image.fromarray(_noise(12, 20)).save(tmp_path / "photo.png")
    rc = main(["-q", "sr", str(tmp_path / "logo.png"), str(tmp_path / "photo.png"), "--policy", "tiny-x4",
               "--out", str(tmp_path / "out")])
    assert rc == 0 and "RGBA" in capsys.readouterr().out
    with Image.open(tmp_path / "out" / "logo.png") as im:
        assert im.mode == "RGBA" and im.size == (80, 48)
        alpha = np.asarray(im)[..., 3]
    assert np.array_equal(alpha, upscale_alpha(rgba[..., 3], (48, 80)))
    assert alpha[:, :36].max() == 0 and alpha[:, 44:].min() == 255
    with Image.open(tmp_path / "out" / "photo.png") as im:
        assert im.mode == "RGB" and im.size == (80, 48)
    rgb, a, _ = read_image_rgba(tmp_path / "logo.png")
    assert np.array_equal(rgb, rgba[..., :3]) and np.array_equal(a, rgba[..., 3])  # straight colour, not composited


# ----------------------------------------------------------------------------------- 3. dtype


@pytest.fixture(scope="module")
def embedded_rm():
    from finpercep.reward.api import load_reward

    return load_reward()


def test_load_reward_accepts_float64_as_float32(embedded_rm):
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        s32, s64 = embedded_rm(x).score, embedded_rm(x.double()).score
    assert s64.dtype == torch.float32
    assert torch.allclose(s64, s32, atol=1e-5, rtol=0)


def _entry_points() -> dict:
    """Every public callable that takes an image batch: name -> lazy factory of ``f(x) -> tensor``."""
    from finpercep.rewards import REWARDS, create_reward

    def rm():
        from finpercep.reward.api import load_reward

        model = load_reward()
        return lambda x: model(x).score

    def baseline(name):
        def make():
            from finpercep import baselines

            return getattr(baselines, name)
        return make

    def stlpips():
        from finpercep.baselines import STLPIPS

        metric = STLPIPS("alex")
        return lambda x: metric(x, x.flip(-1))

    def upscale():
        from finpercep.policies.tiny import TinyConfig, TinySR
        from finpercep.policies.upscale import upscale_tiled

        torch.manual_seed(0)
        policy = TinySR(TinyConfig(channels=8, num_layers=2)).eval()
        return lambda x: upscale_tiled(policy, x[..., :16, :24], tile=8, context=4)

    def reward(name):
        def make():
            r = create_reward(name)
            return lambda x: r(x, hr=x.flip(-1)).score
        return make

    points = {"load_reward": rm, "niqe": baseline("niqe"), "brisque": baseline("brisque"), "piqe": baseline("piqe"),
              "STLPIPS": stlpips, "upscale_tiled": upscale}
    points.update({f"reward:{n}": reward(n) for n in REWARDS})
    return points


ENTRY_POINTS = _entry_points()
_built: dict = {}


def _entry(name: str):
    if name not in _built:
        _built[name] = ENTRY_POINTS[name]()
    return _built[name]


IMAGE = torch.rand(1, 3, 96, 192, generator=torch.Generator().manual_seed(1))  # NIQE needs two 96x96 blocks


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_every_entry_point_accepts_float_dtypes(name, dtype):
    f = _entry(name)
    with torch.no_grad():
        ref, out = f(IMAGE), f(IMAGE.to(dtype))
    assert out.shape == ref.shape and torch.isfinite(out.float()).all()
    if dtype == torch.float64:  # same values, more precision: the same result
        assert torch.allclose(out.double(), ref.double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda x: (x * 255).round().to(torch.uint8), "divide by 255"),
        (lambda x: (x * 255).round().to(torch.int64), "divide by 255"),
        (lambda x: x > 0.5, "bool"),
        (lambda x: x.to(torch.complex64), "complex"),
    ],
    ids=["uint8", "int64", "bool", "complex64"],
)
@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_every_entry_point_refuses_other_dtypes_in_one_line(name, make, words):
    with pytest.raises(ValueError, match=words) as info:
        _entry(name)(make(IMAGE))
    assert "\n" not in str(info.value)


def test_check_image_batch_casts_differentiably():
    from finpercep.checks import check_image_batch

    x = torch.rand(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    y = check_image_batch(x, "t", dtype=torch.float32)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert check_image_batch(x, "t") is x  # no dtype: unchanged


# ------------------------------------------------------------------------------- 4. NaN / inf


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_float_tiff_is_refused(tmp_path, value):
    with pytest.raises(ImageReadError, match="NaN or infinite values in 256 of 256 pixels") as info:
        read_image(_float_tiff(tmp_path / "bad.tif", value))
    assert "\n" not in str(info.value)


def test_finite_float_tiff_still_reads(tmp_path):
    arr, notes = read_image(_float_tiff(tmp_path / "ok.tif", 0.5))
    assert arr.shape == (16, 16, 3) and (arr == 128).all() and "converted F" in notes[0]


def test_score_and_sr_report_each_bad_file_and_do_the_rest(tmp_path, tiny_rm_run, capsys):
    bad = [_float_tiff(tmp_path / "nan.tif", float("nan")), _float_tiff(tmp_path / "inf.tif", float("inf"))]
    Image.fromarray(_noise(16, 16)).save(tmp_path / "good.png")
    files = [str(p) for p in bad] + [str(tmp_path / "good.png")]

    assert main(["-q", "score", *files, "--json", "--checkpoint", str(tiny_rm_run)]) == 1
    cap = capsys.readouterr()
    assert [json.loads(line)["path"] for line in cap.out.splitlines()] == [str(tmp_path / "good.png")]
    errors = [line for line in cap.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("NaN or infinite" in e for e in errors)

    assert main(["-q", "sr", *files, "--policy", "tiny-x4", "--out", str(tmp_path / "sr")]) == 1
    cap = capsys.readouterr()
    errors = cap.err.splitlines()
    assert len(errors) == 2 and all(e.startswith(f"error: {p}: ") for e, p in zip(errors, bad))
    assert sorted(p.name for p in (tmp_path / "sr").iterdir()) == ["good.png"]


# --------------------------------------------------------------------------------- 5. huge images


def test_huge_image_is_refused_from_its_header(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (17000, 17000)).save(path)  # 289 MP; ~35 kB on disk
    assert path.stat().st_size < 100_000
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow DecompressionBombWarning either
        with pytest.raises(ImageReadError, match=r"17000x17000 \(289 MP\), above the 256 MP limit"):
            read_image(path)


# ------------------------------------------------------------------------------- 6. stale temps


def test_atomic_write_removes_dead_writers_temps_only(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    stale = tmp_path / f".x.png.{_host()}-{dead}.abc123.tmp"
    stale_dir = tmp_path / f".model.{_host()}-{dead}.q1w2e3.tmp"
    alive = tmp_path / f".x.png.{_host()}-{live}.def456.tmp"
    other_host = tmp_path / f".x.png.{_host()}x-{dead}.ghi789.tmp"
    legacy = tmp_path / ".x.png.jkl012.tmp"  # the old, PID-less name: nobody can tell, so it stays
    for p in (stale, alive, other_host, legacy):
        p.write_bytes(b"half")
    stale_dir.mkdir()
    (stale_dir / "config.json").write_text("{}")

    atomic_write_bytes(tmp_path / "x.png", b"new")
    assert (tmp_path / "x.png").read_bytes() == b"new"
    assert not stale.exists() and not stale_dir.exists()
    assert alive.exists() and other_host.exists() and legacy.exists()


def test_failed_atomic_write_leaves_no_temp_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    target.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError) as info:
        atomic_write_bytes(target, b"new")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_temp_names_carry_host_and_pid(tmp_path):
    tmp = fio.make_temp_sibling(tmp_path / "a.b.png")
    assert tmp.name.startswith(f".a.b.png.{_host()}-{os.getpid()}.") and tmp.name.endswith(".tmp")
    assert fio._TEMP_RE.fullmatch(tmp.name) and tmp.stat().st_size == 0


# ------------------------------------------------------------------------- 7. full disk, --out


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_sr_on_a_full_or_read_only_disk_is_one_line(tmp_path, monkeypatch, capsys, code):
    Image.fromarray(_noise(8, 8)).save(tmp_path / "a.png")
    out = tmp_path / "out"

    def fail(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fail)
    rc = main(["-q", "sr", str(tmp_path / "a.png"), "--policy", "tiny-x4", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert err == f"finpercep: error: cannot write: {out / 'a.png'} ({os.strerror(code)})\n"
    assert list(out.iterdir()) == []  # no temporary file left behind


def test_os_error_without_a_path_is_still_one_line(monkeypatch, capsys):
    import finpercep.cli as cli

    def boom(args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setitem(cli.COMMANDS, ("policy", "list"), (boom, "x"))
    assert main(["policy", "list"]) == 1
    assert capsys.readouterr().err == f"finpercep: error: cannot write ({os.strerror(errno.ENOSPC)})\n"


@pytest.mark.parametrize("module", ["matplotlib", "matplotlib.pyplot"])
def test_a_missing_extra_is_one_line_naming_it(monkeypatch, capsys, module):
    import finpercep.cli as cli
    from finpercep.checks import require

    def needs_report(args):  # what `report`, `score --overlay` or `data show` do without [report]
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # None in sys.modules: "not installed"
        require(module, extra="report")

    monkeypatch.setitem(cli.COMMANDS, ("policy", "list"), (needs_report, "x"))
    assert main(["policy", "list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("finpercep: error: ") and "pip install 'finpercep[report]'" in err


@pytest.mark.parametrize("command", [["sr", "--policy", "tiny-x4", "--out"], ["score", "--overlay"], ["score", "--maps"]])
def test_out_naming_a_file_where_a_folder_is_expected(tmp_path, capsys, command):
    Image.fromarray(_noise(8, 8)).save(tmp_path / "a.png")
    (tmp_path / "taken").write_text("mine")
    rc = main(["-q", command[0], str(tmp_path / "a.png"), *command[1:], str(tmp_path / "taken")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "is a file, but a folder is expected" in err
    assert (tmp_path / "taken").read_text() == "mine"


def test_report_out_naming_a_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a folder, but the report is one HTML file" in err
