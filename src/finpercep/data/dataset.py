"""Reading an FGR data set: a PyTorch ``Dataset`` and a contract checker.

The on-disk contract (written by :mod:`finpercep.data.builder`): ``ROOT/manifest.jsonl`` holds one
JSON object per sample with at least ``id, hr, lr, sr, syn, mask, map_syn, map_sr, sr_family,
mask_kind, mask_area, seed``. Image keys are PNG paths relative to ROOT (uint8 RGB; the mask 0/255
grey), map keys ``.npy`` float32 arrays (H, W) in [0, 1] at the HR resolution. ``ROOT/dataset.json``
records the config and library version.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from finpercep.data.builder import DATASET_JSON, MANIFEST, REQUIRED_KEYS, check_record, read_manifest, sample_file
from finpercep.io import load_npy, read_image, to_tensor

IMAGE_KEYS = ("hr", "lr", "sr", "syn")
MAP_KEYS = ("map_syn", "map_sr")


class FGRDataset(Dataset):
    """Triplets (HR, syn, SR) with LR, mask and maps, as tensors.

    ``__getitem__`` returns a dict: images ``(3, H, W)`` float32 in [0, 1] (``lr`` is
    ``(3, H/s, W/s)``), ``mask`` and the maps ``(1, H, W)`` float32 in [0, 1], and ``meta`` (the
    manifest record). ``keys`` limits what is read (reading less is faster).

    ``families`` / ``exclude_families`` select samples by SR family (e.g. to hold a family out);
    ``records`` replaces the manifest's records (a subset of them, e.g. a validation split).

    Errors (``ValueError``, one line): a manifest line that is not a record with ``id``,
    ``sr_family`` and ``keys`` (naming file and line), a path leaving ROOT, and, when an item is
    read, a map with NaN, infinite or out-of-[0, 1] values (naming the sample and file).
    """

    def __init__(
        self,
        root: str | Path,
        keys: Sequence[str] = ("hr", "syn", "sr", "mask", "map_syn", "map_sr"),
        families: Sequence[str] | None = None,
        exclude_families: Sequence[str] = (),
        records: list[dict] | None = None,
    ) -> None:
        self.root = Path(root)
        if not (self.root / MANIFEST).exists():
            raise FileNotFoundError(f"{self.root} has no {MANIFEST}; build one with `finpercep data build`")
        valid = set(IMAGE_KEYS) | set(MAP_KEYS) | {"mask"}
        bad = [k for k in keys if k not in valid]
        if bad:
            raise ValueError(f"unknown keys {bad}; valid: {sorted(valid)}")
        self.keys = tuple(keys)
        required = ("sr_family", *self.keys)
        if records is None:
            records = read_manifest(self.root, required=required)
        for n, rec in enumerate(records):
            check_record(rec, required, f"{self.root}: records[{n}]")
        if families is not None:
            records = [r for r in records if r["sr_family"] in set(families)]
        self.records = [r for r in records if r["sr_family"] not in set(exclude_families)]
        info = self.root / DATASET_JSON
        self.info: dict[str, Any] = json.loads(info.read_text()) if info.exists() else {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        r = self.records[idx]
        item: dict[str, Any] = {"meta": r}
        for k in self.keys:
            path = sample_file(self.root, r, k)
            if k in IMAGE_KEYS:
                item[k] = to_tensor(read_image(path)[0])
            elif k == "mask":
                item[k] = torch.from_numpy(np.asarray(_read_grey(path), dtype=np.float32) / 255.0)[None]
            else:
                item[k] = torch.from_numpy(_read_map(path, r["id"], k))[None]
        return item


def _read_map(path: Path, sample: str, key: str) -> np.ndarray:
    """A ground-truth map file as float32 ``(H, W)``; ``ValueError`` unless its values are finite
    and in [0, 1] (a corrupt map must not reach training, where one NaN spoils every weight)."""
    m = load_npy(path).astype(np.float32, copy=False)
    rebuild = "rebuild the sample (delete its manifest line and rerun `finpercep data build`)"
    if not np.isfinite(m).all():
        raise ValueError(f"sample {sample}: {key} {path} contains NaN or infinite values; {rebuild}")
    if m.size and (m.min() < 0 or m.max() > 1):
        raise ValueError(f"sample {sample}: {key} {path} has values in [{m.min():.3g}, {m.max():.3g}], "
                         f"outside [0, 1]; {rebuild}")
    return m


def _read_grey(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep ``meta`` as a list (for ``DataLoader(collate_fn=collate)``)."""
    out: dict[str, Any] = {"meta": [it["meta"] for it in items]}
    for k in items[0]:
        if k != "meta":
            out[k] = torch.stack([it[k] for it in items])
    return out


def check_dataset(root: str | Path, limit: int | None = None) -> list[str]:
    """Check a data set against the on-disk contract. Returns a list of problems (empty = valid).

    Checks keys, unique ids, relative paths inside ROOT, image/mask/map shapes and ranges, that the
    mask is binary, and that ``syn`` equals HR outside the mask and SR inside it.
    """
    root = Path(root)
    problems: list[str] = []
    if not (root / MANIFEST).exists():
        return [f"no {MANIFEST} in {root}"]
    if not (root / DATASET_JSON).exists():
        problems.append(f"no {DATASET_JSON} (unfinished build?)")
    try:
        records = read_manifest(root)
    except ValueError as e:  # a line that is not a record: nothing after it can be trusted
        return problems + [str(e)]
    ids = [r.get("id") for r in records]
    if len(set(ids)) != len(ids):
        problems.append("duplicate sample ids in the manifest")
    for r in records[:limit] if limit else records:
        sid = r.get("id", "?")
        missing = [k for k in REQUIRED_KEYS if k not in r]
        if missing:
            problems.append(f"{sid}: missing keys {missing}")
            continue
        try:
            imgs = {k: read_image(sample_file(root, r, k))[0] for k in IMAGE_KEYS}
            mask = _read_grey(sample_file(root, r, "mask"))
            maps = {k: load_npy(sample_file(root, r, k)) for k in MAP_KEYS}
        except (OSError, ValueError) as e:
            problems.append(f"{sid}: {e}")
            continue
        h, w = imgs["hr"].shape[:2]
        for k in ("sr", "syn"):
            if imgs[k].shape != (h, w, 3):
                problems.append(f"{sid}: {k} shape {imgs[k].shape} != HR {(h, w, 3)}")
        s = r.get("scale", 4)
        if imgs["lr"].shape != (h // s, w // s, 3):
            problems.append(f"{sid}: lr shape {imgs['lr'].shape} != {(h // s, w // s, 3)}")
        if mask.shape != (h, w) or not np.isin(mask, (0, 255)).all():
            problems.append(f"{sid}: mask must be (H, W) with values 0/255")
            continue
        for k, m in maps.items():
            if m.dtype != np.float32 or m.shape != (h, w) or not np.isfinite(m).all() or m.min() < 0 or m.max() > 1:
                problems.append(f"{sid}: {k} must be float32 (H, W) in [0, 1], got {m.dtype} {m.shape}")
        b = mask[..., None] > 127
        if imgs["syn"].shape == (h, w, 3) and not np.array_equal(
            imgs["syn"], np.where(b, imgs["sr"], imgs["hr"])
        ):
            problems.append(f"{sid}: syn != mask * sr + (1 - mask) * hr")
        if abs(float(b.mean()) - float(r["mask_area"])) > 1e-4:
            problems.append(f"{sid}: mask_area {r['mask_area']} != measured {b.mean():.6f}")
    return problems
