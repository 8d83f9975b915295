"""Validation of the independent local-damage judge on the data engine's region swaps.

    python benchmarks/damage_validation.py --data runs/fgr-v2-test [--num N] \
        [--out docs/results/hacking/damage_validation.md]

Each test triplet has HR, ``syn`` (HR with one region replaced by an SR model's output, or by a
negative edit) and the swap mask. The damage map of ``syn`` with HR as its reference
(:func:`finpercep.eval.damage.local_damage_map`, i.e. ``1 - SSIM_loc(syn, HR)``) should light up
inside the mask and stay at 0 outside. Reported per SR family, pooled over all pixels: pixel AUROC
against the mask, and at :data:`~finpercep.eval.damage.DAMAGE_THRESHOLD` the share of mask pixels
found (recall) and of pixels outside the mask flagged (false-positive rate); the data set's own
ground-truth map ``map_syn`` (pixel + feature differences) as the comparison row. The numbers go
to ``--out`` (command on top) and the same name ``.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from finpercep.data.dataset import FGRDataset
from finpercep.eval.damage import DAMAGE_THRESHOLD, local_damage_map
from finpercep.metrics import pixel_auroc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="FGR data set with hr, syn, mask, map_syn (finpercep data build)")
    ap.add_argument("--num", type=int, default=None, help="first N samples (default: all)")
    ap.add_argument("--out", default="docs/results/hacking/damage_validation.md", help="markdown output")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = FGRDataset(args.data, keys=("hr", "syn", "mask", "map_syn"))
    n = len(ds) if args.num is None else min(args.num, len(ds))
    pooled: dict[str, dict[str, list[np.ndarray]]] = {}
    for i in tqdm(range(n), desc="damage maps", unit="sample"):
        item = ds[i]
        hr, syn = item["hr"][None], item["syn"][None]
        d = local_damage_map(syn, hr, hr)[0, 0].numpy().ravel()
        mask = (item["mask"][0].numpy().ravel() > 0.5)
        gt = item["map_syn"][0].numpy().ravel()
        for fam in (item["meta"].get("sr_family", "?"), "all"):
            g = pooled.setdefault(fam, {"damage": [], "gt": [], "mask": []})
            g["damage"].append(d)
            g["gt"].append(gt)
            g["mask"].append(mask)
    rows = {}
    for fam, g in sorted(pooled.items(), key=lambda kv: (kv[0] == "all", kv[0])):
        d, gt, m = (np.concatenate(g[k]) for k in ("damage", "gt", "mask"))
        if m.all() or not m.any():
            continue
        hit = d > DAMAGE_THRESHOLD
        rows[fam] = {"samples": len(g["mask"]), "auroc": pixel_auroc(d, m), "recall": float(hit[m].mean()),
                     "false_positive_rate": float(hit[~m].mean()), "map_syn_auroc": pixel_auroc(gt, m)}
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = [f"`{command}`", "",
             f"Damage map of the swapped image against HR (its reference) vs the swap mask, {n} test triplets "
             f"of `{args.data}` (photo sources never used in training), pixels pooled per SR family. Recall and false-positive "
             f"rate at the damage threshold {DAMAGE_THRESHOLD}. `M_gt AUROC`: the data set's own ground-truth map "
             "(pixel + feature differences) against the same mask.", "",
             "| family | samples | damage AUROC | recall | false-positive rate | M_gt AUROC |", "|---|---:|---:|---:|---:|---:|"]
    for fam, r in rows.items():
        lines.append(f"| {fam} | {r['samples']} | {r['auroc']:.3f} | {r['recall']:.3f} | {r['false_positive_rate']:.3f} | "
                     f"{r['map_syn_auroc']:.3f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": command, "threshold": DAMAGE_THRESHOLD, "rows": rows}, indent=1))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
