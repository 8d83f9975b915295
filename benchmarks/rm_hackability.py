"""Reward-model edit checks, whole-SR check and hackability, on test photos, no data set.

    python benchmarks/rm_hackability.py [--photos ../shared/photos] [--sets BSD68,Set14,Set5]
        [--model NAME=PATH[:STAGE] ...] [--out docs/results/rm_hackability.md]
        [--figure docs/images/rm_hackability.png]

``--model`` may be given any number of times; PATH ``embedded`` is the shipped model
(``finpercep.load_reward()``), STAGE picks RM_k of a run folder. Default: the shipped RM_N and RM_0.
Three measurements per model, on centre crops of the test photos (:mod:`finpercep.eval.edit_checks`,
:mod:`finpercep.eval.hackability`):

1. edit checks: the fraction of photos scoring strictly above each of six edits of themselves;
2. whole-SR check: the fraction where each real SR family's whole output scores below its HR;
3. hackability: pixel-space gradient ascent on the reward from those SR outputs, with the reward
   gain against the change of PSNR-Y and ST-LPIPS to HR.

Writes the markdown tables to ``--out`` (command on top), every number to the same name ``.json`` and
the figure (reward gain vs ST-LPIPS / PSNR-Y change) to ``--figure``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from finpercep.eval.edit_checks import (
    EDIT_TARGET,
    EDITS,
    WHOLE_SR_TARGET,
    check_variants,
    edit_images,
    real_sr_outputs,
    score_batches,
    sr_scale,
)
from finpercep.eval.hackability import AscentConfig, AscentCurves, merge_curves, reward_ascent, summarise_ascent
from finpercep.io import atomic_write_bytes, list_images, load_image, save_json

DEFAULT_MODELS = ("RM_N=embedded", "RM_0=embedded:0")
EMBEDDED = "embedded"


def parse_model_spec(spec: str) -> tuple[str, str | None, int | None]:
    """``NAME=PATH[:STAGE]`` -> ``(name, path or None for 'embedded', stage or None)``."""
    name, sep, rest = spec.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise ValueError(f"--model must be NAME=PATH[:STAGE] (PATH 'embedded' = the shipped model), got {spec!r}")
    path, stage = rest, None
    head, colon, tail = rest.rpartition(":")
    if colon and tail.isdigit():
        path, stage = head, int(tail)
    return name.strip(), (None if path == EMBEDDED else path), stage


def centre_crop(img: torch.Tensor, size: int) -> torch.Tensor | None:
    """The centre ``size x size`` crop of ``img`` (3, H, W), or None when the image is smaller."""
    h, w = img.shape[-2:]
    if min(h, w) < size:
        return None
    top, left = (h - size) // 2, (w - size) // 2
    return img[:, top : top + size, left : left + size]


def load_photos(root: Path, sets: list[str], size: int) -> tuple[torch.Tensor, list[str]]:
    """Centre crops ``(N, 3, size, size)`` of every photo of ``root/<set>`` (sorted), and their names."""
    crops, names = [], []
    for s in sets:
        for path in list_images(root / s):
            c = centre_crop(load_image(path), size)
            if c is None:
                print(f"warning: {s}/{path.name} is smaller than {size} px, left out", file=sys.stderr)
                continue
            crops.append(c)
            names.append(f"{s}/{path.name}")
    if not crops:
        sys.exit(f"error: no photo of at least {size} px under {root} in {sets}")
    return torch.stack(crops), names


def machine() -> str:
    """The CPU model (from /proc/cpuinfo where there is one) and architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.machine() or "unknown"


def evenly_spaced(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them when ``k >= n``)."""
    return list(range(n)) if k >= n else [int(round(i)) for i in np.linspace(0, n - 1, k)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=Path, default=Path("../shared/photos"), help="folder holding the photo sets")
    ap.add_argument("--sets", default="BSD68,Set14,Set5", help="comma-separated subfolders used as test photos")
    ap.add_argument("--model", action="append", help="NAME=PATH[:STAGE], repeatable (default: "
                    f"{' '.join(DEFAULT_MODELS)})")
    ap.add_argument("--reward", choices=("score", "fused"), default="score",
                    help="what is checked and ascended: the score S, or the fused curriculum reward R_k")
    ap.add_argument("--crop", type=int, default=192, help="centre-crop size in px, a multiple of 4 (default 192)")
    ap.add_argument("--families", default="real", help="SR families of the whole-SR check (default: the zoo's 'real')")
    ap.add_argument("--whole-sr-photos", type=int, default=48, help="photos of the whole-SR check, evenly spaced")
    ap.add_argument("--hack-photos", type=int, default=32,
                    help="SR outputs ascended (the first of the whole-SR photos; family i %% number of families)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--step-size", type=float, default=1 / 255)
    ap.add_argument("--method", choices=("sign", "adam"), default="sign")
    ap.add_argument("--record-every", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the 95 %% intervals")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    ap.add_argument("--out", type=Path, default=Path("docs/results/rm_hackability.md"))
    ap.add_argument("--figure", type=Path, default=Path("docs/images/rm_hackability.png"))
    args = ap.parse_args(argv)
    if args.crop < 32 or args.crop % 4:
        ap.error(f"--crop must be a multiple of 4 and >= 32, got {args.crop}")
    return args


def load_scorers(specs: list[str], reward: str) -> tuple[dict, dict[str, dict]]:
    """``{name: fn(x) -> (B,)}`` and ``{name: {"path", "stage"}}`` for the ``--model`` entries."""
    from finpercep.reward.api import load_reward, resolve_checkpoint
    from finpercep.rewards.fused import FusedReward

    fns, info = {}, {}
    for spec in specs:
        try:
            name, path, stage = parse_model_spec(spec)
        except ValueError as e:
            sys.exit(f"error: {e}")
        model = load_reward(path, stage=stage)
        if name in fns:
            sys.exit(f"error: --model name {name!r} given twice")
        if reward == "fused":
            fused = FusedReward(model=model)
            fns[name] = lambda x, f=fused: f(x).score
        else:
            fns[name] = lambda x, m=model: m(x).score
        folder = resolve_checkpoint(path, stage).resolve()
        shown = folder.relative_to(Path.cwd()) if folder.is_relative_to(Path.cwd()) else folder
        info[name] = {"path": shown.as_posix(), "stage": model.stage}
    return fns, info


def ascend(fn, starts: torch.Tensor, hr: torch.Tensor, metrics: dict, cfg: AscentConfig, batch: int,
           seed: int) -> AscentCurves:
    parts = []
    for i in range(0, starts.shape[0], batch):
        g = torch.Generator().manual_seed(seed + i)
        parts.append(reward_ascent(fn, starts[i : i + batch], hr[i : i + batch], metrics, cfg, g))
    return merge_curves(parts)


def curve_means(c: AscentCurves) -> dict[str, list[float]]:
    """Per recorded step, the mean change from the start of the reward and of each metric."""
    out = {"steps": c.steps.tolist(), "reward": (c.reward - c.reward[0]).mean(1).tolist()}
    out.update({k: (v - v[0]).mean(1).tolist() for k, v in c.metrics.items()})
    return out


def save_figure(path: Path, ascent: dict[str, dict]) -> None:
    """Reward gain against the ST-LPIPS and PSNR-Y change, one colour per model (``ascent``: name ->
    summary with ``curve`` and ``per_image``, in legend order); written atomically."""
    from finpercep.viz import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (name, r), colour in zip(ascent.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        curve, ends = r["curve"], r["per_image"]
        for ax, key in zip(axes, ("stlpips", "psnr_y")):
            ax.scatter(ends[key], ends["reward"], s=10, alpha=0.3, color=colour)
            ax.plot(curve[key], curve["reward"], marker="o", color=colour, label=f"{name} (mean, every recorded step)")
    axes[0].set_xlabel("ST-LPIPS to HR, change (higher = further from HR)")
    axes[1].set_xlabel("PSNR-Y to HR, change in dB (lower = further from HR)")
    for ax in axes:
        ax.set_ylabel("reward gain")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.locator_params(axis="x", nbins=5)
    axes[0].legend(fontsize=8)
    fig.suptitle("Pixel-space gradient ascent on the reward from real SR outputs (dots: images after the last step)",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Markdown


def _pct(c: dict) -> str:
    lo, hi = c["below_ci"]
    return f"{100 * c['below']:.1f} % ({100 * lo:.0f}-{100 * hi:.0f})"


def _ci(d: dict, fmt: str = "+.3f") -> str:
    lo, hi = d["change_ci"]
    return f"{d['change']:{fmt}} ({lo:{fmt}} .. {hi:{fmt}})"


def render_markdown(rep: dict, command: str) -> str:
    """The report as markdown. Orders come from ``setup`` lists, so a report read back from its JSON
    (whose keys are sorted) renders the same."""
    s = rep["setup"]
    models = s["model_order"]
    lines = ["# Reward-model edit checks and hackability", "", f"`{command}`", "", "## Setup", ""]
    lines += [
        "- models: " + "; ".join(f"{n} = stage {rep['models'][n]['stage']} of `{rep['models'][n]['path']}`"
                                 for n in models),
        f"- reward checked and ascended: {s['reward']}",
        f"- test photos: {s['n_photos']} centre crops of {s['crop']} px from {', '.join(s['sets'])} "
        "(held out of reward-model training); ties count as failures (\"strictly below\")",
        f"- 95 % intervals: percentile bootstrap over photos, {s['n_boot']} resamples, seed {s['seed']}",
        f"- machine: {s['machine']}, {s['cpu_count']} CPUs, torch threads {s['torch_threads']}; "
        f"elapsed {s['elapsed_s']} s",
        "",
    ]
    if rep.get("edits"):
        lines += [f"## 1. Edit checks: photo scored strictly above its edit (must reach >= {100 * EDIT_TARGET:.0f} %, "
                  "goal 100 %)", "",
                  "Fraction of photos (95 % interval); mean score gap S(photo) - S(edit) below it.", "",
                  "| edit | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
        for edit in s["edits"]:
            lines.append(f"| {edit} | " + " | ".join(
                f"{_pct(rep['edits'][m][edit])}<br>gap {rep['edits'][m][edit]['gap']:+.3f}" for m in models) + " |")
        lines.append("| edits at must-reach | " + " | ".join(
            f"{sum(c['below'] >= EDIT_TARGET for c in rep['edits'][m].values())} / {len(rep['edits'][m])}"
            for m in models) + " |")
        lines.append("")
    if rep.get("whole_sr"):
        lines += [f"## 2. Whole real-SR output scored strictly below its HR (must reach >= {100 * WHOLE_SR_TARGET:.0f} "
                  "%, goal 100 %)", "",
                  f"{s['n_whole_sr']} photos (evenly spaced); LR = bicubic anti-aliased downscale, 8-bit. "
                  "Fraction (95 % interval); mean gap S(HR) - S(SR) below it.", "",
                  "| SR family (scale) | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
        for fam in s["family_order"]:
            lines.append(f"| {fam} (x{s['families'][fam]}) | " + " | ".join(
                f"{_pct(rep['whole_sr'][m][fam])}<br>gap {rep['whole_sr'][m][fam]['gap']:+.3f}" for m in models)
                + " |")
        lines.append("| families at must-reach | " + " | ".join(
            f"{sum(c['below'] >= WHOLE_SR_TARGET for c in rep['whole_sr'][m].values())} / {len(rep['whole_sr'][m])}"
            for m in models) + " |")
        lines.append("")
    if rep.get("ascent"):
        a = s["ascent"]
        lines += ["## 3. Hackability: gradient ascent on the reward in pixel space", "",
                  f"From {s['n_hack']} whole real-SR outputs (image i from family i mod {len(s['families'])}), "
                  f"{a['steps']} {a['method']} steps of {a['step_size']:.5f} (= {255 * a['step_size']:.2f}/255), "
                  "clamped to [0, 1], no fidelity term. Change after the last step, mean (95 % interval). "
                  "A reward that rises while PSNR-Y falls and ST-LPIPS grows is hackable. "
                  "\"above HR\": images whose reward exceeds their clean HR's, before / after. Rewards are in each "
                  "model's own score units; the score gaps of sections 1 and 2 give their scale.", "",
                  "| model | reward start -> end | reward gain | PSNR-Y change (dB) | ST-LPIPS change | above HR |",
                  "|---|---:|---:|---:|---:|---:|"]
        for m in models:
            r = rep["ascent"][m]
            lines.append(f"| {m} | {r['reward']['start']:.3f} -> {r['reward']['end']:.3f} | {_ci(r['reward'])} | "
                         f"{_ci(r['psnr_y'], '+.2f')} | {_ci(r['stlpips'])} | "
                         f"{100 * r['above_hr_start']:.0f} % -> {100 * r['above_hr_end']:.0f} % |")
        lines += ["", f"![reward gain against fidelity change]({s['figure_rel']})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/rm_hackability.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    t_start = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from finpercep.baselines import STLPIPS
    from finpercep.data.sr_zoo import resolve_families
    from finpercep.metrics import psnr_y

    sets = [x.strip() for x in args.sets.split(",") if x.strip()]
    photos, names = load_photos(args.photos, sets, args.crop)
    fns, info = load_scorers(args.model or list(DEFAULT_MODELS), args.reward)
    try:
        families = resolve_families(args.families, 4)
    except ValueError as e:
        sys.exit(f"error: {e}")
    seconds: dict[str, float] = {}
    rep: dict = {"models": info, "edits": {}, "whole_sr": {}, "ascent": {}}

    t0 = time.perf_counter()
    edits = edit_images(photos)
    for name, fn in fns.items():
        print(f"edit checks: {name} on {len(names)} photos", file=sys.stderr)
        res = check_variants(fn, photos, edits, batch_size=args.batch_size,
                             generator=torch.Generator().manual_seed(args.seed), n_boot=args.n_boot)
        rep["edits"][name] = {k: v.to_json() for k, v in res.items()}
    seconds["edits"] = time.perf_counter() - t0

    pick = evenly_spaced(len(names), args.whole_sr_photos)
    hr = photos[pick]
    if args.whole_sr_photos > 0:
        t0 = time.perf_counter()
        total = len(families) * len(pick)
        done = [0]

        def progress(fam: str, i: int) -> None:
            done[0] += 1
            print(f"\r  SR outputs {done[0]}/{total} ({fam})", end="" if done[0] < total else "\n",
                  file=sys.stderr, flush=True)

        srs = real_sr_outputs(hr, families, np.random.default_rng(args.seed), on_image=progress)
        seconds["sr_outputs"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for name, fn in fns.items():
            res = check_variants(fn, hr, srs, batch_size=args.batch_size,
                                 generator=torch.Generator().manual_seed(args.seed), n_boot=args.n_boot)
            rep["whole_sr"][name] = {k: v.to_json() for k, v in res.items()}
        seconds["whole_sr"] = time.perf_counter() - t0

        n_hack = min(args.hack_photos, len(pick))
        if n_hack > 0:
            fam_names = list(srs)
            starts = torch.stack([srs[fam_names[i % len(fam_names)]][i] for i in range(n_hack)])
            metrics = {"psnr_y": psnr_y, "stlpips": STLPIPS()}
            cfg = AscentConfig(steps=args.steps, step_size=args.step_size, method=args.method,
                               record_every=args.record_every)
            for name, fn in fns.items():
                t0 = time.perf_counter()
                print(f"ascent: {name}, {n_hack} images x {cfg.steps} steps", file=sys.stderr)
                curves = ascend(fn, starts, hr[:n_hack], metrics, cfg, args.batch_size, args.seed)
                s_hr = score_batches(fn, hr[:n_hack], args.batch_size)
                summary = summarise_ascent(curves, s_hr, torch.Generator().manual_seed(args.seed), args.n_boot)
                summary["curve"] = curve_means(curves)
                summary["per_image"] = {k: (v[-1] - v[0]).tolist()
                                        for k, v in {"reward": curves.reward, **curves.metrics}.items()}
                rep["ascent"][name] = summary
                seconds[f"ascent {name}"] = time.perf_counter() - t0
    else:
        n_hack = 0

    rep["setup"] = {
        "command": command, "sets": sets, "photos": names, "n_photos": len(names), "crop": args.crop,
        "reward": "score S" if args.reward == "score" else "fused R_k = S_k + (1 - softmax_max(M_k))",
        "model_order": list(fns), "edits": list(EDITS), "families": {f.name: sr_scale(f) for f in families},
        "family_order": [f.name for f in families],
        "n_whole_sr": len(pick) if args.whole_sr_photos > 0 else 0, "whole_sr_photos": [names[i] for i in pick],
        "n_hack": n_hack, "ascent": {"steps": args.steps, "step_size": args.step_size, "method": args.method,
                                     "record_every": args.record_every},
        "seed": args.seed, "n_boot": args.n_boot, "machine": machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "figure_rel": os.path.relpath(args.figure, args.out.parent),
        "seconds": {k: round(v, 1) for k, v in seconds.items()}, "elapsed_s": round(time.perf_counter() - t_start, 1),
    }
    if rep["ascent"]:
        save_figure(args.figure, {m: rep["ascent"][m] for m in fns})
    md = render_markdown(rep, command)
    atomic_write_bytes(args.out, (md + "\n").encode())
    save_json(args.out.with_suffix(".json"), rep)
    print(md)
    print(f"wrote {args.out}, {args.out.with_suffix('.json')}" + (f" and {args.figure}" if rep["ascent"] else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
