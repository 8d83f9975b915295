"""Swap masks B for the region swap ``I_syn = B * I_SR + (1 - B) * I_GT`` (arXiv 2512.22647, FGR-30k).

The paper builds B from random shapes and from semantic segments (it uses SAM, whose weights
cannot be installed offline). We provide five kinds, all with the same contract
(:data:`MaskFn`), registered in :data:`MASK_KINDS`:

- random shapes: ``blob`` (star-shaped blobs with a smooth random radius), ``ellipse`` (rotated
  ellipses), ``stroke`` (thick random-walk brush strokes);
- semantic regions standing in for SAM: ``superpixel`` (a connected union of SLIC superpixels,
  Achanta et al., TPAMI 2012) and ``segment`` (a connected union of graph-based segments,
  Felzenszwalb & Huttenlocher, IJCV 2004), grown from a random seed segment through its
  neighbours, similar mean colour and compact shape first, so the region follows image content.

The kind functions assume checked inputs; call them through :func:`make_mask`, which validates.

Area control: :func:`make_mask` draws a target area fraction uniformly in ``[lo, hi]`` and the
returned mask's area fraction always lies in ``[lo, hi]``. The random shapes get there exactly:
each one is the ``k`` highest pixels of a score field whose level sets are the shape at every
size (``k`` = the target pixel count). The semantic kinds add whole segments while they fit and
finish, if needed, with the part of the most similar neighbouring segment nearest the region
(or the part of the seed segment nearest a random point when every segment is too large, e.g.
one giant segment on a flat image). A final
signed-distance grow/shrink is a safety net that normally does nothing.

Conventions (``finpercep.types``): images ``(3, H, W)`` float in [0, 1]; masks ``(H, W)``
float32 in {0, 1}; all randomness from the ``numpy.random.Generator`` passed in; every random
choice returned in a JSON-serialisable ``params`` dict.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np
import torch

from finpercep.checks import require
from finpercep.types import Params

if TYPE_CHECKING:
    from scipy import sparse

Bounds = tuple[float, float]  # (lo, hi) bounds on a mask's area fraction
MaskResult = tuple[torch.Tensor, Params]  # (mask (H,W) float32 in {0,1}, params)
# fn(image (3,H,W) in [0,1], rng, (lo, hi)) -> (mask, params)
MaskFn = Callable[[torch.Tensor, np.random.Generator, Bounds], MaskResult]

DEFAULT_AREA: Bounds = (0.03, 0.30)
MAX_AREA = 0.9  # above this the "local" swap is the whole image; refuse it
REF_PIXELS = 256 * 256  # shape and segmentation constants are tuned for 256x256 crops
MAX_SEG_PIXELS = 512 * 512  # larger images are segmented at reduced resolution (speed)
COMPACTNESS = 0.2  # weight of the compactness term in semantic region growth (vs RGB distance)
MAX_STROKES = 6  # cap on brush strokes per mask (large areas otherwise ask for many)
_TIE = 1e-6  # tie-break weight added to integer-ish distance fields (below their spacing)


class _Budget(NamedTuple):
    """Pixel counts allowed for a mask on an image of ``n`` pixels."""

    n: int
    n_lo: int  # smallest allowed count: n_lo / n >= lo
    n_hi: int  # largest allowed count: n_hi / n <= hi
    n_target: int  # the drawn target, clipped into [n_lo, n_hi]
    target: float  # the drawn target fraction in [lo, hi]


# ---------------------------------------------------------------------------------------------
# validation and shared helpers


def _check_area(area: object) -> Bounds:
    """Validate area bounds ``(lo, hi)`` with ``0 < lo <= hi <= MAX_AREA``; return them as floats."""
    try:
        lo, hi = area  # type: ignore[misc]
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise ValueError(f"area must be a pair (lo, hi) of numbers, got {area!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 < lo <= hi <= MAX_AREA):
        raise ValueError(
            f"area bounds must satisfy 0 < lo <= hi <= {MAX_AREA} (fractions of the image), "
            f"got {area!r}"
        )
    return lo, hi


def _check_image(image: object) -> tuple[int, int]:
    """Validate a ``(3, H, W)`` float tensor in [0, 1]; return ``(H, W)``."""
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image must be a torch.Tensor of shape (3, H, W), got {type(image).__name__}")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must have shape (3, H, W) (RGB, channels first), got {tuple(image.shape)}")
    if image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"image is empty: shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"image must be a float tensor in [0, 1], got dtype {image.dtype}")
    arr = _as_numpy(image)  # numpy: torch's small-tensor reductions are slow on a busy CPU
    if not np.isfinite(arr).all():
        raise ValueError("image contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"image values must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    return int(image.shape[1]), int(image.shape[2])


def _as_numpy(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` tensor -> ``(3, H, W)`` numpy array (a view when already on the CPU)."""
    image = image.detach().cpu()
    return (image if image.dtype in (torch.float32, torch.float64) else image.float()).numpy()


def _pixel_range(n: int, lo: float, hi: float) -> tuple[int, int]:
    """Integer pixel counts ``[n_lo, n_hi]`` whose fractions of ``n`` lie in ``[lo, hi]``."""
    n_lo = max(1, math.ceil(lo * n))
    while n_lo / n < lo:  # guard against float rounding in lo * n
        n_lo += 1
    n_hi = math.floor(hi * n)
    while n_hi / n > hi:
        n_hi -= 1
    if n_lo > n_hi:
        raise ValueError(
            f"an image of {n} pixels is too small for area bounds ({lo}, {hi}): no pixel count "
            f"gives a fraction in that range; widen the bounds or use a larger image"
        )
    return n_lo, n_hi


def _draw_budget(shape: tuple[int, int], area: Bounds, rng: np.random.Generator) -> _Budget:
    """Draw the target area fraction uniformly in ``[lo, hi]`` and turn it into pixel counts."""
    n = shape[0] * shape[1]
    n_lo, n_hi = _pixel_range(n, *area)
    target = float(rng.uniform(area[0], area[1]))
    n_target = min(max(round(target * n), n_lo), n_hi)
    return _Budget(n, n_lo, n_hi, n_target, target)


def _top_k(score: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask (same shape as ``score``) of exactly the ``k >= 1`` highest-scoring pixels."""
    flat = score.ravel()
    out = np.zeros(flat.size, dtype=bool)
    out[np.argpartition(-flat, k - 1)[:k]] = True
    return out.reshape(score.shape)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(yy, xx)``, each ``(H, W)`` float64."""
    yy, xx = np.mgrid[0:h, 0:w]
    return yy.astype(np.float64), xx.astype(np.float64)


def _to_tensor(mask: np.ndarray) -> torch.Tensor:
    """Boolean ``(H, W)`` array -> ``(H, W)`` float32 tensor in {0, 1}."""
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))


def _fit_area(mask: np.ndarray, k: int) -> np.ndarray:
    """Grow (dilate) or shrink (erode) a boolean mask to exactly ``k`` pixels.

    Pixels are ranked by signed distance to the mask boundary (negative inside), so the result
    is the mask dilated or eroded to the right size; ties go to pixels nearer the centroid.
    """
    h, w = mask.shape
    yy, xx = _grid(h, w)
    if mask.any() and not mask.all():
        ndimage = require("scipy.ndimage", extra="data")
        cy, cx = yy[mask].mean(), xx[mask].mean()
        signed = ndimage.distance_transform_edt(~mask) - ndimage.distance_transform_edt(mask)
    else:  # nothing to grow from (or nothing to erode towards): use the image centre
        cy, cx = (h - 1) / 2, (w - 1) / 2
        signed = np.zeros(mask.shape)
    to_centre = np.hypot(yy - cy, xx - cx) / math.hypot(h, w)
    return _top_k(-(signed + _TIE * to_centre), k)


def _f(x: float) -> float:
    """A plain, rounded python float for params."""
    return round(float(x), 4)


# ---------------------------------------------------------------------------------------------
# random shapes


def blob_mask(image: torch.Tensor, rng: np.random.Generator, area: Bounds) -> MaskResult:
    """One to three star-shaped blobs with a smooth random radius ``r(theta)``.

    Each blob's radius is ``r * exp(sum_k a_k cos(k theta + phi_k))``, k = 1..5, with amplitudes
    falling as ``k^-1.5`` (a smooth, wobbly outline). The mask is the top-``k`` pixels of
    ``max_i -|x - c_i| / r_i(theta)``, i.e. the union of the blobs, all scaled by one factor so
    the area is exact. Returns ``(mask (H, W) float32 in {0,1}, params)``.
    """
    h, w = int(image.shape[-2]), int(image.shape[-1])
    budget = _draw_budget((h, w), area, rng)
    size = math.sqrt(h * w)
    yy, xx = _grid(h, w)
    harmonics = np.arange(1, 6)
    score = np.full((h, w), -np.inf)
    blobs = []
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
        radius = rng.uniform(0.5, 1.0)  # relative to the other blobs; the threshold sets the scale
        wobble = rng.uniform(0.15, 0.4)
        amps = rng.normal(0.0, 1.0, harmonics.size) * wobble / harmonics**1.5
        phases = rng.uniform(0.0, 2 * math.pi, harmonics.size)
        theta = np.arctan2(yy - cy, xx - cx)
        waves = np.cos(harmonics[:, None, None] * theta + phases[:, None, None])  # (5, H, W)
        log_r = np.tensordot(amps, waves, axes=1)
        rho = np.hypot(yy - cy, xx - cx) / (radius * size * np.exp(log_r))
        score = np.maximum(score, -rho)
        blobs.append({"center": [_f(cy), _f(cx)], "radius": _f(radius), "wobble": _f(wobble),
                      "harmonic_amps": [_f(a) for a in amps],
                      "harmonic_phases": [_f(p) for p in phases]})
    mask = _top_k(score, budget.n_target)
    return _to_tensor(mask), {"target_area": budget.target, "blobs": blobs}


def ellipse_mask(image: torch.Tensor, rng: np.random.Generator, area: Bounds) -> MaskResult:
    """Union of one to three rotated ellipses (random centre, axis ratio 0.25..1, angle).

    The mask is the top-``k`` pixels of ``max_i -rho_i`` with ``rho_i`` the normalised elliptic
    radius, so all ellipses are scaled by one factor to hit the area exactly.
    Returns ``(mask (H, W) float32 in {0,1}, params)``.
    """
    h, w = int(image.shape[-2]), int(image.shape[-1])
    budget = _draw_budget((h, w), area, rng)
    size = math.sqrt(h * w)
    yy, xx = _grid(h, w)
    score = np.full((h, w), -np.inf)
    ellipses = []
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
        semi_major = rng.uniform(0.5, 1.0)  # relative sizes; the threshold sets the scale
        ratio = rng.uniform(0.25, 1.0)
        angle = rng.uniform(0.0, math.pi)
        u = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
        v = -(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)
        rho = np.hypot(u / semi_major, v / (semi_major * ratio)) / size
        score = np.maximum(score, -rho)
        ellipses.append({"center": [_f(cy), _f(cx)], "semi_major": _f(semi_major),
                         "axis_ratio": _f(ratio), "angle": _f(angle)})
    mask = _top_k(score, budget.n_target)
    return _to_tensor(mask), {"target_area": budget.target, "ellipses": ellipses}


def _random_walk(rng: np.random.Generator, h: int, w: int) -> list[list[float]]:
    """Vertices ``[[y, x], ...]`` of a random-walk polyline inside the image (mirrored at borders)."""
    size = math.sqrt(h * w)
    y, x = rng.uniform(0, h - 1), rng.uniform(0, w - 1)
    heading = rng.uniform(0, 2 * math.pi)
    vertices = [[y, x]]
    for _ in range(int(rng.integers(3, 9))):
        heading += rng.normal(0.0, 0.7)
        step = rng.uniform(0.1, 0.25) * size
        ny, nx = y + step * math.sin(heading), x + step * math.cos(heading)
        # mirror back inside [0, H-1] x [0, W-1] (at most one bounce per axis for step < size)
        ny = -ny if ny < 0 else (2 * (h - 1) - ny if ny > h - 1 else ny)
        nx = -nx if nx < 0 else (2 * (w - 1) - nx if nx > w - 1 else nx)
        ny, nx = min(max(ny, 0.0), h - 1.0), min(max(nx, 0.0), w - 1.0)
        heading = math.atan2(ny - y, nx - x) if (ny, nx) != (y, x) else heading
        y, x = ny, nx
        vertices.append([y, x])
    return vertices


def _sample_polyline(vertices: list[list[float]], arc0: float) -> tuple[np.ndarray, np.ndarray]:
    """Points every half pixel along a polyline: ``(points (P, 2) [y, x], arc length (P,))``."""
    points, arcs = [np.asarray(vertices[:1], dtype=np.float64)], [np.array([arc0])]
    for p0, p1 in zip(vertices[:-1], vertices[1:]):
        p0, p1 = np.asarray(p0), np.asarray(p1)
        length = float(np.hypot(*(p1 - p0)))
        t = np.linspace(0.0, 1.0, max(2, math.ceil(length / 0.5) + 1))[1:]
        points.append(p0 + t[:, None] * (p1 - p0))
        arcs.append(arc0 + t * length)
        arc0 += length
    return np.concatenate(points), np.concatenate(arcs)


def stroke_mask(image: torch.Tensor, rng: np.random.Generator, area: Bounds) -> MaskResult:
    """Thick brush strokes: random-walk polylines with round caps.

    Strokes are drawn (one at least, at most ``MAX_STROKES``) until the width needed for the
    target area (about area / centreline length) is at most ``max_width`` (12 % of sqrt(H*W)),
    so large areas give more strokes rather than blobs. The width is then whatever makes the
    area exact; when that would be thinner than ``min_width`` (2 % of sqrt(H*W), at least 2 px)
    the strokes are cut shorter instead. The mask is the top-``k`` pixels of minus the distance
    to the centreline, ties broken by position along the strokes.
    Returns ``(mask (H, W) float32 in {0,1}, params)``.
    """
    h, w = int(image.shape[-2]), int(image.shape[-1])
    budget = _draw_budget((h, w), area, rng)
    min_width, max_width = max(2.0, 0.02 * math.sqrt(h * w)), 0.12 * math.sqrt(h * w)
    strokes, points, arcs, arc0 = [], [], [], 0.0
    while not strokes or (len(strokes) < MAX_STROKES and budget.n_target / arc0 > max_width):
        vertices = _random_walk(rng, h, w)
        p, a = _sample_polyline(vertices, arc0)
        arc0 = float(a[-1]) + 1.0
        points.append(p)
        arcs.append(a)
        strokes.append([[_f(y), _f(x)] for y, x in vertices])
    points, arcs = np.concatenate(points), np.concatenate(arcs)
    iy, ix = np.rint(points).astype(int).T
    # centreline pixels covered so far, along the strokes (each pixel counted at its first visit)
    first_visit = np.zeros(arcs.size, dtype=bool)
    first_visit[np.unique(iy * w + ix, return_index=True)[1]] = True
    covered = np.cumsum(first_visit)
    # too little area for this long a centreline at min_width: cut the strokes shorter
    keep = covered <= max(1, math.floor(budget.n_target / min_width))
    line = np.zeros((h, w), dtype=bool)
    line[iy[keep], ix[keep]] = True
    length = int(line.sum())
    arc_img = np.zeros((h, w))
    arc_img[iy[keep], ix[keep]] = arcs[keep]
    ndimage = require("scipy.ndimage", extra="data")
    dist, (ny, nx) = ndimage.distance_transform_edt(~line, return_indices=True)
    tie = arc_img[ny, nx] / (arcs.max() + 1.0)  # prefer the start of the stroke among equals
    mask = _top_k(-(dist + _TIE * tie), budget.n_target)
    params = {"target_area": budget.target, "strokes": strokes, "centreline_px": length,
              "width": _f(budget.n_target / length), "truncated": bool(not keep.all())}
    return _to_tensor(mask), params


# ---------------------------------------------------------------------------------------------
# semantic regions (stand-ins for SAM)


def _segmentation_input(image: torch.Tensor) -> tuple[np.ndarray, float]:
    """``(H, W, 3)`` float64 image for skimage, downscaled to at most ``MAX_SEG_PIXELS``.

    Also returns the size factor ``sqrt(pixels / REF_PIXELS)`` of the working image, used to
    scale pixel-unit segmentation constants tuned for 256x256.
    """
    arr = _as_numpy(image).transpose(1, 2, 0).astype(np.float64)
    h, w = arr.shape[:2]
    if h * w > MAX_SEG_PIXELS:
        resize = require("skimage.transform", extra="data").resize

        f = math.sqrt(MAX_SEG_PIXELS / (h * w))
        arr = resize(arr, (max(1, round(h * f)), max(1, round(w * f))), order=1, anti_aliasing=True)
    return np.clip(arr, 0.0, 1.0), math.sqrt(arr.shape[0] * arr.shape[1] / REF_PIXELS)


def _upsample_labels(labels: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour resize of a label image to ``(h, w)``."""
    lh, lw = labels.shape
    if (lh, lw) == (h, w):
        return labels
    ys = np.minimum((np.arange(h) + 0.5) * lh / h, lh - 1).astype(int)
    xs = np.minimum((np.arange(w) + 0.5) * lw / w, lw - 1).astype(int)
    return labels[ys][:, xs]


def _slic_labels(image: torch.Tensor, rng: np.random.Generator) -> tuple[np.ndarray, Params]:
    """SLIC superpixels (Achanta et al., TPAMI 2012) of an image: ``(labels (H, W) int, params)``.

    About 120-300 superpixels whatever the image size (each ~0.3-0.8 % of the image, fine
    enough for 1 % masks), but at least ~16 pixels each on tiny images.
    """
    slic = require("skimage.segmentation", extra="data").slic

    arr, scale = _segmentation_input(image)
    n_segments = min(int(rng.integers(120, 301)), max(2, arr.shape[0] * arr.shape[1] // 16))
    compactness = float(rng.uniform(5.0, 20.0))
    labels = slic(arr, n_segments=n_segments, compactness=compactness, sigma=max(0.3, scale),
                  start_label=0, channel_axis=-1)
    params = {"n_segments": n_segments, "compactness": _f(compactness)}
    return _upsample_labels(labels, *image.shape[-2:]), params


def _felzenszwalb_labels(image: torch.Tensor, rng: np.random.Generator) -> tuple[np.ndarray, Params]:
    """Graph-based segments (Felzenszwalb & Huttenlocher, IJCV 2004): ``(labels (H, W) int, params)``.

    ``scale`` (the merge threshold k, in skimage's 0-255 units) and ``min_size`` are tuned for
    256x256 and scale with the pixel count, so segments cover similar fractions of any image.
    """
    felzenszwalb = require("skimage.segmentation", extra="data").felzenszwalb

    arr, scale = _segmentation_input(image)
    k = float(rng.uniform(50.0, 200.0)) * scale**2
    min_size = max(4, round(30 * scale**2))
    sigma = max(0.3, 0.8 * scale)
    labels = felzenszwalb(arr, scale=k, sigma=sigma, min_size=min_size, channel_axis=-1)
    params = {"scale": _f(k), "sigma": _f(sigma), "min_size": min_size}
    return _upsample_labels(labels, *image.shape[-2:]), params


def _boundaries(labels: np.ndarray, n_labels: int) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Shared boundary lengths between segments (4-neighbourhood, in pixel edges).

    Returns ``(shared (S, S) sparse, symmetric: edges between segments i and j; perimeter (S,):
    all boundary edges of each segment, the image border included)``.
    """
    sparse = require("scipy.sparse", extra="data")
    pairs = [(labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])]
    rows = np.concatenate([np.concatenate([a[a != b], b[a != b]]) for a, b in pairs])
    cols = np.concatenate([np.concatenate([b[a != b], a[a != b]]) for a, b in pairs])
    shared = sparse.coo_matrix((np.ones(rows.size), (rows, cols)), shape=(n_labels, n_labels)).tocsr()
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    perimeter = np.asarray(shared.sum(axis=1)).ravel() + np.bincount(border, minlength=n_labels)
    return shared, perimeter


def _growth_cost(cand: np.ndarray, means: np.ndarray, region_mean: np.ndarray,
                 touching: np.ndarray, perimeter: np.ndarray) -> np.ndarray:
    """Cost of adding each candidate segment: colour distance plus a compactness term.

    ``|mean_c - mean_region|`` (RGB, 0..1.7) ``+ COMPACTNESS * (1 - touching_c / perimeter_c)``:
    segments that the region already mostly surrounds (holes, bays) come cheap, so the region
    stays compact instead of growing tendrils along fine texture.
    """
    colour = np.linalg.norm(means[cand] - region_mean, axis=1)
    return colour + COMPACTNESS * (1.0 - touching[cand] / perimeter[cand])


def _geodesic_nearest(
    passable: np.ndarray, starts: np.ndarray, candidates: np.ndarray, k: int
) -> np.ndarray:
    """The ``k`` candidate pixels nearest the start pixels along 8-connected paths inside ``passable``.

    All arguments are ``(H, W)`` boolean. A geodesic (not Euclidean) distance keeps the chosen
    pixels connected to the starts even in a winding segment: every chosen pixel's shortest path
    runs through pixels nearer still. Computed with skimage's minimum-cost-path search on the
    bounding box of ``passable``.
    """
    MCP_Geometric = require("skimage.graph", extra="data").MCP_Geometric

    ys, xs = np.nonzero(passable)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    costs = np.where(passable[box], 1.0, np.inf)
    dist = np.full(passable.shape, np.inf)
    dist[box], _ = MCP_Geometric(costs).find_costs(np.argwhere(starts[box]))
    return _top_k(-np.where(candidates, dist, np.inf), k)


def _pick_seed(
    labels: np.ndarray, sizes: np.ndarray, budget: _Budget, rng: np.random.Generator
) -> tuple[int, bool]:
    """A random seed pixel (flat index) for region growth; whether to cut a core from its segment.

    The pixel is drawn uniformly from the interior pixels (no 4-neighbour in another segment)
    of segments no larger than the target, so the area is not decided by one big segment and
    one-or-two-pixel slivers along edges (blends of two objects) do not seed a region; failing
    that, of segments no larger than ``n_hi``; failing that (every segment with an interior is
    larger than ``n_hi``, e.g. one giant segment) any interior pixel, and the caller cuts the
    region out of its segment; only an image of slivers falls back to seeding from a sliver.
    """
    inner = np.ones(labels.shape, dtype=bool)
    horizontal = labels[:, :-1] != labels[:, 1:]
    vertical = labels[:-1, :] != labels[1:, :]
    inner[:, :-1] &= ~horizontal
    inner[:, 1:] &= ~horizontal
    inner[:-1, :] &= ~vertical
    inner[1:, :] &= ~vertical
    inner = inner.ravel()
    seg_size = sizes[labels.ravel()]
    fits_target, fits_hi = seg_size <= budget.n_target, seg_size <= budget.n_hi
    pools = [(inner & fits_target, False), (inner & fits_hi, False), (inner, True),
             (fits_target, False), (fits_hi, False)]
    for pool, core in pools:
        candidates = np.flatnonzero(pool)
        if candidates.size:
            return int(candidates[rng.integers(candidates.size)]), core
    return int(rng.integers(labels.size)), True  # only thin slivers, some larger than n_hi


def _grow_region(
    image: torch.Tensor, labels: np.ndarray, budget: _Budget, rng: np.random.Generator
) -> tuple[np.ndarray, Params]:
    """A connected union of segments with ``n_lo <= area <= n_hi`` pixels, following content.

    Seed: the segment under a random pixel (:func:`_pick_seed`). Growth: add the touching
    segment of least :func:`_growth_cost` (similar mean colour, much of its boundary on the
    region) while it fits and brings the area closer to the target. If still below ``n_lo``,
    take the pixels of the cheapest touching segment nearest the region (geodesically,
    :func:`_geodesic_nearest`). If every usable segment is larger than ``n_hi`` (e.g. one giant
    segment on a flat image), take the pixels of the seed segment nearest the seed pixel.
    ``labels`` is ``(H, W)`` int; returns ``(mask (H, W) bool, params)``.
    """
    _, flat = np.unique(labels, return_inverse=True)
    flat = flat.ravel()
    n_labels = int(flat.max()) + 1
    sizes = np.bincount(flat, minlength=n_labels)
    rgb = _as_numpy(image).reshape(3, -1).astype(np.float64)
    sums = np.stack([np.bincount(flat, weights=c, minlength=n_labels) for c in rgb], axis=1)
    means = sums / sizes[:, None]

    pixel, core = _pick_seed(flat.reshape(labels.shape), sizes, budget, rng)
    py, px = divmod(pixel, labels.shape[1])
    if core:  # every usable segment too large: the part of one nearest a random inner point
        segment = (flat == flat[pixel]).reshape(labels.shape)
        start = np.zeros(labels.shape, dtype=bool)
        start[py, px] = True
        mask = _geodesic_nearest(segment, start, segment, budget.n_target)
        return mask, {"n_labels": n_labels, "seed_pixel": [py, px], "n_grown": 0,
                      "fallback": "seed_core"}

    seed = int(flat[pixel])
    shared, perimeter = _boundaries(flat.reshape(labels.shape), n_labels)
    in_region = np.zeros(n_labels, dtype=bool)
    touching = np.zeros(n_labels)  # boundary edges each segment shares with the region

    def add(segment: int) -> None:
        in_region[segment] = True
        row = shared.getrow(segment)
        touching[row.indices] += row.data

    add(seed)
    area, colour_sum, n_grown = int(sizes[seed]), sums[seed].copy(), 0
    while area < budget.n_target:
        cand = np.flatnonzero((touching > 0) & ~in_region & (sizes <= budget.n_hi - area))
        if cand.size == 0:
            break
        cost = _growth_cost(cand, means, colour_sum / area, touching, perimeter)
        best = int(cand[np.argmin(cost)])
        new_area = area + int(sizes[best])
        if area >= budget.n_lo and new_area - budget.n_target > budget.n_target - area:
            break  # adding it would land further from the target than stopping here
        add(best)
        area, colour_sum, n_grown = new_area, colour_sum + sums[best], n_grown + 1
    mask = in_region[flat].reshape(labels.shape)
    fallback = None
    if area < budget.n_lo:  # no whole segment fits: finish with part of the cheapest one
        cand = np.flatnonzero((touching > 0) & ~in_region)
        if cand.size:
            cost = _growth_cost(cand, means, colour_sum / area, touching, perimeter)
            best = int(cand[np.argmin(cost)])
            segment = (flat == best).reshape(labels.shape)
            part = _geodesic_nearest(mask | segment, mask, segment, budget.n_target - area)
            mask, fallback = mask | part, "partial_segment"
    return mask, {"n_labels": n_labels, "seed_pixel": [py, px], "n_grown": n_grown,
                  "fallback": fallback}


def superpixel_mask(image: torch.Tensor, rng: np.random.Generator, area: Bounds) -> MaskResult:
    """A connected union of SLIC superpixels grown from a random seed (stand-in for a SAM segment).

    Returns ``(mask (H, W) float32 in {0,1}, params)``.
    """
    h, w = int(image.shape[-2]), int(image.shape[-1])
    budget = _draw_budget((h, w), area, rng)
    labels, seg_params = _slic_labels(image, rng)
    mask, grow_params = _grow_region(image, labels, budget, rng)
    return _to_tensor(mask), {"target_area": budget.target, "slic": seg_params, **grow_params}


def segment_mask(image: torch.Tensor, rng: np.random.Generator, area: Bounds) -> MaskResult:
    """A connected union of Felzenszwalb graph-based segments grown from a random seed segment.

    Returns ``(mask (H, W) float32 in {0,1}, params)``.
    """
    h, w = int(image.shape[-2]), int(image.shape[-1])
    budget = _draw_budget((h, w), area, rng)
    labels, seg_params = _felzenszwalb_labels(image, rng)
    mask, grow_params = _grow_region(image, labels, budget, rng)
    return _to_tensor(mask), {"target_area": budget.target, "felzenszwalb": seg_params, **grow_params}


MASK_KINDS: dict[str, MaskFn] = {
    "blob": blob_mask,
    "ellipse": ellipse_mask,
    "stroke": stroke_mask,
    "superpixel": superpixel_mask,
    "segment": segment_mask,
}


def make_mask(
    kind: str,
    image: torch.Tensor,
    rng: np.random.Generator,
    area: Bounds = DEFAULT_AREA,
) -> MaskResult:
    """A swap mask B for ``I_syn = B * I_SR + (1 - B) * I_GT`` (arXiv 2512.22647, FGR-30k region swap).

    Args:
        kind: a key of :data:`MASK_KINDS`.
        image: ``(3, H, W)`` float tensor in [0, 1] (the HR image; semantic kinds segment it).
        rng: the only source of randomness; the same generator state gives the same mask.
        area: ``(lo, hi)`` bounds on the mask's area fraction, ``0 < lo <= hi <= 0.9``.

    Returns:
        ``(mask, params)``: ``mask`` is ``(H, W)`` float32 in {0, 1} whose mean lies in
        ``[lo, hi]`` (guaranteed); ``params`` (JSON-serialisable) holds ``kind``,
        ``area_bounds``, ``target_area`` (drawn uniformly in the bounds), ``area`` (actual)
        and the kind's shape / segmentation parameters.

    Raises:
        ValueError: unknown kind, bad area bounds, a bad image, or an image too small to have
            any pixel count within the bounds.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; valid kinds: {', '.join(MASK_KINDS)}")
    lo, hi = _check_area(area)
    h, w = _check_image(image)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}"
        )
    n_lo, n_hi = _pixel_range(h * w, lo, hi)

    mask_t, shape_params = MASK_KINDS[kind](image, rng, (lo, hi))
    mask = mask_t.numpy() > 0.5
    count, area_fix = int(mask.sum()), None
    if not n_lo <= count <= n_hi:  # safety net; the kinds aim to make this unreachable
        target = min(max(round(shape_params["target_area"] * h * w), n_lo), n_hi)
        area_fix = "dilate" if count < n_lo else "erode"
        mask = _fit_area(mask, target)
        count = int(mask.sum())
    params: Params = {
        "kind": kind,
        "area_bounds": [lo, hi],
        "target_area": float(shape_params.pop("target_area")),
        "area": count / (h * w),
        "area_fix": area_fix,
        **shape_params,
    }
    return _to_tensor(mask), params
