"""The one YAML -> dataclass loader (finpercep.config.load_config) for every command's config:
file values, overrides (``None`` skipped, nested dicts), the renamed ``lr`` key, errors in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from finpercep.config import load_config, override, rename_old_keys
from finpercep.policies.flow import FlowTrainConfig
from finpercep.policies.tiny import TinyTrainConfig
from finpercep.reward.train import RMTrainConfig
from finpercep.rl import RLConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_without_a_file_and_overrides_with_none_skipped():
    cfg = load_config(RMTrainConfig, None, batch_size=3, seed=None)
    assert cfg == RMTrainConfig(batch_size=3)


def test_file_values_then_nested_overrides(tmp_path):
    path = tmp_path / "rl.yaml"
    path.write_text("run:\n  steps: 7\n  learning_rate: 2.0e-4\ngrpo:\n  group_size: 3\n")
    cfg = load_config(RLConfig, path, run={"steps": 2, "batch": None}, grpo={"group_size": None},
                      curriculum={"mode": "auto"})
    assert (cfg.run.steps, cfg.run.learning_rate, cfg.run.batch) == (2, 2e-4, RLConfig().run.batch)
    assert cfg.grpo.group_size == 3 and cfg.curriculum.mode == "auto"
    assert cfg.dpo == RLConfig().dpo


def test_overrides_are_checked_by_the_config_itself():
    with pytest.raises(ValueError, match="run.steps must be >= 1, got 0"):
        load_config(RLConfig, None, run={"steps": 0})
    with pytest.raises(TypeError, match="stepz"):
        override(RLConfig(), {"stepz": 1})


@pytest.mark.parametrize("cls, text, key", [
    (RMTrainConfig, "lr: 0.001\n", "lr"),
    (TinyTrainConfig, "lr: 0.002\n", "lr"),
    (RLConfig, "run:\n  lr: 1.0e-4\n", "run"),
])
def test_the_old_lr_key_is_an_error_that_names_the_new_one(tmp_path, cls, text, key):
    path = tmp_path / "old.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"unknown keys \['lr'\] \(lr is now learning_rate\)") as e:
        load_config(cls, path)
    assert str(e.value).startswith(f"{path}:") and "\n" not in str(e.value)


def test_rename_old_keys_at_any_depth():
    old = {"config": {"run": {"lr": 1.0, "steps": [{"lr": 2}]}, "lr_batch": 3}}
    assert rename_old_keys(old) == {"config": {"run": {"learning_rate": 1.0, "steps": [{"learning_rate": 2}]},
                                               "lr_batch": 3}}


@pytest.mark.parametrize("cls, name", [(RMTrainConfig, "rm_embedded.yaml"), (TinyTrainConfig, "policy_tiny.yaml"),
                                       (FlowTrainConfig, "policy_flow.yaml"), (RLConfig, "rl_flow.yaml")])
def test_shipped_configs_set_the_learning_rate(cls, name):
    cfg = load_config(cls, CONFIGS / name)
    rate = cfg.run.learning_rate if cls is RLConfig else cfg.learning_rate
    assert rate == {"rm_embedded.yaml": 1e-3, "policy_tiny.yaml": 2e-3, "policy_flow.yaml": 1e-3, "rl_flow.yaml": 1e-4}[name]
