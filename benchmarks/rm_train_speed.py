"""Speed of one FinPercep-RM training step on this machine: images/s and achieved GFLOP/s against
the machine's fp32 matmul peak, eager vs channels-last vs torch.compile.

    OMP_NUM_THREADS=2 python benchmarks/rm_train_speed.py --threads 2 --out docs/results/rm_train_speed.md

The step is :func:`finpercep.reward.train.rm_train_step` as the trainer runs it: the model of
``--config`` (default ``configs/rm_v2.yaml``) at its last stage (all decoder levels, the
full-resolution branch), encoder trainable, ``--batch`` triplets of ``--crop``-px images (HR, syn and
SR in one forward pass, so 3 x batch images), RM_0's forward pass for the alignment target, the
backward pass, gradient clipping and the AdamW step. Images are random: the cost of a convolution
does not depend on the pixels. FLOPs are those of one step counted by
``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matmuls, forward and backward;
element-wise ops are not counted), with a group-aware formula for the convolution backward: the
library's own formula counts the weight gradient of a grouped convolution as if it were dense, C
times too much for a depthwise convolution of C channels (measured: 65x the forward FLOPs for a
64-channel depthwise 3x3 instead of 2x), and EfficientNet-Lite0 is mostly depthwise convolutions;
the report gives both counts. The peak is the best of a few ``torch.mm`` of two 2048 x 2048
float32 matrices in the same process, with the same threads. Each setting is timed on ``--steps``
steps after one warm-up step (for torch.compile the warm-up includes the compilation, reported
separately), the timed steps of the settings interleaved; the median and the fastest step time
are reported (on a shared machine the fastest is the least disturbed). Numerical equivalence: the loss and gradient norm
of each setting's first step against eager, from the same weights and batch.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from finpercep.config import load_config
from finpercep.reward.model import FinPercepRM
from finpercep.reward.train import RMTrainConfig, build_optimizer, rm_train_step
from finpercep.types import Triplet

NOTES = (
    "Reading the numbers: on a shared 2-core machine the other jobs' threads preempt ours, and a step's time "
    "varies by several times from one step to the next (compare the median and fastest columns); compare settings "
    "within one run only (their steps are interleaved), and re-measure on the machine of the long run. "
    "Depthwise convolutions (most of EfficientNet-Lite0) do few FLOPs per byte moved: the matmul peak is a bound "
    "they do not approach. torch.compile (inductor) is not in the default settings: in a probe on this CPU, "
    "compiling a tiny v2 model's forward and backward took minutes; `--settings eager,compile` measures it."
)
"""A paragraph of the report that holds no measured number."""


def make_batch(batch: int, crop: int, seed: int = 0) -> Triplet:
    g = torch.Generator().manual_seed(seed)
    hr, sr = torch.rand(batch, 3, crop, crop, generator=g), torch.rand(batch, 3, crop, crop, generator=g)
    mask = torch.zeros(batch, 1, crop, crop)
    mask[..., crop // 4 : crop // 2, crop // 4 : crop // 2] = 1
    return Triplet(hr=hr, syn=mask * sr + (1 - mask) * hr, sr=sr, map_syn=mask.clone(), mask=mask)


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """Best fp32 GFLOP/s of ``torch.mm`` on two ``n x n`` matrices (2 n^3 FLOPs each)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten.convolution_backward``: the input gradient and the weight gradient each cost
    what the forward convolution costs (``conv_flop_count`` is group-aware for the forward)."""
    from torch.utils.flop_counter import conv_flop_count

    fwd = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return fwd * (int(output_mask[0]) + int(output_mask[1]))


def count_flops(model: FinPercepRM, base: FinPercepRM, cfg: RMTrainConfig, batch: Triplet,
                group_aware: bool = True) -> int:
    """FLOPs of one training step; ``group_aware=False``: the library's convolution-backward formula."""
    from torch.utils.flop_counter import FlopCounterMode

    m, b = copy.deepcopy(model), copy.deepcopy(base)
    opt = build_optimizer(m, cfg, cfg.last_stage)
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flop} if group_aware else None
    with FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        rm_train_step(m, batch, cfg.loss, opt, base=b, max_grad_norm=cfg.max_grad_norm)
    return int(fc.get_total_flops())


class Setting:
    """One way of running the step (``eager``, ``channels_last``, ``compile``, ``compile+channels_last``)
    on its own copy of the model, base and optimiser; ``step()`` returns its wall time in seconds."""

    def __init__(self, name: str, model: FinPercepRM, base: FinPercepRM, cfg: RMTrainConfig, batch: Triplet) -> None:
        self.name, self.cfg, self.batch = name, cfg, batch
        self.cl = "channels_last" in name
        fmt = torch.channels_last if self.cl else torch.contiguous_format
        self.model = copy.deepcopy(model).train().to(memory_format=fmt)
        self.base = copy.deepcopy(base).to(memory_format=fmt)
        self.opt = build_optimizer(self.model, cfg, cfg.last_stage)
        # A compiled forward goes through rm_train_step's ``ddp`` slot (the callable used for the forward).
        self.fwd = torch.compile(self.model) if name.startswith("compile") else None
        self.times: list[float] = []

    def step(self) -> tuple[float, dict[str, float]]:
        t0 = time.perf_counter()
        logs = rm_train_step(self.model, self.batch, self.cfg.loss, self.opt, base=self.base,
                             max_grad_norm=self.cfg.max_grad_norm, ddp=self.fwd, channels_last=self.cl)
        return time.perf_counter() - t0, logs


def time_settings(names: list[str], model: FinPercepRM, base: FinPercepRM, cfg: RMTrainConfig, batch: Triplet,
                  steps: int) -> list[dict]:
    """Min and median step time of each setting. The timed steps are interleaved (one step of each
    setting in turn), so load from other jobs on a shared machine hits all settings alike."""
    settings, rows = [], []
    for name in names:
        try:
            s = Setting(name, model, base, cfg, batch)
            warm, first = s.step()  # the first step (for torch.compile: with the compilation)
        except Exception as e:  # torch.compile may be unavailable (no C++ compiler) or fail on CPU
            print(f"{name}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})", flush=True)
            rows.append({"name": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
            continue
        settings.append(s)
        rows.append({"name": name, "warm_s": warm, "loss": first["loss/total"], "grad_norm": first["grad_norm"]})
    for _ in range(steps):
        for s in settings:
            s.times.append(s.step()[0])
    for r in rows:
        s = next((s for s in settings if s.name == r["name"]), None)
        if s is not None:
            r.update(step_s=statistics.median(s.times), min_s=min(s.times))
            print(f"{s.name}: median {r['step_s']:.2f} s/step, min {r['min_s']:.2f} (first step {r['warm_s']:.1f} s)",
                  flush=True)
    return rows


def print_breakdown(cfg: RMTrainConfig, crop: int) -> None:
    """Forward FLOPs of one ``crop x crop`` image through the last stage, per part of the model
    (each part run on its own under FlopCounterMode, in the order of ``FinPercepRM.forward``)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = FinPercepRM(replace(cfg.model, decoder_stage=cfg.last_stage), load_backbone_weights=False)
    x = torch.rand(1, 3, crop, crop)  # a multiple of the stride: no padding

    def flops(fn):
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            out = fn()
        return out, fc.get_total_flops()

    feats, f_enc = flops(lambda: model.encode(x))
    d, f_dec = flops(lambda: model.decoder.features(feats))
    _, f_head = flops(lambda: model.decoder.head(d))
    _, f_full = flops(lambda: model.decoder.fullres(x, d) if model.decoder.fullres is not None else None)
    parts = {"encoder (backbone stages up to f_N)": f_enc, "decoder levels + map head": f_dec + f_head,
             "full-resolution branch": f_full}
    total = sum(parts.values())
    print(f"forward GFLOP per {crop} x {crop} image, RM_{cfg.last_stage} of levels {list(cfg.model.levels)}: "
          f"{total / 1e9:.3f} (score MLP not counted: < 0.001)")
    for name, f in parts.items():
        print(f"  {name:<40} {f / 1e9:.3f} ({100 * f / total:.0f} %)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/rm_v2.yaml")
    ap.add_argument("--out", default="docs/results/rm_train_speed.md")
    ap.add_argument("--batch", type=int, default=8, help="triplets per step (default: %(default)s)")
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per setting (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--settings", default="eager,channels_last",
                    help="comma-separated, of eager, channels_last, compile, compile+channels_last "
                    "(default: %(default)s)")
    ap.add_argument("--breakdown", action="store_true",
                    help="only print the forward GFLOP of one --crop image per part of the model (no timing)")
    args = ap.parse_args()
    if args.breakdown:
        print_breakdown(load_config(RMTrainConfig, args.config), args.crop)
        return

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    cfg = load_config(RMTrainConfig, args.config)
    cfg = replace(cfg, grown_backbone_lr=cfg.grown_backbone_lr or cfg.backbone_lr or 1e-4)  # encoder trained
    torch.manual_seed(0)
    base = FinPercepRM(replace(cfg.model, decoder_stage=0))
    model = base.with_stage(cfg.last_stage).train()
    base.requires_grad_(False)
    batch = make_batch(args.batch, args.crop)
    peak = matmul_peak()
    flops = count_flops(model, base, cfg, batch)
    flops_lib = count_flops(model, base, cfg, batch, group_aware=False)
    print(f"matmul peak {peak:.1f} GFLOP/s; {flops / 1e9:.1f} GFLOP per step ({flops_lib / 1e9:.1f} by the library's "
          "formula)", flush=True)
    rows = time_settings([s for s in args.settings.split(",") if s], model, base, cfg, batch, args.steps)
    peak_after = matmul_peak()
    load_after = os.getloadavg()
    write_report(Path(args.out), args, cfg, rows, (flops, flops_lib), (peak, peak_after), load_before, load_after)


def write_report(out: Path, args: argparse.Namespace, cfg: RMTrainConfig, rows: list[dict], counts: tuple[int, int],
                 peaks: tuple[float, float], load_before: tuple, load_after: tuple) -> None:
    flops, flops_lib = counts
    peak = max(peaks)  # the best of the two measurements: the other jobs on the machine only slow it down
    ref = next((r for r in rows if r["name"] == "eager" and "error" not in r), None)
    n_img = 3 * args.batch
    lines = [
        "# FinPercep-RM training-step speed",
        "",
        f"`OMP_NUM_THREADS={args.threads} python benchmarks/rm_train_speed.py --threads {args.threads} "
        f"--config {args.config} --batch {args.batch} --crop {args.crop} --steps {args.steps}`",
        "",
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, "
        f"{args.threads} threads. **Shared machine:** other jobs ran on the same cores during the measurement "
        f"(1/5/15-min load average {load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f} before, "
        f"{load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f} after), so the times are upper bounds.",
        "",
        f"Step: the model of `{args.config}` at its last stage (RM_{cfg.last_stage}: levels {list(cfg.model.levels)}, "
        f"decoder {cfg.model.decoder_channels} ch, full-resolution branch {cfg.model.fullres_channels} ch), encoder "
        f"trainable; {args.batch} triplets of {args.crop} x {args.crop} px = {n_img} images per forward pass, RM_0's "
        "forward pass on the HR images (alignment target), backward, clip, AdamW. Random pixels.",
        "",
        f"FLOPs per step (FlopCounterMode: convolutions and matmuls, forward + backward, with a group-aware "
        f"convolution-backward formula, see the script's docstring): **{flops / 1e9:.1f} GFLOP** "
        f"({flops / 1e9 / n_img:.2f} GFLOP per trained image; the library's own formula says {flops_lib / 1e9:.1f}). "
        f"fp32 matmul peak (`torch.mm`, 2048 x 2048, {args.threads} threads, best of 10): {peaks[0]:.1f} GFLOP/s "
        f"before the timings, {peaks[1]:.1f} after; the percentages use the higher, **{peak:.1f} GFLOP/s**.",
        "",
        "Images / s, GFLOP/s and % of peak are from the fastest step (the least disturbed by the other jobs).",
        "",
        "| setting | s / step (median) | s / step (fastest) | images / s | GFLOP/s achieved | % of matmul peak | "
        "first step (s) | loss, grad norm vs eager (rel. diff) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} | | | | | | |")
            continue
        gf = flops / r["min_s"] / 1e9
        if ref is None:
            diff = "n/a"
        else:
            diff = (f"{abs(r['loss'] - ref['loss']) / abs(ref['loss']):.1e}, "
                    f"{abs(r['grad_norm'] - ref['grad_norm']) / abs(ref['grad_norm']):.1e}")
        lines.append(f"| {r['name']} | {r['step_s']:.2f} | {r['min_s']:.2f} | {n_img / r['min_s']:.2f} | {gf:.1f} | "
                     f"{100 * gf / peak:.0f} % | {r['warm_s']:.1f} | {diff} |")
    lines += ["", NOTES, ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
