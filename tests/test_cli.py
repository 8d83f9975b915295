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
    names, footer = r.stdout.split("\n\n")
    assert names.split() == ["realesrgan-x4", "realsr-x4", "waifu2x-photo-x2", "tiny-x4", "flow-x4"]
    assert "diffusers:PATH" in footer and "checkpoint folder" in footer


# Minimal arguments of each command that takes --device (the device is checked before any of them is read).
DEVICE_COMMANDS = {
    ("data", "build"): ["--images", "x", "--out", "y", "--num", "1"],
    ("score", ""): ["x"],
    ("rm", "train"): ["--data", "x", "--out", "y"],
    ("sr", ""): ["x", "--policy", "tiny-x4", "--out", "y"],
    ("rl", "train"): ["--policy", "tiny-x4", "--algo", "refl", "--data", "x", "--out", "y"],
    ("experiment", "hacking"): ["--algo", "refl", "--policy", "tiny-x4", "--data", "x", "--test-data", "x",
                                "--judge", "x", "--out", "y"],
}


def test_device_commands_are_every_command_with_a_device_option():
    import argparse

    from finpercep.cli import _add_options

    def has_device(key):
        p = argparse.ArgumentParser()
        _add_options(key, p)
        return "--device" in p._option_string_actions

    assert sorted(k for k in COMMANDS if has_device(k)) == sorted(DEVICE_COMMANDS)


@pytest.mark.parametrize("key", list(DEVICE_COMMANDS))
@pytest.mark.parametrize("device, words", [
    ("gpu", "--device gpu: not a torch device (cpu, cuda, cuda:0, ...)"),
    ("cuda:99", "--device cuda:99: "),
])
def test_a_bad_device_is_one_line_for_every_command(key, device, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the dummy paths are never created
    assert main([*(k for k in key if k), *DEVICE_COMMANDS[key], "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"finpercep: error: {words}") and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


def test_cuda_without_cuda_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this torch has a CUDA device")
    r = run("sr", "x.png", "--policy", "tiny-x4", "--out", "y", "--device", "cuda")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    want = ("CUDA is not available in this torch build" if not torch.backends.cuda.is_built()
            else "no CUDA device is visible")
    assert f"--device cuda: {want}; use --device cpu" in r.stderr


def test_sigma_with_refl_warns(tmp_path, caplog):
    caplog.set_level("WARNING")
    assert main(["-q", "rl", "train", "--policy", "tiny-x4", "--algo", "refl", "--sigma", "0.1",
                 "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "run")]) == 2
    assert "--sigma has no effect with --algo refl" in caplog.text
