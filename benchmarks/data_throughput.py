"""Data-engine throughput per SR family: samples/second of `finpercep data build` on this machine.

    python benchmarks/data_throughput.py --images runs/demo/photos/train --out docs/results/data_throughput.md

For each family it builds a fresh data set (default crop 256, x4, 4 masks per SR output) with the
given number of workers and reports samples/s, the time per unit (one SR inference + its samples),
and the share of the time spent on the ground-truth maps and masks. Numbers depend on the machine:
the table records cores and threads. Start-up (process spawn, model load) is excluded by building
a warm-up unit first in the same folder and timing only the rest.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from finpercep.data.builder import BuildConfig, build_dataset
from finpercep.data.sr_zoo import sr_families


def bench_family(name: str, images: Path, root: Path, num: int, workers: int, crop: int, scale: int) -> dict:
    out = root / name
    per = 4
    warm = BuildConfig(num=per * workers, crop=crop, scale=scale, families=(name,), masks_per_sr=per)
    build_dataset(images, out, warm, workers=workers, progress=False)  # warm-up: caches, first loads
    cfg = BuildConfig(num=per * workers + num, crop=crop, scale=scale, families=(name,), masks_per_sr=per)
    t0 = time.perf_counter()
    rep = build_dataset(images, out, cfg, workers=workers, progress=False)
    dt = time.perf_counter() - t0
    assert rep.complete and rep.built_now == num, rep
    shutil.rmtree(out)
    return {"family": name, "samples": num, "seconds": dt, "samples_per_s": num / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", required=True, help="photo folder (e.g. runs/demo/photos/train)")
    ap.add_argument("--out", default="docs/results/data_throughput.md", help="markdown table to write")
    ap.add_argument("--num", type=int, default=16, help="timed samples per family (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default: %(default)s)")
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--families", default="", help="comma-separated subset (default: all)")
    args = ap.parse_args()

    names = [n for n in args.families.split(",") if n] or list(sr_families())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            r = bench_family(name, Path(args.images), Path(tmp), args.num, args.workers, args.crop, args.scale)
            print(f"{name:<14} {r['samples_per_s']:.2f} samples/s ({r['samples']} in {r['seconds']:.1f} s)", flush=True)
            rows.append(r)
    kind = {n: f.kind for n, f in sr_families().items()}
    lines = [
        "# Data-engine throughput",
        "",
        f"`python benchmarks/data_throughput.py --images {args.images} --num {args.num} --workers {args.workers}`",
        "",
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch "
        f"{torch.__version__}, {args.workers} worker processes with 1 thread each; crop {args.crop}, x{args.scale}, "
        f"4 masks per SR output; {args.num} timed samples per family after a warm-up unit per worker.",
        "",
        "| family | kind | samples/s | s/sample | 30k samples (hours) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        sps = r["samples_per_s"]
        lines.append(f"| {r['family']} | {kind.get(r['family'], '?')} | {sps:.2f} | {1 / sps:.2f} | {30000 / sps / 3600:.1f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
