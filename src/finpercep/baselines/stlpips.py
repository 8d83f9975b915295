"""ST-LPIPS: shift-tolerant LPIPS (full reference; a distance, lower = better; differentiable).

Ghildyal and Liu, "Shift-tolerant Perceptual Similarity Metric", ECCV 2022, built on LPIPS
(Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", CVPR
2018, Eq. 1): ``d(x, y) = sum_l mean_hw( w_l . (f_l(x)/|f_l(x)| - f_l(y)/|f_l(y)|)^2 )`` over five
feature levels ``f_l`` of a backbone, with learned non-negative channel weights ``w_l``.

The shift-tolerant backbones are the ``variant="shift_tolerant"`` networks of
``stlpips-pytorch==0.0.2`` (``invariant_networks.py`` and ``models_lpf/``; BSD-2-Clause,
Copyright 2022 Abhijay Ghildyal and Feng Liu), rewritten here without torchvision:

- every stride is removed from convolutions and max-pools and replaced by a *blur pool*
  (anti-aliased downsampling, Zhang ICML 2019): reflection padding of ``filter_size - 1 = 2``
  pixels on every side ("pad_more"), a depthwise 3x3 binomial filter ``[1, 2, 1]^T [1, 2, 1] / 16``,
  stride 2;
- AlexNet: ``conv11 (stride 1, pad 2) -> blurpool -> ReLU`` | ``maxpool3 (stride 1) -> blurpool ->
  conv5 (pad 2) -> ReLU`` | ``maxpool3 (stride 1) -> blurpool -> conv3 -> ReLU`` | ``conv3 -> ReLU`` |
  ``conv3 -> ReLU``; channels 64, 192, 384, 256, 256 (the trailing pool is unused);
- VGG16: each ``maxpool2 (stride 2)`` becomes ``maxpool2 (stride 1) -> blurpool``; levels after
  relu1_2, relu2_2, relu3_3, relu4_3, relu5_3; channels 64, 128, 256, 512, 512.

Inputs in [0, 1] are mapped to [-1, 1] and then shifted/scaled by the LPIPS "scaling layer"
(``version='0.1'``). The weights are the whole trained metric (backbone, blur filters, scaling
layer and linear heads, ``weights/vST0.0/{alex,vgg}_shift_tolerant.pth``), read from the installed
``stlpips_pytorch`` package (located with ``importlib.util.find_spec``; never imported, since it
imports torchvision) or from an explicit path, with ``torch.load(weights_only=True)`` and
``strict=True`` after renaming the keys to this module's layout.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from finpercep.checks import check_image_batch

NetName = Literal["alex", "vgg"]
MIN_SIZE = 32  # smallest side accepted (the deepest blur pool's reflection pad needs 21 px for alex, 18 for vgg)

_WEIGHT_FILES: dict[str, str] = {"alex": "alex_shift_tolerant.pth", "vgg": "vgg_shift_tolerant.pth"}
_CHANNELS: dict[str, tuple[int, ...]] = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}


class BlurPool(nn.Module):
    """Anti-aliased stride-2 downsampling: reflect pad 2, depthwise binomial 3x3 blur, stride 2.

    ``Downsample(filt_size=3, stride=2, pad_more=True)`` of antialiased-cnns / stlpips-pytorch.
    ``(B, C, H, W) -> (B, C, floor((H + 1) / 2), floor((W + 1) / 2))``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        a = torch.tensor([1.0, 2.0, 1.0])
        filt = a[:, None] * a[None, :]
        # Persistent: the checkpoint holds it, so strict loading checks it too.
        self.register_buffer("filt", (filt / filt.sum())[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), self.filt, stride=2, groups=x.shape[1])


def _alexnet_levels() -> nn.ModuleList:
    """Shift-tolerant AlexNet, one ``nn.Sequential`` per LPIPS level (relu1 .. relu5)."""
    return nn.ModuleList(
        [
            nn.Sequential(nn.Conv2d(3, 64, 11, stride=1, padding=2), BlurPool(64), nn.ReLU()),
            nn.Sequential(nn.MaxPool2d(3, stride=1), BlurPool(64), nn.Conv2d(64, 192, 5, padding=2), nn.ReLU()),
            nn.Sequential(nn.MaxPool2d(3, stride=1), BlurPool(192), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(384, 256, 3, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), nn.ReLU()),
        ]
    )


def _vgg16_levels() -> nn.ModuleList:
    """Shift-tolerant VGG16, one ``nn.Sequential`` per LPIPS level (relu1_2 .. relu5_3)."""

    def convs(c_in: int, c_out: int, n: int) -> list[nn.Module]:
        layers: list[nn.Module] = []
        for i in range(n):
            layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1), nn.ReLU()]
        return layers

    def pool(c: int) -> list[nn.Module]:
        return [nn.MaxPool2d(2, stride=1), BlurPool(c)]

    return nn.ModuleList(
        [
            nn.Sequential(*convs(3, 64, 2)),
            nn.Sequential(*pool(64), *convs(64, 128, 2)),
            nn.Sequential(*pool(128), *convs(128, 256, 3)),
            nn.Sequential(*pool(256), *convs(256, 512, 3)),
            nn.Sequential(*pool(512), *convs(512, 512, 3)),
        ]
    )


def _flat_index_layout(levels: nn.ModuleList) -> dict[int, tuple[int, int]]:
    """Index in the original flat ``features`` list -> ``(level, position)`` in ours.

    The original slices keep the indices of one ``nn.Sequential`` holding all layers, so the
    numbering runs on across levels (AlexNet: slice2 starts at layer 3).
    """
    layout = [(lvl, pos) for lvl, seq in enumerate(levels) for pos in range(len(seq))]
    return dict(enumerate(layout))


def default_weights_path(net: NetName) -> Path:
    """Where ``stlpips-pytorch==0.0.2`` installed the weights of ``net`` (no import of the package)."""
    spec = importlib.util.find_spec("stlpips_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "ST-LPIPS weights come from the 'stlpips-pytorch' package: pip install 'finpercep[metrics]' "
            "or pip install --no-deps stlpips-pytorch==0.0.2 (it is only read, never imported), "
            "or pass weights=PATH to a local copy of the .pth file"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "vST0.0" / _WEIGHT_FILES[net]
    if not path.is_file():
        raise FileNotFoundError(f"ST-LPIPS weights missing from the stlpips-pytorch install: {path}")
    return path


class STLPIPS(nn.Module):
    """Shift-tolerant LPIPS distance between two image batches; lower = more similar.

    Frozen (no trainable parameters), eval-only; gradients flow to the inputs, so it can serve as
    a fidelity loss. Values are about 0 for identical images, ~0.01 for a 1-pixel shift of a
    photo, ~0.3-0.8 for clearly visible distortions; unbounded above in principle.

    Args:
        net: backbone, ``"alex"`` (default, fast) or ``"vgg"``.
        weights: path to the ``.pth`` checkpoint; default: the file in the installed
            ``stlpips-pytorch`` package.
    """

    def __init__(self, net: NetName = "alex", weights: str | Path | None = None) -> None:
        super().__init__()
        if net not in _WEIGHT_FILES:
            raise ValueError(f"unknown ST-LPIPS net {net!r}; choose one of {sorted(_WEIGHT_FILES)}")
        self.net_name = net
        self.levels = _alexnet_levels() if net == "alex" else _vgg16_levels()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS[net])
        self.register_buffer("shift", torch.zeros(1, 3, 1, 1))
        self.register_buffer("scale", torch.ones(1, 3, 1, 1))
        path = Path(weights) if weights is not None else default_weights_path(net)
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.load_state_dict(self._convert_checkpoint(state), strict=True)
        self.requires_grad_(False)
        self.eval()

    def _convert_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename the stlpips-pytorch keys to this module's (one explicit rule per key family)."""
        layout = _flat_index_layout(self.levels)
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key in ("scaling_layer.shift", "scaling_layer.scale"):
                out[key.split(".")[1]] = value
            elif m := re.fullmatch(r"lin(\d)\.model\.1\.weight", key):  # model.0 is a dropout
                out[f"heads.{m[1]}.weight"] = value
            elif m := re.fullmatch(r"net\.slice(\d)\.(\d+)\.(weight|bias|filt)", key):
                lvl, pos = layout.get(int(m[2]), (-1, -1))
                if lvl != int(m[1]) - 1:
                    raise ValueError(f"ST-LPIPS checkpoint key {key} does not fit the {self.net_name} layout")
                out[f"levels.{lvl}.{pos}.{m[3]}"] = value
            else:
                raise ValueError(f"unexpected key in the ST-LPIPS checkpoint: {key}")
        return out

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised features of the five levels for ``x (B, 3, H, W)`` in [0, 1]."""
        h = ((2 * x - 1) - self.shift) / self.scale
        feats = []
        for level in self.levels:
            h = level(h)
            # LPIPS normalize_tensor: f / (|f| + 1e-10); the clamp keeps the gradient finite
            # where all channels are 0 (the value is unchanged for |f|^2 >= 1e-20).
            norm = torch.sqrt((h * h).sum(dim=1, keepdim=True).clamp_min(1e-20))
            feats.append(h / (norm + 1e-10))
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ST-LPIPS distance.

        Args:
            x, y: ``(B, 3, H, W)`` float RGB in [0, 1], same shape, H and W >= 32.

        Returns:
            ``(B,)`` distances >= 0, lower = more similar, in the module's dtype (inputs are
            cast to it, so ``.half()`` / ``.to(torch.bfloat16)`` on GPU works as usual).
        """
        self._check(x, y)
        x, y = x.to(self.shift.dtype), y.to(self.shift.dtype)  # e.g. float64 in, float32 module
        n = x.shape[0]
        dist = x.new_zeros(n)
        # One pass over both batches: (2B, C_l, H_l, W_l) per level, split back into x and y.
        for head, f in zip(self.heads, self.features(torch.cat([x, y]))):
            dist = dist + head((f[:n] - f[n:]) ** 2).mean(dim=(1, 2, 3))
        return dist

    @staticmethod
    def _check(x: torch.Tensor, y: torch.Tensor) -> None:
        for name, t in (("x", x), ("y", y)):
            check_image_batch(t, f"STLPIPS: {name}", min_size=MIN_SIZE, tol=0.5)
        if x.shape != y.shape:
            raise ValueError(f"STLPIPS: x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
