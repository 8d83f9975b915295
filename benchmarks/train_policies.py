"""Train the small SR policies ``tiny-x4`` and ``flow-x4`` and evaluate them.

    python benchmarks/train_policies.py --which both --photos runs/photos/train --out runs/policies \
        [--config YAML] [--test runs/photos/test] [--ship] [--eval-only] [--report docs/results/policies.md]

Trains each chosen recipe (``configs/policy_tiny.yaml`` / ``configs/policy_flow.yaml`` unless
``--config`` names another for a single ``--which``) into ``OUT/tiny`` / ``OUT/flow`` (resolved
config, ``metrics.jsonl``, checkpoint ``model/``); ``--ship`` copies the checkpoints into
``src/finpercep/policies/weights/{tiny-x4,flow-x4}/``. Then evaluates on the test photos: the
center ``--crop`` of each, its LR made by the Real-ESRGAN degradation with ``default_rng(--seed)``;
PSNR and SSIM (scikit-image, on 8-bit outputs, RGB) of bicubic upscaling, tiny-x4, and flow-x4
(deterministic mean path and one stochastic sample). A policy trained in this run is evaluated
from its run folder; one not trained here from the shipped weights. Writes the markdown report
(command line on top) and the raw numbers next to it (``.json``).
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from finpercep.config import load_config
from finpercep.io import atomic_write_bytes, save_json, to_uint8
from finpercep.policies import load_policy, load_policy_checkpoint, save_policy
from finpercep.policies.flow import FlowSR, FlowTrainConfig, train_flow
from finpercep.policies.recipe_data import eval_pairs
from finpercep.policies.tiny import WEIGHTS_DIR, TinyTrainConfig, bicubic_upscale, train_tiny
from finpercep.runs import read_metrics

ROOT = Path(__file__).resolve().parent.parent
RECIPES: dict[str, tuple[type, Callable[..., Path], Path, str]] = {
    "tiny": (TinyTrainConfig, train_tiny, ROOT / "configs" / "policy_tiny.yaml", "tiny-x4"),
    "flow": (FlowTrainConfig, train_flow, ROOT / "configs" / "policy_flow.yaml", "flow-x4"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--which", choices=("tiny", "flow", "both"), default="both", help="recipes to train (default both)")
    ap.add_argument("--photos", type=Path, default=Path("runs/photos/train"), help="training photos")
    ap.add_argument("--out", type=Path, default=Path("runs/policies"), help="run folder (OUT/tiny, OUT/flow)")
    ap.add_argument("--config", type=Path, help="recipe YAML for a single --which (default configs/policy_<which>.yaml)")
    ap.add_argument("--test", type=Path, default=Path("runs/photos/test"), help="evaluation photos")
    ap.add_argument("--crop", type=int, default=256, help="HR center crop for evaluation (default 256)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the evaluation degradations and flow sample")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for evaluation (default 1)")
    ap.add_argument("--ship", action="store_true", help="copy trained checkpoints into the package weights")
    ap.add_argument("--eval-only", action="store_true", help="train nothing; evaluate the shipped weights")
    ap.add_argument("--report", type=Path, default=ROOT / "docs" / "results" / "policies.md")
    args = ap.parse_args(argv)
    if args.config is not None and args.which == "both":
        ap.error("--config needs a single --which (tiny or flow)")
    return args


def train(args: argparse.Namespace) -> tuple[dict[str, Path], dict[str, dict]]:
    """Train the chosen recipes; returns their checkpoints and a summary per recipe."""
    ckpts, summary = {}, {}
    for key in ("tiny", "flow") if args.which == "both" else (args.which,):
        cfg_cls, train_fn, default_yaml, name = RECIPES[key]
        yaml_path = args.config or default_yaml
        cfg = load_config(cfg_cls, yaml_path)
        t0 = time.perf_counter()
        ckpt = train_fn(cfg, args.photos, args.out / key, progress=True)
        wall = time.perf_counter() - t0
        lines = read_metrics(args.out / key)
        loss_key = next(k for k in lines[-1] if k.startswith("loss/"))
        tail = [m[loss_key] for m in lines[-5:]]
        summary[name] = {
            "config": str(yaml_path), "steps": cfg.steps, "batch": cfg.batch, "crop": cfg.crop,
            "threads": cfg.threads, "wall_s": wall, "loss_key": loss_key,
            "loss_first": lines[0][loss_key], "loss_last5_mean": float(np.mean(tail)),
            "params": sum(p.numel() for p in load_policy_checkpoint(ckpt).parameters()),
        }
        ckpts[name] = ckpt
        if args.ship:
            save_policy(load_policy_checkpoint(ckpt), WEIGHTS_DIR / name)
            print(f"shipped {name} -> {WEIGHTS_DIR / name}")
    return ckpts, summary


def psnr_ssim(sr: torch.Tensor, hr: torch.Tensor) -> tuple[float, float]:
    """PSNR (dB) and SSIM of one image pair ``(3, H, W)``, both quantised to 8 bit first."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a, b = to_uint8(sr), to_uint8(hr)
    return (float(peak_signal_noise_ratio(b, a, data_range=255)),
            float(structural_similarity(b, a, data_range=255, channel_axis=2)))


def evaluate(args: argparse.Namespace, ckpts: dict[str, Path]) -> tuple[list[str], dict[str, dict]]:
    """Per-method per-image PSNR / SSIM and seconds per image on the test crops."""
    names, lr, hr = eval_pairs(args.test, args.crop, 4, args.seed)
    models = {n: (load_policy_checkpoint(ckpts[n]) if n in ckpts else load_policy(n)) for n in ("tiny-x4", "flow-x4")}
    flow = models["flow-x4"]
    assert isinstance(flow, FlowSR)
    gen = torch.Generator().manual_seed(args.seed)
    methods: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {
        "bicubic": ("-", lambda x: bicubic_upscale(x, 4).clamp(0, 1)),
        "tiny-x4": (_source("tiny-x4", ckpts), models["tiny-x4"]),
        "flow-x4 (mean path)": (_source("flow-x4", ckpts), flow),
        f"flow-x4 (one sample, seed {args.seed})": (_source("flow-x4", ckpts), lambda x: flow.sample(x, gen).sr),
    }
    results = {}
    with torch.no_grad():
        for label, (source, fn) in methods.items():
            per_image, secs = [], []
            for i in range(len(names)):
                t0 = time.perf_counter()
                sr = fn(lr[i : i + 1])
                secs.append(time.perf_counter() - t0)
                per_image.append(psnr_ssim(sr[0], hr[i]))
            results[label] = {
                "source": source,
                "psnr": [p for p, _ in per_image], "ssim": [s for _, s in per_image],
                "psnr_mean": float(np.mean([p for p, _ in per_image])),
                "ssim_mean": float(np.mean([s for _, s in per_image])),
                "s_per_image": float(np.median(secs)),
            }
    return names, results


def _source(name: str, ckpts: dict[str, Path]) -> str:
    return f"trained here ({ckpts[name]})" if name in ckpts else "shipped weights"


def render(args: argparse.Namespace, argv: list[str], names: list[str], results: dict, summary: dict) -> str:
    cmd = "python benchmarks/train_policies.py " + " ".join(shlex.quote(a) for a in argv)
    lines = [
        "# Small SR policies: tiny-x4 and flow-x4",
        "",
        f"`{cmd}`",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}. "
        f"Test set: the center {args.crop}x{args.crop} crop of each of the {len(names)} photos in `{args.test}` "
        f"(never used in training), LR by the Real-ESRGAN second-order degradation (x4, "
        f"`default_rng({args.seed})`). PSNR / SSIM on 8-bit RGB (scikit-image); s/image is the median "
        f"forward time for one {args.crop // 4}x{args.crop // 4} LR.",
        "",
    ]
    if summary:
        lines += [
            "## Training",
            "",
            "| policy | recipe | steps x batch (crop) | threads | parameters | wall time (s) | loss first -> last 5 mean |",
            "|---|---|---|---:|---:|---:|---|",
        ]
        for name, s in summary.items():
            lines.append(
                f"| {name} | `{Path(s['config']).relative_to(ROOT) if Path(s['config']).is_relative_to(ROOT) else s['config']}` "
                f"| {s['steps']} x {s['batch']} ({s['crop']}) | {s['threads']} | {s['params']:,} | {s['wall_s']:.0f} "
                f"| {s['loss_key']} {s['loss_first']:.4f} -> {s['loss_last5_mean']:.4f} |"
            )
        lines.append("")
    lines += ["## Test crops", "", "| method | weights | PSNR (dB) | SSIM | s/image |", "|---|---|---:|---:|---:|"]
    for label, r in results.items():
        src = r["source"] if not r["source"].startswith("trained") else "trained by this command"
        lines.append(f"| {label} | {src} | {r['psnr_mean']:.2f} | {r['ssim_mean']:.4f} | {r['s_per_image']:.3f} |")
    lines += ["", "Per image, PSNR (dB):", "", "| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, r in results.items():
        lines.append(f"| {label} | " + " | ".join(f"{p:.2f}" for p in r["psnr"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    ckpts, summary = ({}, {}) if args.eval_only else train(args)
    torch.set_num_threads(args.threads)
    names, results = evaluate(args, ckpts)
    text = render(args, argv, names, results, summary)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.report, text.encode())
    save_json(args.report.with_suffix(".json"), {"argv": argv, "images": names, "training": summary, "results": results})
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
