"""The run folder every trainer shares (finpercep.runs): the resolved-config check (old ``lr`` keys
accepted), the metrics resume filter, checkpoints and the trainer state, the progress bar."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finpercep.io import latest_checkpoint
from finpercep.runs import (
    append_metrics,
    check_config,
    last_checkpoint_note,
    load_trainer_state,
    progress_bar,
    read_metrics,
    restart_metrics,
    save_trainer_state,
    truncate_metrics,
)

# ---------------------------------------------------------------------------------------------
# The resolved config


def test_check_config_writes_then_accepts_the_same_and_refuses_other_settings(tmp_path):
    record = {"algo": "refl", "config": {"run": {"steps": 3, "crop": (16, 16)}}}
    check_config(tmp_path, "run_config.json", record)
    assert json.loads((tmp_path / "run_config.json").read_text()) == {"algo": "refl",
                                                                      "config": {"run": {"steps": 3, "crop": [16, 16]}}}
    check_config(tmp_path, "run_config.json", record)  # a resume with the same settings
    with pytest.raises(ValueError, match=r"other settings \(config differ\); resume with the same arguments") as e:
        check_config(tmp_path, "run_config.json", {"algo": "refl", "config": {"run": {"steps": 4, "crop": [16, 16]}}})
    assert "\n" not in str(e.value)


def test_a_damaged_saved_config_is_one_line(tmp_path):
    (tmp_path / "run_config.json").write_text('{"algo": "re')
    with pytest.raises(ValueError, match=r"run_config.json: not a saved run config \(damaged\?\); delete it") as e:
        check_config(tmp_path, "run_config.json", {"algo": "refl"})
    assert "\n" not in str(e.value)


def test_check_config_compares_one_key_when_asked(tmp_path):
    check_config(tmp_path, "train_config.json", {"config": {"seed": 0, "steps": 2}, "data": "/a"}, compare="config")
    check_config(tmp_path, "train_config.json", {"config": {"seed": 0, "steps": 2}, "data": "/moved"}, compare="config")
    with pytest.raises(ValueError, match=r"\(seed differ\)"):
        check_config(tmp_path, "train_config.json", {"config": {"seed": 1, "steps": 2}, "data": "/a"}, compare="config")


def _rl_record(**run) -> dict:
    return {"algo": "refl", "config": {"run": {"steps": 2, **run}}}


def _rm_record(**cfg) -> dict:
    return {"config": {"backbone_lr": 1e-4, **cfg}, "data": "d"}


@pytest.mark.parametrize("name, record, compare", [("run_config.json", _rl_record, None),
                                                   ("train_config.json", _rm_record, "config")])
def test_runs_saved_with_the_old_lr_key_resume_and_the_file_is_kept(tmp_path, name, record, compare):
    saved = record(lr=1e-3)  # as runs were saved before the rename
    (tmp_path / name).write_text(json.dumps(saved))
    check_config(tmp_path, name, record(learning_rate=1e-3), compare=compare)
    assert json.loads((tmp_path / name).read_text()) == saved  # never rewritten
    with pytest.raises(ValueError, match="other settings"):
        check_config(tmp_path, name, record(learning_rate=2e-3), compare=compare)


# ---------------------------------------------------------------------------------------------
# Metrics


def test_truncate_metrics_keeps_what_was_logged_up_to_the_checkpoint(tmp_path):
    for stage, step in [(0, 1), (0, 2), (1, 1), (1, 2)]:
        append_metrics(tmp_path, {"stage": stage, "step": step, "loss": 0.5})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": 1, "st')  # a line torn by a kill
    truncate_metrics(tmp_path, (1, 1), keys=("stage", "step"))
    assert [(m["stage"], m["step"]) for m in read_metrics(tmp_path)] == [(0, 1), (0, 2), (1, 1)]
    truncate_metrics(tmp_path, (1,))  # by step only: step 2 of stage 0 goes
    assert [(m["stage"], m["step"]) for m in read_metrics(tmp_path)] == [(0, 1), (1, 1)]
    truncate_metrics(tmp_path, (0,))  # a run restarting from step 0 drops every step line
    assert read_metrics(tmp_path) == []


def test_restart_metrics_and_read_metrics_of_a_new_run(tmp_path):
    assert read_metrics(tmp_path) == []
    append_metrics(tmp_path, {"step": 0})
    restart_metrics(tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()
    restart_metrics(tmp_path)  # nothing to remove: no error


# ---------------------------------------------------------------------------------------------
# Checkpoints and the trainer state


def _checkpoint(run: Path, name: str, step: int) -> Path:
    folder = run / "ckpt" / name
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"w")
    return save_trainer_state(run, folder, {"step": step, "optimizer": {"lr": torch.tensor([0.1])}})


def test_trainer_state_round_trip_latest_pointer_and_pruning(tmp_path):
    assert load_trainer_state(tmp_path, keys=("step",)) is None
    assert last_checkpoint_note(tmp_path) == "no checkpoint was written yet"
    _checkpoint(tmp_path, "step_0000001", 1)
    second = _checkpoint(tmp_path, "step_0000002", 2)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["LATEST", "step_0000002"]  # the older is gone
    folder, state = load_trainer_state(tmp_path, keys=("step", "optimizer"))
    assert folder == second and state["step"] == 2 and torch.equal(state["optimizer"]["lr"], torch.tensor([0.1]))
    assert latest_checkpoint(tmp_path)[0] == second
    assert last_checkpoint_note(tmp_path) == f"last good checkpoint: {second}"
    with pytest.raises(ValueError, match="not a finpercep trainer state"):
        load_trainer_state(tmp_path, keys=("step", "trainable"))


def test_a_pickled_trainer_state_is_refused_unread(tmp_path):
    folder = _checkpoint(tmp_path, "s0-0000001", 1)
    torch.save({"step": 1, "obj": Path("x")}, folder / "trainer.pt")  # a Python object: weights_only refuses it
    with pytest.raises(ValueError, match="holds Python objects, refused unread"):
        load_trainer_state(tmp_path, keys=("step",))


# ---------------------------------------------------------------------------------------------
# Progress


def test_progress_bar_off_does_nothing_and_on_counts_steps(capsys):
    off = progress_bar(3, "x", enabled=False)
    off.advance(loss="1.0")
    off.close()
    assert capsys.readouterr().err == ""
    on = progress_bar(3, "train", initial=1)
    on.advance(loss="0.5")
    on.close()
    on.close()  # closing twice is harmless
    err = capsys.readouterr().err
    assert "train" in err and "2/3" in err
