"""Contact sheet of an FGR data set: one row per sample, HR | SR | syn (mask outlined) | map overlay.

The sheet is how a person checks the data engine: the artifact inside the
mask must be visible in the syn column and the ground-truth map must light up exactly there.

Layout (all sizes in pixels; ``tile`` is a parameter)::

    PAD | tile | PAD | tile | PAD | tile | PAD | tile | PAD        <- width
    HEADER_H                                                        column titles
    then per row: LABEL_H (row label) + tile + PAD
    then PAD
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from finpercep.checks import require
from finpercep.data.dataset import MANIFEST, REQUIRED_KEYS, FGRDataset
from finpercep.io import save_png
from finpercep.viz import OVERLAY_ALPHA, heatmap_overlay

log = logging.getLogger(__name__)

COLUMNS = ("HR", "SR", "syn + mask", "map_syn")

PAD = 6
HEADER_H = 26
LABEL_H = 20
BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)
MASK_OUTLINE = (0, 255, 255)  # cyan: visible on the inferno map and on most photos
SHEET_KEYS = ("hr", "sr", "syn", "mask", "map_syn")  # what a row shows


def pick_samples(records: Sequence[dict[str, Any]], num: int, seed: int) -> list[dict[str, Any]]:
    """``num`` records, deterministic in ``seed``, round-robin over ``sr_family`` (sorted by name).

    Every family appears once ``num`` >= the number of families; within a family the order is a
    seeded shuffle. Fewer than ``num`` are returned only when the data set is smaller.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    rng = np.random.default_rng(seed)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(str(r["sr_family"]), []).append(r)
    queues = []
    for fam in sorted(groups):
        g = groups[fam]
        queues.append([g[i] for i in rng.permutation(len(g))])
    picked: list[dict[str, Any]] = []
    depth = 0
    while len(picked) < num and any(depth < len(q) for q in queues):
        for q in queues:
            if depth < len(q) and len(picked) < num:
                picked.append(q[depth])
        depth += 1
    return picked


def render_contact_sheet(dataset_dir: str | Path, out: str | Path, num: int = 8, seed: int = 0, tile: int = 192) -> Path:
    """Render ``num`` samples of a data set as a PNG contact sheet and return its path.

    Rows: HR | SR | syn with the mask outlined | map_syn as an inferno heatmap on syn (its max value
    printed). Each row is labelled with id, SR family, mask kind and mask area (%). Samples are
    picked by :func:`pick_samples`. Paths read from the manifest must stay inside ``dataset_dir``.

    Raises ``FileNotFoundError`` when there is no manifest, ``ValueError`` (one line) when it is
    empty, a line is not a record with every key of ``REQUIRED_KEYS`` (naming file and line) or a
    sample's files do not fit together.
    """
    dataset_dir, out = Path(dataset_dir), Path(out)
    if not 32 <= tile <= 1024:
        raise ValueError(f"tile must be between 32 and 1024 pixels, got {tile}")
    ds = FGRDataset(dataset_dir, keys=SHEET_KEYS, record_keys=REQUIRED_KEYS)
    if not len(ds):
        raise ValueError(f"{dataset_dir / MANIFEST} has no samples")
    rows = FGRDataset(dataset_dir, keys=SHEET_KEYS, records=pick_samples(ds.records, num, seed), record_keys=())
    font = _font(max(10, tile // 15))
    small = _font(max(9, tile // 17))
    cols = len(COLUMNS)
    width = cols * tile + (cols + 1) * PAD
    row_h = LABEL_H + tile + PAD
    sheet = Image.new("RGB", (width, HEADER_H + len(rows) * row_h + PAD), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(COLUMNS):
        x = PAD + c * (tile + PAD)
        draw.text((x + tile // 2, HEADER_H // 2), title, fill=TEXT, font=font, anchor="mm")
    for r in range(len(rows)):
        y = HEADER_H + r * row_h
        draw.text((PAD, y + LABEL_H // 2), _row_label(rows.records[r]), fill=TEXT, font=small, anchor="lm")
        for c, tile_img in enumerate(_row_tiles(rows[r], tile, small)):
            sheet.paste(tile_img, (PAD + c * (tile + PAD), y + LABEL_H))
    save_png(out, np.asarray(sheet))
    log.info("contact sheet with %d rows written to %s", len(rows), out)
    return out


# --------------------------------------------------------------------------------------------
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _row_label(rec: dict[str, Any]) -> str:
    area = float(rec["mask_area"])
    return f"{rec['id']}  |  {rec['sr_family']}  |  mask: {rec['mask_kind']} {100 * area:.1f}%"


def _row_tiles(item: dict[str, Any], tile: int, font: Any) -> list[Image.Image]:
    """The four tiles of one row (an :class:`FGRDataset` item with :data:`SHEET_KEYS`), each
    ``tile`` x ``tile`` (images letterboxed to keep aspect)."""
    hr, sr, syn, sid = item["hr"], item["sr"], item["syn"], item["meta"]["id"]
    heat = item["map_syn"][0]  # (1, H, W) -> (H, W)
    size = tuple(syn.shape[1:])
    for key, t in (("hr", hr), ("sr", sr)):
        if tuple(t.shape[1:]) != size:
            raise ValueError(f"sample {sid}: {key} is {tuple(t.shape[1:])} but syn is {size}")
    if heat.ndim != 2 or tuple(heat.shape) != size:
        raise ValueError(f"sample {sid}: map_syn has shape {tuple(heat.shape)}, expected (H, W) = {size}")
    mask = item["mask"][0].numpy() > 0.5

    overlay = heatmap_overlay(syn, heat, OVERLAY_ALPHA)
    tiles = [_to_tile(hr, tile), _to_tile(sr, tile), _outline(_to_tile(syn, tile), mask, tile), _to_tile(overlay, tile)]
    hi = float(heat.max()) if heat.numel() else 0.0
    _label_box(tiles[3], f"max {hi:.2f}", font)
    return tiles


def _fit(h: int, w: int, tile: int) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left) to letterbox an h x w image into a tile x tile square."""
    s = tile / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    return nh, nw, (tile - nh) // 2, (tile - nw) // 2


def _to_tile(img: torch.Tensor, tile: int) -> Image.Image:
    """(3, H, W) in [0, 1] -> tile x tile RGB image, resized with LANCZOS (box-like when shrinking)."""
    arr = img.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    h, w = arr.shape[:2]
    nh, nw, top, left = _fit(h, w, tile)
    out = Image.new("RGB", (tile, tile), BACKGROUND)
    out.paste(Image.fromarray(arr).resize((nw, nh), Image.Resampling.LANCZOS), (left, top))
    return out


def _outline(tile_img: Image.Image, mask: np.ndarray, tile: int) -> Image.Image:
    """Draw the boundary of a (H, W) bool mask, resized to the tile, in ``MASK_OUTLINE``."""
    ndimage = require("scipy.ndimage", extra="data")

    h, w = mask.shape
    nh, nw, top, left = _fit(h, w, tile)
    small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((nw, nh), Image.Resampling.NEAREST)) > 127
    # A 2 px ring straddling the boundary (1 px out, 1 px in); the image frame is not a boundary.
    edge = ndimage.binary_dilation(small) & ~ndimage.binary_erosion(small, border_value=1)
    arr = np.array(tile_img)
    arr[top : top + nh, left : left + nw][edge] = MASK_OUTLINE
    return Image.fromarray(arr)


def _label_box(tile_img: Image.Image, text: str, font: Any) -> None:
    """Write ``text`` in the tile's top-left corner on a dark box, in place."""
    draw = ImageDraw.Draw(tile_img)
    x0, y0, x1, y1 = draw.textbbox((4, 3), text, font=font)
    draw.rectangle((x0 - 3, y0 - 2, x1 + 3, y1 + 2), fill=(0, 0, 0))
    draw.text((4, 3), text, fill=(255, 255, 255), font=font)


__all__ = ["COLUMNS", "HEADER_H", "LABEL_H", "PAD", "pick_samples", "render_contact_sheet"]
