"""The README picture: test images with the reward model's map next to the ground truth.

    python benchmarks/overlay_figure.py --test-data runs/fgr-test --out docs/images/rm_overlay.jpg

Columns: HR | syn (an SR region swapped in, mask outlined) | FinPercep-RM map over syn | ground-truth
map over syn. Each row's label gives the SR family and the scores of HR and syn (higher = better).
The samples are the first of each listed family in the test set (photos never used in training).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from finpercep.data.dataset import FGRDataset
from finpercep.io import to_uint8
from finpercep.reward.api import load_reward
from finpercep.viz import heatmap_overlay


def outline(img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Draw the mask boundary in cyan on ``img`` (3, H, W)."""
    m = mask[0] > 0.5
    edge = m & ~(torch.nn.functional.max_pool2d((~m).float()[None, None], 3, 1, 1)[0, 0] == 0)
    out = img.clone()
    out[:, edge] = torch.tensor([0.0, 1.0, 1.0])[:, None]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--test-data", required=True)
    ap.add_argument("--checkpoint", default=None, help="default: the shipped model")
    ap.add_argument("--families", default="realesrgan,realsr,waifu2x,texture,seams")
    ap.add_argument("--out", default="docs/images/rm_overlay.jpg")
    ap.add_argument("--tile", type=int, default=200)
    args = ap.parse_args()

    model = load_reward(args.checkpoint)
    ds = FGRDataset(args.test_data, keys=("hr", "syn", "mask", "map_syn"))
    wanted = [f for f in args.families.split(",") if f]
    picks = []
    for fam in wanted:
        idx = next((i for i, r in enumerate(ds.records) if r["sr_family"] == fam and r["mask_area"] >= 0.05), None)
        if idx is not None:
            picks.append(idx)
    t, pad, label_h = args.tile, 6, 22
    cols = ("HR", "syn (mask outlined)", "FinPercep-RM map", "ground-truth map")
    sheet = Image.new("RGB", (4 * t + 5 * pad, 24 + len(picks) * (t + label_h + pad) + pad), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=13)
    for c, name in enumerate(cols):
        draw.text((pad + c * (t + pad) + 4, 5), name, fill=(230, 230, 230), font=font)
    for row, i in enumerate(picks):
        item = ds[i]
        with torch.no_grad():
            out = model(torch.stack([item["hr"], item["syn"]]))
        s_hr, s_syn = (float(v) for v in out.score)
        tiles = [item["hr"], outline(item["syn"], item["mask"]),
                 heatmap_overlay(item["syn"], out.map[1, 0]), heatmap_overlay(item["syn"], item["map_syn"][0])]
        y = 24 + row * (t + label_h + pad)
        r = item["meta"]
        draw.text((pad + 2, y + 4), f"{r['sr_family']} | mask {r['mask_area'] * 100:.0f}% | "
                  f"score HR {s_hr:.2f}, syn {s_syn:.2f}", fill=(230, 230, 230), font=font)
        for c, img in enumerate(tiles):
            tile = Image.fromarray(to_uint8(img)).resize((t, t), Image.LANCZOS)
            sheet.paste(tile, (pad + c * (t + pad), y + label_h))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, quality=88)
    print(f"wrote {args.out} ({len(picks)} rows)")


if __name__ == "__main__":
    main()
