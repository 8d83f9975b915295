"""Calibration of the ground-truth map recipe: the tables in the `finpercep.data.gt_maps` docstring.

    python benchmarks/gt_map_calibration.py [--out docs/results/gt_map_calibration.md]

Centre 256x256 crops of scikit-image's astronaut, chelsea and coffee. Table 1: raw distances
(D_pixel, D_feat per stage) with the artifact applied to the whole crop. Table 2: the mean of the
final map inside a 96x96 square region swap, default recipe and pixel-only, for faint / medium /
strong artifacts, plus the mean in the 16-px ring just outside the square and the maximum beyond
`reach_px`. Ranges are min - max over the three crops.
"""

from __future__ import annotations

import argparse
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import skimage.data as sd
import torch
from PIL import Image, ImageFilter

from finpercep.data.gt_maps import GTMapConfig, GTMapper, cosine_distance, pixel_distance

IMAGES = ("astronaut", "chelsea", "coffee")


def crop(name: str) -> Image.Image:
    a = getattr(sd, name)()
    h, w = a.shape[:2]
    y, x = (h - 256) // 2, (w - 256) // 2
    return Image.fromarray(a[y : y + 256, x : x + 256])


def noise(im: Image.Image, sigma: float, seed: int = 0) -> Image.Image:
    a = np.asarray(im, dtype=np.float64) / 255 + np.random.default_rng(seed).normal(0, sigma, (256, 256, 3))
    return Image.fromarray((np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8))


def blur(im: Image.Image, r: float) -> Image.Image:
    return im.filter(ImageFilter.GaussianBlur(r))


def jpeg(im: Image.Image, q: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


ARTIFACTS = {
    "Gaussian noise 0.01": lambda im: noise(im, 0.01),
    "Gaussian noise 0.03": lambda im: noise(im, 0.03),
    "Gaussian noise 0.10": lambda im: noise(im, 0.10),
    "Gaussian blur 0.7": lambda im: blur(im, 0.7),
    "Gaussian blur 1.5": lambda im: blur(im, 1.5),
    "Gaussian blur 3.0": lambda im: blur(im, 3.0),
    "JPEG q90": lambda im: jpeg(im, 90),
    "JPEG q50": lambda im: jpeg(im, 50),
    "JPEG q10": lambda im: jpeg(im, 10),
}
LEVELS = {
    "faint": ("Gaussian noise 0.01", "Gaussian blur 0.7", "JPEG q90"),
    "medium": ("Gaussian noise 0.03", "Gaussian blur 1.5", "JPEG q50"),
    "strong": ("Gaussian noise 0.10", "Gaussian blur 3.0", "JPEG q10"),
}


def t(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def rng_fmt(v: list[float]) -> str:
    lo, hi = min(v), max(v)
    return f"{lo:.3f}" if abs(hi - lo) < 5e-4 else f"{lo:.3f} - {hi:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/results/gt_map_calibration.md")
    args = ap.parse_args()
    cfg = GTMapConfig()
    mapper = GTMapper(cfg)
    pix = GTMapper(replace(cfg, pixel_only=True))
    net = mapper.net
    lines = ["# Ground-truth map calibration", "", "`python benchmarks/gt_map_calibration.py`", "",
             "Raw distances, artifact over the whole 256x256 crop (mean over the crop; min - max over "
             f"{', '.join(IMAGES)}):", "",
             "| artifact | D_pixel | " + " | ".join(f"D_feat stage {s}" for s in cfg.layers) + " |",
             "|---|---:|" + "---:|" * len(cfg.layers)]
    with torch.no_grad():
        for name, fn in ARTIFACTS.items():
            dp, df = [], {s: [] for s in cfg.layers}
            for img in IMAGES:
                ref = crop(img)
                a, b = t(ref), t(fn(ref))
                dp.append(float(pixel_distance(a, b).mean()))
                fa = net.features(a, last_stage=max(cfg.layers))
                fb = net.features(b, last_stage=max(cfg.layers))
                for s in cfg.layers:
                    df[s].append(float(cosine_distance(fa[s], fb[s]).mean()))
            lines.append(f"| {name} | {rng_fmt(dp)} | " + " | ".join(rng_fmt(df[s]) for s in cfg.layers) + " |")
        lines += ["", f"Map with the default recipe (alpha {cfg.alpha}, tau {cfg.tau}, gamma {cfg.gamma}) and "
                  f"pixel-only (tau {cfg.pixel_only_tau}) for a 96x96 square swap at (80, 80); "
                  f"ring = 16 px outside the square; beyond = farther than reach_px = {mapper.reach_px} px:", "",
                  "| level | artifacts | default map inside | pixel-only inside | default ring | default max beyond reach |",
                  "|---|---|---:|---:|---:|---:|"]
        m = torch.zeros(1, 1, 256, 256)
        m[..., 80:176, 80:176] = 1
        ring = torch.zeros_like(m)
        ring[..., 64:192, 64:192] = 1
        ring -= m
        far = torch.ones_like(m)
        r = mapper.reach_px
        far[..., 80 - r : 176 + r, 80 - r : 176 + r] = 0
        for level, names in LEVELS.items():
            ins, pins, rings, beyond = [], [], [], []
            for img in IMAGES:
                ref = crop(img)
                a = t(ref)
                for n in names:
                    syn = m * t(ARTIFACTS[n](ref)) + (1 - m) * a
                    mp, pp = mapper(a, syn), pix(a, syn)
                    ins.append(float((mp * m).sum() / m.sum()))
                    pins.append(float((pp * m).sum() / m.sum()))
                    rings.append(float((mp * ring).sum() / ring.sum()))
                    beyond.append(float((mp * far).max()))
            lines.append(f"| {level} | {' / '.join(names)} | {rng_fmt(ins)} | {rng_fmt(pins)} | {rng_fmt(rings)} | "
                         f"{max(beyond):.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
