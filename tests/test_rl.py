"""RL fine-tuning: invariants (constant reward -> no update, DPO log 2, accumulation == big batch,
resume == uninterrupted, 2 processes == 1), guards, LoRA, dense credit and the CLI, on tiny
policies and tiny data."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from finpercep.config import load_config
from finpercep.io import latest_checkpoint
from finpercep.policies import load_policy, save_policy
from finpercep.policies.flow import FlowConfig, FlowSR
from finpercep.policies.lora import adapters_disabled, apply_lora, merge_lora
from finpercep.policies.tiny import TinySR
from finpercep.rl import RLConfig, fine_tune
from finpercep.rl.common import (
    FixedReward,
    PairData,
    RunConfig,
    as_reward_source,
    credit_weight,
    group_advantages,
)
from finpercep.rl.dpo import DPOConfig, best_and_worst, dpo_loss
from finpercep.rl.grpo import GRPOConfig, clipped_objective, kl_k3
from finpercep.rl.refl import ReFLConfig
from finpercep.runs import read_metrics
from finpercep.types import NonFiniteError, RewardOutput, RewardSource, Rollout
from rl_helpers import ConstantReward, ToyReward, flow_policy, tiny_policy, train_rl, write_pairs

SRC = str(Path(__file__).resolve().parents[1] / "src")


# ---------------------------------------------------------------------------------------------
# Fixtures: a tiny LR/HR data set and tiny policies / rewards


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """Four x4 LR/HR pairs (HR 32x32 crops of real photos), in the FGR manifest format."""
    return write_pairs(tmp_path_factory.mktemp("pairs"))



class NaNReward(ToyReward):
    name = "nan"

    def __call__(self, sr, lr=None, hr=None):
        return RewardOutput(score=sr.flatten(1).mean(1) * float("nan"), map=None)


def run_cfg(**kw) -> RunConfig:
    base = dict(steps=2, batch=2, crop=16, learning_rate=1e-2, sample_every=1, ckpt_every=1, max_grad_norm=0.0)
    base.update(kw)
    return RunConfig(**base)


train = train_rl  # rl_helpers: one run of an algorithm, quiet, meta naming the policy "test"


def params(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def same(a: dict, b: dict, atol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


# ---------------------------------------------------------------------------------------------
# Pure pieces


def test_dpo_loss_is_log2_when_chosen_equals_rejected():
    e = torch.tensor([0.3, 1.2], requires_grad=True)
    r = torch.tensor([0.5, 0.7])
    loss = dpo_loss(e, e, r, r, beta=1000.0)
    assert torch.allclose(loss, torch.full((2,), math.log(2.0)))
    loss.sum().backward()
    assert torch.count_nonzero(e.grad) == 0


def test_dpo_loss_prefers_lower_error_on_chosen():
    ref = torch.tensor([1.0])
    good = dpo_loss(torch.tensor([0.9]), torch.tensor([1.1]), ref, ref, beta=10.0)
    bad = dpo_loss(torch.tensor([1.1]), torch.tensor([0.9]), ref, ref, beta=10.0)
    assert good < math.log(2.0) < bad


def test_best_and_worst_pick_per_group():
    iw, il = best_and_worst(torch.tensor([0.1, 0.5, 0.3, 2.0, -1.0, 0.0]), 3)
    assert iw.tolist() == [1, 3] and il.tolist() == [0, 4]


def test_group_advantages():
    a = group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0, 4.0]), 3)
    assert torch.count_nonzero(a[:3]) == 0
    assert a[3:].mean().abs() < 1e-6 and a[3:].std(unbiased=False) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="G=4"):
        group_advantages(torch.zeros(6), 4)


def test_clipped_objective_and_kl():
    adv = torch.tensor([1.0, -2.0])
    lp = torch.tensor([0.0, 0.0])
    assert torch.allclose(clipped_objective(lp, lp, adv, 0.2), -adv)
    # a ratio far above 1 + c earns no more than the clipped value for a positive advantage
    big = clipped_objective(torch.tensor([5.0]), torch.tensor([0.0]), torch.tensor([1.0]), 0.2)
    assert big.item() == pytest.approx(-1.2)
    assert kl_k3(lp, lp).abs().max() == 0
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


def test_credit_weight_concentrates_on_the_map():
    m = torch.zeros(2, 1, 4, 4)
    m[0, 0, 0, 0] = 1.0
    w = credit_weight(m, 2.0)
    assert w[0].mean() == pytest.approx(3.0)  # mean 1 + a
    assert w[0, 0, 0, 0] > w[0, 0, 1, 1] == pytest.approx(1.0)
    assert torch.allclose(w[1], torch.ones(1, 4, 4))  # an empty map: uniform weight


def test_run_config_and_yaml(tmp_path):
    with pytest.raises(ValueError, match="run.steps"):
        RunConfig(steps=0)
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)
    p = tmp_path / "c.yaml"
    p.write_text("run:\n  steps: 7\n  lora_rank: 4\ngrpo:\n  kl_beta: 0.1\n")
    cfg = load_config(RLConfig, p, run=dict(steps=3, batch=None))
    assert cfg.run.steps == 3 and cfg.run.lora_rank == 4 and cfg.grpo.kl_beta == 0.1
    p.write_text("run:\n  stepz: 7\n")
    with pytest.raises(ValueError, match="stepz"):
        load_config(RLConfig, p)


def _rollout(n: int = 2, g: int = 2, k: int = 3, **kw) -> Rollout:
    """``n`` LR images x ``g`` samples of a flow policy with ``k`` steps, scored by ToyReward."""
    lr = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(0)).repeat_interleave(g, dim=0)
    hr = torch.rand(n * g, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    traj = FlowSR(FlowConfig(channels=8, num_blocks=1, time_dim=8, num_steps=k)).sample(lr, torch.Generator().manual_seed(2))
    return Rollout(lr=lr, hr=hr, traj=traj, reward=ToyReward()(traj.sr), group_size=g, **kw)


def test_rollout_checks_shapes_and_gives_the_first_of_each_group():
    ro = _rollout(advantages=torch.zeros(4), steps=(0, 2), old_log_probs={0: torch.zeros(4), 2: torch.zeros(4)})
    assert len(ro) == 4
    lr, sr, hr, out = ro.group_firsts()
    assert torch.equal(sr, ro.traj.sr[[0, 2]]) and torch.equal(hr, ro.hr[[0, 2]]) and torch.equal(lr, ro.lr[[0, 2]])
    assert torch.equal(out.score, ro.reward.score[[0, 2]]) and out.map.shape == (2, 1, 16, 16)
    good = dict(lr=ro.lr, hr=ro.hr, traj=ro.traj, reward=ro.reward, group_size=2)
    for change, message in [
        (dict(hr=ro.hr[:, :, :8]), r"Rollout.traj.sr must be \(4, 3, 8, 16\), got \(4, 3, 16, 16\)"),
        (dict(hr=ro.hr[:3]), r"Rollout.hr must be \(4, 3, 16, 16\), got \(3, 3, 16, 16\)"),
        (dict(group_size=3), "4 rows do not form groups of group_size=3"),
        (dict(reward=RewardOutput(score=ro.reward.score[:2])), r"Rollout.reward.score must be \(4,\)"),
        (dict(advantages=torch.zeros(4, 1)), r"Rollout.advantages must be \(4,\), got \(4, 1\)"),
        (dict(pixel_weight=torch.ones(4, 3, 16, 16)), r"Rollout.pixel_weight must be \(4, 1, 16, 16\)"),
        (dict(steps=(1,), old_log_probs={0: torch.zeros(4)}), r"expected \[1\]"),
        (dict(steps=(1,), old_log_probs={1: torch.zeros(2)}), r"Rollout.old_log_probs\[1\] must be \(4,\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            Rollout(**{**good, **change})


def test_a_reward_and_a_curriculum_are_reward_sources(tiny_rm_run):
    from finpercep.curriculum import Curriculum, CurriculumConfig

    reward = ToyReward()
    assert not isinstance(reward, RewardSource)
    src = as_reward_source(reward)
    assert isinstance(src, FixedReward) and isinstance(src, RewardSource) and src.reward is reward
    assert (src.add_rollout(torch.zeros(1), torch.zeros(1)), src.observe(1, 0.5), src.logs(), src.state_dict()) == (0, None, {}, {})
    cur = Curriculum(CurriculumConfig(mode="fixed", schedule=(2,)), tiny_rm_run)
    assert isinstance(cur, RewardSource) and as_reward_source(cur) is cur


def test_pair_data_batches_are_a_function_of_seed_and_step(pairs):
    d = PairData(pairs)
    lr, hr = d.batch(0, 5, 3, 16)
    assert lr.shape == (3, 3, 4, 4) and hr.shape == (3, 3, 16, 16)
    lr2, hr2 = d.batch(0, 5, 3, 16)
    assert torch.equal(lr, lr2) and torch.equal(hr, hr2)
    assert not torch.equal(d.batch(0, 6, 3, 16)[1], hr)
    with pytest.raises(ValueError, match="does not fit"):
        d.batch(0, 0, 1, 64)
    with pytest.raises(FileNotFoundError, match="finpercep data build"):
        PairData(pairs / "samples")


# ---------------------------------------------------------------------------------------------
# LoRA


def test_lora_starts_as_the_base_and_merges_exactly():
    base = tiny_policy().eval()
    x = torch.rand(2, 3, 8, 8)
    want = base(x)
    lora = tiny_policy()
    names = apply_lora(lora, rank=2)
    lora.eval()
    assert names and torch.allclose(lora(x), want, atol=1e-6)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all(".down." in n or ".up." in n for n in trainable)
    with torch.no_grad():
        for p in lora.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    tuned = lora(x)
    assert not torch.allclose(tuned, want, atol=1e-4)
    with adapters_disabled(lora) as ref:
        assert torch.allclose(ref(x), want, atol=1e-6)  # the reference: no second copy
    merged = merge_lora(lora).eval()
    assert set(merged.state_dict()) == set(base.state_dict())
    assert torch.allclose(merged(x), tuned, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# ReFL


def test_refl_updates_and_writes_the_run(pairs, tmp_path):
    pol = tiny_policy()
    before = params(pol)
    final = train("refl", pol, ToyReward(), pairs, tmp_path / "run", run_cfg())
    assert not same(before, params(pol))
    m = read_metrics(tmp_path / "run")
    assert [r["step"] for r in m] == [1, 2]
    for key in ("reward/mean", "reward/std", "fidelity/l1", "grad_norm", "time/step", "time/policy_forward",
                "time/reward_forward", "time/reward_backward", "time/policy_backward", "time/optimizer",
                "time/reward_share"):
        assert key in m[-1] and math.isfinite(m[-1][key]), key
    assert (tmp_path / "run" / "samples" / "step_0000002.png").exists()
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["algo"] == "refl"
    loaded = load_policy(final)
    x = torch.rand(1, 3, 8, 8)
    assert torch.allclose(loaded(x), pol.eval()(x), atol=1e-6)


def test_refl_refuses_a_non_differentiable_reward(pairs, tmp_path):
    with pytest.raises(ValueError, match="not differentiable"):
        train("refl", tiny_policy(), ConstantReward(), pairs, tmp_path / "run", run_cfg())


def test_refl_grad_accumulation_equals_the_big_batch(pairs, tmp_path, monkeypatch):
    """The accumulated gradient equals the big batch's. (Compared before Adam: its first step is
    ~lr * sign(g), which turns float-level differences of near-zero gradients into +-lr.)"""
    import finpercep.distributed

    grads: list[dict[str, torch.Tensor]] = []
    monkeypatch.setattr(finpercep.distributed, "average_gradients",
                        lambda ps: grads.append({i: p.grad.clone() for i, p in enumerate(ps)}))
    train("refl", tiny_policy(), ToyReward(), pairs, tmp_path / "a", run_cfg(steps=1, batch=4, grad_accum=1))
    train("refl", tiny_policy(), ToyReward(), pairs, tmp_path / "b", run_cfg(steps=1, batch=4, grad_accum=2))
    assert len(grads) == 2 and same(grads[0], grads[1], atol=1e-7)
    assert read_metrics(tmp_path / "a")[0]["grad_norm"] == pytest.approx(read_metrics(tmp_path / "b")[0]["grad_norm"], rel=1e-5)


def test_refl_lora_trains_only_adapters(pairs, tmp_path):
    pol = tiny_policy()
    base = params(pol)
    final = train("refl", pol, ToyReward(), pairs, tmp_path / "run", run_cfg(lora_rank=2))
    with adapters_disabled(pol):
        kept = {k.replace(".base", ""): v for k, v in params(pol).items() if ".down." not in k and ".up." not in k}
    assert same(kept, base)
    assert not same(params(load_policy(final)), base)


def test_refl_on_a_multistep_policy_uses_a_late_step(pairs, tmp_path):
    pol = flow_policy()
    before = params(pol)
    train("refl", pol, ToyReward(), pairs, tmp_path / "run", run_cfg(steps=1), ReFLConfig(late_steps=2))
    assert not same(before, params(pol))


def test_dense_credit_changes_the_update(pairs, tmp_path):
    a, b = tiny_policy(), tiny_policy()
    train("refl", a, ToyReward(), pairs, tmp_path / "a", run_cfg(steps=1))
    train("refl", b, ToyReward(), pairs, tmp_path / "b", run_cfg(steps=1, dense_credit=2.0))
    assert not same(params(a), params(b), atol=1e-7)
    with pytest.raises(ValueError, match="map"):
        train("grpo", flow_policy(), ConstantReward(), pairs, tmp_path / "c", run_cfg(dense_credit=1.0))


@pytest.mark.parametrize("algo", ["refl", "grpo"])
def test_resume_equals_an_uninterrupted_run(pairs, tmp_path, algo):
    make = tiny_policy if algo == "refl" else flow_policy
    whole = make()
    train(algo, whole, ToyReward(), pairs, tmp_path / "whole", run_cfg(steps=3))
    part = make()
    train(algo, part, ToyReward(), pairs, tmp_path / "part", run_cfg(steps=3), stop_after_steps=1)
    assert latest_checkpoint(tmp_path / "part")[1]["step"] == 1
    resumed = make()
    train(algo, resumed, ToyReward(), pairs, tmp_path / "part", run_cfg(steps=3))
    assert same(params(whole), params(resumed), atol=1e-6)
    a, b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "part")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3]
    for ma, mb in zip(a, b):
        for k in ("reward/mean", "fidelity/l1", "grad_norm"):
            assert ma[k] == pytest.approx(mb[k], rel=1e-5, abs=1e-7), k
    with pytest.raises(ValueError, match="other settings"):
        train(algo, make(), ToyReward(), pairs, tmp_path / "part", run_cfg(steps=4))


def test_a_run_saved_with_the_old_lr_key_resumes(pairs, tmp_path):
    """Runs written before ``run.lr`` became ``run.learning_rate`` resume like any other."""
    whole = tiny_policy()
    train("refl", whole, ToyReward(), pairs, tmp_path / "whole", run_cfg(steps=2))
    old = tmp_path / "old"
    train("refl", tiny_policy(), ToyReward(), pairs, old, run_cfg(steps=2), stop_after_steps=1)
    saved = (old / "run_config.json").read_text()
    assert saved.count('"learning_rate"') == 1
    (old / "run_config.json").write_text(saved.replace('"learning_rate"', '"lr"'))
    resumed = tiny_policy()
    train("refl", resumed, ToyReward(), pairs, old, run_cfg(steps=2))
    assert same(params(whole), params(resumed), atol=1e-6)
    assert [m["step"] for m in read_metrics(old)] == [1, 2]
    with pytest.raises(ValueError, match=r"\(config differ\)"):  # a different learning rate is still refused
        train("refl", tiny_policy(), ToyReward(), pairs, old, run_cfg(steps=2, learning_rate=0.5))


def test_non_finite_reward_stops_and_names_the_step(pairs, tmp_path):
    with pytest.raises(NonFiniteError, match="step 1.*no checkpoint"):
        train("refl", tiny_policy(), NaNReward(), pairs, tmp_path / "run", run_cfg())
    # with a checkpoint written, it is named and left as it was
    run = tmp_path / "run2"
    train("refl", tiny_policy(), ToyReward(), pairs, run, run_cfg(steps=1))
    ckpt = latest_checkpoint(run)[0]
    stamp = (ckpt / "trainer.pt").read_bytes()
    meta = json.loads((run / "run_config.json").read_text())
    (run / "run_config.json").unlink()  # a new config for the continued run
    with pytest.raises(NonFiniteError, match=f"step 2.*{ckpt.name}"):
        train("refl", tiny_policy(), NaNReward(), pairs, run, run_cfg(steps=2))
    assert (ckpt / "trainer.pt").read_bytes() == stamp and meta["reward"] == "toy"


# ---------------------------------------------------------------------------------------------
# GRPO and DPO


@pytest.mark.parametrize("kl_beta", [0.0, 0.5])
def test_grpo_with_a_constant_reward_leaves_the_policy_unchanged(pairs, tmp_path, kl_beta):
    pol = flow_policy()
    before = params(pol)
    train("grpo", pol, ConstantReward(), pairs, tmp_path / "run", run_cfg(), GRPOConfig(group_size=3, kl_beta=kl_beta))
    assert same(before, params(pol))
    assert all(m["grad_norm"] == 0 for m in read_metrics(tmp_path / "run"))


def test_grpo_learns_from_a_varying_reward(pairs, tmp_path):
    pol = flow_policy()
    before = params(pol)
    train("grpo", pol, ToyReward(), pairs, tmp_path / "run", run_cfg(lora_rank=2, dense_credit=1.0),
          GRPOConfig(group_size=3, kl_beta=0.1, timestep_fraction=0.5))
    assert not same(before, params(pol))
    m = read_metrics(tmp_path / "run")[-1]
    assert m["grad_norm"] > 0 and "kl" in m and "reward/group_std" in m


def test_grpo_and_dpo_loops_need_a_stochastic_policy(pairs, tmp_path):
    for algo in ("grpo", "dpo"):
        with pytest.raises(ValueError, match="stochastic"):
            train(algo, tiny_policy(), ToyReward(), pairs, tmp_path / algo, run_cfg())


def test_dpo_trains_against_the_reference(pairs, tmp_path):
    pol = flow_policy()
    before = params(pol)
    train("dpo", pol, ConstantReward(), pairs, tmp_path / "run", run_cfg(lora_rank=2), DPOConfig(group_size=2))
    assert not same(before, params(pol))  # the first sample of each group is "chosen"
    m = read_metrics(tmp_path / "run")
    assert m[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-5)  # policy == reference at step 1
    assert "dpo/implicit_acc" in m[-1] and m[-1]["reward/pair_gap"] == 0


# ---------------------------------------------------------------------------------------------
# Command line, with a real reward spec and a saved tiny policy


def _cli(args: list[str], nproc: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    head = [sys.executable, "-m", "finpercep.cli"] if not nproc else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "finpercep.cli"]
    return subprocess.run(head + ["-q"] + args, env=env, capture_output=True, text=True, timeout=600)


def test_cli_rl_train_then_sr(pairs, tmp_path):
    pol = save_policy(tiny_policy(), tmp_path / "tiny")
    out = tmp_path / "run"
    r = _cli(["rl", "train", "--policy", str(pol), "--algo", "refl", "--reward", "finpercep:1+0.5*l1",
              "--data", str(pairs), "--out", str(out), "--steps", "2", "--batch", "2", "--crop", "16"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "fine-tuned policy" in r.stdout and (out / "final" / "model.safetensors").exists()
    assert len(read_metrics(out)) == 2
    r = _cli(["sr", str(pairs / "samples" / "0_lr.png"), str(tmp_path / "missing.png"), "--policy", str(out / "final"),
              "--out", str(tmp_path / "sr")])
    assert r.returncode == 1 and "missing.png" in r.stderr
    assert Image.open(tmp_path / "sr" / "0_lr.png").size == (32, 32)
    r = _cli(["rl", "train", "--policy", "nope", "--algo", "refl", "--data", str(pairs), "--out", str(tmp_path / "x")])
    assert r.returncode == 2 and "unknown policy" in r.stderr
    r = _cli(["rl", "train", "--policy", str(pol), "--algo", "refl", "--reward", "niqe", "--data", str(pairs),
              "--out", str(tmp_path / "y")])
    assert r.returncode == 2 and "not differentiable" in r.stderr


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process(pairs, tmp_path):
    """2 processes x 2 images (gloo) take the same global batch as 1 process x 4 and average their
    gradients: the first step's reward and gradient norm agree."""
    pol = save_policy(tiny_policy(), tmp_path / "tiny")
    runs = {}
    for n in (2, 1):
        out = tmp_path / f"p{n}"
        r = _cli(["rl", "train", "--policy", str(pol), "--algo", "refl", "--reward", "l1", "--data", str(pairs),
                  "--out", str(out), "--steps", "1", "--batch", "4", "--crop", "16"], nproc=n)
        assert r.returncode == 0, r.stderr[:2000] + "\n...\n" + r.stderr[-2000:]
        runs[n] = read_metrics(out)[0]
    for key in ("reward/mean", "fidelity/l1", "grad_norm"):
        assert runs[2][key] == pytest.approx(runs[1][key], rel=1e-4), key
    a, b = load_policy(tmp_path / "p2" / "final"), load_policy(tmp_path / "p1" / "final")
    assert same(params(a), params(b), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Curriculum inside the loops


def curriculum(run: Path, mode: str = "fixed", **kw):
    from finpercep.curriculum import Curriculum, CurriculumConfig

    return Curriculum(CurriculumConfig(mode=mode, **kw), run)


def test_refl_with_a_fixed_curriculum_switches_and_resumes(pairs, tmp_path, tiny_rm_run):
    cfg = run_cfg(steps=4, crop=32)

    def make():
        return curriculum(tiny_rm_run, schedule=(2, 1))

    whole = tiny_policy()
    train("refl", whole, make(), pairs, tmp_path / "whole", cfg)
    stages = [m["curriculum/stage"] for m in read_metrics(tmp_path / "whole")]
    assert stages == [0, 0, 1, 2]  # the stage each step trained on: switched after steps 2 and 3
    part = tiny_policy()
    train("refl", part, make(), pairs, tmp_path / "part", cfg, stop_after_steps=3)
    assert latest_checkpoint(tmp_path / "part")[1]["extra"]["curriculum"]["state"]["stage_index"] == 2
    resumed = tiny_policy()
    train("refl", resumed, make(), pairs, tmp_path / "part", cfg)
    assert [m["curriculum/stage"] for m in read_metrics(tmp_path / "part")] == stages
    assert same(params(whole), params(resumed), atol=1e-6)


def test_grpo_with_online_coevolution_refreshes_the_reward_model(pairs, tmp_path, tiny_rm_run):
    from finpercep.curriculum import CoevolveConfig

    cur = curriculum(tiny_rm_run, "coevolve", stages=(1,), coevolve=CoevolveConfig(refresh_every=1, rm_steps=1, batch=2, heldout=0))
    before = {k: v.clone() for k, v in cur.reward.model.state_dict().items()}
    train("grpo", flow_policy(), cur, pairs, tmp_path / "run", run_cfg(steps=2, crop=32), GRPOConfig(group_size=2))
    after = cur.reward.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    m = read_metrics(tmp_path / "run")[-1]
    assert "coevolve/rm_loss" in m and math.isfinite(m["coevolve/rm_loss"]) and m["coevolve/buffer"] > 0


def test_cli_curriculum_and_reward_are_exclusive(pairs, tmp_path, tiny_rm_run):
    pol = save_policy(tiny_policy(), tmp_path / "tiny")
    r = _cli(["rl", "train", "--policy", str(pol), "--algo", "refl", "--curriculum", "fixed", "--reward", "finpercep",
              "--checkpoint", str(tiny_rm_run), "--data", str(pairs), "--out", str(tmp_path / "r")])
    assert r.returncode == 2 and "drop the reward spec" in r.stderr
    r = _cli(["rl", "train", "--policy", str(pol), "--algo", "refl", "--curriculum", "auto", "--checkpoint", str(tiny_rm_run),
              "--data", str(pairs), "--out", str(tmp_path / "ok"), "--steps", "2", "--batch", "2", "--crop", "32"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_metrics(tmp_path / "ok")[-1]["curriculum/stage"] == 0


# ---------------------------------------------------------------------------------------------
# One-step policies under DPO / GRPO: the Gaussian wrapper


def test_gaussian_policy_contract():
    from finpercep.policies.gaussian import GaussianPolicy, unwrap
    from finpercep.types import StochasticPolicy

    base = tiny_policy().eval()
    pol = GaussianPolicy(base, 0.05)
    assert isinstance(pol, StochasticPolicy) and unwrap(pol) is base and pol.scale == 4
    lr = torch.rand(2, 3, 8, 8)
    traj = pol.sample(lr, torch.Generator().manual_seed(0))
    assert traj.states.shape == (2, 2, 3, 32, 32) and traj.log_probs.shape == (2, 1)
    lp = pol.step_log_prob(lr, traj.states[:, 0], 0, traj.states[:, 1])
    assert torch.allclose(lp, traj.log_probs[:, 0], atol=1e-5)
    assert torch.allclose(pol.step_log_prob(lr, traj.states[:, 0], 0, traj.states[:, 1], torch.ones(2, 1, 32, 32)), lp, atol=1e-5)
    mean = base(lr)
    assert (pol.step_log_prob(lr, None, 0, mean) > lp).all()  # the mean is the most likely output
    assert torch.allclose(pol.predict_sr(lr, None, 0), mean) and pol.denoising_error(lr, mean, None, None).abs().max() < 1e-12
    with pytest.raises(ValueError, match="sigma"):
        GaussianPolicy(base, 0.0)


@pytest.mark.parametrize("algo", ["grpo", "dpo"])
def test_fine_tune_wraps_a_one_step_policy_for_dpo_and_grpo(pairs, tmp_path, algo):
    pol = save_policy(tiny_policy(), tmp_path / "tiny")
    cfg = RLConfig(run=run_cfg(steps=2, lora_rank=2, gaussian_sigma=0.05),
                   grpo=GRPOConfig(group_size=2), dpo=DPOConfig(group_size=2))
    final = fine_tune(str(pol), algo, "l1", pairs, tmp_path / "run", cfg, progress=False)
    tuned = load_policy(final)
    assert isinstance(tuned, TinySR)  # the checkpoint holds the network, not the wrapper
    assert not same(params(tuned), params(load_policy(pol)))


def test_a_custom_network_fine_tunes_and_its_weights_load_back(pairs, tmp_path):
    from finpercep.policies import load_policy_checkpoint, load_policy_weights

    class MySR(torch.nn.Module):  # any LR -> SR module with `scale` and `name`
        scale, name = 4, "my-sr"

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 48, 3, padding=1)

        def forward(self, lr):
            return torch.nn.functional.pixel_shuffle(self.conv(lr), 4).sigmoid()

    torch.manual_seed(0)
    net = MySR()
    final = train("refl", net, ToyReward(), pairs, tmp_path / "run", run_cfg(steps=1, lora_rank=2))
    with pytest.raises(ValueError, match="load_policy_weights"):
        load_policy_checkpoint(final)
    again = load_policy_weights(MySR(), final)
    x = torch.rand(1, 3, 8, 8)
    assert torch.allclose(again(x), merge_lora(net).eval()(x), atol=1e-6)


def test_dpo_with_an_automatic_curriculum(pairs, tmp_path, tiny_rm_run):
    cur = curriculum(tiny_rm_run, "auto", stages=(0, 1), window=2, min_steps=1, max_steps=2)
    train("dpo", flow_policy(), cur, pairs, tmp_path / "run", run_cfg(steps=3, crop=32), DPOConfig(group_size=2))
    stages = [m["curriculum/stage"] for m in read_metrics(tmp_path / "run")]
    assert stages[0] == 0 and stages[-1] == 1  # moved on by max_steps at the latest
