"""The data-set builder: manifest contract, determinism, shards, extension, resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tree_bytes
from finpercep.data.builder import BuildConfig, build_dataset, merge_datasets
from finpercep.data.dataset import FGRDataset, check_dataset, collate, read_manifest
from finpercep.data.sr_zoo import resolve_families, user_family

FAST = ("bicubic", "halo", "blocking")


def tiny(num: int, **kw) -> BuildConfig:
    kw.setdefault("families", FAST)
    kw.setdefault("crop", 64)
    return BuildConfig(num=num, masks_per_sr=2, **kw)


def test_manifest_contract_and_dataset(photo_dir, tmp_path):
    rep = build_dataset(photo_dir, tmp_path / "d", tiny(6), progress=False)
    assert rep.complete and rep.done == 6 and rep.built_now == 6 and not rep.failed_units
    assert check_dataset(tmp_path / "d") == []
    records = read_manifest(tmp_path / "d")
    assert [r["id"] for r in records] == [f"s{i:07d}" for i in range(6)]
    for r in records:
        for key in ("id", "hr", "lr", "sr", "syn", "mask", "map_syn", "map_sr", "sr_family", "mask_kind",
                    "mask_area", "seed", "photo", "crop_box", "degradation", "sr_params"):
            assert key in r
        assert not Path(r["hr"]).is_absolute()
        assert 0.03 <= r["mask_area"] <= 0.30
    # the round-robin reaches every requested family (3 units, 3 families)
    assert sorted({r["sr_family"] for r in records}) == sorted(FAST)
    info = json.loads((tmp_path / "d" / "dataset.json").read_text())
    assert info["num_samples"] == 6 and info["finpercep_version"] and info["config"]["crop"] == 64

    ds = FGRDataset(tmp_path / "d", keys=("hr", "lr", "sr", "syn", "mask", "map_syn", "map_sr"))
    batch = collate([ds[0], ds[1]])
    assert batch["hr"].shape == (2, 3, 64, 64) and batch["lr"].shape == (2, 3, 16, 16)
    assert batch["mask"].shape == (2, 1, 64, 64) and batch["map_syn"].shape == (2, 1, 64, 64)
    m, syn, hr, sr = batch["mask"], batch["syn"], batch["hr"], batch["sr"]
    assert torch.equal(syn, m * sr + (1 - m) * hr)
    # the map is where the swap is: higher inside the mask than outside
    inside = (batch["map_syn"] * m).sum() / m.sum()
    outside = (batch["map_syn"] * (1 - m)).sum() / (1 - m).sum()
    assert inside > outside
    assert len(FGRDataset(tmp_path / "d", exclude_families=["halo"])) == 4


def test_deterministic_bytes_across_runs_and_workers(photo_dir, tmp_path):
    cfg = tiny(6, seed=3)
    build_dataset(photo_dir, tmp_path / "a", cfg, progress=False)
    build_dataset(photo_dir, tmp_path / "b", cfg, progress=False)
    build_dataset(photo_dir, tmp_path / "c", cfg, workers=2, progress=False)
    a = tree_bytes(tmp_path / "a")
    assert a == tree_bytes(tmp_path / "b")
    assert a == tree_bytes(tmp_path / "c")
    build_dataset(photo_dir, tmp_path / "other", tiny(6, seed=4), progress=False)
    assert tree_bytes(tmp_path / "other")["manifest.jsonl"] != a["manifest.jsonl"]


def test_shards_merge_into_the_unsharded_build(photo_dir, tmp_path):
    cfg = tiny(7)
    build_dataset(photo_dir, tmp_path / "full", cfg, progress=False)
    for i in range(3):
        rep = build_dataset(photo_dir, tmp_path / f"part{i}", cfg, shard=(i, 3), progress=False)
        assert rep.complete
    with pytest.raises(ValueError, match="same shard"):
        merge_datasets([tmp_path / "part0", tmp_path / "part0"], tmp_path / "bad")
    n = merge_datasets([tmp_path / f"part{i}" for i in range(3)], tmp_path / "merged")
    assert n == 7
    assert tree_bytes(tmp_path / "merged") == tree_bytes(tmp_path / "full")


def test_extending_a_build_equals_building_it_at_once(photo_dir, tmp_path):
    build_dataset(photo_dir, tmp_path / "grow", tiny(3), progress=False)
    rep = build_dataset(photo_dir, tmp_path / "grow", tiny(8), progress=False)
    assert rep.built_now == 5 and rep.done == 8
    build_dataset(photo_dir, tmp_path / "once", tiny(8), progress=False)
    assert tree_bytes(tmp_path / "grow") == tree_bytes(tmp_path / "once")


def test_resume_refuses_other_settings(photo_dir, tmp_path):
    build_dataset(photo_dir, tmp_path / "d", tiny(2), progress=False)
    with pytest.raises(ValueError, match="seed"):
        build_dataset(photo_dir, tmp_path / "d", tiny(2, seed=9), progress=False)


def test_torn_manifest_line_is_repaired(photo_dir, tmp_path):
    out = tmp_path / "d"
    build_dataset(photo_dir, out, tiny(4), progress=False)
    reference = tree_bytes(out)
    lines = (out / "manifest.jsonl").read_bytes().splitlines(keepends=True)
    # as if killed while writing sample 3's line: keep 2 lines and half of the third
    (out / "manifest.jsonl").write_bytes(b"".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    (out / "dataset.json").unlink()
    rep = build_dataset(photo_dir, out, tiny(4), progress=False)
    assert rep.built_now == 2 and rep.complete
    assert tree_bytes(out) == reference


@pytest.mark.slow
def test_resume_after_kill_9(photo_dir, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "finpercep.cli", "-q", "data", "build", "--images", str(photo_dir),
            "--out", str(out), "--num", "40", "--crop", "64", "--masks-per-sr", "2",
            "--families", ",".join(FAST)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "manifest.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists() and manifest.read_bytes().count(b"\n") >= 4:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the build finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(read_manifest(out))
    assert 4 <= partial < 40
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    records = read_manifest(out)
    assert len(records) == 40 and len({r["id"] for r in records}) == 40
    assert check_dataset(out) == []
    clean = tmp_path / "clean"
    subprocess.run([a if a != str(out) else str(clean) for a in args], env=env, check=True, timeout=300)
    assert tree_bytes(out) == tree_bytes(clean)
    # no temporary file left behind by the kill
    assert not [p for p in out.rglob("*.tmp")]


def test_bad_input_files_are_skipped_or_converted(tmp_path, caplog):
    import skimage.data as sd

    d = tmp_path / "imgs"
    d.mkdir()
    rgb = sd.astronaut()
    Image.fromarray(rgb).convert("L").save(d / "grey.png")
    Image.fromarray(rgb).convert("RGBA").save(d / "rgba.png")
    Image.fromarray(rgb).convert("P").save(d / "palette.png")
    Image.fromarray((sd.camera().astype(np.uint16) * 257)).save(d / "deep16.png")
    Image.fromarray(rgb[:40, :40]).save(d / "small.png")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" + os.urandom(100))
    (d / "text.png").write_text("hello")
    good = Image.fromarray(rgb)
    good.save(d / "truncated.jpg")
    data = (d / "truncated.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 3])
    rep = build_dataset(d, tmp_path / "out", tiny(4), progress=False)
    assert rep.complete and rep.done == 4
    skipped = {s["file"]: s["reason"] for s in rep.skipped_photos}
    assert set(skipped) == {"small.png", "corrupt.jpg", "text.png", "truncated.jpg"}
    assert "smaller" in skipped["small.png"]
    assert rep.photos_used == 4  # grey, rgba, palette, 16-bit converted and used
    assert check_dataset(tmp_path / "out") == []
    with pytest.raises(ValueError, match="no usable photo"):
        build_dataset(d, tmp_path / "none", tiny(2, crop=4096), progress=False)


def test_bad_config_values_raise_clear_errors():
    with pytest.raises(ValueError, match="scale"):
        tiny(2, scale=3)
    with pytest.raises(ValueError, match="num"):
        tiny(-1)
    with pytest.raises(ValueError, match="unknown SR family 'nope'"):
        tiny(2, families=("nope",))
    with pytest.raises(ValueError, match="mask kinds"):
        tiny(2, mask_kinds=("hexagon",))


def test_family_groups_resolve():
    real = resolve_families("real", 4)
    assert real and all(f.kind == "real" for f in real)
    assert {f.name for f in resolve_families("interpolation", 2)} >= {"bicubic", "lanczos"}
    assert len(resolve_families("all", 4)) == len({f.name for f in resolve_families("all", 4)})


def test_user_model_as_sr_family(photo_dir, tmp_path):
    def nearest_x4(lr: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(lr, scale_factor=4, mode="nearest")

    fam = user_family("nearest", nearest_x4)
    rep = build_dataset(photo_dir, tmp_path / "u", tiny(4, families=()), extra_families=(fam,), progress=False)
    assert rep.complete
    assert {r["sr_family"] for r in read_manifest(tmp_path / "u")} == {"nearest"}
    bad = user_family("broken", lambda lr: lr)  # forgets to upscale
    rep = build_dataset(photo_dir, tmp_path / "b", tiny(2, families=()), extra_families=(bad,), progress=False)
    assert not rep.complete and rep.failed_units and "expected" in rep.failed_units[0]["error"]


def test_crops_prefer_texture(tmp_path):
    """A photo that is flat except for one textured quarter: crops land on the texture."""
    img = np.full((256, 256, 3), 128, np.uint8)
    img[:128, :128] = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    (tmp_path / "p").mkdir()
    Image.fromarray(img).save(tmp_path / "p" / "half.png")
    rep = build_dataset(tmp_path / "p", tmp_path / "d", tiny(8, min_texture=0.05, crop_tries=16), progress=False)
    assert rep.complete
    recs = read_manifest(tmp_path / "d")
    assert all(r["crop_texture"] >= 0.05 for r in recs)
    flat = build_dataset(tmp_path / "p", tmp_path / "f", tiny(8, min_texture=0.0), progress=False)
    assert flat.complete  # min_texture 0 takes the first crop, textured or not
