"""ResNet for CIFAR (He et al. 2016, section 4.2): 6n+2 layers, three stages of 16/32/64 channels.

Shortcuts: option "A" (the paper's CIFAR choice, default) is the parameter-free identity, with
stride-2 subsampling and zero-padded extra channels where the shape changes; option "B" uses a
1x1 convolution + batch norm projection there. ResNet-20 with option A has 0.27M parameters.

References:
    He et al., "Deep Residual Learning for Image Recognition", arXiv:1512.03385.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.models._registry import register_model

__all__ = ["CifarResNet", "BasicBlock", "resnet8", "resnet20", "resnet32", "resnet44", "resnet56"]


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            if shortcut == "A":
                self.shortcut = _PadShortcut(stride, out_ch - in_ch)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class _PadShortcut(nn.Module):
    """Option A: subsample by ``stride`` and zero-pad ``extra`` channels (half before, half after)."""

    def __init__(self, stride: int, extra: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class CifarResNet(nn.Module):
    def __init__(
        self, depth: int, num_classes: int = 10, in_chans: int = 3, width: int = 16, shortcut: str = "A"
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' (zero-pad identity) or 'B' (1x1 projection), got {shortcut!r}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        layers, ch = [], width
        for stage, out_ch in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(ch, out_ch, stride, shortcut))
                ch = out_ch
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


_PAPER = "Deep Residual Learning for Image Recognition, arXiv:1512.03385"


@register_model((3, 32, 32), "cifar10", _PAPER)
def resnet8(num_classes: int = 10, in_chans: int = 3, shortcut: str = "A") -> nn.Module:
    """One basic block per stage: the student of the FSP paper (Yim et al. 2017)."""
    return CifarResNet(8, num_classes, in_chans, shortcut=shortcut)


@register_model((3, 32, 32), "cifar10", _PAPER)
def resnet20(num_classes: int = 10, in_chans: int = 3, shortcut: str = "A") -> nn.Module:
    return CifarResNet(20, num_classes, in_chans, shortcut=shortcut)


@register_model((3, 32, 32), "cifar10", _PAPER)
def resnet32(num_classes: int = 10, in_chans: int = 3, shortcut: str = "A") -> nn.Module:
    return CifarResNet(32, num_classes, in_chans, shortcut=shortcut)


@register_model((3, 32, 32), "cifar10", _PAPER)
def resnet44(num_classes: int = 10, in_chans: int = 3, shortcut: str = "A") -> nn.Module:
    return CifarResNet(44, num_classes, in_chans, shortcut=shortcut)


@register_model((3, 32, 32), "cifar10", _PAPER)
def resnet56(num_classes: int = 10, in_chans: int = 3, shortcut: str = "A") -> nn.Module:
    return CifarResNet(56, num_classes, in_chans, shortcut=shortcut)
