"""The GPU path, checked in one run: maps and reward model on CUDA, bf16/fp16 autocast, throughput.

    python benchmarks/gpu_check.py --out docs/results/gpu_check.md

1. Ground-truth maps on CUDA vs CPU (same inputs): max abs difference, and pairs/s on each.
2. FinPercep-RM (final stage) forward at 512x512: score and map under fp32 / bf16 / fp16 autocast vs
   fp32, and images/s on CUDA vs the CPU of the same machine (batch 8).
3. One training step on CUDA with bf16 autocast (loss finite, gradients finite).
4. A one-step diffusion SR policy through diffusers (``--policy diffusers:PATH``; the tiny random
   model of ``tools/make_tiny_diffusers.py``, or a real model folder with ``--diffusers-model``):
   fp16 / bf16 autocast forward vs fp32, a LoRA ReFL-style backward with and without gradient
   checkpointing (gradients equal, only LoRA parameters get one) and its peak memory.
   ``diffusers_section`` runs on any device (``python -c`` it with ``torch.device("cpu")``); it has
   not yet been run on a GPU.
5. The multi-step diffusion SR policy (x4-upscaler layout; the tiny random one of
   ``tools/make_tiny_diffusers.py --upscaler``, or a real folder with ``--diffusers-upscaler``):
   bf16 sampling (log-probabilities finite, recomputed ones equal the sampler's), a DRaFT-K
   backward under bf16 with and without gradient checkpointing (gradients equal, only LoRA) and its
   peak memory. ``multistep_section`` runs on any device too; not yet run on a GPU.
6. A timed ReFL step at 512x512 (LR 128x128, batch 1) on a full-size random-weight one-step model
   (Stable Diffusion 2.1-base sizes, :func:`finpercep.policies.diffusers_tiny.write_full_size_model`,
   or a real folder with ``--refl-model``) in bf16 with LoRA rank 4 and the shipped FinPercep-RM:
   step time, the reward's forward + backward time and its share of the step, peak memory, with
   gradient checkpointing on and off. ``refl_step_section`` runs on any device (the CPU test runs it
   on the tiny model at 64x64); ``--skip-full-size`` leaves it out. Not yet run on a GPU.
The data build and the torchrun (DDP, NCCL, 1 GPU) training run are driven by the shell command
that calls this script (see docs/results/gpu_check.md for the exact command).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from finpercep.data.gt_maps import GTMapper
from finpercep.reward.losses import RMLossConfig, total_loss
from finpercep.reward.model import FinPercepRM, RewardOutput, RMConfig


def timed(fn, reps: int, sync: bool) -> float:
    fn()
    if sync:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if sync:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def diffusers_section(dev: torch.device, model: str | None = None, size: int = 64) -> dict:
    """Check 4 of the module docstring on ``dev`` with LR images of ``size`` pixels (x4 out)."""
    import tempfile

    from finpercep.policies.diffusers_tiny import write_tiny_model
    from finpercep.policies.diffusion_onestep import load_diffusers_policy

    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = model or str(write_tiny_model(Path(tmp) / "tiny"))
        res["diffusers_model"] = "tiny random (tools/make_tiny_diffusers.py)" if model is None else folder
        lr = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dev)
        with torch.no_grad():
            ref = load_diffusers_policy(folder).to(dev)(lr)
            for tag in ("bf16", "fp16"):
                out = load_diffusers_policy(folder, mixed_precision=tag).to(dev)(lr)
                res[f"diffusers_{tag}_max_abs_vs_fp32"] = float((out - ref).abs().max())
                res[f"diffusers_{tag}_finite"] = bool(torch.isfinite(out).all())
        grads = []
        for ckpt in (False, True):
            policy = load_diffusers_policy(folder, gradient_checkpointing=ckpt, mixed_precision="bf16").to(dev)
            policy.add_lora(4, generator=torch.Generator().manual_seed(0))
            policy.train()
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            policy(lr).mean().backward()
            grads.append({n: p.grad.float().cpu() for n, p in policy.named_parameters() if p.grad is not None})
            res[f"diffusers_only_lora_grads_ckpt_{ckpt}"] = all(".lora_" in n for n in grads[-1])
            res[f"diffusers_grads_finite_ckpt_{ckpt}"] = all(bool(torch.isfinite(g).all()) for g in grads[-1].values())
            if dev.type == "cuda":
                res[f"diffusers_backward_peak_gib_ckpt_{ckpt}"] = torch.cuda.max_memory_allocated(dev) / 2**30
        res["diffusers_ckpt_grad_max_abs_diff"] = max(float((grads[0][n] - grads[1][n]).abs().max()) for n in grads[0])
    return res


def multistep_section(dev: torch.device, model: str | None = None, size: int = 32, steps: int = 4) -> dict:
    """Check 5 of the module docstring on ``dev`` with LR images of ``size`` pixels and ``steps`` sampler steps."""
    import tempfile

    from finpercep.policies.diffusers_tiny import write_tiny_model
    from finpercep.policies.diffusion_multistep import load_multistep_policy

    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = model or str(write_tiny_model(Path(tmp) / "tiny", upscaler=True))
        res["multistep_model"] = "tiny random (make_tiny_diffusers.py --upscaler)" if model is None else folder
        lr = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dev)
        policy = load_multistep_policy(folder, num_steps=steps, mixed_precision="bf16").to(dev)
        traj = policy.sample(lr, torch.Generator(device=dev).manual_seed(0))
        with torch.no_grad():
            again = torch.stack([policy.step_log_prob(lr, traj.states[:, k], k, traj.states[:, k + 1])
                                 for k in range(steps)], dim=1)
        res["multistep_bf16_log_probs_finite"] = bool(torch.isfinite(traj.log_probs).all())
        res["multistep_bf16_log_prob_recompute_max_abs_diff"] = float((again - traj.log_probs).abs().max())
        grads = []
        for ckpt in (False, True):
            policy = load_multistep_policy(folder, num_steps=steps, grad_steps=2, mixed_precision="bf16",
                                           gradient_checkpointing=ckpt).to(dev)
            policy.add_lora(4, generator=torch.Generator().manual_seed(0))
            policy.train()
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            policy.sample_with_grad(lr, torch.Generator(device=dev).manual_seed(1)).mean().backward()
            grads.append({n: p.grad.float().cpu() for n, p in policy.named_parameters() if p.grad is not None})
            res[f"multistep_only_lora_grads_ckpt_{ckpt}"] = all(".lora_" in n for n in grads[-1])
            res[f"multistep_grads_finite_ckpt_{ckpt}"] = all(bool(torch.isfinite(g).all()) for g in grads[-1].values())
            if dev.type == "cuda":
                res[f"multistep_draft2_peak_gib_ckpt_{ckpt}"] = torch.cuda.max_memory_allocated(dev) / 2**30
        res["multistep_ckpt_grad_max_abs_diff"] = max(float((grads[0][n] - grads[1][n]).abs().max()) for n in grads[0])
    return res


def refl_step_section(dev: torch.device, size: int = 512, model: str | None = None, steps: int = 3) -> dict:
    """Check 6 of the module docstring on ``dev``: ``steps`` timed ReFL steps (after one warm-up) of
    a batch of one ``size/4`` LR image (SR ``size`` x ``size``) with gradient checkpointing on, then
    off (an out-of-memory there is recorded, not raised). ``model``: a one-step model folder
    (default: a full-size random one, written to a temporary folder; its writing time is reported).

    The step is :func:`refl_step`. Keys (``S`` = ``size``, ``C`` = checkpointing True / False):
    ``refl_S_step_s_ckpt_C`` and ``refl_S_reward_s_ckpt_C`` (seconds per step, mean over ``steps``),
    ``refl_S_reward_share_ckpt_C`` (their ratio, as ``rl train``'s ``time/reward_share``),
    ``refl_S_peak_gib_ckpt_C`` (CUDA only: peak allocated memory of the policy, the reward and the
    step, over what was allocated before the section), ``refl_lora_params`` (trainable), and
    ``refl_model`` / ``refl_write_model_s``."""
    import gc
    import tempfile

    from finpercep import load_reward
    from finpercep.policies.diffusers_tiny import write_full_size_model
    from finpercep.policies.diffusion_onestep import load_diffusers_policy

    if size % 4 or steps < 1:
        raise ValueError(f"refl_step_section: size must be a multiple of 4 (the LR image is size/4) and steps >= 1, "
                         f"got size {size}, steps {steps}")
    cuda = dev.type == "cuda"
    base_mem = torch.cuda.memory_allocated(dev) if cuda else 0
    g = torch.Generator().manual_seed(0)
    lr, hr = torch.rand(1, 3, size // 4, size // 4, generator=g).to(dev), torch.rand(1, 3, size, size, generator=g).to(dev)
    reward = load_reward(device=dev)  # the shipped FinPercep-RM, float32 (rl train runs it so)
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            t = time.perf_counter()
            folder = str(write_full_size_model(Path(tmp) / "sd21base-random"))
            res["refl_model"] = "full-size random (SD 2.1-base sizes)"
            res["refl_write_model_s"] = time.perf_counter() - t
        else:
            folder = res["refl_model"] = model
        for ckpt in (True, False):
            key = f"refl_{size}_%s_ckpt_{ckpt}"
            policy = None
            try:
                policy = load_diffusers_policy(folder, mixed_precision="bf16", gradient_checkpointing=ckpt)
                policy.add_lora(4, generator=torch.Generator().manual_seed(0))
                policy.to(dev).train()
                res["refl_lora_params"] = sum(p.numel() for p in policy.parameters() if p.requires_grad)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(dev)
                step_s, reward_s = refl_step(policy, reward, lr, hr, steps)
                res[key % "step_s"], res[key % "reward_s"] = step_s, reward_s
                res[key % "reward_share"] = reward_s / step_s
                if cuda:
                    res[key % "peak_gib"] = (torch.cuda.max_memory_allocated(dev) - base_mem) / 2**30
            except torch.cuda.OutOfMemoryError:  # only the run without checkpointing should risk it
                res[key % "step_s"] = "out of memory"
            del policy
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    return res


def refl_step(policy: torch.nn.Module, reward, lr: torch.Tensor, hr: torch.Tensor, steps: int) -> tuple[float, float]:
    """Mean seconds of a ReFL step and of its reward part over ``steps`` steps after one warm-up
    (allocator, cuDNN autotuning), on ``policy``'s trainable parameters with Adam.

    The step is :func:`finpercep.rl.refl.train`'s: the reward's gradient with respect to ``sr``
    (its forward + backward, timed alone and CUDA-synchronised by the same
    :class:`~finpercep.rl.common.StepTimer`), then the policy's backward of ``(sr * g_sr).sum() +
    fidelity_weight * l1(sr, hr)``, gradient clipping and the optimiser step. ``reward_weight`` is 1
    (the timing does not depend on it); the rest are ReFLConfig's and RunConfig's defaults."""
    import torch.nn.functional as F

    from finpercep.rl.common import RunConfig, StepTimer
    from finpercep.rl.refl import ReFLConfig

    algo, run = ReFLConfig(reward_weight=1.0), RunConfig()
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=run.learning_rate)
    timers = []
    for _ in range(steps + 1):
        timer = StepTimer(lr.device)
        with timer("step"):
            sr = policy(lr)
            sr_in = sr.detach().requires_grad_(True)
            with timer("reward"):
                (g_sr,) = torch.autograd.grad(-algo.reward_weight * reward(sr_in).score.mean(), sr_in)
            ((sr * g_sr).sum() + algo.fidelity_weight * F.l1_loss(sr, hr)).backward()
            torch.nn.utils.clip_grad_norm_(params, run.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        timers.append(timer.times)
    return (sum(t["step"] for t in timers[1:]) / steps, sum(t["reward"] for t in timers[1:]) / steps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/results/gpu_check.md")
    ap.add_argument("--diffusers-model", default=None,
                    help="a local diffusers model folder for check 4 (default: a tiny random one)")
    ap.add_argument("--diffusers-upscaler", default=None,
                    help="a local x4-upscaler-layout diffusers folder for check 5 (default: a tiny random one)")
    ap.add_argument("--refl-model", default=None,
                    help="a local one-step diffusers model folder for check 6 (default: a full-size random one)")
    ap.add_argument("--skip-full-size", action="store_true",
                    help="leave out check 6 (it writes ~4 GB of random weights to a temporary folder)")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    res: dict = {"device": name, "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
                 "cpu": platform.processor() or platform.machine()}
    g = torch.Generator().manual_seed(0)

    # 1. maps
    ref = torch.rand(8, 3, 256, 256, generator=g)
    dist = (ref + 0.1 * torch.randn(8, 3, 256, 256, generator=g)).clamp(0, 1)
    cpu_m, gpu_m = GTMapper(device="cpu"), GTMapper(device="cuda")
    m_cpu = cpu_m(ref, dist)
    m_gpu = gpu_m(ref.to(dev), dist.to(dev)).cpu()
    res["maps_max_abs_diff_cuda_vs_cpu"] = float((m_cpu - m_gpu).abs().max())
    res["maps_pairs_per_s_cpu"] = 8 / timed(lambda: cpu_m(ref, dist), 2, False)
    rd, dd = ref.to(dev), dist.to(dev)
    res["maps_pairs_per_s_cuda"] = 8 / timed(lambda: gpu_m(rd, dd), 10, True)

    # 2. reward model forward, precisions and throughput
    torch.manual_seed(0)
    model = FinPercepRM(RMConfig()).eval()
    x = torch.rand(8, 3, 512, 512, generator=g)
    with torch.no_grad():
        ref_out = model(x)
        gm = model.to(dev)
        xd = x.to(dev)
        out32 = gm(xd)
        res["rm_fp32_cuda_vs_cpu_score_max_abs"] = float((out32.score.cpu() - ref_out.score).abs().max())
        res["rm_fp32_cuda_vs_cpu_map_max_abs"] = float((out32.map.cpu() - ref_out.map).abs().max())
        for tag, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            with torch.autocast("cuda", dtype=dt):
                o = gm(xd)
            res[f"rm_{tag}_score_max_abs_vs_fp32"] = float((o.score.float() - out32.score).abs().max())
            res[f"rm_{tag}_map_max_abs_vs_fp32"] = float((o.map.float() - out32.map).abs().max())
            res[f"rm_{tag}_finite"] = bool(torch.isfinite(o.score).all() and torch.isfinite(o.map).all())

            def run_amp(dt=dt):
                with torch.autocast("cuda", dtype=dt):
                    gm(xd)

            res[f"rm_{tag}_img_per_s_cuda_512"] = 8 / timed(run_amp, 10, True)
        res["rm_fp32_img_per_s_cuda_512"] = 8 / timed(lambda: gm(xd), 10, True)
        cpu_model = FinPercepRM(RMConfig()).eval()
        res["rm_fp32_img_per_s_cpu_512"] = 8 / timed(lambda: cpu_model(x), 1, False)

    # 3. a bf16 training step on CUDA
    model.train()
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    hr = torch.rand(4, 3, 256, 256, device=dev)
    syn, sr = (hr + 0.05).clamp(0, 1), (hr + 0.1).clamp(0, 1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        o = model(torch.cat([hr, syn, sr]))
        outs = [RewardOutput(o.score[i * 4:(i + 1) * 4], o.map[i * 4:(i + 1) * 4], o.map_logits[i * 4:(i + 1) * 4])
                for i in range(3)]
        loss, logs = total_loss(*outs, torch.rand(4, 1, 256, 256, device=dev), o.score[:4].detach().float(),
                                RMLossConfig())
    loss.backward()
    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()
    res["train_step_bf16_loss"] = float(loss.detach())
    res["train_step_bf16_grads_finite"] = bool(grads_finite)
    res["cuda_max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30

    # 4. a one-step diffusion SR policy (the diffusers extra)
    res.update(diffusers_section(dev, args.diffusers_model))
    # 5. the multi-step diffusion SR policy (x4-upscaler layout)
    res.update(multistep_section(dev, args.diffusers_upscaler))
    # 6. a timed ReFL step at 512x512 on a full-size one-step model
    if not args.skip_full_size:
        res.update(refl_step_section(dev, model=args.refl_model))

    print(json.dumps(res, indent=2))
    lines = ["# GPU check", "", f"Device: **{name}**, torch {torch.__version__}; CPU baseline on the same machine "
             f"({res['cpu_threads']} threads). Produced by `python benchmarks/gpu_check.py`.", "",
             "| check | value |", "|---|---:|"]
    for k, v in res.items():
        if k in ("device", "torch"):
            continue
        lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
