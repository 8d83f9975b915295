"""Multi-step diffusion SR through diffusers (Stable Diffusion x4 upscaler layout run as an SDE) on a
tiny random-weight model written from configs: the folder rule and its errors, the sampler against
diffusers' own ``DDIMScheduler.step``, the StochasticPolicy contract (log-probabilities recomputed
from the stored chain), DRaFT-K's gradient through the last K steps only, LoRA checkpoints, and ReFL /
DPO / GRPO from the library and the command line, on CPU. Needs the ``diffusers`` extra (a test
requirement: these tests fail, not skip, without it)."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from finpercep.cli import main
from finpercep.io import latest_checkpoint
from finpercep.policies import diffusers_folder as folder_io
from finpercep.policies import load_policy
from finpercep.policies.diffusers_tiny import write_tiny_model
from finpercep.policies.diffusion_base import policy_kind
from finpercep.policies.diffusion_multistep import ARCH, MultiStepDiffusionSR, trailing_timesteps
from finpercep.policies.diffusion_onestep import OneStepDiffusionSR
from finpercep.rl.common import LORA_INIT_KEY, RunConfig, seeded_generator
from finpercep.rl.dpo import DPOConfig
from finpercep.rl.grpo import GRPOConfig
from finpercep.runs import read_metrics
from finpercep.types import AdapterPolicy, StochasticPolicy, TruncatedBackpropPolicy
from rl_helpers import ConstantReward, ToyReward, base_state, lora_state, train_rl, write_pairs

STEPS = 3  # sampler steps in these tests (K)


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory) -> Path:
    """A tiny random x4-upscaler-layout folder (unet/ with 4 + 3 input channels, vae/ x4, scheduler/,
    low_res_scheduler/, prompt_embeds.safetensors)."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-upscaler") / "model", upscaler=True)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs"))


def policy_of(folder: Path, **options) -> MultiStepDiffusionSR:
    return load_policy(f"diffusers:{folder}", **{"num_steps": STEPS, **options})



def run_cfg(**kw) -> RunConfig:
    base = dict(steps=2, batch=2, crop=32, learning_rate=1e-2, lora_rank=2, sample_every=0, ckpt_every=1,
                max_grad_norm=0.0)
    return RunConfig(**{**base, **kw})


def train(algo, policy, reward, pairs, out, cfg, algo_cfg=None, **kw) -> Path:
    return train_rl(algo, policy, reward, pairs, out, cfg, algo_cfg, policy_name="diffusers:tiny-upscaler", **kw)


def same(a: dict, b: dict, atol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


def perturb_lora(policy: torch.nn.Module, seed: int) -> None:
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# The folder rule and loading


def test_the_folder_rule_picks_the_multistep_policy_and_its_errors_are_one_line(upscaler, tmp_path):
    policy = policy_of(upscaler)
    assert isinstance(policy, MultiStepDiffusionSR) and policy.scale == 4 and policy.num_steps == STEPS
    for proto in (StochasticPolicy, TruncatedBackpropPolicy, AdapterPolicy):
        assert isinstance(policy, proto), proto
    assert policy_kind(upscaler) == "multistep" and not any(p.requires_grad for p in policy.parameters())

    onestep = write_tiny_model(tmp_path / "onestep")
    assert policy_kind(onestep) == "onestep" and isinstance(load_policy(f"diffusers:{onestep}"), OneStepDiffusionSR)
    with pytest.raises(ValueError, match=r"^--sampling-steps \(num_steps\) applies to multi-step .* is a one-step model$"):
        load_policy(f"diffusers:{onestep}", num_steps=4)
    (onestep / "finpercep_policy.json").write_text(json.dumps({"policy": "multistep", "noise_level": 0}))  # card > rule
    with pytest.raises(ValueError, match="UNet takes 4 channels, the x4-upscaler layout needs the latent's 4 \\+ 3"):
        load_policy(f"diffusers:{onestep}")

    folder = tmp_path / "no-low-res"
    shutil.copytree(upscaler, folder)
    shutil.rmtree(folder / "low_res_scheduler")
    with pytest.raises(FileNotFoundError, match="low_res_scheduler/scheduler_config.json is missing") as e:
        load_policy(f"diffusers:{folder}")
    assert "\n" not in str(e.value)
    (folder / "finpercep_policy.json").write_text(json.dumps({"noise_level": 0, "num_steps": 2}))  # then not needed
    assert load_policy(f"diffusers:{folder}").num_steps == 2
    shutil.rmtree(folder / "vae")
    with pytest.raises(FileNotFoundError, match=r"vae/ is missing"):
        load_policy(f"diffusers:{folder}")


def test_option_errors_name_the_flag_or_the_card_the_value_came_from(upscaler, tmp_path):
    with pytest.raises(ValueError, match=r"^--draft-k \(grad_steps\) must be in \[1, 2\], got 5$"):
        policy_of(upscaler, num_steps=2, grad_steps=5)  # no card: no file is named
    with pytest.raises(ValueError, match=r"^--eta \(eta\) must be in \(0, 1\]"):
        policy_of(upscaler, eta=0.0)
    folder = tmp_path / "carded"
    shutil.copytree(upscaler, folder)
    card = folder / "finpercep_policy.json"
    card.write_text(json.dumps({"num_steps": 2, "grad_steps": 3}))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(card))}: grad_steps must be in \[1, 2\], got 3$"):
        load_policy(f"diffusers:{folder}")
    card.write_text(json.dumps({"num_steps": 2}))
    with pytest.raises(ValueError, match=r"^--draft-k \(grad_steps\) must be in \[1, 2\], got 4$"):  # the flag's value
        load_policy(f"diffusers:{folder}", grad_steps=4)


def test_forward_and_sample_shapes_and_ranges(upscaler):
    policy = policy_of(upscaler)
    lr = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sr = policy(lr)
    assert sr.shape == (2, 3, 32, 32) and 0 <= sr.min() and sr.max() <= 1
    assert torch.equal(policy(lr), sr)  # the ODE path from a fixed noise: deterministic
    traj = policy.sample(lr, torch.Generator().manual_seed(1))
    assert traj.states.shape == (2, STEPS + 1, 4, 8, 8) and traj.log_probs.shape == (2, STEPS)
    assert traj.sr.shape == (2, 3, 32, 32) and 0 <= traj.sr.min() and traj.sr.max() <= 1
    assert torch.isfinite(traj.log_probs).all() and not torch.equal(traj.sr, sr)
    odd = policy.sample(torch.rand(1, 3, 5, 7), torch.Generator().manual_seed(2))  # padded to 6x8 latents, cropped
    assert odd.states.shape == (1, STEPS + 1, 4, 6, 8) and odd.sr.shape == (1, 3, 20, 28)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_each_transition_is_diffusers_ddim_step_with_eta(upscaler, tmp_path, prediction_type):
    """Mean and std of ``p(x_{k+1} | x_k)`` equal ``DDIMScheduler.step(..., eta)`` on the trailing grid."""
    import diffusers

    folder = upscaler if prediction_type == "epsilon" else write_tiny_model(tmp_path / "v", upscaler=True,
                                                                            prediction_type=prediction_type)
    eta = 0.7
    policy = policy_of(folder, num_steps=4, eta=eta)
    sched = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler", timestep_spacing="trailing")
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == policy.timesteps == trailing_timesteps(1000, 4)
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, _ = policy.condition(lr)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for k, t in enumerate(policy.timesteps):
            mean, std = policy.transition(cond, x, k)
            pred = policy.unet_output(x, t, cond)
            want = sched.step(pred, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
            assert torch.allclose(mean, want, atol=1e-5), k
            prev = policy.timesteps[k + 1] if k + 1 < 4 else -1
            assert std == pytest.approx(eta * float(sched._get_variance(t, prev)) ** 0.5, rel=1e-5), k
            x = mean + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(10 + k))
    low = diffusers.DDPMScheduler.from_pretrained(folder / "low_res_scheduler")  # the LR image's noise augmentation
    noise = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(policy.cfg.seed))
    assert torch.allclose(cond, low.add_noise(2 * lr - 1, noise, torch.tensor([20])), atol=1e-6)


def test_sampler_log_probs_equal_the_ones_recomputed_from_the_chain(upscaler):
    policy = policy_of(upscaler, eta=0.8)
    lr = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    traj = policy.sample(lr, torch.Generator().manual_seed(3))
    ones = torch.ones(2, 1, 32, 32)
    for k in range(STEPS):
        again = policy.step_log_prob(lr, traj.states[:, k], k, traj.states[:, k + 1])
        assert torch.allclose(again, traj.log_probs[:, k], atol=1e-5), k
        assert torch.allclose(policy.step_log_prob(lr, traj.states[:, k], k, traj.states[:, k + 1], ones), again, atol=1e-5)
    # and the log-density is exactly Gaussian: moving x_{k+1} by d lowers it by mean(d^2) / (2 s^2)
    moved = policy.step_log_prob(lr, traj.states[:, 0], 0, traj.states[:, 1] + 0.1)
    mean, std = policy.transition(policy.condition(lr)[0], traj.states[:, 0], 0)
    shift = ((traj.states[:, 1] + 0.1 - mean) ** 2 - (traj.states[:, 1] - mean) ** 2).mean(dim=(1, 2, 3)) / (2 * std**2)
    assert torch.allclose(traj.log_probs[:, 0] - moved, shift, atol=1e-4)
    assert policy.predict_sr(lr, traj.states[:, -1], STEPS).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="k must be an int in \\[0, 2\\]"):
        policy.step_log_prob(lr, traj.states[:, 0], STEPS, traj.states[:, 1])
    with pytest.raises(ValueError, match="expected a latent of shape"):
        policy.step_log_prob(lr, traj.states[:, 0, :3], 0, traj.states[:, 1])


@pytest.mark.parametrize("grad_steps", [1, 2])
def test_draft_k_carries_the_gradient_through_the_last_k_steps_only(upscaler, grad_steps):
    policy = policy_of(upscaler, grad_steps=grad_steps)
    policy.add_lora(2, generator=torch.Generator().manual_seed(0))
    perturb_lora(policy, 1)
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    calls: list[tuple[bool, bool]] = []  # per UNet call: grad mode on, input latent carries a gradient

    def hook(module, args, kwargs):
        calls.append((torch.is_grad_enabled(), args[0].requires_grad))

    handle = policy.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        sr = policy.sample_with_grad(lr, torch.Generator().manual_seed(4))
    finally:
        handle.remove()
    first = STEPS - grad_steps
    assert [on for on, _ in calls] == [False] * first + [True] * grad_steps
    assert [carries for _, carries in calls] == [False] * (first + 1) + [True] * (grad_steps - 1)
    assert torch.allclose(sr, policy.sample(lr, torch.Generator().manual_seed(4)).sr, atol=1e-6)  # the same chain
    sr.mean().backward()
    grads = {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads) and any(g.abs().max() > 0 for g in grads.values())


def test_lora_checkpoint_reloads_to_the_same_policy_with_its_config(upscaler, tmp_path):
    policy = policy_of(upscaler, eta=0.5)
    policy.add_lora(2, generator=torch.Generator().manual_seed(0))
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    before = policy(lr)
    perturb_lora(policy, 2)
    tuned = policy(lr)
    assert not torch.allclose(tuned, before, atol=1e-4)
    with policy.adapters_disabled() as ref:
        assert torch.equal(ref(lr), before)
    ckpt = policy.save_checkpoint(tmp_path / "ckpt")
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", folder_io.LORA_WEIGHT_NAME]
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["arch"] == ARCH and meta["config"]["num_steps"] == STEPS and meta["config"]["eta"] == 0.5
    again = load_policy(ckpt)
    assert isinstance(again, MultiStepDiffusionSR) and again.num_steps == STEPS
    assert torch.allclose(again(lr), tuned, atol=1e-5)
    assert load_policy(f"diffusers:{ckpt}", num_steps=2).num_steps == 2  # options override the saved config


# ---------------------------------------------------------------------------------------------
# ReFL (DRaFT-K), DPO and GRPO


def test_refl_draft_1_changes_only_the_lora(upscaler, pairs, tmp_path):
    policy = policy_of(upscaler, grad_steps=1)
    base = base_state(policy)
    grad_on: list[bool] = []  # per UNet call during training: was the gradient on?
    handle = policy.unet.register_forward_pre_hook(lambda *_: grad_on.append(torch.is_grad_enabled()))
    try:
        final = train("refl", policy, ToyReward(), pairs, tmp_path / "run", run_cfg())
    finally:
        handle.remove()
    assert grad_on == [False, False, True] * 2  # 2 steps of K = 3: the gradient through the last step only
    assert same(base_state(policy), base)
    assert any(v.abs().max() > 0 for k, v in lora_state(policy).items() if ".lora_B." in k)
    assert all(m["grad_norm"] > 0 for m in read_metrics(tmp_path / "run"))
    lr = torch.rand(1, 3, 8, 8)
    policy.eval()
    assert torch.allclose(load_policy(final)(lr), policy(lr), atol=1e-5)


def test_dpo_and_grpo_learn_only_lora_and_dpo_starts_at_log2(upscaler, pairs, tmp_path):
    for algo, algo_cfg in (("grpo", GRPOConfig(group_size=2, kl_beta=0.1)), ("dpo", DPOConfig(group_size=2))):
        policy = policy_of(upscaler)
        base = base_state(policy)
        train(algo, policy, ToyReward(), pairs, tmp_path / algo, run_cfg(), algo_cfg)
        assert same(base_state(policy), base), algo
        assert any(v.abs().max() > 0 for k, v in lora_state(policy).items() if ".lora_B." in k), algo
        metrics = read_metrics(tmp_path / algo)
        if algo == "dpo":  # policy == reference (adapters off) at step 1
            assert metrics[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-5)
        else:
            assert "kl" in metrics[-1] and all(m["grad_norm"] > 0 for m in metrics)


def test_grpo_with_a_constant_reward_leaves_the_policy_unchanged(upscaler, pairs, tmp_path):
    policy = policy_of(upscaler)
    train("grpo", policy, ConstantReward(), pairs, tmp_path / "run", run_cfg(), GRPOConfig(group_size=2, kl_beta=0.5))
    fresh = policy_of(upscaler)
    fresh.add_lora(2, generator=seeded_generator(0, LORA_INIT_KEY))
    assert same(lora_state(policy), lora_state(fresh))
    assert all(m["grad_norm"] == 0 for m in read_metrics(tmp_path / "run"))


@pytest.mark.parametrize("algo", ["refl", "grpo"])
def test_resume_equals_an_uninterrupted_run(upscaler, pairs, tmp_path, algo):
    algo_cfg = GRPOConfig(group_size=2) if algo == "grpo" else None
    whole = policy_of(upscaler)
    train(algo, whole, ToyReward(), pairs, tmp_path / "whole", run_cfg(steps=3), algo_cfg)
    part = policy_of(upscaler)
    train(algo, part, ToyReward(), pairs, tmp_path / "part", run_cfg(steps=3), algo_cfg, stop_after_steps=1)
    assert latest_checkpoint(tmp_path / "part")[1]["step"] == 1
    resumed = policy_of(upscaler)
    train(algo, resumed, ToyReward(), pairs, tmp_path / "part", run_cfg(steps=3), algo_cfg)
    assert same(lora_state(whole), lora_state(resumed), atol=1e-6)
    a, b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "part")
    assert [m["step"] for m in b] == [1, 2, 3]
    for k in ("reward/mean", "grad_norm"):
        assert [m[k] for m in a] == pytest.approx([m[k] for m in b], rel=1e-5), k


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_rl_train_each_algorithm_on_the_upscaler_folder(upscaler, pairs, tmp_path):
    common = ["--data", str(pairs), "--steps", "2", "--batch", "2", "--crop", "32", "--lora-rank", "2",
              "--group-size", "2", "--sampling-steps", "2", "--eta", "0.9"]
    for algo, reward, extra in (("refl", "l1", ["--draft-k", "2"]), ("dpo", "l1", []), ("grpo", "l1", [])):
        out = tmp_path / algo
        assert main(["-q", "rl", "train", "--policy", f"diffusers:{upscaler}", "--algo", algo, "--reward", reward,
                     "--out", str(out), *common, *extra]) == 0, algo
        assert len(read_metrics(out)) == 2 and (out / "final" / folder_io.LORA_WEIGHT_NAME).is_file()
        saved = json.loads((out / "run_config.json").read_text())["policy_options"]
        assert saved["num_steps"] == 2 and saved["eta"] == 0.9, algo
        final = load_policy(out / "final")
        assert isinstance(final, MultiStepDiffusionSR) and final.num_steps == 2 and final.cfg.eta == 0.9
    assert json.loads((tmp_path / "refl" / "final" / "config.json").read_text())["config"]["grad_steps"] == 2


def test_cli_warns_of_options_without_effect(upscaler, pairs, tmp_path, caplog):
    """--draft-k with dpo / grpo, --sigma on a multi-step policy, fp16 autocast on a CPU: a warning, not a refusal."""
    caplog.set_level("WARNING")
    argv = ["-q", "rl", "train", "--policy", f"diffusers:{upscaler}", "--algo", "grpo", "--draft-k", "2", "--sigma",
            "0.1", "--mixed-precision", "fp16", "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "run")]
    assert main(argv) == 2  # the missing data set stops it after the warnings
    text = caplog.text
    assert "--draft-k has no effect with --algo grpo" in text
    assert f"--sigma has no effect on diffusers:{upscaler}" in text
    assert "--mixed-precision fp16 on --device cpu" in text
    caplog.clear()
    assert main(["-q", "rl", "train", "--policy", f"diffusers:{upscaler}", "--algo", "refl", "--draft-k", "2",
                 "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "run")]) == 2
    assert "no effect" not in caplog.text  # --draft-k is refl's
