"""One-step diffusion SR policies through diffusers (OSEDiff style, arXiv 2406.08177) on tiny
random-weight models written from configs: the loader and its errors, the forward against
diffusers' own scheduler step, peft LoRA (reference = adapters off), checkpoints in diffusers'
LoRA format, and ReFL / DPO / GRPO from the library and from the command line, on CPU. The
``diffusers`` extra is a test requirement (requirements.txt): these tests fail, not skip, without it."""

from __future__ import annotations

import importlib.util
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from finpercep.cli import main
from finpercep.io import latest_checkpoint
from finpercep.policies import diffusers_folder as folder_io
from finpercep.policies import load_policy
from finpercep.policies.diffusers_tiny import write_tiny_model
from finpercep.policies.diffusion_onestep import (
    TRAIN_ADAPTER,
    OneStepDiffusionSR,
    load_diffusers_policy,
)
from finpercep.policies.gaussian import GaussianPolicy
from finpercep.rl.common import LORA_INIT_KEY, RunConfig, seeded_generator
from finpercep.rl.dpo import DPOConfig
from finpercep.rl.grpo import GRPOConfig
from finpercep.runs import read_metrics
from finpercep.types import AdapterPolicy, StochasticPolicy
from rl_helpers import ConstantReward, ToyReward, base_state, lora_state, train_rl, write_pairs


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny random diffusers model folder (unet/, vae/, scheduler/, prompt_embeds.safetensors)."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-diffusers") / "model")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs"))



def run_cfg(**kw) -> RunConfig:
    base = dict(steps=2, batch=2, crop=32, learning_rate=1e-2, lora_rank=2, sample_every=0, ckpt_every=1,
                max_grad_norm=0.0, gaussian_sigma=0.05)
    return RunConfig(**{**base, **kw})


def train(algo, policy, reward, pairs, out, cfg, algo_cfg=None, **kw) -> Path:
    return train_rl(algo, policy, reward, pairs, out, cfg, algo_cfg, policy_name="diffusers:tiny", **kw)


def same(a: dict, b: dict, atol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


# ---------------------------------------------------------------------------------------------
# Loading a model folder


@pytest.mark.parametrize("remove, words", [
    (None, "model folder .*missing-model not found"),
    ("unet", r"unet/ is missing"),
    ("vae/diffusion_pytorch_model.safetensors", r"vae/diffusion_pytorch_model.safetensors is missing"),
    ("scheduler/scheduler_config.json", r"scheduler/scheduler_config.json is missing"),
    ("prompt_embeds.safetensors", r"no text conditioning: prompt_embeds.safetensors is missing and so is "
                                  r"text_encoder/ and tokenizer/"),
])
def test_a_missing_folder_or_part_is_one_line_naming_it(model, tmp_path, remove, words):
    folder = tmp_path / "missing-model"
    if remove is not None:
        shutil.copytree(model, folder)
        target = folder / remove
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match=words) as e:
        load_policy(f"diffusers:{folder}")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("part, damage, words", [
    ("unet/config.json", b"{ not json", r"unet/config.json: not valid JSON \("),
    ("vae/config.json", b"[4]", r"vae/config.json: expected a JSON object"),
    ("scheduler/scheduler_config.json", b"", r"scheduler/scheduler_config.json: not valid JSON \("),
    ("unet/diffusion_pytorch_model.safetensors", "half", r"unet/diffusion_pytorch_model.safetensors: not a complete "
                                                          r"safetensors file \(.*\); the file is damaged"),
    ("vae/diffusion_pytorch_model.safetensors", b"", r"vae/diffusion_pytorch_model.safetensors: not a complete"),
])
def test_a_broken_config_or_weights_file_is_one_line_naming_it(model, tmp_path, part, damage, words):
    folder = tmp_path / "broken-model"
    shutil.copytree(model, folder)
    target = folder / part
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2] if damage == "half" else damage)
    with pytest.raises(ValueError, match=words) as e:
        load_policy(f"diffusers:{folder}")
    assert "\n" not in str(e.value) and str(e.value).count(str(target)) == 1


def test_an_empty_diffusers_path_and_a_moved_base_model_are_one_line(model, tmp_path):
    with pytest.raises(ValueError, match=r"^diffusers: needs a model folder path \(diffusers:PATH\)$"):
        load_policy("diffusers:")
    base = shutil.copytree(model, tmp_path / "base")
    ckpt = load_diffusers_policy(base).save_checkpoint(tmp_path / "ckpt")
    shutil.rmtree(base)  # the base folder moved away
    with pytest.raises(FileNotFoundError, match=rf"base model folder .*base .*is missing; edit base_model in "
                                                rf"{re.escape(str(ckpt / 'config.json'))} .*base_model=") as e:
        load_policy(ckpt)
    assert "\n" not in str(e.value)


def test_importing_the_policy_modules_needs_no_diffusers_and_a_missing_extra_is_named(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # what an environment without the extra looks like
    with pytest.raises(ImportError, match=r"pip install 'finpercep\[diffusers\]'"):
        load_diffusers_policy(model)


def test_forward_is_osediff_one_step_through_diffusers_own_scheduler(model):
    """``sr = D(z_H)`` with ``z_H`` what ``DDPMScheduler.step`` gives at t = 999 with one step."""
    import diffusers

    policy = load_policy(f"diffusers:{model}")
    assert isinstance(policy, OneStepDiffusionSR) and isinstance(policy, AdapterPolicy) and policy.scale == 4
    assert not isinstance(policy, StochasticPolicy) and not any(p.requires_grad for p in policy.parameters())
    lr = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sr = policy(lr)
    assert sr.shape == (2, 3, 32, 32) and 0 <= sr.min() and sr.max() <= 1

    sched = diffusers.DDPMScheduler.from_pretrained(model / "scheduler")
    sched.set_timesteps(timesteps=[999])  # one step from T_L = 999 to the clean latent
    u = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False)
    with torch.no_grad():
        c = policy.vae.config.scaling_factor
        z = policy.vae.encode(2 * u - 1).latent_dist.mode() * c
        eps = policy.unet(z, 999, encoder_hidden_states=policy.prompt_embeds.expand(2, -1, -1)).sample
        z0 = sched.step(eps, 999, z).prev_sample
        want = ((policy.vae.decode(z0 / c).sample + 1) / 2).clamp(0, 1)
        assert torch.allclose(policy.clean_latent(z, eps), z0, atol=1e-5)
    assert torch.allclose(sr, want, atol=1e-5)
    odd = policy(torch.rand(1, 3, 5, 7))  # padded to what the VAE and UNet divide, cropped back
    assert odd.shape == (1, 3, 20, 28)


def test_v_prediction_and_text_encoder_folders(tmp_path, capfd):
    """A v-prediction schedule and a folder with a CLIP text encoder instead of the embedding file."""
    import transformers

    bars = transformers.utils.logging.is_progress_bar_enabled()
    folder = write_tiny_model(tmp_path / "m", text_encoder=True, prediction_type="v_prediction")
    assert "Writing model shards" not in capfd.readouterr().err  # the library prints no progress bar
    assert transformers.utils.logging.is_progress_bar_enabled() == bars  # and leaves the caller's setting
    policy = load_policy(f"diffusers:{folder}")
    tok = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
    enc = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder")
    ids = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(policy.prompt_embeds, enc(ids)[0])
    z, v = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    a = policy.sqrt_a**2
    assert torch.allclose(policy.clean_latent(z, v), math.sqrt(a) * z - math.sqrt(1 - a) * v)
    assert policy(torch.rand(1, 3, 4, 4)).shape == (1, 3, 16, 16)


# ---------------------------------------------------------------------------------------------
# LoRA (peft) and checkpoints


def test_lora_starts_as_the_base_trains_alone_and_turns_off_for_the_reference(model):
    policy = load_diffusers_policy(model)
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    before = policy(lr)
    names = policy.add_lora(2, generator=torch.Generator().manual_seed(0))
    assert names and all(".lora_" in n for n in names)
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == set(names)
    assert torch.equal(policy(lr), before)  # lora_B = 0
    other = load_diffusers_policy(model)
    other.add_lora(2, generator=torch.Generator().manual_seed(0))
    assert same(lora_state(policy), lora_state(other))  # lora_A is a function of the generator
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    tuned = policy(lr)
    assert not torch.allclose(tuned, before, atol=1e-4)
    with policy.adapters_disabled() as ref:
        assert torch.equal(ref(lr), before)
    assert torch.equal(policy(lr), tuned) and all(policy.get_parameter(n).requires_grad for n in names)
    with pytest.raises(ValueError, match="already has"):
        policy.add_lora(2)


def test_checkpoint_is_diffusers_lora_format_and_reloads_and_chains(model, tmp_path):
    policy = load_diffusers_policy(model)
    policy.add_lora(2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    want = policy(lr)
    ckpt = policy.save_checkpoint(tmp_path / "ckpt")
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", folder_io.LORA_WEIGHT_NAME]
    again = load_policy(ckpt)  # a plain path works, as for every policy checkpoint
    assert isinstance(again, OneStepDiffusionSR) and torch.allclose(again(lr), want, atol=1e-5)

    # diffusers' own loader reads the file into a fresh UNet: the same adapter
    import diffusers

    unet = diffusers.UNet2DConditionModel.from_pretrained(model / "unet")
    unet.load_lora_adapter(ckpt, prefix="unet", weight_name=folder_io.LORA_WEIGHT_NAME, local_files_only=True,
                           adapter_name="x")
    ours = {k.replace(f".{TRAIN_ADAPTER}.", "."): v for k, v in policy.unet.state_dict().items() if ".lora_" in k}
    theirs = {k.replace(".x.", "."): v for k, v in unet.state_dict().items() if ".lora_" in k}
    assert same(ours, theirs) and unet.peft_config["x"].r == 2

    # fine-tuning a fine-tuned checkpoint: the first adapter is fused and kept, the second trained on top
    again.add_lora(2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for n, p in again.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
    with again.adapters_disabled() as ref:
        assert torch.allclose(ref(lr), want, atol=1e-5)  # the reference is the policy it started from
    second = again.save_checkpoint(tmp_path / "ckpt2")
    assert sorted(p.name for p in second.iterdir()) == ["config.json", "lora_0.safetensors", folder_io.LORA_WEIGHT_NAME]
    assert torch.allclose(load_policy(second)(lr), again(lr), atol=1e-5)
    moved = tmp_path / "moved"
    shutil.copytree(second, moved)
    (moved / "config.json").write_text((moved / "config.json").read_text().replace(str(model.resolve()), "/nowhere"))
    with pytest.raises(FileNotFoundError, match="base model folder /nowhere .*missing"):
        load_policy(moved)


# ---------------------------------------------------------------------------------------------
# ReFL, DPO and GRPO


def test_refl_changes_only_the_lora_and_the_final_checkpoint_is_the_trained_policy(model, pairs, tmp_path):
    policy = load_diffusers_policy(model, gradient_checkpointing=True)
    base = base_state(policy)
    final = train("refl", policy, ToyReward(), pairs, tmp_path / "run", run_cfg())
    assert same(base_state(policy), base)  # the UNet and VAE weights are untouched
    assert lora_state(policy) and any(v.abs().max() > 0 for k, v in lora_state(policy).items() if ".lora_B." in k)
    assert all(m["grad_norm"] > 0 for m in read_metrics(tmp_path / "run"))
    lr = torch.rand(1, 3, 8, 8)
    policy.eval()
    assert torch.allclose(load_policy(final)(lr), policy(lr), atol=1e-5)


def test_gradient_checkpointing_and_autocast_keep_the_gradient(model):
    lr = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    grads = []
    for ckpt in (False, True):
        policy = load_diffusers_policy(model, gradient_checkpointing=ckpt)
        assert policy.unet.is_gradient_checkpointing == policy.vae.is_gradient_checkpointing == ckpt
        policy.add_lora(2, generator=torch.Generator().manual_seed(0))
        policy.train()
        policy(lr).mean().backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None})
    assert grads[0] and same(grads[0], grads[1], atol=1e-6)
    bf16 = load_diffusers_policy(model, mixed_precision="bf16")
    out = bf16(lr)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="mixed_precision"):
        load_diffusers_policy(model, mixed_precision="fp8")


def test_gaussian_sampler_log_probs_equal_recomputed_ones(model):
    policy = GaussianPolicy(load_diffusers_policy(model), 0.05)
    lr = torch.rand(2, 3, 8, 8)
    traj = policy.sample(lr, torch.Generator().manual_seed(0))
    assert traj.states.shape == (2, 2, 3, 32, 32) and traj.log_probs.shape == (2, 1)
    again = policy.step_log_prob(lr, traj.states[:, 0], 0, traj.states[:, 1])
    assert torch.allclose(again, traj.log_probs[:, 0], atol=1e-5)


@pytest.mark.parametrize("kl_beta", [0.0, 0.5])
def test_grpo_with_a_constant_reward_leaves_the_policy_unchanged(model, pairs, tmp_path, kl_beta):
    policy = GaussianPolicy(load_diffusers_policy(model), 0.05)
    train("grpo", policy, ConstantReward(), pairs, tmp_path / "run", run_cfg(), GRPOConfig(group_size=2, kl_beta=kl_beta))
    fresh = load_diffusers_policy(model)
    fresh.add_lora(2, generator=seeded_generator(0, LORA_INIT_KEY))
    assert same(lora_state(policy.base), lora_state(fresh))  # the adapters as initialised: no update
    assert all(m["grad_norm"] == 0 for m in read_metrics(tmp_path / "run"))


def test_grpo_and_dpo_learn_only_lora_and_dpo_starts_at_log2(model, pairs, tmp_path):
    for algo, algo_cfg in (("grpo", GRPOConfig(group_size=2, kl_beta=0.1)), ("dpo", DPOConfig(group_size=2))):
        policy = GaussianPolicy(load_diffusers_policy(model), 0.05)
        base = base_state(policy)
        final = train(algo, policy, ToyReward(), pairs, tmp_path / algo, run_cfg(), algo_cfg)
        assert same(base_state(policy), base), algo
        assert any(v.abs().max() > 0 for k, v in lora_state(policy).items() if ".lora_B." in k), algo
        assert isinstance(load_policy(final), OneStepDiffusionSR)  # the network, not the Gaussian wrapper
        if algo == "dpo":  # policy == reference (adapters off) at step 1
            assert read_metrics(tmp_path / algo)[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-5)
        else:
            assert "kl" in read_metrics(tmp_path / algo)[-1]


@pytest.mark.parametrize("algo", ["refl", "grpo"])
def test_resume_equals_an_uninterrupted_run(model, pairs, tmp_path, algo):
    def make():
        p = load_diffusers_policy(model)
        return p if algo == "refl" else GaussianPolicy(p, 0.05)

    algo_cfg = GRPOConfig(group_size=2) if algo == "grpo" else None
    whole = make()
    train(algo, whole, ToyReward(), pairs, tmp_path / "whole", run_cfg(steps=3), algo_cfg)
    part = make()
    train(algo, part, ToyReward(), pairs, tmp_path / "part", run_cfg(steps=3), algo_cfg, stop_after_steps=1)
    assert latest_checkpoint(tmp_path / "part")[1]["step"] == 1
    resumed = make()
    train(algo, resumed, ToyReward(), pairs, tmp_path / "part", run_cfg(steps=3), algo_cfg)
    assert same(lora_state(whole), lora_state(resumed), atol=1e-6)
    a, b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "part")
    assert [m["step"] for m in b] == [1, 2, 3]
    for k in ("reward/mean", "grad_norm"):
        assert [m[k] for m in a] == pytest.approx([m[k] for m in b], rel=1e-5), k


def test_full_fine_tuning_is_refused(model, pairs, tmp_path):
    with pytest.raises(ValueError, match="LoRA adapters only.*--lora-rank"):
        train("refl", load_diffusers_policy(model), ToyReward(), pairs, tmp_path / "run", run_cfg(lora_rank=0))
    assert not (tmp_path / "run").exists()  # refused before the run folder is written: a rerun is free to start


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_rl_train_each_algorithm_then_sr(model, pairs, tmp_path, capsys):
    common = ["--data", str(pairs), "--steps", "2", "--batch", "2", "--crop", "32", "--lora-rank", "2",
              "--group-size", "2"]
    for algo, reward in (("refl", "finpercep:1+0.5*l1"), ("dpo", "l1"), ("grpo", "l1")):
        out = tmp_path / algo
        assert main(["-q", "rl", "train", "--policy", f"diffusers:{model}", "--algo", algo, "--reward", reward,
                     "--out", str(out), *common]) == 0, algo
        assert len(read_metrics(out)) == 2 and (out / "final" / folder_io.LORA_WEIGHT_NAME).is_file()
    assert main(["-q", "sr", str(pairs / "samples" / "0_lr.png"), "--policy", str(tmp_path / "refl" / "final"),
                 "--out", str(tmp_path / "sr"), "--mixed-precision", "bf16"]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "sr" / "0_lr.png").size == (32, 32)
    capsys.readouterr()
    assert main(["-q", "rl", "train", "--policy", f"diffusers:{tmp_path / 'nope'}", "--algo", "refl",
                 "--out", str(tmp_path / "x"), *common]) == 2
    err = capsys.readouterr().err
    assert "nope not found" in err and len(err.strip().splitlines()) == 1
    assert main(["-q", "sr", str(pairs / "samples" / "0_lr.png"), "--policy", "tiny-x4", "--out", str(tmp_path / "y"),
                 "--mixed-precision", "bf16"]) == 2
    assert "diffusers policies" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The GPU check's timed ReFL step (benchmarks/gpu_check.py, check 6), on the tiny model on CPU


def test_gpu_check_refl_step_section_runs_on_the_tiny_model_on_cpu(model):
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parents[1] / "benchmarks" / "gpu_check.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    res = script.refl_step_section(torch.device("cpu"), size=64, model=str(model), steps=1)
    assert res.pop("refl_model") == str(model)
    keys = {f"refl_64_{k}_ckpt_{c}" for k in ("step_s", "reward_s", "reward_share") for c in (True, False)}
    assert set(res) == keys | {"refl_lora_params"}  # no peak memory off CUDA, no writing time for a given folder
    assert all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in res.values())
    assert all(0 < res[f"refl_64_reward_share_ckpt_{c}"] < 1 for c in (True, False))
    assert isinstance(res["refl_lora_params"], int)
