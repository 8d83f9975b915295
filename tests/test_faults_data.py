"""Faults of the data engine: each bad input or broken environment ends in one clear
line and a state a rerun can resume from, never in a traceback, a corrupt map or an orphan process."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import finpercep.data.builder as builder
import finpercep.io as fio
from conftest import tree_bytes
from finpercep import cli
from finpercep.data import sheet
from finpercep.data.builder import BuildConfig, build_dataset
from finpercep.data.dataset import FGRDataset, check_dataset, read_manifest

BUILD_ARGS = ["--num", "2", "--crop", "64", "--masks-per-sr", "2", "--families", "bicubic", "--workers", "1"]


@pytest.fixture(scope="module")
def built(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-sample data set, as `finpercep data build ... BUILD_ARGS` makes it."""
    out = tmp_path_factory.mktemp("built") / "d"
    build_dataset(photo_dir, out, BuildConfig(num=2, crop=64, masks_per_sr=2, families=("bicubic",)), progress=False)
    return out


@pytest.fixture()
def dataset(built: Path, tmp_path: Path) -> Path:
    """A copy of ``built`` this test may damage."""
    return Path(shutil.copytree(built, tmp_path / "d"))


def _error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()


# ---------------------------------------------------------------------------------------------
# A manifest line that is not a sample record


@pytest.mark.parametrize("line", ["42", '{"hr": "x.png"}', '{"id": 7}', "[1, 2]"])
@pytest.mark.parametrize("reader", ["read_manifest", "sheet", "dataset", "pairs"])
def test_a_manifest_line_that_is_not_a_record_names_file_and_line(dataset: Path, line: str, reader: str) -> None:
    from finpercep.rl.common import PairData

    manifest = dataset / "manifest.jsonl"
    first = manifest.read_text().splitlines()[0]
    manifest.write_text(f"{first}\n{line}\n")
    read = {"read_manifest": read_manifest, "sheet": lambda d: sheet.render_contact_sheet(d, d / "sheet.png"),
            "dataset": FGRDataset, "pairs": PairData}[reader]
    with pytest.raises(ValueError, match=r"manifest\.jsonl line 2: not a sample record .*; fix or delete that line"):
        read(dataset)


def test_a_record_missing_a_key_names_the_line_and_the_key(dataset: Path) -> None:
    manifest = dataset / "manifest.jsonl"
    rec = json.loads(manifest.read_text().splitlines()[1])
    del rec["map_syn"]
    manifest.write_text(manifest.read_text().splitlines()[0] + "\n" + json.dumps(rec) + "\n")
    for read in (lambda d: sheet.render_contact_sheet(d, d / "sheet.png"), FGRDataset):
        with pytest.raises(ValueError, match=r"line 2: sample s0000001 has missing keys \['map_syn'\]"):
            read(dataset)
    assert len(FGRDataset(dataset, keys=("hr", "syn"))) == 2  # a reader that does not need it still works


def test_data_check_reports_a_bad_line_in_one_line(dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (dataset / "manifest.jsonl").write_text("42\n")
    assert cli.main(["data", "check", str(dataset)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("manifest.jsonl line 1: not a sample record (a JSON object with a string \"id\"), "
                           "got 42; fix or delete that line")
    assert out[1] == f"{dataset}: ? samples, 1 problems"


# ---------------------------------------------------------------------------------------------
# A corrupt ground-truth map


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1.5])
def test_a_map_with_nan_or_out_of_range_values_is_refused(dataset: Path, bad: float) -> None:
    path = dataset / builder.sample_paths(1)["map_syn"]
    m = np.load(path)
    m[3, 5] = bad
    np.save(path, m)
    ds = FGRDataset(dataset, keys=("hr", "map_syn"))
    assert float(ds[0]["map_syn"].max()) <= 1  # the other sample reads as before
    with pytest.raises(ValueError, match=r"sample s0000001: map_syn .*s0000001_map_syn\.npy .*rebuild the sample"):
        ds[1]
    assert [p for p in check_dataset(dataset) if p.startswith("s0000001: map_syn")]


def test_a_nan_map_does_not_reach_reward_model_training(dataset: Path) -> None:
    from finpercep.reward.train import Triplets

    path = dataset / builder.sample_paths(0)["map_syn"]
    np.save(path, np.full_like(np.load(path), np.nan))
    triplets = Triplets(dataset, read_manifest(dataset), pixel_only=False)
    with pytest.raises(ValueError, match="sample s0000000: map_syn .* NaN or infinite"):
        triplets.load([1, 0], None, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------
# A part whose manifest points outside it


@pytest.mark.parametrize("escape", ["../secret.png", "ABSOLUTE"])
def test_merge_refuses_paths_outside_the_part(dataset: Path, tmp_path: Path, escape: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for the merged data set")
    rel = str(secret) if escape == "ABSOLUTE" else escape
    manifest = dataset / "manifest.jsonl"
    recs = [json.loads(line) for line in manifest.read_text().splitlines()]
    recs[1]["hr"] = rel
    manifest.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "merged" / "out"
    assert cli.main(["data", "merge", str(dataset), "--out", str(out)]) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and "sample s0000001: hr" in err[0] and repr(rel) in err[0]
    assert not (tmp_path / "merged").exists()  # nothing written, inside --out or outside it


def test_merge_of_a_clean_part_still_works(dataset: Path, tmp_path: Path) -> None:
    assert builder.merge_datasets([dataset], tmp_path / "m") == 2
    assert tree_bytes(tmp_path / "m", skip=("build_stats.json", "build.json")) == \
        tree_bytes(dataset, skip=("build_stats.json", "build.json"))


# ---------------------------------------------------------------------------------------------
# A full or read-only disk


@pytest.mark.parametrize("fails", ["s0000001_syn.png", "manifest.jsonl", "build_stats.json"])
def test_a_full_disk_stops_the_build_with_one_line_and_a_rerun_resumes(
    photo_dir: Path, built: Path, tmp_path: Path, fails: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The disk fills while writing a sample, the final manifest or the run's stats (the last write)."""
    real = fio.atomic_write_bytes

    def full_disk(path: str | Path, data: bytes) -> None:
        if Path(path).name == fails:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(fio, "atomic_write_bytes", full_disk)
    monkeypatch.setattr(builder, "atomic_write_bytes", full_disk)
    out = tmp_path / "d"
    args = ["-q", "data", "build", "--images", str(photo_dir), "--out", str(out), *BUILD_ARGS]
    assert cli.main(args) == 1
    err = _error_lines(capsys)
    assert len(err) == 1, err
    assert err[0].startswith("finpercep: error: data build stopped: cannot write ")
    assert f"{fails} (No space left on device); free space (or make it writable) and rerun to resume" in err[0]

    monkeypatch.undo()  # space freed
    assert cli.main(args) == 0
    assert tree_bytes(out) == tree_bytes(built)


def test_a_failed_manifest_append_stops_the_build(photo_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = tmp_path / "d" / "manifest.jsonl"
    real = os.fsync

    def fsync(fd: int) -> None:  # the file system turns read-only under the manifest's journal
        if manifest.exists() and os.fstat(fd).st_ino == manifest.stat().st_ino:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(fio.WriteError) as info:
        build_dataset(photo_dir, tmp_path / "d", BuildConfig(num=2, crop=64, masks_per_sr=2, families=("bicubic",)),
                      progress=False)
    assert info.value.filename == str(manifest) and info.value.errno == errno.EROFS


# ---------------------------------------------------------------------------------------------
# A build killed with kill -9


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an exited child nobody has reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers through /proc")
def test_workers_exit_when_the_build_process_is_killed(photo_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "d"
    args = [sys.executable, "-m", "finpercep.cli", "-q", "data", "build", "--images", str(photo_dir),
            "--out", str(out), "--num", "40", "--crop", "64", "--masks-per-sr", "2",
            "--families", "bicubic,halo,blocking", "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kids: list[int] = []
    try:
        deadline = time.time() + 120
        manifest = out / "manifest.jsonl"
        while time.time() < deadline and proc.poll() is None:  # until the workers are building
            if manifest.exists() and manifest.read_bytes().count(b"\n") >= 1:
                break
            time.sleep(0.05)
        kids = _children(proc.pid)
        assert proc.poll() is None, "the build finished before it could be killed; make it longer"
        assert len(kids) >= 2  # two workers (and multiprocessing's resource tracker)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 5
        while time.time() < deadline and any(_running(k) for k in kids):
            time.sleep(0.05)
        assert not [k for k in kids if _running(k)], "worker processes outlived the killed build"
    finally:
        for pid in [proc.pid, *kids]:  # whatever this test started and is still running
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
