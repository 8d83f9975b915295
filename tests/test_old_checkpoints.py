"""Checkpoints, runs and a data set written by finpercep 0.1 (commit 99c4b40, ``tests/fixtures/v0_1``,
made by ``tools/make_v0_1_fixtures.py``) load with today's code and give what the old code recorded
in ``expected.json``: reward scores and maps (float32 and float16 checkpoints, whole and tiled, the
``score`` command), policy outputs and samples, trainer states that resume, data-set samples bit
for bit. Today's writers still produce the same ``config.json``."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from finpercep.cli import main
from finpercep.data.dataset import FGRDataset, check_dataset
from finpercep.io import read_latest_checkpoint
from finpercep.policies import load_policy, save_policy
from finpercep.reward.api import load_reward
from finpercep.reward.model import load_pretrained, save_pretrained, score_image_tiled
from finpercep.types import Reward

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "v0_1"
EXPECTED = json.loads((FIX / "expected.json").read_text())

_spec = importlib.util.spec_from_file_location("make_v0_1_fixtures", ROOT / "tools" / "make_v0_1_fixtures.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)  # digest, tensor_sha256, fixture_batch: the helpers the fixtures were recorded with

ATOL = 1e-5  # same code, same float32 arithmetic: only summation order may differ


def assert_digest(t: torch.Tensor, want: dict, atol: float = ATOL) -> None:
    got = tool.digest(t)
    assert got["shape"] == want["shape"]
    np.testing.assert_allclose(got["sample"], want["sample"], rtol=0, atol=atol)
    n = float(np.prod(want["shape"]))
    assert got["sum"] == pytest.approx(want["sum"], abs=atol * n)
    assert got["abs_sum"] == pytest.approx(want["abs_sum"], abs=atol * n)


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    return tool.fixture_batch(FIX / "fgr")


def test_fixtures_are_small_and_recorded_by_the_old_commit():
    size = sum(p.stat().st_size for p in FIX.rglob("*") if p.is_file())
    assert size < 1_000_000, f"fixtures take {size} bytes"
    assert EXPECTED["commit"] == tool.OLD_COMMIT == "99c4b40"


def test_old_data_set_reads_sample_for_sample():
    keys = ("hr", "lr", "sr", "syn", "mask", "map_syn", "map_sr")
    ds = FGRDataset(FIX / "fgr", keys=keys)
    want = EXPECTED["dataset"]["samples"]
    assert len(ds) == len(want) == 3
    for i, w in enumerate(want):
        item = ds[i]
        assert item["meta"]["id"] == w["id"]
        for k in keys:
            assert list(item[k].shape) == w[k]["shape"], (w["id"], k)
            assert tool.tensor_sha256(item[k]) == w[k]["sha256"], (w["id"], k)
    assert check_dataset(FIX / "fgr") == EXPECTED["dataset"]["problems"] == []


@pytest.mark.parametrize("name", sorted(EXPECTED["rm"]))
def test_old_reward_checkpoints_score_as_before(name, batch):
    want = EXPECTED["rm"][name]
    folder, _, stage = name.partition(":")
    rm = load_reward(FIX / folder, int(stage) if stage else None)
    assert isinstance(rm, Reward) and rm.stage == want["stage"] and rm.has_map == (want["map"] is not None)
    assert next(rm.parameters()).dtype == torch.float32  # float16 weights are cast back
    images = torch.cat([batch["hr"], batch["syn"], batch["sr"]])
    wide = torch.cat(list(batch["hr"]), dim=-1)[None]
    with torch.no_grad():
        out = rm(images)
        tiled = score_image_tiled(rm, wide, tile=tool.TILE)
    np.testing.assert_allclose(out.score.numpy(), want["score"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(tiled.score.numpy(), want["tiled_score"], rtol=0, atol=ATOL)
    if want["map"] is None:
        assert out.map is None and tiled.map is None
    else:
        assert_digest(out.map, want["map"])
        assert_digest(tiled.map, want["tiled_map"])


def test_old_reward_run_through_the_score_command(capsys, monkeypatch):
    monkeypatch.chdir(FIX)  # the recorded arguments are relative to the fixture folder
    assert main(["-q", *EXPECTED["score_cli"]["args"]]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = EXPECTED["score_cli"]["records"]
    assert [r["path"] for r in got] == [r["path"] for r in want] and len(want) == 3
    for g, w in zip(got, want):
        assert (g["height"], g["width"]) == (w["height"], w["width"])
        for key in ("score", "map_mean", "map_max"):
            assert g[key] == pytest.approx(w[key], abs=ATOL), (g["path"], key)


@pytest.mark.parametrize("name", sorted(EXPECTED["policies"]))
def test_old_policies_compute_as_before(name, batch):
    want = EXPECTED["policies"][name]
    pol = load_policy(FIX / name)
    assert (type(pol).__name__, pol.name, pol.scale) == (want["class"], want["name"], want["scale"])
    with torch.no_grad():
        assert_digest(pol(batch["lr"]), want["sr"])
        if "sample" in want:
            traj = pol.sample(batch["lr"], torch.Generator().manual_seed(0))
            np.testing.assert_allclose(traj.log_probs.numpy(), want["sample"]["log_probs"], rtol=0, atol=ATOL)
            assert_digest(traj.sr, want["sample"]["sr"])


@pytest.mark.parametrize("run", sorted(EXPECTED["trainer_states"]))
def test_old_trainer_states_are_read_for_resuming(run):
    want = EXPECTED["trainer_states"][run]
    folder, state = read_latest_checkpoint(FIX / run, keys=tuple(want["keys"]))
    assert folder == FIX / want["folder"]
    assert sorted(state) == want["keys"] and state["step"] == want["step"] and state.get("stage") == want["stage"]


def test_old_reward_run_resumes_from_its_trainer_state(tmp_path, capsys, monkeypatch):
    """stage_1 deleted: the rerun continues from ``ckpt/s1-0000001`` and trains stage 1 to the
    weights the old run ended with."""
    run = tmp_path / "v0_1"
    shutil.copytree(FIX, run)
    shutil.rmtree(run / "rm_run" / "stage_1")
    (tmp_path / "rm.yaml").write_text(tool.RM_YAML)
    monkeypatch.chdir(run)
    assert main(["-q", "rm", "train", "--data", "fgr", "--out", "rm_run", "--config", str(tmp_path / "rm.yaml")]) == 0
    capsys.readouterr()
    steps = [(r["stage"], r["step"]) for r in map(json.loads, (run / "rm_run" / "metrics.jsonl").read_text().splitlines())
             if "loss/total" in r]
    assert steps == [(0, 1), (0, 2), (1, 1), (1, 2)]  # stage 1 step 2 trained once, after the resume
    assert json.loads((run / "rm_run" / "stage_1" / "val.json").read_text()) == json.loads(
        (FIX / "rm_run" / "stage_1" / "val.json").read_text())
    with torch.no_grad():
        score = load_reward(run / "rm_run")(torch.cat([tool.fixture_batch(run / "fgr")[k] for k in ("hr", "syn", "sr")])).score
    np.testing.assert_allclose(score.numpy(), EXPECTED["rm"]["rm_run"]["score"], rtol=0, atol=1e-4)


def test_old_rl_run_writes_its_final_policy_again_from_its_trainer_state(tmp_path, capsys, monkeypatch, batch):
    """final/ deleted: the rerun of the finished run rebuilds it from the LoRA weights in
    ``ckpt/step_0000002/trainer.pt``."""
    run = tmp_path / "v0_1"
    shutil.copytree(FIX, run)
    shutil.rmtree(run / "rl_run" / "final")
    monkeypatch.chdir(run)
    args = ["rl", "train", "--policy", "tiny_x4", "--algo", "refl", "--reward", "l1", "--data", "fgr", "--out", "rl_run",
            "--steps", "2", "--batch", "2", "--crop", "16", "--lora-rank", "2"]
    assert main(["-q", *args]) == 0
    capsys.readouterr()
    with torch.no_grad():
        assert_digest(load_policy(run / "rl_run" / "final")(batch["lr"]), EXPECTED["policies"]["rl_run/final"]["sr"])


def test_todays_writers_keep_the_old_config_json(tmp_path):
    """Re-saving an old checkpoint writes the same ``config.json`` bytes and the same tensors."""
    from safetensors.torch import load_file

    pairs = [(FIX / "rm_run" / "stage_1", save_pretrained(load_pretrained(FIX / "rm_run" / "stage_1"), tmp_path / "rm")),
             (FIX / "rm_fp16" / "stage_1",
              save_pretrained(load_pretrained(FIX / "rm_fp16" / "stage_1"), tmp_path / "rm16", dtype=torch.float16))]
    for name in ("tiny_x4", "flow_x4", "rrdb_converted"):
        pairs.append((FIX / name, save_policy(load_policy(FIX / name), tmp_path / name)))
    for old, new in pairs:
        assert (new / "config.json").read_bytes() == (old / "config.json").read_bytes(), old
        a, b = load_file(old / "model.safetensors"), load_file(new / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), old
