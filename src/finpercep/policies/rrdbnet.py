"""RRDBNet: the ESRGAN / Real-ESRGAN generator, as a policy.

Wang et al., "ESRGAN: Enhanced Super-Resolution Generative Adversarial Networks", ECCVW 2018
(section 3.1, Fig. 4: Residual-in-Residual Dense Blocks, residual scaling 0.2), the generator of
Real-ESRGAN x4plus (Wang et al., ICCVW 2021) and of RealSR DF2K (Ji et al., CVPRW 2020).

Parameter names follow BasicSR's ``RRDBNet`` (``conv_first``, ``body.N.rdbK.convJ``,
``conv_body``, ``conv_up1``, ``conv_up2``, ``conv_hr``, ``conv_last``), so a BasicSR x4 state dict
(e.g. the ``params_ema`` of ``RealESRGAN_x4plus.pth``) loads with ``strict=True`` where a user has
one. The weights this project ships come from the ncnn packages through
:mod:`finpercep.policies.convert`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from finpercep.checks import check_image_batch


@dataclass(frozen=True)
class RRDBConfig:
    """Shape of an x4 RRDBNet.

    Fields:
        num_in_ch: input channels (3: policies take RGB).
        num_out_ch: output channels (3: policies return RGB).
        num_feat: feature channels of the trunk (64 in ESRGAN / Real-ESRGAN).
        num_block: number of RRDB blocks in the trunk (23 in ESRGAN / Real-ESRGAN / RealSR).
        num_grow_ch: growth channels of each dense-block convolution (32).
        scale: upscaling factor; only 4 (two nearest x2 upsampling + conv stages) is supported.
        prepad: LR pixels of replicate padding added on each side before the network and cropped
            (``prepad * scale`` pixels) from the output afterwards. 10 reproduces the reference
            ncnn programs (realesrgan-ncnn-vulkan, RealESRGANer's ``pre_pad``) and the data
            engine's real SR families exactly, including at the image border; 0 is the plain
            network and the cheapest to fine-tune (padding costs ``((h + 2 p) / h)^2`` compute).
        source: where the weights came from (e.g. the ncnn package and files they were converted
            from); informational only, it does not change the network.
    """

    num_in_ch: int = 3
    num_out_ch: int = 3
    num_feat: int = 64
    num_block: int = 23
    num_grow_ch: int = 32
    scale: int = 4
    prepad: int = 0
    source: str = ""

    def __post_init__(self) -> None:
        for f in ("num_in_ch", "num_out_ch", "num_feat", "num_block", "num_grow_ch"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"RRDBConfig.{f} must be >= 1, got {getattr(self, f)}")
        if self.scale != 4:
            raise ValueError(f"RRDBConfig.scale must be 4 (the only RRDBNet variant implemented), got {self.scale}")
        if self.prepad < 0:
            raise ValueError(f"RRDBConfig.prepad must be >= 0, got {self.prepad}")


def straight_through_clamp(x: torch.Tensor) -> torch.Tensor:
    """``x.clamp(0, 1)`` in value, identity in gradient.

    A policy's output must lie in [0, 1] (the Policy contract; rewards check their input range),
    but a plain clamp has zero gradient wherever the network overshoots, so a reward could never
    pull an overshooting pixel back. SR networks are trained on their raw output (BasicSR clamps
    only when writing images); the straight-through estimator keeps exactly that gradient.
    """
    return x + (x.clamp(0, 1) - x).detach()


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convolutions, each seeing the concatenation of the input and all previous outputs
    (dense connections), LeakyReLU 0.2 after the first four; output ``x + 0.2 * conv5(...)``."""

    def __init__(self, num_feat: int, num_grow_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = _lrelu
        x1 = act(self.conv1(x))
        x2 = act(self.conv2(torch.cat((x, x1), 1)))
        x3 = act(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = act(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x  # residual scaling (ESRGAN section 3.1)


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks, output ``x + 0.2 * rdb3(rdb2(rdb1(x)))``."""

    def __init__(self, num_feat: int, num_grow_ch: int) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator, x4: ``lr (B, 3, h, w)`` in [0, 1] -> ``sr (B, 3, 4h, 4w)`` in [0, 1].

    conv_first -> ``num_block`` RRDBs -> conv_body (+ the conv_first features) -> two stages of
    nearest x2 upsampling + conv + LeakyReLU 0.2 -> conv_hr + LeakyReLU 0.2 -> conv_last.

    Output range: the returned values are always clamped to [0, 1] (the Policy contract), through
    :func:`straight_through_clamp`, so gradients reach the parameters and the input as if the
    output were unclamped (what reward backpropagation needs), in train and eval mode alike.

    Convolutions are the registered ``nn.Conv2d`` modules in forward order, which the ncnn
    converter relies on.
    """

    arch = "rrdbnet"

    def __init__(self, cfg: RRDBConfig = RRDBConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.scale = cfg.scale
        self.name = "rrdbnet"
        nf, gc = cfg.num_feat, cfg.num_grow_ch
        self.conv_first = nn.Conv2d(cfg.num_in_ch, nf, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(nf, gc) for _ in range(cfg.num_block)))
        self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, cfg.num_out_ch, 3, 1, 1)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        check_image_batch(lr, "RRDBNet")
        p, s = self.cfg.prepad, self.scale
        x = F.pad(lr, (p, p, p, p), mode="replicate") if p else lr
        act = _lrelu
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = act(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = act(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        out = self.conv_last(act(self.conv_hr(feat)))
        if p:
            out = out[..., p * s : out.shape[-2] - p * s, p * s : out.shape[-1] - p * s]
        return straight_through_clamp(out)


__all__ = ["RRDB", "RRDBConfig", "RRDBNet", "ResidualDenseBlock", "straight_through_clamp"]
