"""The FGR data-set builder (arXiv 2512.22647, FGR-30k): HR crop -> LR -> SR -> region swap -> maps.

How a build is organised, and why:

- Samples are grouped in **units**. A unit is one HR crop of one photo, its degraded LR and one SR
  output; it yields ``masks_per_sr`` samples that share the SR output but swap different regions,
  so the expensive real-model inference runs once per unit. Sample ``i`` belongs to unit
  ``i // masks_per_sr``.
- Everything about unit ``u`` is drawn from ``SeedSequence([seed, u])`` and everything about sample
  ``i`` from ``SeedSequence([seed, u, i])``: a sample does not depend on how many samples are built,
  on the number of workers, or on which shard builds it. Building more samples later extends a data
  set; ``--shard I/N`` builds the units ``u % N == I``, and merging the shards gives exactly the
  data set a single machine would have built.
- Images go through 8-bit quantisation at the point they are written (LR before the SR model sees
  it, SR before the swap), so a unit read back from its files gives the same samples as a fresh one.
- ``manifest.jsonl`` is an append-only journal during a build (one fsync'd line per finished
  sample, written after the sample's files, each written atomically). A resumed build drops a torn
  last line and rebuilds whatever has no line. When a build completes, the manifest is rewritten
  sorted by id, so the final bytes do not depend on completion order.
- A write that fails (full disk, read-only folder) stops the build with a
  :class:`finpercep.io.WriteError` naming the file: every later write would fail the same way.
  What was written is kept, so freeing space and rerunning resumes. Worker processes exit when
  the build process dies, even by ``kill -9`` (:func:`_exit_with_parent`).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

import finpercep
from finpercep.config import from_dict, to_dict
from finpercep.data.dataset import DATASET_JSON, MANIFEST, PATH_KEYS, quantise, read_manifest, sample_file, swap
from finpercep.data.degradations import DegradationConfig, degrade
from finpercep.data.gt_maps import GTMapConfig, GTMapper
from finpercep.data.masks import MASK_KINDS, make_mask
from finpercep.data.sr_zoo import resolve_families
from finpercep.io import (
    ImageReadError,
    WriteError,
    atomic_write_bytes,
    list_images,
    read_image,
    save_json,
    save_npy,
    save_png,
    to_tensor,
)
from finpercep.types import SRFamily

log = logging.getLogger(__name__)

BUILD_JSON = "build.json"  # the config a (possibly unfinished) build was started with


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn an ``OSError`` raised inside the block into a :class:`~finpercep.io.WriteError` naming ``path``."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(e.errno, e.strerror or str(e), str(path)) from e


def _put(save: Callable[[Path, Any], None], path: Path, obj: Any) -> None:
    """``save(path, obj)`` (a :mod:`finpercep.io` writer); any ``OSError`` becomes a
    :class:`~finpercep.io.WriteError` naming ``path``."""
    with _writing(path):
        save(path, obj)


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides the content of a data set (not how fast it is built)."""

    num: int
    """Number of samples in the whole data set (all shards together)."""
    seed: int = 0
    """Root seed: unit ``u`` draws from ``SeedSequence([seed, u])``, sample ``i`` from ``[seed, u, i]``."""
    scale: int = 4
    """Super-resolution factor, 4 or 2. The LR is ``crop / scale`` pixels wide."""
    crop: int = 256
    """HR crop size in pixels (square); must be a multiple of ``scale`` and at least 32."""
    families: tuple[str, ...] = ("all",)
    """SR family names or groups (see ``finpercep data families``), used round-robin over units."""
    masks_per_sr: int = 4
    """Samples per SR output (each a different swap mask): the SR model runs once per unit."""
    mask_kinds: tuple[str, ...] = tuple(MASK_KINDS)
    """Mask kinds used round-robin over samples: random shapes and semantic segments."""
    mask_area: tuple[float, float] = (0.03, 0.30)
    """Bounds of the swapped area fraction per sample."""
    min_texture: float = 0.008
    """A crop is accepted when its :func:`texture` (mean absolute grey gradient) reaches this; 0 accepts
    the first crop."""
    crop_tries: int = 8
    """Random crop positions tried per unit before taking the most textured one."""
    hflip_prob: float = 0.5
    """Probability of a horizontal flip of the crop."""
    vflip_prob: float = 0.0
    """Probability of a vertical flip of the crop (off by default: skies belong on top)."""
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    """The Real-ESRGAN-style second-order degradation ranges."""
    gt_map: GTMapConfig = field(default_factory=GTMapConfig)
    """The ground-truth map recipe (alpha, feature layers, Normalize); ``pixel_only`` for the ablation."""

    def __post_init__(self) -> None:
        if self.num < 1:
            raise ValueError(f"--num must be a positive number of samples, got {self.num}")
        if self.scale not in (2, 4):
            raise ValueError(f"--scale must be 2 or 4, got {self.scale}")
        if self.crop < 32 or self.crop % self.scale:
            raise ValueError(f"--crop must be >= 32 and a multiple of the scale {self.scale}, got {self.crop}")
        if self.crop_tries < 1 or self.min_texture < 0:
            raise ValueError("crop_tries must be >= 1 and min_texture >= 0")
        if self.masks_per_sr < 1:
            raise ValueError(f"masks_per_sr must be >= 1, got {self.masks_per_sr}")
        if self.seed < 0:
            raise ValueError(f"--seed must be non-negative, got {self.seed}")
        bad = [k for k in self.mask_kinds if k not in MASK_KINDS]
        if bad or not self.mask_kinds:
            raise ValueError(f"unknown mask kinds {bad}; valid: {', '.join(MASK_KINDS)}")
        lo, hi = self.mask_area
        if not 0 < lo <= hi <= 0.9:
            raise ValueError(f"mask area bounds must satisfy 0 < lo <= hi <= 0.9, got {self.mask_area}")
        if self.families:  # empty only when user families are given to build_dataset
            resolve_families(list(self.families), self.scale)  # raises on unknown names / bad scale

    @property
    def num_units(self) -> int:
        return -(-self.num // self.masks_per_sr)

    def to_json(self) -> dict:
        return to_dict(self)

    @staticmethod
    def from_json(d: dict) -> "BuildConfig":
        return from_dict(BuildConfig, d)


# ----------------------------------------------------------------------------------------------
# Photos
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Photo:
    path: str  # absolute path on this machine (not recorded in outputs)
    rel: str  # path relative to the images folder (recorded)
    height: int
    width: int


def scan_photos(images: Path, crop: int, progress: bool = False) -> tuple[list[Photo], list[dict]]:
    """Open every image under ``images``; keep those usable as HR sources.

    Returns ``(photos, skipped)`` with a reason per skipped file. Grey, palette, RGBA and 16-bit
    files are converted (logged), unreadable ones and ones smaller than the crop are skipped.
    """
    images = Path(images)
    paths = list_images(images)
    photos: list[Photo] = []
    skipped: list[dict] = []
    it: Iterable[Path] = paths
    if progress:
        from tqdm import tqdm

        it = tqdm(paths, desc="checking photos", unit="img", leave=False)
    for p in it:
        rel = p.relative_to(images).as_posix()
        try:
            arr, notes = read_image(p)
        except ImageReadError as e:
            log.warning("skipping %s", e)
            skipped.append({"file": rel, "reason": str(e).split(": ", 1)[-1]})
            continue
        for n in notes:
            log.info("%s: %s", rel, n)
        h, w = arr.shape[:2]
        if h < crop or w < crop:
            reason = f"smaller ({w}x{h}) than the crop {crop}x{crop}"
            log.warning("skipping %s: %s", rel, reason)
            skipped.append({"file": rel, "reason": reason})
            continue
        photos.append(Photo(str(p.resolve()), rel, h, w))
    return photos, skipped


@lru_cache(maxsize=4)
def _load_photo(path: str) -> torch.Tensor:
    arr, _ = read_image(path)
    return to_tensor(arr)


# ----------------------------------------------------------------------------------------------
# One unit: pure given (config, photos, unit index)
# ----------------------------------------------------------------------------------------------


_UNIT_STREAM = 2**40


def texture(img: torch.Tensor) -> float:
    """Mean absolute horizontal/vertical gradient of the grey image ``(3, H, W)`` in [0, 1]."""
    g = img.mean(0)
    return float(((g[1:] - g[:-1]).abs().mean() + (g[:, 1:] - g[:, :-1]).abs().mean()) / 2)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def unit_paths(u: int) -> dict[str, str]:
    d = f"units/{u // 1000:04d}"
    return {k: f"{d}/u{u:07d}_{k}{ext}" for k, ext in
            (("hr", ".png"), ("lr", ".png"), ("sr", ".png"), ("map_sr", ".npy"), ("meta", ".json"))}


def sample_paths(i: int) -> dict[str, str]:
    d = f"samples/{i // 1000:04d}"
    return {k: f"{d}/s{i:07d}_{k}{ext}" for k, ext in (("syn", ".png"), ("mask", ".png"), ("map_syn", ".npy"))}


def sample_id(i: int) -> str:
    return f"s{i:07d}"


class UnitBuilder:
    """Builds units and their samples into ``out``. Holds the per-process models (map network)."""

    def __init__(self, cfg: BuildConfig, photos: list[Photo], out: Path, device: str = "cpu",
                 extra_families: tuple[SRFamily, ...] = ()):
        self.cfg = cfg
        self.photos = photos
        self.out = Path(out)
        self.families = _families(cfg, extra_families)
        self.mapper = GTMapper(cfg.gt_map, device=device)
        self.device = device

    def _make_unit(self, u: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        cfg = self.cfg
        # Unit streams are tagged above any sample index, so they never collide with [seed, u, i].
        rng_crop, rng_deg, rng_sr = (_rng(cfg.seed, u, _UNIT_STREAM + k) for k in range(3))
        photo = self.photos[int(rng_crop.integers(len(self.photos)))]
        img = _load_photo(photo.path)
        # Up to `crop_tries` random positions; the first with enough texture wins (else the most
        # textured). Wallpapers have large out-of-focus areas where an SR artifact has little to show.
        best = (-1.0, 0, 0)
        for _ in range(cfg.crop_tries):
            y = int(rng_crop.integers(photo.height - cfg.crop + 1))
            x = int(rng_crop.integers(photo.width - cfg.crop + 1))
            t = texture(img[:, y : y + cfg.crop, x : x + cfg.crop])
            if t > best[0]:
                best = (t, y, x)
            if t >= cfg.min_texture:
                break
        tex, y, x = best
        hr = img[:, y : y + cfg.crop, x : x + cfg.crop]
        hflip = bool(rng_crop.random() < cfg.hflip_prob)
        vflip = bool(rng_crop.random() < cfg.vflip_prob)
        if hflip:
            hr = hr.flip(-1)
        if vflip:
            hr = hr.flip(-2)
        hr = hr.contiguous()
        lr, deg_params = degrade(hr, cfg.scale, rng_deg, cfg.degradation)
        lr = quantise(lr)  # what is written is what is used
        family = self.families[u % len(self.families)]
        sr, sr_params = family.fn(lr, hr, cfg.scale, rng_sr)
        if tuple(sr.shape) != tuple(hr.shape):
            raise RuntimeError(f"SR family {family.name} returned {tuple(sr.shape)}, expected {tuple(hr.shape)}")
        sr = quantise(sr)
        map_sr = self.mapper(hr[None], sr[None])[0, 0]
        paths = unit_paths(u)
        _put(save_png, self.out / paths["hr"], hr)
        _put(save_png, self.out / paths["lr"], lr)
        _put(save_png, self.out / paths["sr"], sr)
        _put(save_npy, self.out / paths["map_sr"], map_sr.numpy().astype(np.float32))
        meta = {
            "unit": u,
            "photo": photo.rel,
            "crop_box": [x, y, cfg.crop, cfg.crop],
            "crop_texture": round(tex, 6),
            "hflip": hflip,
            "vflip": vflip,
            "scale": cfg.scale,
            "degradation": deg_params,
            "sr_family": family.name,
            "sr_kind": family.kind,
            "sr_params": sr_params,
            "map_sr_mean": round(float(map_sr.mean()), 6),
        }
        _put(save_json, self.out / paths["meta"], meta)  # written last: its presence marks a complete unit
        return hr, sr, meta

    def _load_unit(self, u: int) -> tuple[torch.Tensor, torch.Tensor, dict] | None:
        paths = unit_paths(u)
        try:
            meta = json.loads((self.out / paths["meta"]).read_text())
            hr = to_tensor(read_image(self.out / paths["hr"])[0])
            sr = to_tensor(read_image(self.out / paths["sr"])[0])
        except (OSError, ValueError):
            return None
        if tuple(hr.shape) != (3, self.cfg.crop, self.cfg.crop) or hr.shape != sr.shape:
            return None
        return hr, sr, meta

    def build(self, u: int, indices: list[int]) -> list[dict]:
        """Build (or finish) unit ``u``: the samples ``indices`` of it. Returns their manifest records."""
        cfg = self.cfg
        loaded = self._load_unit(u)
        hr, sr, meta = loaded if loaded is not None else self._make_unit(u)
        masks, mask_params = [], []
        for i in indices:
            kind = cfg.mask_kinds[i % len(cfg.mask_kinds)]
            m, p = make_mask(kind, hr, _rng(cfg.seed, u, i), cfg.mask_area)
            masks.append(m)
            mask_params.append(p)
        mask = torch.stack(masks)[:, None]  # (K, 1, H, W) in {0, 1}
        n = len(indices)
        syn = swap(hr.expand(n, -1, -1, -1), sr.expand(n, -1, -1, -1), mask)  # (K, 3, H, W); arXiv 2512.22647, Sec. 2
        map_syn = self.mapper(hr[None], syn)  # (K, 1, H, W); HR encoded once
        up = unit_paths(u)
        records = []
        for k, i in enumerate(indices):
            sp = sample_paths(i)
            _put(save_png, self.out / sp["syn"], syn[k])
            _put(save_png, self.out / sp["mask"], (mask[k, 0].numpy() * 255).astype(np.uint8))
            _put(save_npy, self.out / sp["map_syn"], map_syn[k, 0].numpy().astype(np.float32))
            records.append({
                "id": sample_id(i),
                "hr": up["hr"], "lr": up["lr"], "sr": up["sr"], "syn": sp["syn"], "mask": sp["mask"],
                "map_syn": sp["map_syn"], "map_sr": up["map_sr"],
                "sr_family": meta["sr_family"], "mask_kind": mask_params[k]["kind"],
                "mask_area": round(float(mask[k].mean()), 6),
                "seed": cfg.seed, "unit": u,
                "photo": meta["photo"], "crop_box": meta["crop_box"], "crop_texture": meta["crop_texture"],
                "hflip": meta["hflip"], "vflip": meta["vflip"],
                "scale": cfg.scale, "degradation": meta["degradation"],
                "sr_kind": meta["sr_kind"], "sr_params": meta["sr_params"], "mask_params": mask_params[k],
                "map_syn_mean": round(float(map_syn[k].mean()), 6),
                "map_syn_max": round(float(map_syn[k].max()), 6),
            })
        return records


def _families(cfg: BuildConfig, extra: tuple[SRFamily, ...]) -> list[SRFamily]:
    fams = resolve_families(list(cfg.families), cfg.scale) if cfg.families else []
    fams = [f for f in fams if f.name not in {e.name for e in extra}] + list(extra)
    if not fams:
        raise ValueError("no SR family selected")
    return fams


# Worker processes: one UnitBuilder each, made once by the initializer.
_WORKER: UnitBuilder | None = None
_PARENT_POLL_S = 0.25


def _exit_with_parent(parent: int) -> None:
    """Exit this process (status 1) within ``_PARENT_POLL_S`` seconds of its parent ``parent`` dying.

    A build killed with ``kill -9`` cannot shut its pool down, and its workers (~450 MB each) would
    otherwise live on as orphans. A daemon thread polls ``os.getppid()``, which changes when the
    parent dies on Linux and macOS. (Linux's ``PR_SET_PDEATHSIG`` is not used: it fires when the
    *thread* that started the worker ends, and the pool may start workers from a helper thread.)
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _init_worker(cfg: BuildConfig, photos: list[Photo], out: str, device: str, threads: int, parent: int) -> None:
    global _WORKER
    _exit_with_parent(parent)  # first: loading the models below takes seconds
    torch.set_num_threads(threads)
    _WORKER = UnitBuilder(cfg, photos, Path(out), device)


def _run_unit(u: int, indices: list[int]) -> list[dict]:
    assert _WORKER is not None
    return _WORKER.build(u, indices)


# ----------------------------------------------------------------------------------------------
# The build: plan, resume, run, finalise
# ----------------------------------------------------------------------------------------------


@dataclass
class BuildReport:
    """What a build did. ``complete`` means the shard's share of ``num`` samples is all there."""

    out: Path
    requested: int
    done: int
    built_now: int
    failed_units: list[dict]
    skipped_photos: list[dict]
    photos_used: int
    seconds: float
    complete: bool


def _cut_torn_line(out: Path) -> None:
    """Cut the bytes after the last newline of ``out/manifest.jsonl`` (a line torn by a killed
    build, which :func:`~finpercep.data.dataset.read_manifest` ignores), so appends continue on a
    clean line; the sample it described has no line, so it is rebuilt, identically."""
    path = Path(out) / MANIFEST
    if not path.exists():
        return
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        log.warning("dropping a torn last line from %s (an interrupted build)", path)
        with _writing(path), open(path, "r+b") as f:
            f.truncate(cut)


def parse_shard(spec: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like I/N (e.g. 0/4), got {spec!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard I/N needs 0 <= I < N, got {spec!r}")
    return i, n


def _check_compatible(out: Path, cfg: BuildConfig, shard: tuple[int, int]) -> None:
    """Refuse to resume into a folder built with different content settings (num may grow)."""
    path = out / BUILD_JSON
    if not path.exists():
        return
    old = json.loads(path.read_text())
    new = {"config": cfg.to_json(), "shard": list(shard)}
    old_c = {k: v for k, v in old.get("config", {}).items() if k != "num"}
    new_c = {k: v for k, v in new["config"].items() if k != "num"}
    diff = sorted(k for k in set(old_c) | set(new_c) if old_c.get(k) != new_c.get(k))
    if old.get("shard") != new["shard"]:
        diff.append("shard")
    if diff:
        raise ValueError(
            f"{out} holds a build with other settings ({', '.join(diff)} differ); "
            "resume with the same arguments or choose a new --out"
        )


def build_dataset(
    images: str | Path,
    out: str | Path,
    cfg: BuildConfig,
    *,
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    device: str = "cpu",
    extra_families: tuple[SRFamily, ...] = (),
    progress: bool = True,
) -> BuildReport:
    """Build (or resume, or extend) a data set in ``out``. See the module docstring.

    ``workers`` > 1 runs units in that many processes. Every unit computes with one torch thread,
    so the bytes written do not depend on ``workers``. ``extra_families``
    adds user SR families (:func:`finpercep.data.sr_zoo.user_family`); they only work with
    ``workers == 1`` since a Python callable is not sent to other processes.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if extra_families and workers != 1:
        raise ValueError("user SR families (Python callables) need workers=1")
    si, sn = shard
    photos, skipped = scan_photos(Path(images), cfg.crop, progress=progress)
    if not photos:
        raise ValueError(f"no usable photo in {images} (need images at least {cfg.crop}x{cfg.crop}; "
                         f"{len(skipped)} skipped)")
    with _writing(out):
        out.mkdir(parents=True, exist_ok=True)
    _check_compatible(out, cfg, shard)
    _put(save_json, out / BUILD_JSON, {"config": cfg.to_json(), "shard": [si, sn],
                                       "extra_families": [f.name for f in extra_families],
                                       "photos": [p.rel for p in photos]})

    done = {r["id"] for r in read_manifest(out)}
    _cut_torn_line(out)
    todo: dict[int, list[int]] = {}
    for u in range(si, cfg.num_units, sn):
        idx = [i for i in range(u * cfg.masks_per_sr, min((u + 1) * cfg.masks_per_sr, cfg.num))
               if sample_id(i) not in done]
        if idx:
            todo[u] = idx
    share = sum(len(range(u * cfg.masks_per_sr, min((u + 1) * cfg.masks_per_sr, cfg.num)))
                for u in range(si, cfg.num_units, sn))
    n_todo = sum(len(v) for v in todo.values())
    if done:
        log.info("resuming %s: %d samples already there, %d to build", out, share - n_todo, n_todo)

    failed: list[dict] = []
    built = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=share, initial=share - n_todo, desc=f"building {out.name}", unit="sample")
    try:
        with _writing(out / MANIFEST), open(out / MANIFEST, "a", encoding="utf-8") as manifest:

            def commit(records: list[dict]) -> None:
                nonlocal built
                for r in records:
                    manifest.write(json.dumps(r, sort_keys=True) + "\n")
                manifest.flush()
                os.fsync(manifest.fileno())
                built += len(records)
                if bar:
                    bar.update(len(records))

            if workers == 1 or len(todo) <= 1:
                _build_here(UnitBuilder(cfg, photos, out, device, extra_families) if todo else None,
                            todo, commit, failed)
            else:
                _build_in_workers(cfg, photos, out, device, workers, todo, commit, failed)
    finally:
        if bar:
            bar.close()

    records = read_manifest(out)
    mine = {sample_id(i) for u in range(si, cfg.num_units, sn)
            for i in range(u * cfg.masks_per_sr, min((u + 1) * cfg.masks_per_sr, cfg.num))}
    records = sorted({r["id"]: r for r in records if r["id"] in mine}.values(), key=lambda r: r["id"])
    complete = len(records) == len(mine)
    if complete:
        _write_sorted_manifest(out, records)
        _put(save_json, out / DATASET_JSON, dataset_info(cfg, shard, records, skipped, photos, extra_families))
    seconds = time.perf_counter() - t0
    _put(save_json, out / "build_stats.json", {"seconds_last_run": round(seconds, 2), "built_last_run": built,
                                               "workers": workers, "failed_units": failed})
    return BuildReport(out, len(mine), len(records), built, failed, skipped, len(photos), seconds, complete)


def _build_here(builder: UnitBuilder | None, todo: dict[int, list[int]],
                commit: Callable[[list[dict]], None], failed: list[dict]) -> None:
    """Build the units ``todo`` (unit -> sample indices) in this process, committing each.

    A unit that fails is logged and appended to ``failed``; a :class:`WriteError` stops the build.
    """
    # Units always compute with one torch thread: float results can depend on the thread count,
    # and a data set must not depend on --workers.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for u, idx in todo.items():
            assert builder is not None
            try:
                records = builder.build(u, idx)
            except WriteError:
                raise
            except Exception as e:  # noqa: BLE001 - report and carry on with other units
                log.error("unit %d failed: %s: %s", u, type(e).__name__, e, exc_info=log.isEnabledFor(logging.INFO))
                failed.append({"unit": u, "error": f"{type(e).__name__}: {e}"})
                continue
            commit(records)
    finally:
        torch.set_num_threads(threads)


def _build_in_workers(cfg: BuildConfig, photos: list[Photo], out: Path, device: str, workers: int,
                      todo: dict[int, list[int]], commit: Callable[[list[dict]], None], failed: list[dict]) -> None:
    """:func:`_build_here` with the units spread over ``workers`` processes (one torch thread each).

    The workers exit if this process dies (:func:`_exit_with_parent`). On a :class:`WriteError` the
    units not started yet are cancelled; the running ones finish (or fail) first.
    """
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(cfg, photos, str(out), device, 1, os.getpid())) as pool:
        pending = {pool.submit(_run_unit, u, idx): u for u, idx in todo.items()}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                u = pending.pop(fut)
                try:
                    records = fut.result()
                except WriteError:
                    for other in pending:
                        other.cancel()
                    raise
                except Exception as e:  # noqa: BLE001 - report and carry on with other units
                    log.error("unit %d failed: %s: %s", u, type(e).__name__, e)
                    failed.append({"unit": u, "error": f"{type(e).__name__}: {e}"})
                    continue
                commit(records)


def _write_sorted_manifest(out: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    _put(atomic_write_bytes, out / MANIFEST, text.encode())


def dataset_info(cfg: BuildConfig, shard: tuple[int, int], records: list[dict], skipped: list[dict],
                 photos: list[Photo], extra: tuple[SRFamily, ...] = ()) -> dict:
    """The ``dataset.json`` of a finished build: config, version and counts (no timings: byte-stable)."""
    fams: dict[str, int] = {}
    kinds: dict[str, int] = {}
    for r in records:
        fams[r["sr_family"]] = fams.get(r["sr_family"], 0) + 1
        kinds[r["mask_kind"]] = kinds.get(r["mask_kind"], 0) + 1
    return {
        "format": "finpercep-fgr/1",
        "finpercep_version": finpercep.__version__,
        "config": cfg.to_json(),
        "shard": list(shard),
        "extra_families": [f.name for f in extra],
        "num_samples": len(records),
        "per_family": dict(sorted(fams.items())),
        "per_mask_kind": dict(sorted(kinds.items())),
        "photos": [p.rel for p in photos],
        "skipped_photos": skipped,
    }


def merge_datasets(parts: list[str | Path], out: str | Path, *, link: bool = True) -> int:
    """Join finished shard folders (``--shard I/N`` builds) into one data set in ``out``.

    Files are hard-linked when possible (copied otherwise). All parts must come from the same config;
    the union of all N shards equals an unsharded build byte for byte. Returns the sample count.
    Every part's manifest is checked before anything is written: a path that leaves its part
    (``ValueError``) or a missing file (``FileNotFoundError``) stops the merge with nothing written.
    A failed write raises :class:`WriteError`; rerunning the merge continues it.
    """
    out = Path(out)
    infos = []
    for p in parts:
        p = Path(p)
        if not (p / DATASET_JSON).exists():
            raise FileNotFoundError(f"{p} is not a finished data set (no {DATASET_JSON}); finish its build first")
        infos.append((p, json.loads((p / DATASET_JSON).read_text())))
    cfgs = {json.dumps(i["config"], sort_keys=True) for _, i in infos}
    if len(cfgs) != 1:
        raise ValueError("the parts were built with different configs; only shards of one build can be merged")
    shards = sorted(tuple(i["shard"]) for _, i in infos)
    n = shards[0][1]
    if len(set(shards)) != len(shards):
        raise ValueError(f"the same shard appears twice among the parts: {shards}")
    by_id: dict[str, dict] = {}
    files: dict[Path, Path] = {}  # relative path -> source file
    for p, _ in infos:
        for r in read_manifest(p, required=PATH_KEYS):
            for key in PATH_KEYS:
                src = sample_file(p, r, key)
                if not src.is_file():
                    raise FileNotFoundError(f"{src}: listed by {p / MANIFEST} (sample {r['id']}) but missing; "
                                            "finish or rebuild that part")
                files.setdefault(src.relative_to(p), src)
            by_id[r["id"]] = r
        for meta in (p / "units").rglob("*_meta.json"):  # unit meta files travel too (resume, provenance)
            if not meta.is_symlink():
                files.setdefault(meta.relative_to(p), meta)
    for rel, src in files.items():
        if not (out / rel).exists():
            _link_or_copy(src, out / rel, link)
    records = sorted(by_id.values(), key=lambda r: r["id"])
    _write_sorted_manifest(out, records)
    cfg = BuildConfig.from_json(infos[0][1]["config"])
    full = [s[0] for s in shards] == list(range(n))
    info = dataset_info(cfg, (0, 1), records, infos[0][1]["skipped_photos"], [])
    info["photos"] = infos[0][1]["photos"]
    if not full:  # some shards still missing: say which are here
        info["shard"] = None
        info["merged_from"] = [list(s) for s in shards]
    _put(save_json, out / DATASET_JSON, info)
    if full:
        _put(save_json, out / BUILD_JSON, {"config": cfg.to_json(), "shard": [0, 1], "extra_families": [],
                                           "photos": info["photos"]})
    return len(records)


def _link_or_copy(src: Path, dst: Path, link: bool) -> None:
    """Hard-link ``src`` as ``dst`` when ``link`` and possible, else copy it; raises :class:`WriteError`."""
    with _writing(dst):
        dst.parent.mkdir(parents=True, exist_ok=True)
        if link:
            try:
                os.link(src, dst)
                return
            except OSError:
                pass  # another file system, or no hard links: copy
        shutil.copyfile(src, dst)
