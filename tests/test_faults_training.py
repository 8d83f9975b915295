"""Training runs, checkpoints and configs under faults: same seed -> same LoRA run, a
kill at any point -> a rerun that finishes the job with each metrics line once, damaged or foreign
files and nonsense config values -> one line naming the problem, never a traceback."""

from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from finpercep.cli import main
from finpercep.config import from_dict, load_config, load_yaml
from finpercep.policies import load_policy, load_policy_checkpoint, save_policy
from finpercep.policies.flow import FlowConfig, FlowTrainConfig
from finpercep.policies.lora import apply_lora
from finpercep.policies.rrdbnet import RRDBConfig, RRDBNet
from finpercep.policies.tiny import TinyTrainConfig
from finpercep.reward.model import FinPercepRM, RMConfig, load_pretrained, save_pretrained
from finpercep.reward.train import RMTrainConfig, Triplets, train_reward_model
from finpercep.rl import ALGORITHMS, RLConfig
from finpercep.rl.common import PairData, RunConfig, run_meta
from finpercep.rl.dpo import DPOConfig
from finpercep.rl.grpo import GRPOConfig
from finpercep.rl.refl import ReFLConfig
from finpercep.runs import read_metrics
from finpercep.types import NonFiniteError
from rl_helpers import ToyReward, flow_policy, tiny_policy, write_pairs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers: tiny LR/HR pairs, tiny policies, a toy reward, a tiny FGR data set


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """Four x4 LR/HR pairs (HR 32x32 crops of real photos), in the FGR manifest format."""
    return write_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def rm_data(photo_dir, tmp_path_factory) -> Path:
    from finpercep.data.builder import BuildConfig, build_dataset

    out = tmp_path_factory.mktemp("rmdata") / "d"
    cfg = BuildConfig(num=12, crop=64, masks_per_sr=2, families=("bicubic", "halo", "blocking"))
    assert build_dataset(photo_dir, out, cfg, progress=False).complete
    return out


def run_cfg(**kw) -> RunConfig:
    base = dict(steps=2, batch=2, crop=16, learning_rate=1e-2, sample_every=0, ckpt_every=1, max_grad_norm=0.0)
    return RunConfig(**{**base, **kw})


def train(algo: str, policy, run: Path, cfg: RunConfig, algo_cfg=None, pairs: Path = None, **kw) -> Path:
    algo_cfg = algo_cfg or RLConfig().algo_config(algo)
    meta = run_meta(algo, "test", "toy", pairs, cfg)
    return ALGORITHMS[algo](policy, ToyReward(), PairData(pairs), run, cfg, algo_cfg, meta=meta, progress=False, **kw)


def rm_cfg(**kw) -> RMTrainConfig:
    base = dict(model=RMConfig(decoder_stage=0, levels=(1, 2), decoder_channels=8, score_hidden=16), stages=1,
                steps_per_stage=(3,), batch_size=2, log_every=1, ckpt_every=2, val_fraction=0.34, warmup_steps=1)
    return RMTrainConfig(**{**base, **kw})


def cli(capsys, *args: str) -> tuple[int, str, list[str]]:
    """``finpercep -q ARGS`` in-process: (exit status, stdout, stderr lines)."""
    code = main(["-q", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err.strip().splitlines()


def one_error_line(err: list[str], *fragments: str) -> str:
    assert len(err) == 1, err
    assert err[0].startswith("finpercep: error: "), err
    for f in fragments:
        assert f in err[0], (f, err[0])
    return err[0]


def metric_keys(run: Path) -> list[tuple]:
    """(stage, step, is-validation) of every metrics line, in file order."""
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [(r.get("stage", 0), r["step"], any(k.startswith("val/") for k in r)) for r in lines]


def without_times(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in metrics]


class Sentinel:
    """Unpickling this would create ``path``: proof that a pickle was (not) executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


# ---------------------------------------------------------------------------------------------
# 1. Same seed, same LoRA run


def test_lora_init_is_a_function_of_the_generator():
    a, b, c = tiny_policy(), tiny_policy(), tiny_policy()
    apply_lora(a, 2, generator=torch.Generator().manual_seed(5))
    torch.rand(10)  # the global RNG moves on; it must not matter
    apply_lora(b, 2, generator=torch.Generator().manual_seed(5))
    apply_lora(c, 2, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.head.down.weight, b.head.down.weight)
    assert not torch.equal(a.head.down.weight, c.head.down.weight)


@pytest.mark.parametrize("algo", ["refl", "dpo", "grpo"])
def test_lora_runs_with_the_same_seed_are_identical(pairs, tmp_path, algo):
    make = tiny_policy if algo == "refl" else flow_policy
    algo_cfg = {"refl": ReFLConfig(), "dpo": DPOConfig(group_size=2), "grpo": GRPOConfig(group_size=2)}[algo]
    finals = []
    for i in range(2):
        policy = make()
        torch.manual_seed(100 + i)  # a different global RNG state for each run
        finals.append(train(algo, policy, tmp_path / f"r{i}", run_cfg(lora_rank=2), algo_cfg, pairs))
    a, b = (f / "model.safetensors" for f in finals)
    assert a.read_bytes() == b.read_bytes()
    m0, m1 = without_times(read_metrics(tmp_path / "r0")), without_times(read_metrics(tmp_path / "r1"))
    assert m0 == m1 and [m["step"] for m in m0] == [1, 2]


# ---------------------------------------------------------------------------------------------
# 2. A finished run does not lose its result


def test_rl_killed_while_writing_final_writes_it_on_rerun(pairs, tmp_path, monkeypatch):
    import finpercep.rl.common as common

    whole = train("refl", tiny_policy(), tmp_path / "whole", run_cfg(lora_rank=2), pairs=pairs)
    real_save = common.save_plain_policy

    def killed_at_final(policy, folder):
        if folder.name == "final":
            raise KeyboardInterrupt  # the kill, after the last checkpoint
        return real_save(policy, folder)

    monkeypatch.setattr(common, "save_plain_policy", killed_at_final)
    with pytest.raises(KeyboardInterrupt):
        train("refl", tiny_policy(), tmp_path / "cut", run_cfg(lora_rank=2), pairs=pairs)
    assert not (tmp_path / "cut" / "final").exists()
    monkeypatch.setattr(common, "save_plain_policy", real_save)
    final = train("refl", tiny_policy(), tmp_path / "cut", run_cfg(lora_rank=2), pairs=pairs)
    for name in ("model.safetensors", "config.json"):
        assert (final / name).read_bytes() == (whole / name).read_bytes()
    assert [m["step"] for m in read_metrics(tmp_path / "cut")] == [1, 2]


def test_cli_rl_rerun_restores_a_deleted_final(pairs, tmp_path, capsys):
    pol = save_policy(tiny_policy(), tmp_path / "tiny")
    run = tmp_path / "run"
    args = ["rl", "train", "--policy", pol, "--algo", "refl", "--reward", "l1", "--data", pairs, "--out", run,
            "--steps", "2", "--batch", "2", "--crop", "16", "--lora-rank", "2"]
    assert cli(capsys, *args)[0] == 0
    want = (run / "final" / "model.safetensors").read_bytes()
    shutil.rmtree(run / "final")
    code, out, _ = cli(capsys, *args)
    assert code == 0 and f"fine-tuned policy: {run / 'final'}" in out
    assert (run / "final" / "model.safetensors").read_bytes() == want
    assert load_policy(run / "final").name == "tiny-x4"


# ---------------------------------------------------------------------------------------------
# 3. Each metrics line once, in order, after a kill


@pytest.mark.parametrize("kill_at", [1, 2])
def test_rl_kill_while_checkpointing_logs_each_step_once(pairs, tmp_path, monkeypatch, kill_at):
    """kill_at 1: before the run's first checkpoint exists (restart at step 0); 2: while writing
    the second (resume from step 1). Either way the rerun logs steps 1, 2, 3 once."""
    import finpercep.rl.common as common

    real_save, calls = common.save_checkpoint, []

    def killed(*args, **kw):
        calls.append(1)
        if len(calls) == kill_at:
            raise KeyboardInterrupt
        return real_save(*args, **kw)

    monkeypatch.setattr(common, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        train("refl", tiny_policy(), tmp_path / "run", run_cfg(steps=3), pairs=pairs)
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == list(range(1, kill_at + 1))
    monkeypatch.setattr(common, "save_checkpoint", real_save)
    train("refl", tiny_policy(), tmp_path / "run", run_cfg(steps=3), pairs=pairs)
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]


@pytest.mark.parametrize("checkpointed", [False, True])
def test_rl_torn_metrics_line_from_a_full_disk_is_dropped(pairs, tmp_path, checkpointed):
    run = tmp_path / "run"
    cfg = run_cfg(steps=3, ckpt_every=1 if checkpointed else 50)
    if checkpointed:
        train("refl", tiny_policy(), run, cfg, pairs=pairs, stop_after_steps=1)
    else:
        run.mkdir()
        (run / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.1}\n')
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "reward/me')  # the disk filled up mid-line
    train("refl", tiny_policy(), run, cfg, pairs=pairs)
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]


def test_rm_kill_before_a_stages_first_checkpoint_logs_each_step_once(rm_data, tmp_path, monkeypatch):
    import finpercep.reward.train as rm_train

    real_save = rm_train.save_checkpoint

    def killed_in_stage_1(run, model, opt, stage, step):
        if stage == 1:
            raise KeyboardInterrupt  # stage 1's first checkpoint is never written
        return real_save(run, model, opt, stage, step)

    monkeypatch.setattr(rm_train, "save_checkpoint", killed_in_stage_1)
    with pytest.raises(KeyboardInterrupt):
        train_reward_model(rm_data, tmp_path / "run", rm_cfg(), progress=False)
    assert metric_keys(tmp_path / "run")[-2:] == [(1, 1, False), (1, 2, False)]
    monkeypatch.setattr(rm_train, "save_checkpoint", real_save)
    train_reward_model(rm_data, tmp_path / "run", rm_cfg(), progress=False)

    def stage(k: int) -> list[tuple[int, int, bool]]:
        return [(k, 1, False), (k, 2, False), (k, 3, False), (k, 3, True)]  # 3 steps, then validation

    assert metric_keys(tmp_path / "run") == stage(0) + stage(1)


# ---------------------------------------------------------------------------------------------
# 4. Damaged and foreign files: one line


def _damage(path: Path, how: str) -> None:
    blob = path.read_bytes()
    path.write_bytes({"truncated": blob[: len(blob) // 2], "empty": b"", "pickle": pickle.dumps({"w": [1.0]}),
                      "torch.save": _torch_save({"w": torch.zeros(2)})}[how])


def _torch_save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize("how", ["truncated", "empty", "pickle", "torch.save"])
def test_damaged_weights_are_refused_in_one_line(tmp_path, capsys, pairs, how):
    pol = save_policy(tiny_policy(), tmp_path / "pol")
    _damage(pol / "model.safetensors", how)
    with pytest.raises(ValueError, match="not a complete safetensors file"):
        load_policy_checkpoint(pol)
    code, _, err = cli(capsys, "rl", "train", "--policy", pol, "--algo", "refl", "--data", pairs, "--out", tmp_path / "r")
    assert code == 2
    one_error_line(err, "model.safetensors", "not a complete safetensors file")
    rm = save_pretrained(FinPercepRM(rm_cfg().model, load_backbone_weights=False), tmp_path / "rm")
    _damage(rm / "model.safetensors", how)
    with pytest.raises(ValueError, match="not a complete safetensors file"):
        load_pretrained(rm)


@pytest.mark.parametrize("how", ["pickle", "truncated"])
def test_rl_unreadable_trainer_state_is_one_line_and_never_unpickled(pairs, tmp_path, capsys, how):
    pol = save_policy(tiny_policy(), tmp_path / "tiny")
    run = tmp_path / "run"
    args = ["rl", "train", "--policy", pol, "--algo", "refl", "--reward", "l1", "--data", pairs, "--out", run,
            "--steps", "3", "--batch", "2", "--crop", "16"]
    assert cli(capsys, *args)[0] == 0
    state = run / "ckpt" / (run / "ckpt" / "LATEST").read_text() / "trainer.pt"
    sentinel = tmp_path / "executed"
    state.write_bytes(pickle.dumps({"step": Sentinel(sentinel)}, protocol=2) if how == "pickle" else state.read_bytes()[:100])
    code, _, err = cli(capsys, *args)
    assert code == 2 and not sentinel.exists()
    why = "Python objects, refused unread" if how == "pickle" else "truncated or damaged"
    one_error_line(err, str(state), "cannot resume", why, "delete")


def test_rm_unreadable_trainer_state_is_one_line(rm_data, tmp_path):
    run = tmp_path / "run"
    train_reward_model(rm_data, run, rm_cfg(stages=0), progress=False, stop_after_steps=1)
    state = next((run / "ckpt").glob("s0-*")) / "trainer.pt"
    state.write_bytes(_torch_save(["not", "a", "state"]))
    with pytest.raises(ValueError, match="trainer.pt: cannot resume from it \\(not a finpercep trainer state\\)"):
        train_reward_model(rm_data, run, rm_cfg(stages=0), progress=False)


def _edit_config(folder: Path, **changes) -> None:
    meta = json.loads((folder / "config.json").read_text())
    meta["config"].update(changes)
    (folder / "config.json").write_text(json.dumps(meta))


def test_huge_architecture_in_a_checkpoint_config_is_refused_before_allocating(tmp_path, capsys, pairs):
    tiny = save_policy(tiny_policy(), tmp_path / "tiny")
    _edit_config(tiny, channels=200000)
    with pytest.raises(ValueError, match="TinyConfig.channels must be in \\[1, 1024\\], got 200000"):
        load_policy_checkpoint(tiny)
    # an arch without bounds of its own: the config's shapes are checked against the file's on the meta device
    rrdb = save_policy(RRDBNet(RRDBConfig(num_feat=4, num_block=1, num_grow_ch=4)), tmp_path / "rrdb")
    _edit_config(rrdb, num_feat=200000)
    code, _, err = cli(capsys, "rl", "train", "--policy", rrdb, "--algo", "refl", "--data", pairs, "--out", tmp_path / "r")
    assert code == 2
    one_error_line(err, "weights do not match config.json", "is (4, 200000, 3, 3) in the config and (4, 4, 3, 3) in the file")
    rm = save_pretrained(FinPercepRM(rm_cfg().model, load_backbone_weights=False), tmp_path / "rm")
    original = (rm / "config.json").read_text()
    for key, value in (("decoder_channels", 200000), ("score_hidden", 10**9)):
        (rm / "config.json").write_text(original)
        _edit_config(rm, **{key: value})
        with pytest.raises(ValueError, match=f"config.json: config: RMConfig.{key} must be in \\[1, "):
            load_pretrained(rm)


@pytest.mark.parametrize("data, fragment", [
    ({"run": {"batch": "two"}}, "cfg.yaml: run.batch: expected int, got 'two' (str)"),
    ({"run": {"steps": 2.5}}, "run.steps: expected int, got 2.5 (float)"),
    ({"run": {"seed": True}}, "run.seed: expected int, got True (bool)"),
    ({"run": {"learning_rate": "fast"}}, "run.learning_rate: expected a number, got 'fast' (str)"),
    ({"run": {"lora_alpha": "x"}}, "run.lora_alpha: expected a number or null, got 'x'"),
    ({"run": 5}, "cfg.yaml: run: expected a mapping of RunConfig fields, got 5 (int)"),
    ({"curriculum": {"mode": "sometimes"}}, "curriculum.mode: expected one of ['none', 'fixed', 'auto', 'coevolve']"),
    ({"curriculum": {"stages": [0, "one"]}}, "curriculum.stages: expected a list of int or null"),
    ({"curriculum": {"coevolve": {"area": [0.1]}}}, "coevolve.area: expected a list of 2 values"),
    ({"curriculum": {"coevolve": {"train_backbone": "yes"}}}, "train_backbone: expected bool, got 'yes'"),
])
def test_config_values_of_the_wrong_type_name_key_type_and_value(data, fragment):
    with pytest.raises(ValueError) as e:
        from_dict(RLConfig, data, where="cfg.yaml:")
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_config_accepts_the_json_and_yaml_forms_of_each_type():
    cfg = from_dict(RLConfig, {"run": {"learning_rate": 1, "lora_alpha": None}, "refl": {"reward_weight": "1e-3"},
                               "curriculum": {"stages": [0, 2], "l1": [0.5, 1], "mode": "fixed"}})
    assert cfg.run.learning_rate == 1.0 and isinstance(cfg.run.learning_rate, float) and cfg.run.lora_alpha is None
    assert cfg.refl.reward_weight == 1e-3  # PyYAML reads 1e-3 as a string
    assert cfg.curriculum.stages == (0, 2) and cfg.curriculum.l1 == (0.5, 1.0)


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_still_load(name):
    path = CONFIGS / name
    if name.startswith("rm_"):
        load_config(RMTrainConfig, path)
    elif name.startswith("policy_"):
        load_config(TinyTrainConfig if "tiny" in name else FlowTrainConfig, path)
    else:
        load_config(RLConfig, path)


@pytest.mark.parametrize("command, text, fragments", [
    ("rm", "batch_size: two\n", ["batch_size: expected int, got 'two' (str)"]),
    ("rm", "model: 5\n", ["model: expected a mapping of RMConfig fields, got 5"]),
    ("rl", "run:\n  steps: ten\n", ["run.steps: expected int, got 'ten'"]),
    ("policy", "steps: [1\n", ["cfg.yaml:2:1: not valid YAML (expected ',' or ']'"]),
    ("rl", "run:\n  steps: 2\n   lr: 1\n", ["cfg.yaml:3:", "not valid YAML"]),
    ("rm", "- a list\n", ["expected a mapping of config keys at the top level"]),
])
def test_cli_bad_config_files_are_one_line(tmp_path, capsys, command, text, fragments):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(text)
    args = {"rm": ["rm", "train", "--data", tmp_path, "--out", tmp_path / "o"],
            "rl": ["rl", "train", "--policy", "tiny-x4", "--algo", "refl", "--data", tmp_path, "--out", tmp_path / "o"],
            "policy": ["policy", "train", "tiny", "--photos", tmp_path, "--out", tmp_path / "o"]}[command]
    code, _, err = cli(capsys, *args, "--config", cfg)
    assert code == 2
    one_error_line(err, *fragments)
    assert not (tmp_path / "o").exists()


def test_load_yaml_binary_file_is_one_line(tmp_path):
    (tmp_path / "c.yaml").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="not a text file"):
        load_yaml(tmp_path / "c.yaml")


# ---------------------------------------------------------------------------------------------
# 5. Accepted nonsense


@pytest.mark.parametrize("build, fragment", [
    (lambda: RunConfig(learning_rate=-1), "run.learning_rate must be a finite number > 0, got -1"),
    (lambda: RunConfig(learning_rate=float("nan")), "run.learning_rate must be a finite number > 0"),
    (lambda: RunConfig(max_grad_norm=-1.0), "run.max_grad_norm must be >= 0"),
    (lambda: RunConfig(seed=-3), "run.seed must be >= 0"),
    (lambda: RunConfig(lora_alpha=0.0), "run.lora_alpha must be a finite number > 0"),
    (lambda: ReFLConfig(reward_weight=-1e-3), "refl.reward_weight must be >= 0"),
    (lambda: GRPOConfig(timestep_fraction=1.5), "grpo.timestep_fraction must be in [0, 1]"),
    (lambda: GRPOConfig(adv_eps=0.0), "grpo.adv_eps must be a finite number > 0"),
    (lambda: DPOConfig(beta=float("inf")), "dpo.beta must be a finite number > 0"),
    (lambda: RMTrainConfig(learning_rate=-1), "RMTrainConfig.learning_rate must be a finite number > 0, got -1"),
    (lambda: RMTrainConfig(batch_size=0), "RMTrainConfig.batch_size must be >= 1"),
    (lambda: RMTrainConfig(weight_decay=-0.1), "RMTrainConfig.weight_decay must be >= 0"),
    (lambda: RMTrainConfig(grown_backbone_lr=-1.0), "RMTrainConfig.grown_backbone_lr must be >= 0"),
    (lambda: TinyTrainConfig(learning_rate=-1), "recipe.learning_rate must be a finite number > 0"),
    (lambda: FlowTrainConfig(warmup=-5), "recipe.warmup must be >= 0"),
    (lambda: FlowConfig(channels=200000), "FlowConfig.channels must be in [1, 1024]"),
    (lambda: FlowConfig(num_steps=10**6), "FlowConfig.num_steps must be in [1, 1000]"),
])
def test_config_values_out_of_range_are_refused(build, fragment):
    with pytest.raises(ValueError) as e:
        build()
    assert fragment in str(e.value)


def test_cli_negative_learning_rates_are_refused(tmp_path, capsys, pairs):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("learning_rate: -1\n")
    code, _, err = cli(capsys, "rm", "train", "--data", tmp_path, "--out", tmp_path / "o", "--config", cfg)
    assert code == 2
    one_error_line(err, "cfg.yaml: RMTrainConfig.learning_rate must be a finite number > 0, got -1")
    code, _, err = cli(capsys, "rl", "train", "--policy", "tiny-x4", "--algo", "refl", "--data", pairs,
                       "--out", tmp_path / "r", "--lr", "-1")
    assert code == 2
    one_error_line(err, "run.learning_rate must be a finite number > 0, got -1")
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------
# 6. A NaN ground-truth map stops reward-model training with one line


def test_rm_nan_map_stops_with_one_line_naming_the_step(rm_data, tmp_path, capsys, monkeypatch):
    real_load = Triplets.load

    def nan_maps(self, idx, crop, rng):
        batch = real_load(self, idx, crop, rng)
        batch.map_syn[:, :, 0, 0] = float("nan")
        return batch

    monkeypatch.setattr(Triplets, "load", nan_maps)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model:\n  levels: [1, 2]\n  decoder_channels: 8\n  score_hidden: 16\nval_fraction: 0.34\n"
                   "log_every: 1\nckpt_every: 1\nwarmup_steps: 1\n")
    run = tmp_path / "run"
    code, _, err = cli(capsys, "rm", "train", "--data", rm_data, "--out", run, "--config", cfg, "--stages", "1",
                       "--steps", "2", "--batch-size", "2")
    assert code == 2
    # stage 0 has no map loss and finishes; stage 1 stops at its first step, naming the checkpoint
    one_error_line(err, "stage 1 step 1: non-finite loss/map", "last good checkpoint", "ckpt/s0-0000001")
    assert (run / "stage_0" / "val.json").exists() and not (run / "stage_1").exists()
    with pytest.raises(NonFiniteError):  # the library raises the same error (a ValueError too)
        train_reward_model(rm_data, run, load_config(RMTrainConfig, cfg, stages=1, steps_per_stage=(2,), batch_size=2),
                           progress=False)
