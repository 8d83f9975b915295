"""The FGR data set: its on-disk format, the one reader, the region swap, a contract checker.

The on-disk format (written by :mod:`finpercep.data.builder`, read by everything else through this
module, which imports neither the builder nor OpenCV / SciPy): ``ROOT/manifest.jsonl`` holds one
JSON object per sample with at least :data:`REQUIRED_KEYS`. The keys of :data:`PATH_KEYS` are
paths relative to ROOT: images are PNG (uint8 RGB; the mask 0/255 grey), maps ``.npy`` float32
arrays ``(H, W)`` in [0, 1] at the HR resolution. ``ROOT/dataset.json`` records the config
(``config.scale``) and library version.

Readers: :func:`read_manifest` (the records), :class:`FGRDataset` (samples as tensors; batches of
reward-model triplets as :class:`finpercep.types.Triplet`), :func:`check_dataset` (the contract).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from finpercep.io import load_npy, read_image, safe_relpath, to_tensor
from finpercep.types import Triplet

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
DATASET_JSON = "dataset.json"
REQUIRED_KEYS = ("id", "hr", "lr", "sr", "syn", "mask", "map_syn", "map_sr", "sr_family", "mask_kind", "mask_area", "seed")
PATH_KEYS = ("hr", "lr", "sr", "syn", "mask", "map_syn", "map_sr")  # files of a sample, relative to its folder
IMAGE_KEYS = ("hr", "lr", "sr", "syn")
MAP_KEYS = ("map_syn", "map_sr")
TRIPLET_KEYS = ("hr", "syn", "sr", "mask", "map_syn")
"""What :meth:`FGRDataset.load_triplets` reads by default."""


# ---------------------------------------------------------------------------------------------
# The manifest


def check_record(rec: Any, required: Sequence[str], where: str) -> None:
    """Raise ``ValueError`` (one line, starting with ``where``) unless ``rec`` is a manifest record:
    a JSON object with a string ``id`` and every key of ``required``."""
    if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
        got = json.dumps(rec)
        got = got if len(got) <= 60 else got[:57] + "..."
        raise ValueError(f"{where}: not a sample record (a JSON object with a string \"id\"), got {got}; "
                         "fix or delete that line")
    missing = [k for k in required if k not in rec]
    if missing:
        raise ValueError(f"{where}: sample {rec['id']} has missing keys {missing}; fix or delete that line")


def read_manifest(root: str | Path, required: Sequence[str] = ()) -> list[dict]:
    """The records of ``root/manifest.jsonl`` in file order, each a dict with a string ``id`` and
    the keys ``required``; ``[]`` when there is no manifest.

    Every finished line ends with a newline; bytes after the last newline are a line torn by a
    killed build and are ignored (the builder cuts them before it appends). A line that is not
    JSON is skipped with a warning (its sample is rebuilt). Raises ``ValueError`` naming the file
    and line for a line that is JSON but not a complete record.
    """
    path = Path(root) / MANIFEST
    if not path.exists():
        return []
    data = path.read_bytes()
    records = []
    for n, line in enumerate(data[: data.rfind(b"\n") + 1].splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("%s line %d is not valid JSON; ignored (its sample will be rebuilt)", path, n)
            continue
        check_record(rec, required, f"{path} line {n}")
        records.append(rec)
    return records


def sample_file(root: Path, rec: dict, key: str) -> Path:
    """The file ``rec[key]`` of manifest record ``rec`` of the data set in ``root``.

    Raises ``ValueError`` naming the manifest and sample when the path is not a string, is absolute
    or leaves ``root`` (``..``): a manifest never makes us read or write outside its folder.
    """
    rel = rec[key]
    if not isinstance(rel, str):
        raise ValueError(f"{root / MANIFEST} sample {rec['id']}: {key} must be a path string, got {rel!r}")
    try:
        return safe_relpath(root, rel)
    except ValueError as e:
        raise ValueError(f"{root / MANIFEST} sample {rec['id']}: {key}: {e}") from None


# ---------------------------------------------------------------------------------------------
# The region swap


def quantise(img: torch.Tensor) -> torch.Tensor:
    """Round an image in [0, 1] (clamped; any shape) to 8 bits and back, float32: what a PNG of it
    holds, bit for bit (``round(255 * x) / 255`` = ``to_tensor(to_uint8(x))``)."""
    return img.detach().float().clamp(0, 1).mul(255.0).round().div(255.0)


def swap(hr: torch.Tensor, sr: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The region swap of arXiv 2512.22647, Sec. 2: ``syn = B * SR + (1 - B) * HR``, rounded to
    8 bits (``round(255 * x) / 255``, as the data set stores it in PNG), so a swap computed in
    memory equals one read back from disk.

    ``hr``, ``sr``: ``(B, 3, H, W)`` float in [0, 1] (clamped); ``mask``: ``(B, 1, H, W)`` in
    {0, 1}. Returns ``(B, 3, H, W)`` float32 on 8-bit values, detached (data, not a loss).
    ``ValueError`` when the shapes do not fit.
    """
    if hr.ndim != 4 or hr.shape[1] != 3 or sr.shape != hr.shape or tuple(mask.shape) != (hr.shape[0], 1, *hr.shape[2:]):
        raise ValueError(f"swap needs hr, sr (B, 3, H, W) and mask (B, 1, H, W); got hr {tuple(hr.shape)}, "
                         f"sr {tuple(sr.shape)}, mask {tuple(mask.shape)}")
    return quantise(mask * sr + (1 - mask) * hr)


# ---------------------------------------------------------------------------------------------
# The reader


class FGRDataset(Dataset):
    """The one reader of an FGR data set: its samples as tensors, and batches of reward-model
    triplets (:meth:`load_triplets`).

    ``__getitem__`` returns a dict: images ``(3, H, W)`` float32 in [0, 1] (``lr`` is
    ``(3, H/s, W/s)``), ``mask`` and the maps ``(1, H, W)`` float32 in [0, 1], and ``meta`` (the
    manifest record). ``keys`` limits what is read (reading less is faster); ``record_keys`` are
    the other keys every record must have.

    ``families`` / ``exclude_families`` select samples by SR family (e.g. to hold a family out);
    ``records`` replaces the manifest's records (a subset of them, e.g. a validation split).

    Errors: ``FileNotFoundError`` when ROOT has no manifest; ``ValueError`` (one line) for a
    manifest line that is not a record with ``id``, ``record_keys`` and ``keys`` (naming file and
    line), a path leaving ROOT, and, when an item is read, a map with NaN, infinite or
    out-of-[0, 1] values (naming the sample and file).
    """

    def __init__(
        self,
        root: str | Path,
        keys: Sequence[str] = ("hr", "syn", "sr", "mask", "map_syn", "map_sr"),
        families: Sequence[str] | None = None,
        exclude_families: Sequence[str] = (),
        records: list[dict] | None = None,
        record_keys: Sequence[str] = ("sr_family",),
    ) -> None:
        self.root = Path(root)
        if not (self.root / MANIFEST).exists():
            raise FileNotFoundError(f"{self.root} has no {MANIFEST}; build one with `finpercep data build`")
        valid = set(IMAGE_KEYS) | set(MAP_KEYS) | {"mask"}
        bad = [k for k in keys if k not in valid]
        if bad:
            raise ValueError(f"unknown keys {bad}; valid: {sorted(valid)}")
        self.keys = tuple(keys)
        required = tuple(dict.fromkeys((*record_keys, *self.keys)))  # in order, each once
        if records is None:
            records = read_manifest(self.root, required=required)
        for n, rec in enumerate(records):
            check_record(rec, required, f"{self.root}: records[{n}]")
        if families is not None:
            records = [r for r in records if r.get("sr_family") in set(families)]
        self.records = [r for r in records if r.get("sr_family") not in set(exclude_families)]
        info = self.root / DATASET_JSON
        self.info: dict[str, Any] = json.loads(info.read_text()) if info.exists() else {}

    @property
    def scale(self) -> int:
        """The super-resolution factor (``dataset.json``'s ``config.scale``; 4 when not recorded)."""
        return int(self.info.get("config", {}).get("scale", 4))

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

    def load_triplets(
        self,
        idx: Sequence[int],
        crop: int | None = None,
        rng: np.random.Generator | None = None,
        map_syn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> Triplet:
        """Samples ``idx`` (in that order, repeats allowed) as one :class:`~finpercep.types.Triplet`:
        ``hr, syn, sr, map_syn``, and ``mask`` / ``map_sr`` when in ``keys``.

        ``crop``: one random ``c x c`` window per sample, ``c = min(crop, H, W)``, its corner drawn
        from ``rng`` (``y`` then ``x``, sample after sample), so the batch is a pure function of
        ``idx`` and the generator's state; ``None`` = whole samples (all of one size).
        ``map_syn``: ``fn(hr (1, 3, H, W), syn (1, 3, H, W)) -> (1, 1, H, W)`` in [0, 1] replaces the
        stored map (e.g. the pixel-only ablation's ``GTMapper``); it sees the whole sample, before
        the crop. ``ValueError`` when ``keys`` lack ``hr``, ``syn``, ``sr`` or (without ``map_syn``)
        ``map_syn``, for a crop without ``rng``, and for whole samples of different sizes.
        """
        need = ("hr", "syn", "sr") + (() if map_syn is not None else ("map_syn",))
        if any(k not in self.keys for k in need):
            raise ValueError(f"load_triplets needs the keys {list(need)}; this FGRDataset reads {list(self.keys)}")
        if crop is not None and rng is None:
            raise ValueError("load_triplets: a random crop needs rng, a numpy.random.Generator")
        fields = [k for k in ("hr", "syn", "sr", "map_syn", "mask", "map_sr") if k in self.keys or k == "map_syn"]
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in fields}
        for i in idx:
            item = self[int(i)]
            if map_syn is not None:
                item["map_syn"] = map_syn(item["hr"][None], item["syn"][None])[0]
            window = (slice(None), slice(None))
            if crop is not None:
                assert rng is not None
                h, w = item["hr"].shape[-2:]
                c = min(crop, h, w)
                y, x = int(rng.integers(h - c + 1)), int(rng.integers(w - c + 1))
                window = (slice(y, y + c), slice(x, x + c))
            for k in fields:
                parts[k].append(item[k][(..., *window)])
        if len({tuple(t.shape) for t in parts["hr"]}) > 1:
            raise ValueError(f"{self.root}: samples {list(idx)} differ in size; pass crop to batch them")
        return Triplet(**{k: torch.stack(v) for k, v in parts.items()})


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
        b = mask > 127
        hr, sr, syn = (to_tensor(imgs[k])[None] for k in ("hr", "sr", "syn"))
        if syn.shape == sr.shape == hr.shape and not torch.equal(syn, swap(hr, sr, torch.from_numpy(b)[None, None].float())):
            problems.append(f"{sid}: syn != mask * sr + (1 - mask) * hr")
        if abs(float(b.mean()) - float(r["mask_area"])) > 1e-4:
            problems.append(f"{sid}: mask_area {r['mask_area']} != measured {b.mean():.6f}")
    return problems
