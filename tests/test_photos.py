"""Real photos (finpercep.data.photos): the table, the split, the wheel fallback, the Debian path.

The Debian path is tested offline with fake ``apt-get`` / ``dpkg-deb`` programs on PATH (fake
packages built with the real ``dpkg-deb -b`` when it exists); one small real download (the 2 MB
palapeli-data package) is marked slow and skips where apt cannot download.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finpercep.data import photos
from finpercep.data.photos import (
    DEBIAN_PHOTOS,
    SPLITS,
    WHEEL_MIN_SHORT_SIDE,
    WHEEL_PHOTOS,
    PhotoRecord,
    PhotosUnavailable,
    downscale,
    fetch_photos,
    halving_factor,
    split_of,
)

MANIFEST_KEYS = {
    "name", "split", "file", "source", "package", "package_version", "member",
    "original_size", "saved_size", "scale", "licence", "author", "sha256",
}


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "photos.jsonl").read_text().splitlines()]


def _tree(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _fake_bin(tmp_path: Path, scripts: dict[str, str]) -> Path:
    """A folder holding only the given shell scripts, to put alone on PATH."""
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    for name, body in scripts.items():
        p = d / name
        p.write_text("#!/bin/sh\n" + body)
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return d


# ---- the table and the split --------------------------------------------------------------------
def test_split_table_is_disjoint_and_covers_every_listed_photo() -> None:
    names = [s.name for s in DEBIAN_PHOTOS + WHEEL_PHOTOS]
    assert len(names) == len(set(names)), "photo names must be unique"
    in_splits = [n for split in SPLITS.values() for n in split]
    assert len(in_splits) == len(set(in_splits)), "a photo is in two splits"
    assert set(in_splits) == set(names), "SPLITS and the photo tables disagree"
    assert set(SPLITS) == {"train", "val", "test"}
    debian = [split_of(s.name) for s in DEBIAN_PHOTOS]
    assert len(DEBIAN_PHOTOS) == 42
    assert (debian.count("train"), debian.count("val"), debian.count("test")) == (30, 6, 6)
    # every wheel split has a photo that needs only the required dependencies
    required = [s for s in WHEEL_PHOTOS if s.module in ("skimage", "matplotlib")]
    assert {split_of(s.name) for s in required} == {"train", "val", "test"}
    with pytest.raises(KeyError):
        split_of("not-a-photo")


def test_table_entries_are_complete() -> None:
    for s in DEBIAN_PHOTOS:
        assert s.kind == "debian" and s.package in photos.DEBIAN_VERSIONS_CHECKED
        assert s.member.startswith("usr/share/") and s.member.endswith(".jpg")
        assert s.licence and s.author and len(s.sha256) == 16
    for s in WHEEL_PHOTOS:
        assert s.kind == "wheel" and s.module and s.licence and s.author


def test_halving_rule_and_downscale() -> None:
    assert halving_factor(2560, 1600) == 2  # Debian: always halved
    assert halving_factor(512, 512, WHEEL_MIN_SHORT_SIDE) == 1  # 256 would be < 384
    assert halving_factor(1411, 1411, WHEEL_MIN_SHORT_SIDE) == 2  # 705 >= 384
    assert halving_factor(768, 2000, 384) == 2 and halving_factor(767, 2000, 384) == 1
    with pytest.raises(ValueError):
        halving_factor(0, 10)
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (101, 67, 3), dtype=np.uint8)
    small = downscale(arr, 2)
    assert small.shape == (50, 33, 3) and small.dtype == np.uint8
    assert downscale(arr, 1) is arr
    # anti-aliased: a 1-px checkerboard (pure aliasing bait) becomes flat grey, not a pattern
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, -1)
    assert downscale(checker, 2).std() < 8


# ---- wheel photos (fast, offline) ---------------------------------------------------------------
def test_wheel_fetch_end_to_end_and_idempotent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "photos"
    records = fetch_photos(out, source="wheels", progress=False)
    names = {r.name for r in records}
    assert {"astronaut", "chelsea", "coffee", "rocket", "motorcycle-left", "grace-hopper"} <= names
    assert {r.split for r in records} == {"train", "val", "test"}
    manifest = _manifest(out)
    assert [m["name"] for m in manifest] == [r.name for r in records]
    for m, r in zip(manifest, records):
        assert set(m) == MANIFEST_KEYS
        assert PhotoRecord.from_json(m) == r
        assert m["file"] == f"{m['split']}/{m['name']}.png" and m["split"] == split_of(m["name"])
        assert m["source"] == "wheel" and m["scale"] == 1  # all wheel photos are under 768 px
        with Image.open(out / m["file"]) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            assert list(im.size) == m["saved_size"] == m["original_size"]
    astronaut = np.asarray(Image.open(out / "train/astronaut.png"))
    import skimage.data

    assert np.array_equal(astronaut, skimage.data.astronaut())  # lossless copy
    assert not (out / ".cache").exists()

    before = _tree(out)

    def no_refetch(*a, **k):  # the second call must not read or write any photo again
        raise AssertionError("photo fetched again")

    monkeypatch.setattr(photos, "_save_photo", no_refetch)
    again = fetch_photos(out, source="wheels", progress=False)
    assert again == records and _tree(out) == before
    assert fetch_photos(out, source="auto", progress=False) == records  # complete wheel set is kept


def test_wheel_fetch_redoes_a_deleted_photo_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "photos"
    records = fetch_photos(out, source="wheels", progress=False)
    before = _tree(out)
    (out / "test/grace-hopper.png").unlink()
    calls = []
    real = photos._save_photo
    monkeypatch.setattr(photos, "_save_photo", lambda out_, s, *a: calls.append(s.name) or real(out_, s, *a))
    assert fetch_photos(out, source="wheels", progress=False) == records
    assert calls == ["grace-hopper"] and _tree(out) == before


def test_missing_apt_falls_back_to_wheels_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PATH", str(_fake_bin(tmp_path, {})))  # no apt-get, no dpkg-deb
    with caplog.at_level(logging.WARNING, logger="finpercep.data.photos"):
        records = fetch_photos(tmp_path / "out", progress=False)
    assert records and all(r.source == "wheel" for r in records)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "apt-get is not installed" in warning and "falling back" in warning
    with pytest.raises(PhotosUnavailable, match="apt-get"):
        fetch_photos(tmp_path / "out2", source="debian", progress=False)


def test_failing_apt_download_falls_back_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "apt.log"
    fail = f'echo "$@" >> {log}\necho "E: Unable to locate package $2" >&2\nexit 100\n'
    monkeypatch.setenv("PATH", str(_fake_bin(tmp_path, {"apt-get": fail, "dpkg-deb": "exit 2\n"})))
    with caplog.at_level(logging.WARNING, logger="finpercep.data.photos"):
        records = fetch_photos(tmp_path / "out", source="auto", progress=False)
    assert records and all(r.source == "wheel" for r in records)
    text = caplog.text
    assert "skipping Debian package" in text and "falling back" in text
    calls = log.read_text().splitlines()
    assert calls.count("update") == 1  # apt-get update tried once, not once per package
    assert sum(c.startswith("download") for c in calls) == len({s.package for s in DEBIAN_PHOTOS})


# ---- the Debian path, offline, with fake packages ---------------------------------------------
@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb not installed")
def test_debian_path_with_fake_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    table = (DEBIAN_PHOTOS[0], next(s for s in DEBIAN_PHOTOS if s.name == "kleiber"))
    repo = tmp_path / "repo"
    rng = np.random.default_rng(0)
    for s in table:  # build PKG_1.0_all.deb holding a small JPEG at the table's member path
        root = tmp_path / "build" / s.package
        (root / "DEBIAN").mkdir(parents=True)
        (root / "DEBIAN" / "control").write_text(
            f"Package: {s.package}\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n"
        )
        (root / s.member).parent.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (81, 120, 3), dtype=np.uint8)).save(root / s.member, quality=95)
        repo.mkdir(exist_ok=True)
        subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(root), str(repo / f"{s.package}_1.0_all.deb")], check=True, capture_output=True)
    log = tmp_path / "apt.log"
    fake_apt = f'echo "$@" >> {log}\n[ "$1" = download ] && cp {repo}/"$2"_1.0_all.deb . \n'
    bin_dir = _fake_bin(tmp_path, {"apt-get": fake_apt})
    os.symlink(shutil.which("dpkg-deb"), bin_dir / "dpkg-deb")
    monkeypatch.setattr(photos, "DEBIAN_PHOTOS", table)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)  # a relative --out, as `make demo` passes it (apt runs in another folder)
    with caplog.at_level(logging.WARNING, logger="finpercep.data.photos"):
        records = fetch_photos(Path("out"), source="debian", progress=False)
    assert [r.name for r in records] == [s.name for s in table]
    for r, s in zip(records, table):
        assert r.source == "debian" and r.package == s.package and r.package_version == "1.0"
        assert r.member == s.member and r.licence == s.licence and r.split == split_of(s.name)
        assert r.original_size == [120, 81] and r.saved_size == [60, 40] and r.scale == 2
        with Image.open(out / r.file) as im:
            assert im.size == (60, 40)
    assert "differs from the version we checked" in caplog.text  # fake files, so sha256 mismatch
    assert sorted(p.name for p in out.iterdir()) == ["photos.jsonl", "test", "train"]  # no .deb, no tree
    assert log.read_text().count("download") == 2

    before = _tree(out)
    assert fetch_photos(out, source="auto", progress=False) == records  # complete: nothing to do
    assert fetch_photos(out, source="debian", progress=False) == records
    assert log.read_text().count("download") == 2 and _tree(out) == before


# ---- a real download (slow; needs a Debian mirror) ----------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None, reason="apt-get/dpkg-deb not installed")
def test_real_debian_download_of_the_smallest_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = tuple(s for s in DEBIAN_PHOTOS if s.package == "palapeli-data")  # 2 MB, 5 photos
    monkeypatch.setattr(photos, "DEBIAN_PHOTOS", table)
    try:
        records = fetch_photos(tmp_path, source="debian", progress=False)
    except PhotosUnavailable as e:
        pytest.skip(f"apt cannot download here: {e}")
    assert len(records) == 5
    for r in records:
        assert r.scale == 2 and r.saved_size == [r.original_size[0] // 2, r.original_size[1] // 2]
        assert (tmp_path / r.file).is_file()
