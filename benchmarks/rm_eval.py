"""Reward-model evaluation: map quality, ordering, local sensitivity, speed.

    python benchmarks/rm_eval.py --test-data runs/fgr-test --run runs/rm-embedded \
        [--pixel-only-run RUN2] [--out docs/results/rm_eval.md] [--held-out realsr,seams] [--max-samples N]

Evaluates every stage RM_0 .. RM_N of a training run (and the last stage of the pixel-only run)
against NIQE, BRISQUE and PIQE on a test data set built from photos never used in training, and
writes the tables to ``--out`` (markdown, command line on top) and every raw number next to it
(same name, ``.json``). The measurements are in :mod:`finpercep.eval.rm_benchmark`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from finpercep.eval.rm_benchmark import (
    CLASSIC_METRICS,
    DEFAULT_HELD_OUT,
    BenchConfig,
    build_report,
    classic_scorer,
    evaluate,
    measure_speed,
    render_markdown,
    rm_scorer,
)
from finpercep.io import atomic_write_bytes, save_json
from finpercep.reward.api import list_stages, load_reward


def run_excluded_families(run: Path) -> list[str] | None:
    """``exclude_families`` of a training run (``train_config.json``), or None if not recorded."""
    path = run / "train_config.json"
    try:
        fams = json.loads(path.read_text())["config"]["exclude_families"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [str(f) for f in fams]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--test-data", required=True, type=Path, help="FGR data set built from the test photos")
    ap.add_argument("--run", required=True, type=Path, help="training run folder with stage_0 .. stage_N")
    ap.add_argument("--pixel-only-run", type=Path, help="run trained on pixel-only maps (its last stage is evaluated)")
    ap.add_argument("--out", type=Path, default=Path("docs/results/rm_eval.md"), help="markdown file; JSON next to it")
    ap.add_argument("--held-out", help="comma-separated SR families never trained on (default: the run's "
                    f"exclude_families, else {','.join(DEFAULT_HELD_OUT)})")
    ap.add_argument("--max-samples", type=int, default=256, help="test triplets used, evenly spaced (default 256)")
    ap.add_argument("--max-crops", type=int, default=128, help="HR crops in the local-sensitivity test (default 128)")
    ap.add_argument("--pixels-per-image", type=int, default=16384, help="pixels per sample in AUROC/AP (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--speed-size", type=int, default=512)
    ap.add_argument("--speed-runs", type=int, default=20)
    ap.add_argument("--speed-warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch threads for everything (default: torch's default)")
    ap.add_argument("--no-speed", action="store_true", help="skip the speed / memory measurement")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/rm_eval.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    t_start = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    stages = list_stages(args.run)
    if not stages:
        sys.exit(f"error: no complete stage_K checkpoint in {args.run}")
    excluded = run_excluded_families(args.run)
    if args.held_out:
        held_out = tuple(f.strip() for f in args.held_out.split(",") if f.strip())
        if excluded is not None and set(held_out) - set(excluded):
            print(f"warning: --held-out {sorted(set(held_out) - set(excluded))} were NOT excluded from training "
                  f"of {args.run} (it excluded {excluded}); they are not truly held out", file=sys.stderr)
    else:
        held_out = tuple(excluded) if excluded else DEFAULT_HELD_OUT
    cfg = BenchConfig(held_out=held_out, max_samples=args.max_samples, max_crops=args.max_crops,
                      pixels_per_image=args.pixels_per_image, seed=args.seed)

    scorers = {f"RM_{k}": rm_scorer(load_reward(args.run, stage=k)) for k in stages}
    final = f"RM_{max(stages)}"
    if args.pixel_only_run is not None:
        p_stages = list_stages(args.pixel_only_run)
        if not p_stages:
            sys.exit(f"error: no complete stage_K checkpoint in {args.pixel_only_run}")
        k = max(p_stages)
        scorers[f"pixel-only RM_{k}"] = rm_scorer(load_reward(args.pixel_only_run, stage=k))
    for key, label in CLASSIC_METRICS.items():
        scorers[label] = classic_scorer(key)
    global_baselines = (["RM_0"] if 0 in stages else []) + list(CLASSIC_METRICS.values())

    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        el = time.perf_counter() - t0
        print(f"\r  crops {done}/{total}  {el:.0f} s elapsed, ~{el / done * (total - done):.0f} s left",
              end="" if done < total else "\n", file=sys.stderr, flush=True)

    print(f"scorers: {', '.join(scorers)}; held out: {', '.join(held_out)}", file=sys.stderr)
    data = evaluate(args.test_data, scorers, cfg, on_unit=progress)
    speed = None
    if not args.no_speed:
        print(f"speed: {args.speed_size}x{args.speed_size}, {args.speed_runs} runs ...", file=sys.stderr)
        t1 = time.perf_counter()
        speed = measure_speed(stages[max(stages)], size=args.speed_size, runs=args.speed_runs,
                              warmup=args.speed_warmup, threads=args.threads)
        data.seconds["speed"] = time.perf_counter() - t1

    from finpercep.data.dataset import read_manifest

    counts: dict[str, int] = {}
    for t in data.triplets:
        counts[t["family"]] = counts.get(t["family"], 0) + 1
    setup = {
        "test_data": str(args.test_data), "n_available": len(read_manifest(args.test_data)),
        "run": str(args.run), "stages": sorted(stages), "pixel_only_run": str(args.pixel_only_run) if args.pixel_only_run else None,
        "train_excluded": excluded, "torch_threads": torch.get_num_threads(),
        "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(), "family_counts": dict(sorted(counts.items())),
        "elapsed_s": round(time.perf_counter() - t_start, 1), "command": command,
    }
    report = build_report(data, cfg, final=final, global_baselines=global_baselines, speed=speed, setup=setup)
    md = render_markdown(report, command)
    atomic_write_bytes(args.out, (md + "\n").encode())
    save_json(args.out.with_suffix(".json"), report)
    print(md)
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
