"""The reward-model benchmark ("how good, measured"): pure pieces and the loop.

``benchmarks/rm_eval.py`` is the command-line shell; everything it reports is computed here:

1. **Map quality** of every stage with a map: pixel AUROC and average precision of ``M(I_syn)``
   against the swap mask ``B``, MAE against ``M_gt`` (the data set's ``map_syn``) and IoU of
   ``M >= 0.5`` with ``B``, pooled over all pixels of all samples of a family group
   (:class:`MapStats`).
2. **Ordering accuracy** ``S_HR > S_syn > S_SR`` per triplet (the ranking loss ``L_rank`` of arXiv 2512.22647).
3. **Local sensitivity**, the paper's core claim: an artifact of exactly ``a`` of the image area
   (``a`` in 1 %, 3 %, 10 %) is swapped into the clean HR crop from the sample's own SR output
   (``I = B * I_SR + (1 - B) * I_HR``, arXiv 2512.22647, Sec. 2, quantised to 8 bits as in the data
   set: :func:`finpercep.data.dataset.swap`); the fraction of crops whose score drops below the
   clean crop's (:func:`exact_area_mask`).
4. **Speed and memory** of score + map at 512x512 against a ShiftTolerant-LPIPS AlexNet pass on a
   512x512 pair, each measured in a fresh subprocess (:func:`measure_speed`).

Every scorer is a callable ``(B, 3, H, W) in [0, 1] -> (score (B,) higher = better, map (B, 1, H, W)
or None)``: a FinPercep-RM stage (:func:`rm_scorer`) or a classic no-reference metric negated so
that higher is better (:func:`classic_scorer`). Forward passes are shared: per HR crop one batch
``[HR, SR, syn_1 .. syn_k, local_1 .. local_m]`` goes through each scorer once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finpercep.metrics import (
    DEFAULT_IOU_THRESHOLD,
    average_precision,
    drop_fraction,
    order_accuracy,
    pixel_auroc,
)

log = logging.getLogger(__name__)

ScoreFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
"""``fn(x (B, 3, H, W) in [0, 1]) -> (score (B,) float, higher = better; map (B, 1, H, W) or None)``."""

SENSITIVITY_AREAS: tuple[float, ...] = (0.01, 0.03, 0.10)
"""Artifact areas of the local-sensitivity test."""

CLASSIC_METRICS: dict[str, str] = {"niqe": "NIQE", "brisque": "BRISQUE", "piqe": "PIQE"}
"""Classic no-reference baselines (keys of ``finpercep.baselines.METRICS``) -> display name."""

FAMILY_KINDS: tuple[str, ...] = ("real", "interpolation", "procedural", "negative", "user")
"""``SRFamily.kind`` values, the groups of the per-kind breakdowns."""

GT_REFERENCE = "M_gt (reference)"
"""Map-quality row of the data set's own ``map_syn`` used as the prediction: how well the
ground-truth map itself finds the swap mask (an upper reference for AUROC / AP / IoU; its MAE is
0 by definition). Swapped regions where the SR output hardly differs from HR are invisible to it."""

DEFAULT_HELD_OUT: tuple[str, ...] = ("realsr", "seams")
"""Families the embedded recipe leaves out of training (``configs/rm_embedded.yaml``)."""

# The reward model's targets (issue #11, "FinPercep-RM v2"): (name, must reach, goal); None = no goal.
# Scores and fractions are "higher is better" except the speed ratio.
TARGET_HELD_OUT_AUROC = (0.90, 0.95)
TARGET_WORST_FAMILY_AUROC = (0.75, 0.90)
TARGET_ORDER_ACCURACY = (0.90, 0.95)
TARGET_DROP = {0.01: (0.85, 0.95), 0.03: (0.92, 0.98)}
TARGET_GAIN_OVER_RM0 = 0.05
"""Local drop fraction of the final stage minus RM_0's, at 1 % and 3 % area (must reach; the paper's
thesis: the fine-grained stages are more sensitive to a small local defect than the global one)."""
TARGET_SPEED_RATIO = 0.5
BUSY_LOAD = 1.0
"""1-minute load average before a speed measurement from which the report warns that the machine
was busy (the measuring subprocess itself is not running yet at that point)."""


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class BenchConfig:
    """What the benchmark measures and how much of it."""

    held_out: tuple[str, ...] = DEFAULT_HELD_OUT
    """SR families left out of training: map quality, ordering and sensitivity are reported for
    them and for the other ("seen") families separately."""
    max_samples: int = 256
    """At most this many test triplets, evenly spaced over the manifest (all when fewer)."""
    max_crops: int = 128
    """At most this many distinct HR crops (units) get the local-sensitivity test, evenly spaced
    over the crops of the selected samples."""
    areas: tuple[float, ...] = SENSITIVITY_AREAS
    """Artifact areas of the local-sensitivity test, fractions of the image in (0, 0.9]."""
    pixels_per_image: int = 16384
    """Pixels per sample entering the pooled AUROC / AP (uniform, without replacement, the same
    pixels for every model); 0 or >= H*W = all pixels. MAE and IoU always use all pixels."""
    iou_threshold: float = DEFAULT_IOU_THRESHOLD
    """Threshold on the map for IoU (the map's own decision boundary, ``logit >= 0``)."""
    seed: int = 0
    """Root seed of the pixel subsample and the sensitivity masks."""

    def __post_init__(self) -> None:
        if self.max_samples < 1 or self.max_crops < 0:
            raise ValueError(f"max_samples must be >= 1 and max_crops >= 0, got {self.max_samples}, {self.max_crops}")
        if not self.areas or any(not 0 < a <= 0.9 for a in self.areas):
            raise ValueError(f"areas must be fractions in (0, 0.9], got {self.areas}")
        if self.pixels_per_image < 0:
            raise ValueError(f"pixels_per_image must be >= 0 (0 = all), got {self.pixels_per_image}")
        if not 0.0 <= self.iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in [0, 1], got {self.iou_threshold}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


# ---------------------------------------------------------------------------------------------
# Scorers


def rm_scorer(model: torch.nn.Module) -> ScoreFn:
    """A FinPercep-RM as a scorer: its score (higher = better) and map (``None`` at stage 0),
    without gradients, on the model's device; outputs returned on the CPU as float32."""
    param = next(model.parameters())

    def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        with torch.no_grad():
            out = model(x.to(device=param.device, dtype=param.dtype))
        m = None if out.map is None else out.map.float().cpu()
        return out.score.float().cpu(), m

    return fn


def classic_scorer(name: str) -> ScoreFn:
    """A classic no-reference metric (key of ``finpercep.baselines.METRICS``) as a scorer, its raw
    value negated when lower is better, so that higher = better for every scorer. No map."""
    from finpercep.baselines import METRICS

    if name not in METRICS:
        raise ValueError(f"unknown baseline {name!r}; known: {sorted(METRICS)}")
    info = METRICS[name]
    if info.needs_reference:
        raise ValueError(f"{name} needs a reference image; the benchmark compares no-reference scorers")
    metric = info.create()
    sign = 1.0 if info.higher_is_better else -1.0

    def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        try:
            raw = metric(x)
        except ValueError as e:
            # e.g. NIQE on crops smaller than two 96x96 blocks: undefined here, not a benchmark
            # failure; NaN scores are left out of every summary and counted as undefined.
            log.warning("%s undefined for a batch of shape %s: %s", name, tuple(x.shape), e)
            return torch.full((x.shape[0],), math.nan), None
        return sign * raw.float(), None

    return fn


# ---------------------------------------------------------------------------------------------
# Samples, groups, artifacts


def select_evenly(n: int, k: int) -> list[int]:
    """``min(k, n)`` indices in ``range(n)`` spread evenly (first index 0), increasing, distinct."""
    if n < 0 or k < 0:
        raise ValueError(f"select_evenly needs n, k >= 0, got {n}, {k}")
    if k >= n:
        return list(range(n))
    return [int(i * n // k) for i in range(k)]


def family_kind(record: dict[str, Any]) -> str:
    """The ``SRFamily.kind`` of a manifest record (``sr_kind``; looked up in the SR zoo for
    manifests without it; ``"user"`` for unknown names)."""
    kind = record.get("sr_kind")
    if isinstance(kind, str) and kind:
        return kind
    from finpercep.data.sr_zoo import sr_families

    fam = sr_families().get(record["sr_family"])
    return fam.kind if fam is not None else "user"


def group_names(family: str, kind: str, held_out: Sequence[str]) -> tuple[str, ...]:
    """The report groups a sample belongs to: ``all``, ``held-out`` or ``seen``, and its kind."""
    return ("all", "held-out" if family in held_out else "seen", kind)


def exact_area_bounds(area: float, n_pixels: int) -> tuple[float, float]:
    """Area bounds for :func:`finpercep.data.masks.make_mask` that admit exactly one pixel count,
    ``round(area * n_pixels)`` (at least 1): ``(area, area)`` itself admits none unless
    ``area * n_pixels`` is an integer. The bounds are widened by one float ulp on each side so that
    rounding inside ``make_mask`` cannot exclude that count; no other count fits in them."""
    if not 0 < area <= 0.9 or n_pixels < 1:
        raise ValueError(f"exact_area_bounds: area must be in (0, 0.9] and n_pixels >= 1, got {area}, {n_pixels}")
    frac = max(1, round(area * n_pixels)) / n_pixels
    return math.nextafter(frac, 0.0), math.nextafter(frac, 1.0)


def exact_area_mask(hr: torch.Tensor, area: float, rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
    """A blob swap mask ``(H, W)`` in {0, 1} of exactly ``round(area * H * W)`` pixels
    (``make_mask("blob", ...)``, see :func:`exact_area_bounds`), and its params."""
    from finpercep.data.masks import make_mask

    h, w = hr.shape[-2:]
    return make_mask("blob", hr, rng, area=exact_area_bounds(area, h * w))


def pixel_subsample(n_pixels: int, k: int, rng: np.random.Generator) -> np.ndarray | None:
    """Sorted flat indices of ``k`` pixels drawn uniformly without replacement, or ``None`` (all
    pixels) when ``k == 0`` or ``k >= n_pixels``."""
    if k == 0 or k >= n_pixels:
        return None
    return np.sort(rng.choice(n_pixels, size=k, replace=False))


# ---------------------------------------------------------------------------------------------
# Map statistics, pooled over images


@dataclass
class MapStats:
    """Pooled map-quality statistics of a set of images.

    AUROC and AP need every pooled value at once, so they use a uniform pixel subsample per image
    (``values``, ``labels``); MAE and IoU are exact sums over all pixels. ``summary()`` gives
    ``pixel_auroc``, ``average_precision``, ``mae`` (``mean |M - M_gt|``), ``iou`` (``M >= t`` vs
    ``B``, pooled intersection over pooled union, as :func:`finpercep.metrics.iou_at` on the
    concatenation of all images), and the counts.
    """

    threshold: float = DEFAULT_IOU_THRESHOLD
    values: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    abs_err_sum: float = 0.0
    n_pixels: int = 0
    intersection: int = 0
    union: int = 0
    n_images: int = 0

    def add(self, pred: torch.Tensor, mask: torch.Tensor, gt: torch.Tensor, idx: np.ndarray | None) -> None:
        """One image: ``pred`` the model's map, ``mask`` the swap mask B ({0, 1}), ``gt`` M_gt, all
        ``H x W`` (any leading singleton dims); ``idx`` flat pixel indices for AUROC / AP or None = all."""
        p = pred.detach().reshape(-1).double().cpu().numpy()
        b = mask.detach().reshape(-1).cpu().numpy() > 0.5
        g = gt.detach().reshape(-1).double().cpu().numpy()
        if not p.size == b.size == g.size:
            raise ValueError(f"MapStats.add: sizes differ: map {p.size}, mask {b.size}, gt {g.size}")
        if not np.isfinite(p).all():
            raise ValueError("MapStats.add: the map holds NaN or infinite values")
        self.abs_err_sum += float(np.abs(p - g).sum())
        self.n_pixels += p.size
        hit = p >= self.threshold
        self.intersection += int((hit & b).sum())
        self.union += int((hit | b).sum())
        self.n_images += 1
        sel = slice(None) if idx is None else idx
        self.values.append(p[sel].astype(np.float32))
        self.labels.append(b[sel])

    @staticmethod
    def merge(parts: Sequence["MapStats"], threshold: float = DEFAULT_IOU_THRESHOLD) -> "MapStats":
        """The statistics of the union of ``parts`` (all with the same threshold)."""
        out = MapStats(threshold=threshold)
        for s in parts:
            if s.threshold != threshold:
                raise ValueError(f"MapStats.merge: thresholds differ ({s.threshold} vs {threshold})")
            out.values += s.values
            out.labels += s.labels
            out.abs_err_sum += s.abs_err_sum
            out.n_pixels += s.n_pixels
            out.intersection += s.intersection
            out.union += s.union
            out.n_images += s.n_images
        return out

    def summary(self) -> dict[str, Any]:
        """Pooled metrics (``None`` where undefined: no images, or one class only)."""
        res: dict[str, Any] = {"n_images": self.n_images, "n_pixels": self.n_pixels,
                               "n_pixels_ranked": int(sum(v.size for v in self.values)),
                               "pixel_auroc": None, "average_precision": None, "mae": None, "iou": None}
        if self.n_images == 0:
            return res
        res["mae"] = self.abs_err_sum / self.n_pixels
        res["iou"] = 1.0 if self.union == 0 else self.intersection / self.union
        v, y = np.concatenate(self.values), np.concatenate(self.labels)
        if 0 < int(y.sum()) < y.size:
            res["pixel_auroc"] = pixel_auroc(v, y)
            res["average_precision"] = average_precision(v, y)
        return res


# ---------------------------------------------------------------------------------------------
# Score aggregation (pure functions of the per-sample records)


def _finite_rows(rows: Sequence[Sequence[float]]) -> np.ndarray:
    a = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
    return a[np.isfinite(a).all(axis=1)]


def ordering_summary(triplets: Sequence[dict], scorer: str, group: str) -> dict[str, Any]:
    """Ordering accuracy ``S_HR > S_syn > S_SR`` of ``scorer`` over the triplets of ``group``.

    ``triplets``: records with ``groups`` and ``scores[scorer] = {"hr", "syn", "sr"}``. Triplets
    where the scorer gave a non-finite value (e.g. NIQE on a textureless crop) are left out and
    counted in ``n_undefined``. ``accuracy`` is ``None`` when no triplet is left.
    """
    rows = [[t["scores"][scorer][k] for k in ("hr", "syn", "sr")] for t in triplets if group in t["groups"]]
    ok = _finite_rows(rows) if rows else np.zeros((0, 3))
    acc = order_accuracy(ok[:, 0], ok[:, 1], ok[:, 2]) if len(ok) else None
    return {"accuracy": acc, "n": len(ok), "n_undefined": len(rows) - len(ok)}


def drop_summary(crops: Sequence[dict], scorer: str, group: str, area: float) -> dict[str, Any]:
    """Fraction of the crops of ``group`` whose ``scorer`` score with an artifact of ``area`` is
    strictly below the clean crop's (:func:`finpercep.metrics.drop_fraction`). ``crops``:
    records with ``groups`` and ``scores[scorer] = {"clean": s, "local": {area_key: s}}``."""
    key = area_key(area)
    rows = [[c["scores"][scorer]["clean"], c["scores"][scorer]["local"][key]] for c in crops if group in c["groups"]]
    ok = _finite_rows(rows) if rows else np.zeros((0, 2))
    frac = drop_fraction(ok[:, 0], ok[:, 1]) if len(ok) else None
    return {"drop_fraction": frac, "n": len(ok), "n_undefined": len(rows) - len(ok)}


def area_key(area: float) -> str:
    """JSON key of an artifact area: ``0.03 -> "3%"``."""
    return f"{area * 100:g}%"


# ---------------------------------------------------------------------------------------------
# The evaluation loop


@dataclass
class BenchData:
    """The raw results of :func:`evaluate`; :func:`build_report` turns them into the reported numbers."""

    triplets: list[dict]
    """Per test sample: ``id``, ``unit``, ``family``, ``kind``, ``groups``, ``scores[scorer]``."""
    crops: list[dict]
    """Per sensitivity crop: ``unit``, ``family``, ``kind``, ``groups``, ``areas`` (actual),
    ``scores[scorer] = {"clean", "local": {"1%": .., ..}}``."""
    maps: dict[str, dict[str, MapStats]]
    """``maps[scorer][family]``: map statistics per SR family, for scorers with a map, and for
    :data:`GT_REFERENCE` (last)."""
    seconds: dict[str, float]
    """Wall time per scorer (forward passes) and for data loading / masks."""

    def map_summary(self, scorer: str, families: Sequence[str], threshold: float) -> dict[str, Any]:
        parts = [s for f, s in self.maps.get(scorer, {}).items() if f in set(families)]
        return MapStats.merge(parts, threshold).summary()


def evaluate(
    dataset_root: str | Path,
    scorers: dict[str, ScoreFn],
    cfg: BenchConfig = BenchConfig(),
    on_unit: Callable[[int, int], None] | None = None,
) -> BenchData:
    """Run every scorer over the selected test samples and sensitivity crops of an FGR data set.

    ``scorers``: display name -> :data:`ScoreFn`, in report order. Per HR crop (unit) one batch
    ``[HR, SR, syn of its selected samples, local swaps at cfg.areas]`` goes through each scorer
    once: HR and SR scores are shared by the unit's triplets and are the clean scores of the
    sensitivity test. ``on_unit(done, total)`` is called after each unit (progress display).
    """
    from finpercep.data.dataset import TRIPLET_KEYS, FGRDataset, swap

    ds = FGRDataset(dataset_root, keys=TRIPLET_KEYS)
    if len(ds) == 0:
        raise ValueError(f"{dataset_root}: the test data set has no samples")
    chosen = select_evenly(len(ds), cfg.max_samples)
    units: dict[str, list[int]] = {}  # HR path -> selected sample indices, in manifest order
    for i in chosen:
        units.setdefault(ds.records[i]["hr"], []).append(i)
    unit_list = list(units)
    sens_units = {unit_list[j] for j in select_evenly(len(unit_list), cfg.max_crops)}

    triplets: list[dict] = []
    crops: list[dict] = []
    if GT_REFERENCE in scorers:
        raise ValueError(f"scorer name {GT_REFERENCE!r} is reserved for the ground-truth reference row")
    maps: dict[str, dict[str, MapStats]] = {name: {} for name in scorers}
    maps[GT_REFERENCE] = {}
    seconds = {name: 0.0 for name in scorers} | {"data": 0.0}

    for u_idx, hr_path in enumerate(unit_list):
        t0 = time.perf_counter()
        samples = ds.load_triplets(units[hr_path])  # k triplets sharing one HR crop and SR output
        recs = [ds.records[i] for i in units[hr_path]]
        rec0 = recs[0]
        hr, sr = samples.hr[:1], samples.sr[:1]  # (1, 3, H, W)
        family, kind = rec0["sr_family"], family_kind(rec0)
        groups = group_names(family, kind, cfg.held_out)
        unit_id = int(rec0.get("unit", u_idx))
        local, local_areas = [], {}
        if hr_path in sens_units:
            for a_idx, area in enumerate(cfg.areas):
                rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, unit_id, a_idx, 1]))
                mask, params = exact_area_mask(hr[0], area, rng)
                local.append(swap(hr, sr, mask[None, None]))
                local_areas[area_key(area)] = params["area"]
        batch = torch.cat([hr, sr, samples.syn, *local])  # (2 + k + m, 3, H, W)
        n_syn = len(samples)
        pix_idx = [pixel_subsample(hr.shape[-2] * hr.shape[-1], cfg.pixels_per_image,
                                   np.random.default_rng(np.random.SeedSequence([cfg.seed, i, 2])))
                   for i in units[hr_path]]
        seconds["data"] += time.perf_counter() - t0

        unit_triplets = [{"id": r["id"], "unit": unit_id, "family": family, "kind": kind,
                          "groups": list(groups), "mask_area": r.get("mask_area"), "scores": {}}
                         for r in recs]
        crop = {"unit": unit_id, "family": family, "kind": kind, "groups": list(groups),
                "areas": local_areas, "scores": {}} if local else None
        for name, fn in scorers.items():
            t0 = time.perf_counter()
            score, m = fn(batch)
            seconds[name] += time.perf_counter() - t0
            s = [float(v) for v in score]
            for k, trip in enumerate(unit_triplets):
                trip["scores"][name] = {"hr": s[0], "syn": s[2 + k], "sr": s[1]}
            if crop is not None:
                crop["scores"][name] = {"clean": s[0], "local": dict(zip(local_areas, s[2 + n_syn:]))}
            if m is not None:
                stats = maps[name].setdefault(family, MapStats(threshold=cfg.iou_threshold))
                for k in range(n_syn):
                    stats.add(m[2 + k], samples.mask[k], samples.map_syn[k], pix_idx[k])
        ref = maps[GT_REFERENCE].setdefault(family, MapStats(threshold=cfg.iou_threshold))
        for k in range(n_syn):
            ref.add(samples.map_syn[k], samples.mask[k], samples.map_syn[k], pix_idx[k])
        triplets += unit_triplets
        if crop is not None:
            crops.append(crop)
        if on_unit is not None:
            on_unit(u_idx + 1, len(unit_list))
    return BenchData(triplets=triplets, crops=crops, maps={k: v for k, v in maps.items() if v}, seconds=seconds)


# ---------------------------------------------------------------------------------------------
# Speed and memory, each in a fresh subprocess


def _maxrss_mib() -> float:
    """Peak resident set size of this process so far, MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``, the memory map's high-water mark, which
    :func:`_reset_peak_rss` resets. ``ru_maxrss`` is the same counter, but in a child started by
    fork + exec it is at least the parent's RSS at the fork (the kernel carries the pre-exec peak
    over), so it is only the fallback elsewhere (KiB on Linux, bytes on macOS).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024.0 if sys.platform != "darwin" else kib / 2**20


def _rss_now_mib() -> float | None:
    """Current resident set size, MiB (Linux ``/proc/self/statm``), or None elsewhere."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux >= 4.0: ``5`` to
    ``/proc/self/clear_refs``). False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class _PeakMemory:
    """Peak RSS growth over a baseline, one phase at a time.

    With a resettable peak (Linux ``VmHWM``): at the start of a phase the peak is reset and the current RSS
    is the baseline; the phase's cost is ``ru_maxrss`` at its end minus that baseline. Without
    (``exact=False``): the baseline is ``ru_maxrss`` at the start, so an earlier higher peak
    (e.g. during the imports) hides the phase's growth, and the numbers are lower bounds.
    """

    def __init__(self) -> None:
        self.exact = _reset_peak_rss() and _rss_now_mib() is not None
        self.start = self._baseline()

    def _baseline(self) -> float:
        now = _rss_now_mib() if self.exact else None
        return now if now is not None else _maxrss_mib()

    def phase(self) -> tuple[float, float]:
        """``(growth of the peak over the phase's baseline MiB, peak MiB)``; starts the next phase."""
        peak = _maxrss_mib()
        growth = max(0.0, peak - self.start)
        if self.exact:
            _reset_peak_rss()
        self.start = self._baseline()
        return growth, peak


def speed_worker(kind: str, checkpoint: str | None, size: int, runs: int, warmup: int,
                 threads: int | None = None) -> dict[str, Any]:
    """Time one network in *this* process (call it in a fresh one, see :func:`measure_speed`).

    ``kind``: ``"rm"`` (FinPercep-RM ``checkpoint``, score + map of one ``size x size`` image) or
    ``"stlpips"`` (ST-LPIPS AlexNet on one ``size x size`` pair). Batch 1, ``torch.no_grad``,
    ``warmup`` untimed passes, then ``runs`` timed ones (``time.perf_counter``). Memory
    (:class:`_PeakMemory`): RSS after the imports; the growth of the peak RSS (``VmHWM``)
    while building the network and input over the RSS after the imports; the growth of the peak
    during the passes over the RSS before them (activations and workspace of one pass); the
    overall peak over the RSS after the imports.
    ``threads``: ``torch.set_num_threads`` first (``None``: torch's default).
    """
    # Import everything first: the memory baseline is the state after the imports, for both kinds.
    from finpercep.baselines import STLPIPS
    from finpercep.reward.api import load_reward

    if threads is not None:
        torch.set_num_threads(threads)
    load_1min = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    mem = _PeakMemory()
    rss_imports = mem.start
    g = torch.Generator().manual_seed(0)
    if kind == "rm":
        net = load_reward(checkpoint)
        x = torch.rand(1, 3, size, size, generator=g)

        def step() -> None:
            out = net(x)
            if net.stage > 0:
                assert out.map is not None and out.map.shape == (1, 1, size, size)

        what = f"FinPercep-RM stage {net.stage}: score" + (" + map" if net.stage > 0 else " only (stage 0 has no map)")
    elif kind == "stlpips":
        net = STLPIPS(net="alex")
        x, y = torch.rand(1, 3, size, size, generator=g), torch.rand(1, 3, size, size, generator=g)

        def step() -> None:
            net(x, y)

        what = "ST-LPIPS AlexNet distance of one pair"
    else:
        raise ValueError(f"speed_worker: kind must be 'rm' or 'stlpips', got {kind!r}")
    model_mib, peak_model = mem.phase()
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            step()
        for _ in range(runs):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1000.0)
    forward_mib, peak_forward = mem.phase()
    return {
        "kind": kind, "what": what, "size": size, "runs": runs, "warmup": warmup,
        "ms_median": float(np.median(times)), "ms_min": float(min(times)), "ms_max": float(max(times)),
        "ms_all": times,
        "rss_after_imports_mib": rss_imports,
        "rss_model_and_input_mib": model_mib,
        "rss_forward_peak_mib": forward_mib,
        "rss_peak_over_imports_mib": max(peak_model, peak_forward) - rss_imports,
        "memory_method": "exact" if mem.exact else "lower_bound",
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_avg_1min_before": load_1min,
    }


def _speed_worker_main() -> None:  # pragma: no cover - runs in the child process
    args = json.loads(sys.argv[1])
    print(json.dumps(speed_worker(**args)))


def measure_speed(checkpoint: str | Path, size: int = 512, runs: int = 20, warmup: int = 3,
                  threads: int | None = None, timeout: float = 900.0) -> dict[str, Any]:
    """FinPercep-RM ``checkpoint`` (score + map) vs ST-LPIPS AlexNet at ``size x size``, each in a
    fresh Python subprocess (so neither inherits the other's allocations or warm caches) with the
    same environment and thread count (``threads``; ``None``: torch's default). The 1-minute load
    average before each is recorded: other busy processes make both slower. Returns
    ``{"rm": .., "stlpips": .., "ratio": rm_ms / stlpips_ms}`` (medians; entries as
    :func:`speed_worker` returns them)."""
    if size < 32 or runs < 1 or warmup < 0:
        raise ValueError(f"measure_speed needs size >= 32, runs >= 1, warmup >= 0; got {size}, {runs}, {warmup}")
    src = str(Path(__file__).resolve().parents[2])  # the folder holding the finpercep package
    env = dict(os.environ)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    code = "from finpercep.eval.rm_benchmark import _speed_worker_main; _speed_worker_main()"
    out: dict[str, Any] = {}
    for kind in ("rm", "stlpips"):
        args = {"kind": kind, "checkpoint": str(checkpoint) if kind == "rm" else None,
                "size": size, "runs": runs, "warmup": warmup, "threads": threads}
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], env=env,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"speed measurement of {kind} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    out["ratio"] = out["rm"]["ms_median"] / out["stlpips"]["ms_median"]
    return out


# ---------------------------------------------------------------------------------------------
# The report: numbers (JSON) and tables (markdown)


def report_groups(triplets: Sequence[dict]) -> list[str]:
    """Groups to report, in order: ``all``, ``held-out``, ``seen``, then the family kinds present."""
    present = {g for t in triplets for g in t["groups"]}
    return ["all", "held-out", "seen"] + [k for k in FAMILY_KINDS if k in present]


def build_report(
    data: BenchData,
    cfg: BenchConfig,
    *,
    final: str,
    global_baselines: Sequence[str],
    speed: dict[str, Any] | None = None,
    setup: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """All reported numbers as one JSON-serialisable dict (the markdown is rendered from it).

    ``final``: the scorer the targets are checked on (RM_N); ``global_baselines``: the scorers it
    must beat "clearly" on local sensitivity (RM_0 and the classic metrics).
    """
    scorers = list(data.triplets[0]["scores"]) if data.triplets else []
    if final not in scorers:
        raise ValueError(f"build_report: final scorer {final!r} is not among the scorers {scorers}")
    groups = report_groups(data.triplets)
    families = sorted({t["family"] for t in data.triplets})
    held = [f for f in families if f in cfg.held_out]
    seen = [f for f in families if f not in cfg.held_out]

    map_quality = {}
    for name in data.maps:
        map_quality[name] = {
            "held-out": data.map_summary(name, held, cfg.iou_threshold),
            "seen": data.map_summary(name, seen, cfg.iou_threshold),
            "all": data.map_summary(name, families, cfg.iou_threshold),
            "per_family": {f: data.map_summary(name, [f], cfg.iou_threshold) for f in families},
        }
    ordering = {name: {g: ordering_summary(data.triplets, name, g) for g in groups} for name in scorers}
    sensitivity = {
        name: {area_key(a): {g: drop_summary(data.crops, name, g, a) for g in groups} for a in cfg.areas}
        for name in scorers
    } if data.crops else {}

    report: dict[str, Any] = {
        "setup": {**(setup or {}), "held_out": list(cfg.held_out), "families_held_out": held, "families_seen": seen,
                  "n_triplets": len(data.triplets), "n_crops": len(data.crops),
                  "config": {"max_samples": cfg.max_samples, "max_crops": cfg.max_crops, "areas": list(cfg.areas),
                             "pixels_per_image": cfg.pixels_per_image, "iou_threshold": cfg.iou_threshold,
                             "seed": cfg.seed},
                  "scorers": scorers, "final": final, "global_baselines": list(global_baselines),
                  "groups": groups},
        "map_quality": map_quality,
        "ordering": ordering,
        "sensitivity": sensitivity,
        "speed": speed,
        "seconds": data.seconds,
        "raw": {"triplets": data.triplets, "crops": data.crops},
    }
    report["targets"] = check_targets(report)
    return report


def _target(
    name: str, value: float | None, must: float, goal: float | None, *, unit: str = "", below: bool = False,
    detail: str = "",
) -> dict[str, Any]:
    """One target row: ``value`` against the must-reach and goal thresholds (``>=``, or ``<=`` when
    ``below``); ``unit`` ``""``, ``"%"`` (a fraction shown in %) or ``"points"`` (a difference of
    fractions shown in percentage points). ``status``: ``goal reached``, ``reached`` (the must-reach
    row), ``not reached`` or ``not measured`` (``value`` None); ``reached``: the must-reach row met."""
    def ok(t: float | None) -> bool:
        return t is not None and value is not None and (value <= t if below else value >= t)

    def show(t: float | None) -> str:
        if t is None:
            return ""
        num = {"%": f"{t * 100:.0f} %", "points": f"{t * 100:+.0f} points"}.get(unit, f"{t:g}")
        return ("<= " if below else ">= ") + num

    status = "not measured" if value is None else "goal reached" if ok(goal) else "reached" if ok(must) else "not reached"
    return {"name": name, "value": value, "unit": unit, "must": show(must), "goal": show(goal),
            "reached": None if value is None else ok(must), "status": status, "detail": detail}


def check_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The reward model's targets (issue #11: :data:`TARGET_HELD_OUT_AUROC` ..), checked on the final
    RM; ``value`` None = not measured. The edit checks and the whole-SR check are
    ``benchmarks/rm_hackability.py``'s (:mod:`finpercep.eval.edit_checks`)."""
    final = report["setup"]["final"]
    out = []
    mq = report["map_quality"].get(final, {})
    auroc = mq.get("held-out", {}).get("pixel_auroc")
    out.append(_target(f"map AUROC vs swap mask, held-out families ({final})", auroc, *TARGET_HELD_OUT_AUROC))
    fams = {f: s["pixel_auroc"] for f, s in mq.get("per_family", {}).items() if s.get("pixel_auroc") is not None}
    worst = min(fams, key=fams.get) if fams else None
    out.append(_target(f"map AUROC, worst single family ({final})", fams.get(worst), *TARGET_WORST_FAMILY_AUROC,
                       detail=f"{worst}" if worst else ""))
    acc = report["ordering"][final]["all"]["accuracy"]
    out.append(_target(f"ordering S_HR > S_syn > S_SR, all families ({final})", acc, *TARGET_ORDER_ACCURACY,
                       unit="%"))

    def drop(name: str, area: float) -> float | None:
        return report["sensitivity"].get(name, {}).get(area_key(area), {}).get("all", {}).get("drop_fraction")

    for area, (must, goal) in TARGET_DROP.items():
        out.append(_target(f"score drops at {area_key(area)} swapped area ({final})", drop(final, area), must, goal,
                           unit="%"))
    base = "RM_0" if "RM_0" in report["ordering"] and final != "RM_0" else None
    for area in TARGET_DROP:
        d, d0 = drop(final, area), drop(base, area) if base else None
        gain = None if d is None or d0 is None else d - d0
        out.append(_target(f"{final} minus RM_0, local drop at {area_key(area)}", gain, TARGET_GAIN_OVER_RM0, None,
                           unit="points", detail="" if d0 is None else f"RM_0 {_fmt(d0, pct=True)}"))
    sp = report.get("speed")
    out.append(_target("score + map time / ST-LPIPS AlexNet pair time (512x512)", sp["ratio"] if sp else None,
                       TARGET_SPEED_RATIO, None, below=True))
    return out


def _fmt(v: float | None, pct: bool = False, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v * 100:.1f} %" if pct else f"{v:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: Sequence[int] = (0,)) -> list[str]:
    """A markdown table; columns in ``left`` left-aligned, the others (numbers) right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i in left else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _fmt_target(t: dict[str, Any]) -> str:
    """A target's measured value in its unit, with its detail (``0.745 (gamma)``, ``68.8 %``, ``-12.3 points``)."""
    v = t["value"]
    val = ("n/a" if v is None else f"{v * 100:+.1f} points") if t["unit"] == "points" else _fmt(v, pct=t["unit"] == "%")
    return val + (f" ({t['detail']})" if t["detail"] else "")


def render_markdown(report: dict[str, Any], command: str) -> str:
    """The results as markdown tables, the command line on top. Every number comes from ``report``."""
    st = report["setup"]
    groups = st["groups"]
    final = st["final"]
    md = ["# Reward-model evaluation", "", f"`{command}`", ""]

    md += ["## Targets", "", "The reward model's targets (issue #11); the edit checks and the whole-SR check are "
           "`benchmarks/rm_hackability.py`'s.", ""]
    rows = [[t["name"], _fmt_target(t), t["must"], t["goal"], f"**{t['status']}**"] for t in report["targets"]]
    md += _table(["target", "measured", "must reach", "goal", "status"], rows, left=(0, 2, 3, 4)) + [""]

    md += ["## Setup", ""]
    md += [f"- test data: `{st.get('test_data', '?')}`, {st['n_triplets']} triplets used of "
           f"{st.get('n_available', '?')} (evenly spaced over the manifest), {st['n_crops']} HR crops for the "
           "local-sensitivity test",
           f"- held-out families (never trained on): {', '.join(st['families_held_out']) or 'none in the test set'}"
           f" (asked: {', '.join(st['held_out'])}); seen families: {', '.join(st['families_seen']) or 'none'}"]
    for k in ("run", "stages", "pixel_only_run", "train_excluded", "torch_threads", "cpu_count",
              "load_avg_1min_at_end", "elapsed_s"):
        if st.get(k) is not None:
            md.append(f"- {k.replace('_', ' ')}: {st[k]}")
    if st.get("family_counts"):
        md.append("- triplets per family: " + ", ".join(f"{f} {n}" for f, n in st["family_counts"].items()))
    cfg = st["config"]
    md += [f"- AUROC and AP pool {cfg['pixels_per_image'] or 'all'} uniformly drawn pixels per sample "
           f"(seed {cfg['seed']}, the same pixels for every model); MAE and IoU use all pixels; IoU of "
           f"`M >= {cfg['iou_threshold']}` with the swap mask", ""]

    md += ["## 1. Map quality of M(I_syn)", "",
           "Against the swap mask B (pixel AUROC, average precision, IoU) and against M_gt, the data set's "
           "`map_syn` (MAE), pooled over all pixels of all samples of a group. The pixel-only variant "
           "was trained towards pixel-difference maps, so its MAE is against a target it did not learn; "
           "its mask metrics compare like with like. The last row scores the data set's own M_gt against the "
           "swap mask: parts of a swap where the SR output hardly differs from HR are invisible even to it.", ""]
    if any(name != GT_REFERENCE for name in report["map_quality"]):
        rows = []
        for name, mq in report["map_quality"].items():
            r = [name]
            for g in ("held-out", "seen"):
                s = mq[g]
                r += [_fmt(s["pixel_auroc"]), _fmt(s["average_precision"]), _fmt(s["mae"]), _fmt(s["iou"])]
            a = mq["held-out"]["pixel_auroc"]
            if name == GT_REFERENCE:
                r.append("(reference)")
            else:
                r.append("n/a" if a is None else ("reached" if a >= TARGET_HELD_OUT_AUROC[0] else "not reached"))
            rows.append(r)
        n_h = next(iter(report["map_quality"].values()))["held-out"]["n_images"]
        n_s = next(iter(report["map_quality"].values()))["seen"]["n_images"]
        md += _table(["model", f"held-out AUROC (n={n_h})", "held-out AP", "held-out MAE", "held-out IoU",
                      f"seen AUROC (n={n_s})", "seen AP", "seen MAE", "seen IoU",
                      f"held-out AUROC >= {TARGET_HELD_OUT_AUROC[0]} (must reach)"], rows) + [""]
        fin = report["map_quality"].get(final)
        if fin:
            md += [f"Per family ({final}):", ""]
            rows = [[f, str(s["n_images"]), _fmt(s["pixel_auroc"]), _fmt(s["average_precision"]), _fmt(s["mae"]),
                     _fmt(s["iou"])] for f, s in fin["per_family"].items()]
            md += _table(["family", "n", "AUROC", "AP", "MAE", "IoU"], rows) + [""]
    else:
        md += ["No model with a map (only stage 0 was found).", ""]

    md += ["## 2. Ordering accuracy S_HR > S_syn > S_SR", "",
           "Strict inequalities; NIQE, BRISQUE and PIQE negated (higher = better). n per group: "
           + ", ".join(f"{g} {report['ordering'][final][g]['n']}" for g in groups) + ".", ""]
    rows = []
    for name, o in report["ordering"].items():
        r = [name] + [_fmt(o[g]["accuracy"], pct=True) for g in groups]
        a = o["all"]["accuracy"]
        r.append("n/a" if a is None else ("reached" if a >= TARGET_ORDER_ACCURACY[0] else "not reached"))
        und = sum(o[g]["n_undefined"] for g in ("all",))
        if und:
            r[0] += f" ({und} undefined, left out)"
        rows.append(r)
    md += _table(["scorer"] + groups + [f"all >= {TARGET_ORDER_ACCURACY[0] * 100:.0f} % (must reach)"], rows) + [""]

    md += ["## 3. Local sensitivity", "",
           "A blob of exactly the given area of the HR crop replaced by the sample's own SR output "
           "(quantised to 8 bits); the fraction of crops whose score drops strictly below the clean crop's.", ""]
    if report["sensitivity"]:
        areas = list(next(iter(report["sensitivity"].values())))
        rows = []
        for name, sv in report["sensitivity"].items():
            r = [name] + [_fmt(sv[a]["all"]["drop_fraction"], pct=True) for a in areas]
            rows.append(r)
        md += _table(["scorer"] + [f"{a} (n={report['sensitivity'][final][a]['all']['n']})" for a in areas], rows) + [""]
        for a in areas:
            md += [f"By family group, {a} area (n: "
                   + ", ".join(f"{g} {report['sensitivity'][final][a][g]['n']}" for g in groups) + "):", ""]
            rows = [[name] + [_fmt(sv[a][g]["drop_fraction"], pct=True) for g in groups]
                    for name, sv in report["sensitivity"].items()]
            md += _table(["scorer"] + groups, rows) + [""]
    else:
        md += ["Not measured (no crops selected).", ""]

    md += ["## 4. Speed and memory", ""]
    sp = report.get("speed")
    if sp:
        rm, lp = sp["rm"], sp["stlpips"]
        md += [f"{rm['size']}x{rm['size']}, batch 1, `torch.no_grad`, {rm['warmup']} warm-up passes, median of "
               f"{rm['runs']} timed passes; torch threads {rm['torch_threads']}, CPU count {rm['cpu_count']}. "
               "Each network in a fresh Python subprocess. Memory: growth of the peak resident set size "
               "(`VmHWM` of `/proc/self/status`, the counter behind `ru_maxrss`, whose value a forked child "
               "inherits from its parent; reset through `/proc/self/clear_refs` at the start of each phase) over "
               "the resident set size at the start of the phase: building the network + input (from the state "
               "after importing torch and finpercep), the forward passes (from the state with network and input "
               "resident), and the overall peak over the state after the imports"
               + ("" if rm.get("memory_method") == "exact" and lp.get("memory_method") == "exact" else
                  " (**peak reset unavailable here: the numbers are lower bounds**)")
               + ". 1-minute load average before each measurement: "
               f"{_fmt(rm.get('load_avg_1min_before'), digits=2)} (RM), {_fmt(lp.get('load_avg_1min_before'), digits=2)} "
               "(ST-LPIPS); above the thread count, other processes competed for the CPU.", ""]
        rows = [[x["what"], f"{x['ms_median']:.1f}", f"{x['ms_min']:.1f} - {x['ms_max']:.1f}",
                 f"{x['rss_model_and_input_mib']:.0f}", f"{x['rss_forward_peak_mib']:.0f}",
                 f"{x['rss_peak_over_imports_mib']:.0f}"] for x in (rm, lp)]
        md += _table(["network", "ms (median)", "ms (min - max)", "MiB model + input", "MiB forward peak",
                      "MiB total over imports"], rows) + [""]
        busy = [x["load_avg_1min_before"] for x in (rm, lp) if (x.get("load_avg_1min_before") or 0) >= BUSY_LOAD]
        if busy:
            md += [f"**Warning:** the machine was busy (1-minute load average up to {max(busy):.1f} before a "
                   "measurement): other processes competed for the cores, so these timings are not "
                   "representative (with several OpenMP threads on shared cores both networks can be many "
                   "times slower and the ratio meaningless); rerun on an idle machine or with `--threads 1`.", ""]
        md += [f"Ratio score + map / ST-LPIPS = {sp['ratio']:.2f} (must reach <= {TARGET_SPEED_RATIO:g}): "
               f"**{'reached' if sp['ratio'] <= TARGET_SPEED_RATIO else 'not reached'}**.", ""]
    else:
        md += ["Not measured (`--no-speed`).", ""]

    secs = report.get("seconds") or {}
    if secs:
        md += ["## Benchmark wall time", "", ", ".join(f"{k} {v:.1f} s" for k, v in secs.items()), ""]
    return "\n".join(md)
