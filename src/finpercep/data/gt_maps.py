"""Ground-truth degradation maps for region-swapped images (FinPercep-RM, Liu et al.,
arXiv 2512.22647, the ground-truth maps of the FGR-30k data set):

    M_gt = Normalize(alpha * D_pixel + (1 - alpha) * D_feat)

- ``D_pixel`` (:func:`pixel_distance`): per-pixel L1 between the distorted image and the
  reference, averaged over RGB. In [0, 1]; exactly 0 wherever the two images agree.
- ``D_feat`` (:func:`feature_distance`): cosine distance ``1 - cos`` between the channel
  vectors of pretrained EfficientNet-Lite0 features (the paper uses DINOv3, not installable
  offline) at a few stages, each upsampled to full resolution (bilinear, aligned to the
  feature grid, see :func:`upsample_to`) and averaged with fixed weights.
- ``Normalize`` (:func:`normalize`): the fixed monotone map ``1 - exp(-(d / tau) ** gamma)``.
  No per-image statistics, so maps are comparable across samples: a faint artifact stays faint.

Locality. Every operation is local: convolutions with symmetric zero padding (identical for
both images), per-location cosine distance, and an upsampling whose footprint is one feature
cell. A map pixel farther than :attr:`GTMapper.reach_px` (Chebyshev distance, hence also
Euclidean) from every pixel where the images differ is exactly 0.

Calibration (the numbers behind the defaults of :class:`GTMapConfig`):
``python benchmarks/gt_map_calibration.py`` measures, on centre 256x256 crops of
``skimage.data`` astronaut / chelsea / coffee, the raw distances for noise, blur and JPEG of three
strengths and the resulting map inside and around a 96x96 region swap; its output is
``docs/results/gt_map_calibration.md``. In short: ``D_feat`` is several times ``D_pixel`` for the
same artifact, so ``alpha = 0.8`` makes the two terms contribute about equally (``0.8 * D_pixel ~
0.2 * D_feat``) instead of letting the feature term dominate as ``alpha = 0.5`` would.
``gamma = 2`` flattens ``Normalize`` near 0 so faint differences stay near 0 while strong ones
approach 1; ``tau = 0.06`` puts faint artifacts (noise 0.01, blur 0.7, JPEG q90) below ~0.15,
strong ones (noise 0.1, blur 3, JPEG q10) above ~0.6. The map is exactly 0 beyond ``reach_px``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from finpercep.backbones.efficientnet_lite import (
    STAGES,
    EfficientNetLite0,
    efficientnet_lite0,
    stage_receptive_field,
)


@dataclass(frozen=True)
class GTMapConfig:
    """How a ground-truth map is made. Defaults are calibrated (module docstring)."""

    alpha: float = 0.8
    """Weight of ``D_pixel`` in ``alpha * D_pixel + (1 - alpha) * D_feat``, in [0, 1]. 0.8 balances
    the two terms, whose raw scales differ by ~4-10x (measured; module docstring)."""

    layers: tuple[int, ...] = (1, 2)
    """EfficientNet-Lite0 stages used for ``D_feat`` (indices into ``STAGES``): stage 1 (stride 4,
    24 channels, receptive field 19 px) and stage 2 (stride 8, 40 channels, 67 px). Their reach
    (12 px and 40 px) is modest for 256x256 crops; stage 3 would reach 88 px and the deeper
    stages see the whole crop, which would smear the map far beyond the changed region."""

    layer_weights: tuple[float, ...] = (0.5, 0.5)
    """Weight of each entry of ``layers`` when averaging their upsampled cosine distances
    (normalised to sum 1). Equal: both stages respond to the same artifacts with similar size."""

    tau: float = 0.06
    """Scale of ``Normalize(d) = 1 - exp(-(d / tau) ** gamma)`` for the pixel + feature map: the
    combined distance of a faint artifact (~0.015) maps to ~0.06, a strong one (~0.1) to ~0.94."""

    gamma: float = 2.0
    """Shape of ``Normalize``; > 1 keeps faint differences near 0 and pushes strong ones to 1."""

    pixel_only: bool = False
    """The paper's ablation: ``D_feat`` dropped (alpha = 1), normalised with ``pixel_only_tau``.
    The map is then exactly 0 wherever the images agree (reach 0)."""

    pixel_only_tau: float = 0.03
    """``tau`` used when ``pixel_only``: ``D_pixel`` alone is ~0.008 for faint and 0.03-0.08 for
    strong artifacts (module docstring), so faint maps to ~0.07 and strong to 0.63-1."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"GTMapConfig.alpha must be in [0, 1], got {self.alpha}")
        if not self.layers:
            raise ValueError("GTMapConfig.layers must name at least one stage")
        for s in self.layers:
            if not 0 <= s < len(STAGES):
                raise ValueError(f"GTMapConfig.layers: stage {s} not in [0, {len(STAGES) - 1}]")
        if len(self.layer_weights) != len(self.layers):
            raise ValueError(
                f"GTMapConfig.layer_weights needs one weight per layer: {len(self.layers)} layers, "
                f"{len(self.layer_weights)} weights"
            )
        if any(w < 0 for w in self.layer_weights) or sum(self.layer_weights) <= 0:
            raise ValueError(f"GTMapConfig.layer_weights must be >= 0 with a positive sum, got {self.layer_weights}")
        for name in ("tau", "gamma", "pixel_only_tau"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GTMapConfig.{name} must be > 0, got {getattr(self, name)}")


def pixel_distance(ref: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """``D_pixel``: per-pixel L1 averaged over RGB. ``(B, 3, H, W)`` x2 -> ``(B, 1, H, W)`` in [0, 1]."""
    _check_pair(ref, dist)
    return (dist - ref).abs().mean(dim=1, keepdim=True)


def cosine_distance(feat_ref: torch.Tensor, feat_dist: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``1 - cos`` between channel vectors at each location: ``(B, C, h, w)`` x2 -> ``(B, 1, h, w)`` in [0, 2].

    Computed as ``0.5 * |a/|a| - b/|b||^2`` (equal to ``1 - cos`` for unit vectors), which is
    exactly 0 for identical vectors, unlike ``1 - cos`` whose rounding can leave ~1e-7.
    """
    if feat_ref.shape != feat_dist.shape or feat_ref.ndim != 4:
        raise ValueError(
            f"features must be equal-shape (B, C, h, w), got {tuple(feat_ref.shape)} and {tuple(feat_dist.shape)}"
        )
    a = F.normalize(feat_ref, dim=1, eps=eps)
    b = F.normalize(feat_dist, dim=1, eps=eps)
    return 0.5 * (a - b).pow(2).sum(dim=1, keepdim=True)


def _interp_matrix(size: int, n: int, stride: int, device: torch.device) -> torch.Tensor:
    """``(size, n)`` linear-interpolation weights from a grid whose cell ``i`` sits at pixel ``i * stride``.

    Pixel ``x`` reads source coordinate ``x / stride`` (clamped to ``n - 1`` past the last
    cell, i.e. edge replication), so it mixes only cells ``i`` with ``|x - i * stride| < stride``.
    """
    src = (torch.arange(size, dtype=torch.float64, device=device) / stride).clamp(max=n - 1)
    i0 = src.floor().long()
    frac = src - i0
    i1 = (i0 + 1).clamp(max=n - 1)
    rows = torch.arange(size, device=device)
    w = torch.zeros(size, n, dtype=torch.float64, device=device)
    w.index_put_((rows, i0), 1.0 - frac, accumulate=True)
    w.index_put_((rows, i1), frac, accumulate=True)
    return w


def upsample_to(d: torch.Tensor, stride: int, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of a feature-grid map ``(B, C, h, w)`` to ``(B, C, H, W)`` = ``size``.

    Aligned to the backbone's grid: cell ``(i, j)`` of a stride-``s`` stage is centred on input
    pixel ``(i * s, j * s)`` (symmetric padding), so the value there is reproduced exactly and
    nothing is shifted. ``F.interpolate(align_corners=False)`` would misplace it by
    ``(s - 1) / 2`` pixels. Needs ``h == ceil(H / s)`` and ``w == ceil(W / s)``.
    """
    H, W = size
    h, w = d.shape[-2:]
    if h != -(-H // stride) or w != -(-W // stride):
        raise ValueError(f"a stride-{stride} grid for {H}x{W} must be {-(-H // stride)}x{-(-W // stride)}, got {h}x{w}")
    wh = _interp_matrix(H, h, stride, d.device).to(d.dtype)
    ww = _interp_matrix(W, w, stride, d.device).to(d.dtype)
    return torch.einsum("yi,bcij,xj->bcyx", wh, d, ww)


def feature_distance(
    feats_ref: list[torch.Tensor],
    feats_dist: list[torch.Tensor],
    size: tuple[int, int],
    strides: tuple[int, ...],
    weights: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """``D_feat``: weighted mean over layers of upsampled cosine distances.

    ``feats_ref[k]``, ``feats_dist[k]``: ``(B, C_k, ceil(H/s_k), ceil(W/s_k))`` with ``s_k =
    strides[k]``; ``size = (H, W)``; ``weights`` default equal. Returns ``(B, 1, H, W)`` in [0, 2].
    """
    if not (len(feats_ref) == len(feats_dist) == len(strides)) or not strides:
        raise ValueError(
            f"need one stride per feature pair: {len(feats_ref)} ref, {len(feats_dist)} dist, {len(strides)} strides"
        )
    weights = tuple(weights) if weights is not None else (1.0,) * len(strides)
    if len(weights) != len(strides):
        raise ValueError(f"need one weight per layer, got {len(weights)} for {len(strides)} layers")
    total = float(sum(weights))
    out = None
    for fr, fd, s, wgt in zip(feats_ref, feats_dist, strides, weights):
        term = upsample_to(cosine_distance(fr, fd), s, size) * (wgt / total)
        out = term if out is None else out + term
    return out


def normalize(d: torch.Tensor, tau: float, gamma: float = 1.0) -> torch.Tensor:
    """The fixed monotone ``Normalize`` of the paper's map equation: ``1 - exp(-(d / tau) ** gamma)``.

    ``d >= 0`` -> [0, 1], increasing (strictly until float saturation at 1), 0 at 0. Negative
    ``d`` is treated as 0. No per-image statistics.
    """
    return -torch.expm1(-(d.clamp(min=0) / tau).pow(gamma))


def feature_reach_px(stage: int) -> int:
    """Pixels from a change beyond which the upsampled ``D_feat`` of ``stage`` is exactly 0.

    A cell at pixel ``i * s`` sees ``(rf - 1) / 2`` pixels either side (receptive field); the
    upsampling lets a map pixel read cells less than ``s`` away. Sum: ``(rf - 1) // 2 + s - 1``
    (Chebyshev distance): 12 px for stage 1, 40 for stage 2, 88 for stage 3.
    """
    return (stage_receptive_field(stage) - 1) // 2 + STAGES[stage][0] - 1


def _check_pair(ref: torch.Tensor, dist: torch.Tensor) -> None:
    for name, x in (("ref", ref), ("dist", dist)):
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a (B, 3, H, W) RGB tensor in [0, 1], got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a float tensor in [0, 1], got {x.dtype} (divide uint8 by 255)")
    if ref.shape != dist.shape and not (ref.shape[0] == 1 and ref.shape[1:] == dist.shape[1:]):
        raise ValueError(
            f"ref and dist must have the same shape (or ref a batch of 1 shared by every dist), "
            f"got {tuple(ref.shape)} and {tuple(dist.shape)}"
        )


class GTMapper:
    """Computes ``M_gt`` for (reference, distorted) pairs with a frozen EfficientNet-Lite0.

    ``GTMapper(cfg, device)(ref, dist)``: ``(B, 3, H, W)`` x2 in [0, 1] (or ``(3, H, W)`` x2)
    -> ``(B, 1, H, W)`` (or ``(1, H, W)``) float32 in [0, 1], on the inputs' device. Any
    ``H, W >= 1``; no gradients. Each pair is computed on its own (batch 1), so a map is the
    same, bit for bit, whatever else is in the batch.

    ``backbone``: an EfficientNet-Lite0 to copy (e.g. one already loaded); by default the
    shipped ImageNet weights are loaded. The mapper keeps its own frozen, eval-mode copy, so a
    network being trained elsewhere is never modified.

    Speed (torch 2.13 CPU, 2 cores shared with other jobs, so noisy): 40-120 ms per 256x256
    pair with the default layers, nearly all of it the stage 0-2 forward of both images
    (convolutions ~70 %, batch norm ~25 %); pixel-only < 1 ms.
    """

    def __init__(
        self,
        cfg: GTMapConfig = GTMapConfig(),
        device: str | torch.device = "cpu",
        backbone: EfficientNetLite0 | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.net: EfficientNetLite0 | None = None
        if not cfg.pixel_only:
            net = copy.deepcopy(backbone) if backbone is not None else efficientnet_lite0()  # ImageNet weights shipped in a package
            self.net = net.to(self.device).eval().requires_grad_(False)

    @property
    def reach_px(self) -> int:
        """Distance (pixels, Chebyshev or Euclidean) from the changed pixels beyond which the map is exactly 0."""
        if self.cfg.pixel_only:
            return 0
        return max(feature_reach_px(s) for s in self.cfg.layers)

    @torch.no_grad()
    def __call__(self, ref: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        squeeze = isinstance(ref, torch.Tensor) and ref.ndim == 3
        if squeeze and isinstance(dist, torch.Tensor):
            ref, dist = ref[None], dist[None]
        _check_pair(ref, dist)
        lo, hi = (torch.stack(v) for v in zip(*(torch.aminmax(x.detach().float()) for x in (ref, dist))))
        lo, hi = lo.min(), hi.max()
        if lo < -1e-4 or hi > 1 + 1e-4 or not torch.isfinite(lo + hi):
            raise ValueError(f"images must be in [0, 1] (got values in [{float(lo):.3g}, {float(hi):.3g}])")
        out_device = ref.device
        ref = ref.to(self.device, torch.float32)
        dist = dist.to(self.device, torch.float32)
        m = self._map(ref, dist).to(out_device)
        return m[0] if squeeze else m

    def _map(self, ref: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        """``(B or 1, 3, H, W)``, ``(B, 3, H, W)`` float32 on ``self.device`` -> ``(B, 1, H, W)``.

        One sample at a time, each in its own fresh batch-1 tensor: CPU kernels (the upsampling's
        matrix products, the convolutions, the reductions) may pick other blockings for other batch
        sizes, or other alignments, and round differently in the last bits (seen on AVX2-only AMD
        CPUs). So a sample's map never depends on how many others share the call, and a data set
        grown in steps or resumed writes the same bytes as one built at once.
        """
        shared = self._features(ref[:1].clone()) if len(ref) == 1 and self.net is not None else None
        maps = []
        for i in range(len(dist)):
            r = ref[:1] if len(ref) == 1 else ref[i : i + 1]
            maps.append(self._map_one(r.clone(), dist[i : i + 1].clone(), shared))
        return torch.cat(maps)

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The ``cfg.layers`` stage outputs of one image ``(1, 3, H, W)``."""
        assert self.net is not None
        feats = self.net.features(x, last_stage=max(self.cfg.layers))
        return [feats[s] for s in self.cfg.layers]

    def _map_one(self, ref: torch.Tensor, dist: torch.Tensor, f_ref: list[torch.Tensor] | None) -> torch.Tensor:
        """``M_gt`` of one pair ``(1, 3, H, W)`` x2 -> ``(1, 1, H, W)``; ``f_ref``: the reference's
        features when already computed (a reference shared by a batch is encoded once)."""
        cfg = self.cfg
        d_pix = pixel_distance(ref, dist)
        if cfg.pixel_only:
            return normalize(d_pix, cfg.pixel_only_tau, cfg.gamma)
        f_ref = self._features(ref) if f_ref is None else f_ref
        strides = tuple(STAGES[s][0] for s in cfg.layers)
        d_feat = feature_distance(f_ref, self._features(dist), tuple(dist.shape[-2:]), strides=strides,
                                  weights=cfg.layer_weights)
        return normalize(cfg.alpha * d_pix + (1 - cfg.alpha) * d_feat, cfg.tau, cfg.gamma)
