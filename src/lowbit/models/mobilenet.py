"""MobileNet v1 (depthwise-separable convolutions) and MobileNet v2 (inverted residuals).

MobileNet v1: a 3x3 stem conv of 32 then 13 depthwise-separable layers (3x3 depthwise conv -> BN ->
ReLU, 1x1 pointwise conv -> BN -> ReLU), global average pool, one Linear. The width multiplier
``alpha`` thins every layer (channels ``max(8, int(c * alpha))``, as in the TF-slim reference); the
resolution multiplier ``rho`` only changes the input the net is meant for, ``round(rho * 224)`` (or
``* 32``), recorded in ``model.input_shape``: the net itself is fully convolutional. 1.0 MobileNet-224
has 4,231,976 parameters and 569M multiply-adds (paper: 4.2M, 569M).

MobileNet v2: a 3x3 stem conv of 32, 17 inverted-residual blocks (1x1 expansion by t -> BN -> ReLU6,
3x3 depthwise -> BN -> ReLU6, linear 1x1 projection -> BN; identity shortcut when the shape is kept),
a 1x1 conv to 1280, pool, dropout, Linear. ``width_mult`` scales channels, rounded to multiples of 8
(the last conv never shrinks below 1280). 1.0 MobileNet v2-224 has 3,504,872 parameters and 300M
multiply-adds (paper: 3.4M, 300M; the paper's count leaves out batch norm and differs slightly).

CIFAR adaptation (default, 32x32 input): the overall stride is 8 instead of 32, by making two
stride-2 layers stride 1: in v1 the stem conv and the first stride-2 depthwise conv (64 -> 128
channels); in v2 the stem conv and the first block of the 24-channel stage. The feature map is
4x4 before the pool (32 -> 16 -> 8 -> 4). ``imagenet=True`` gives the original 224x224 strides and
1000 classes.

References:
    Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision
    Applications", arXiv:1704.04861.
    Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", arXiv:1801.04381.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.models._layers import ConvBNAct, check_positive, make_divisible
from lowbit.models._registry import register_model

__all__ = ["MobileNetV1", "MobileNetV2", "InvertedResidual", "mobilenet_v1", "mobilenet_v2"]

_RELU6 = lambda: nn.ReLU6(inplace=True)  # noqa: E731

# MobileNet v1 body (paper Table 1): (pointwise output channels, depthwise stride) per separable layer.
_V1_LAYERS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]

# MobileNet v2 body (paper Table 2): expansion t, output channels c, repeats n, stride of the first s.
_V2_STAGES = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _input_shape(in_chans: int, imagenet: bool, rho: float = 1.0) -> tuple[int, int, int]:
    side = round((224 if imagenet else 32) * rho)
    return (in_chans, side, side)


class MobileNetV1(nn.Module):
    def __init__(
        self, num_classes: int = 10, in_chans: int = 3, alpha: float = 1.0, rho: float = 1.0, imagenet: bool = False
    ) -> None:
        super().__init__()
        check_positive("alpha", alpha)
        check_positive("rho", rho)
        self.input_shape = _input_shape(in_chans, imagenet, rho)
        width = lambda c: max(8, int(c * alpha))  # noqa: E731
        ch = width(32)
        layers: list[nn.Module] = [ConvBNAct(in_chans, ch, 3, stride=2 if imagenet else 1)]
        for i, (out, stride) in enumerate(_V1_LAYERS):
            if i == 1 and not imagenet:
                stride = 1  # CIFAR: the first stride-2 layer (64 -> 128 channels) keeps 32x32
            layers += [ConvBNAct(ch, ch, 3, stride, groups=ch), ConvBNAct(ch, width(out), 1)]
            ch = width(out)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)  # (B, C, 1, 1) -> (B, C)
        return self.fc(x)


class InvertedResidual(nn.Module):
    """MobileNet v2 block: expand 1x1 (left out when t = 1) -> depthwise 3x3 -> linear 1x1 projection."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        layers: list[nn.Module] = [ConvBNAct(in_ch, hidden, 1, act=_RELU6)] if expand != 1 else []
        layers += [
            ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act=_RELU6),  # depthwise
            ConvBNAct(hidden, out_ch, 1, act=None),  # linear bottleneck: no activation
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(
        self, num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0, imagenet: bool = False,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        check_positive("width_mult", width_mult)
        self.input_shape = _input_shape(in_chans, imagenet)
        ch = make_divisible(32 * width_mult)
        layers: list[nn.Module] = [ConvBNAct(in_chans, ch, 3, stride=2 if imagenet else 1, act=_RELU6)]
        for stage, (t, c, n, s) in enumerate(_V2_STAGES):
            out = make_divisible(c * width_mult)
            if stage == 1 and not imagenet:
                s = 1  # CIFAR: the 24-channel stage keeps 32x32
            for i in range(n):
                layers.append(InvertedResidual(ch, out, s if i == 0 else 1, t))
                ch = out
        last = make_divisible(1280 * max(1.0, width_mult))
        layers.append(ConvBNAct(ch, last, 1, act=_RELU6))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(last, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)  # (B, 1280, 1, 1) -> (B, 1280)
        return self.fc(self.dropout(x))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def _classes(num_classes: int | None, imagenet: bool) -> int:
    return num_classes if num_classes is not None else (1000 if imagenet else 10)


@register_model((3, 32, 32), "cifar10", "MobileNets, arXiv:1704.04861")
def mobilenet_v1(
    num_classes: int | None = None, in_chans: int = 3, alpha: float = 1.0, rho: float = 1.0, imagenet: bool = False
) -> nn.Module:
    """``num_classes`` defaults to 10, or 1000 with ``imagenet=True``."""
    return MobileNetV1(_classes(num_classes, imagenet), in_chans, alpha, rho, imagenet)


@register_model((3, 32, 32), "cifar10", "MobileNetV2, arXiv:1801.04381")
def mobilenet_v2(
    num_classes: int | None = None, in_chans: int = 3, width_mult: float = 1.0, imagenet: bool = False,
    dropout: float = 0.2,
) -> nn.Module:
    """``num_classes`` defaults to 10, or 1000 with ``imagenet=True``."""
    return MobileNetV2(_classes(num_classes, imagenet), in_chans, width_mult, imagenet, dropout)
