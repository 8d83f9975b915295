"""The command line: help texts, one-line errors for bad arguments, a small end-to-end build."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from finpercep.cli import COMMANDS, main

SRC = str(Path(__file__).parents[1] / "src")


def run(*args: str) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "finpercep.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_top_level_help_lists_every_group(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for group, _ in COMMANDS:
        assert group in out


@pytest.mark.parametrize("key", list(COMMANDS))
def test_each_subcommand_has_its_own_help(key, capsys):
    with pytest.raises(SystemExit) as e:
        main([*(k for k in key if k), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert COMMANDS[key][1].split(":")[0] in out


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--families", "nope"], "unknown SR family 'nope'"),
        (["--scale", "3"], "scale must be 2 or 4"),
        (["--num", "-5"], "--num must be a positive"),
        (["--workers", "0"], "--workers must be >= 1"),
        (["--shard", "3/2"], "--shard"),
    ],
)
def test_bad_build_arguments_give_one_clear_line(photo_dir, tmp_path, extra, words):
    base = ["data", "build", "--images", str(photo_dir), "--out", str(tmp_path / "o"), "--num", "2"]
    r = run(*base, *extra)
    assert r.returncode == 2
    assert words in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_missing_images_folder(tmp_path):
    r = run("data", "build", "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--num", "2")
    assert r.returncode == 2 and "no such folder" in r.stderr and "Traceback" not in r.stderr


def test_build_check_show_end_to_end(photo_dir, tmp_path):
    out = tmp_path / "d"
    r = run("-q", "data", "build", "--images", str(photo_dir), "--out", str(out), "--num", "4", "--crop", "64",
            "--families", "bicubic,ringing", "--masks-per-sr", "2")
    assert r.returncode == 0, r.stderr
    assert "4/4 samples" in r.stdout
    r = run("data", "check", str(out))
    assert r.returncode == 0 and "0 problems" in r.stdout
    r = run("data", "show", str(out), "--num", "2", "--to", str(tmp_path / "sheet.png"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "sheet.png").stat().st_size > 1000
    r = run("data", "families")
    assert r.returncode == 0 and "realesrgan" in r.stdout and "procedural" in r.stdout


def test_policy_train_and_list(photo_dir, tmp_path):
    r = run("-q", "policy", "train", "tiny", "--photos", str(photo_dir), "--out", str(tmp_path / "t"), "--steps", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "t" / "model" / "model.safetensors").exists() and "--policy" in r.stdout
    r = run("policy", "train", "flow", "--photos", str(tmp_path / "nope"), "--out", str(tmp_path / "f"))
    assert r.returncode == 2 and "no such folder" in r.stderr
    r = run("policy", "list")
    assert r.stdout.split() == ["realesrgan-x4", "realsr-x4", "waifu2x-photo-x2", "tiny-x4", "flow-x4"]
