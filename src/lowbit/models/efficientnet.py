"""EfficientNet-B0 and its compound-scaled family (MBConv blocks with squeeze-and-excitation).

MBConv block (paper Fig. 2 / MnasNet): 1x1 expansion by ``t`` -> BN -> swish (left out when t = 1),
k x k depthwise conv -> BN -> swish, squeeze-and-excitation (global pool, 1x1 conv to a quarter of
the block's *input* channels -> swish, 1x1 conv back -> sigmoid, channel-wise scale), linear 1x1
projection -> BN; identity shortcut when stride is 1 and the channels are kept (no drop-connect).

B0 (paper Table 1): stem conv 32@3x3/2, seven stages (t, k, stride, channels, repeats) =
(1,3,1,16,1) (6,3,2,24,2) (6,5,2,40,2) (6,3,2,80,3) (6,5,1,112,3) (6,5,2,192,4) (6,3,1,320,1),
head conv 1x1 to 1280, pool, dropout, Linear. 5,288,548 parameters and 0.39B multiply-adds at 224x224
(paper: 5.3M, 0.39B FLOPS).

Compound scaling with coefficient ``phi``: depth x 1.2^phi (repeats rounded up), width x 1.1^phi
(channels rounded to multiples of 8, never more than 10% down), resolution x 1.15^phi (224 -> recorded
in ``model.input_shape``; the net is fully convolutional). Note: the released B1-B7 use hand-picked
rounded coefficients (B1 = width 1.0, depth 1.1, 240 px; ...), not exactly these powers.

``fused=True``: the EdgeTPU variant's fused-MBConv in the early stages: in stages 1-3 (16, 24 and
40 channels at B0) the expansion 1x1 + depthwise conv become one regular 3x3 conv (stride of the
stage, output in x t channels) -> BN -> swish, then the linear 1x1 projection (with t = 1, stage 1,
the single 3x3 conv goes straight to the output channels and keeps its activation). The 5x5 kernel of
stage 3 becomes 3x3 and fused blocks have no SE, as in EfficientNet-EdgeTPU and EfficientNetV2.
Stages 4-7 are unchanged.

CIFAR adaptation (default, 32x32 input): the overall stride is 8 instead of 32: the stem conv and the
first block of stage 2 (24 channels) use stride 1, so the maps are 32 -> 16 -> 8 -> 4 before the
pool. ``imagenet=True`` gives the original 224x224 strides and 1000 classes.

References:
    Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks",
    arXiv:1905.11946.
    Gupta & Tan, "EfficientNet-EdgeTPU" (Google AI blog, 2019); Tan & Le, "EfficientNetV2",
    arXiv:2104.00298 (fused-MBConv).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.models._layers import ConvBNAct, make_divisible
from lowbit.models._registry import register_model

__all__ = ["SqueezeExcite", "MBConv", "FusedMBConv", "EfficientNet", "efficientnet_b0"]

_SWISH = lambda: nn.SiLU(inplace=True)  # noqa: E731

# B0 stages: expansion t, kernel k, stride of the first block, output channels, repeats
_B0_STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
              (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
_FUSED_STAGES = 3  # with fused=True, stages 1-3 use FusedMBConv


class SqueezeExcite(nn.Module):
    """Channel attention: scale = sigmoid(W2 swish(W1 avgpool(x))), with 1x1 convs for W1, W2."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.act = nn.SiLU(inplace=True)
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gate(self.expand(self.act(self.reduce(self.pool(x)))))  # (B, C, 1, 1)
        return x * scale


class MBConv(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, se_ratio: float = 0.25) -> None:
        super().__init__()
        hidden = in_ch * expand
        layers: list[nn.Module] = [ConvBNAct(in_ch, hidden, 1, act=_SWISH)] if expand != 1 else []
        layers += [
            ConvBNAct(hidden, hidden, kernel, stride, groups=hidden, act=_SWISH),
            SqueezeExcite(hidden, max(1, int(in_ch * se_ratio))),
            ConvBNAct(hidden, out_ch, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_residual else self.block(x)


class FusedMBConv(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        if expand == 1:
            layers: list[nn.Module] = [ConvBNAct(in_ch, out_ch, 3, stride, act=_SWISH)]
        else:
            hidden = in_ch * expand
            layers = [ConvBNAct(in_ch, hidden, 3, stride, act=_SWISH), ConvBNAct(hidden, out_ch, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_residual else self.block(x)


class EfficientNet(nn.Module):
    def __init__(
        self, num_classes: int = 10, in_chans: int = 3, phi: float = 0.0, imagenet: bool = False,
        fused: bool = False, dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if not (isinstance(phi, (int, float)) and math.isfinite(phi)):
            raise ValueError(f"phi must be a finite number, got {phi!r}")
        width, depth = 1.1**phi, 1.2**phi
        side = round((224 if imagenet else 32) * 1.15**phi)
        self.input_shape = (in_chans, side, side)
        ch = make_divisible(32 * width)
        layers: list[nn.Module] = [ConvBNAct(in_chans, ch, 3, stride=2 if imagenet else 1, act=_SWISH)]
        for stage, (t, k, s, c, n) in enumerate(_B0_STAGES):
            out = make_divisible(c * width)
            if stage == 1 and not imagenet:
                s = 1  # CIFAR: the 24-channel stage keeps 32x32
            for i in range(math.ceil(n * depth)):
                stride = s if i == 0 else 1
                if fused and stage < _FUSED_STAGES:
                    layers.append(FusedMBConv(ch, out, stride, t))
                else:
                    layers.append(MBConv(ch, out, k, stride, t))
                ch = out
        head = make_divisible(1280 * width)
        layers.append(ConvBNAct(ch, head, 1, act=_SWISH))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(head, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.uniform_(m.weight, -1 / math.sqrt(m.out_features), 1 / math.sqrt(m.out_features))
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)  # (B, 1280, 1, 1) -> (B, 1280)
        return self.fc(self.dropout(x))


@register_model((3, 32, 32), "cifar10", "EfficientNet, arXiv:1905.11946")
def efficientnet_b0(
    num_classes: int | None = None, in_chans: int = 3, phi: float = 0.0, imagenet: bool = False,
    fused: bool = False, dropout: float = 0.2,
) -> nn.Module:
    """B0 (``phi=0``), compound-scaled by ``phi``; ``num_classes`` defaults to 10, or 1000 with ``imagenet=True``."""
    classes = num_classes if num_classes is not None else (1000 if imagenet else 10)
    return EfficientNet(classes, in_chans, phi, imagenet, fused, dropout)
