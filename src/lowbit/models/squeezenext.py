"""SqueezeNext: hardware-aware small networks; here the 1.0-SqNxt-23 layout.

Block (paper Fig. 2) for input channels C: 1x1 conv to C/2 -> 1x1 conv to C/4 -> 3x1 conv to C/2 ->
1x3 conv to C/2 -> 1x1 conv to the block's output channels; every conv is conv -> BN -> ReLU (no
bias), the sum with the shortcut goes through a final ReLU. The first block of a stage changes the
shape; there, as in the authors' released models, the shortcut is a 1x1 conv -> BN -> ReLU
(stride 2 where the stage downsamples), and the squeeze is milder: a stride-2 block squeezes to C
and C/2 (the strided 1x1 does the downsampling), a block with fewer output than input channels
squeezes to C/4 and C/8 (only the first block, 64 -> 32 channels).

Network (1.0-SqNxt-23): conv 64@7x7/2 -> maxpool 3x3/2 -> four stages of [6, 6, 8, 1] blocks with
32, 64, 128, 256 output channels (stride 1, 2, 2, 2) -> 1x1 conv to 128 -> global average pool ->
Linear. 21 blocks of 5 convs; "23" counts the stem and classifier like the paper's naming. The
ImageNet net has 0.725M parameters (paper Table: 0.72M). ``width_mult`` scales every channel count
(1.5- and 2.0-SqNxt-23 in the paper).

CIFAR adaptation (default, 32x32 input): the stem is a 3x3 conv with stride 1 and no max pool, so
the stages see 32 -> 16 -> 8 -> 4; ``imagenet=True`` gives the original 224x224 stem and 1000 classes.

References:
    Gholami et al., "SqueezeNext: Hardware-Aware Neural Network Design", arXiv:1803.10615.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.models._layers import ConvBNAct, check_positive, check_positive_int
from lowbit.models._registry import register_model

__all__ = ["SqueezeNextBlock", "SqueezeNext", "squeezenext"]

_STAGE_CHANNELS = (32, 64, 128, 256)
_STAGE_BLOCKS_23 = (6, 6, 8, 1)


class SqueezeNextBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        # squeeze to in/r then in/(2r): r = 2 normally, 1 when downsampling, 4 when the width shrinks
        r = 1 if stride == 2 else 4 if in_ch > out_ch else 2
        mid = max(1, in_ch // r)
        low = max(1, in_ch // (2 * r))
        self.squeeze1 = ConvBNAct(in_ch, mid, 1, stride)
        self.squeeze2 = ConvBNAct(mid, low, 1)
        self.conv3x1 = ConvBNAct(low, mid, (3, 1))
        self.conv1x3 = ConvBNAct(mid, mid, (1, 3))
        self.expand = ConvBNAct(mid, out_ch, 1)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = ConvBNAct(in_ch, out_ch, 1, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(self.conv1x3(self.conv3x1(self.squeeze2(self.squeeze1(x)))))
        return self.relu(out + self.shortcut(x))


class SqueezeNext(nn.Module):
    def __init__(
        self, num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0,
        blocks: tuple[int, ...] = _STAGE_BLOCKS_23, imagenet: bool = False,
    ) -> None:
        super().__init__()
        check_positive("width_mult", width_mult)
        if len(blocks) != len(_STAGE_CHANNELS):
            raise ValueError(f"blocks must give the block count of each of the 4 stages, got {blocks!r}")
        for b in blocks:
            check_positive_int("each stage's block count", b)
        self.input_shape = (in_chans, 224, 224) if imagenet else (in_chans, 32, 32)
        scale = lambda c: max(1, int(c * width_mult))  # noqa: E731
        ch = scale(64)
        if imagenet:
            self.stem = nn.Sequential(ConvBNAct(in_chans, ch, 7, 2), nn.MaxPool2d(3, 2, ceil_mode=True))
        else:
            self.stem = nn.Sequential(ConvBNAct(in_chans, ch, 3, 1))
        stages = []
        for i, (c, n) in enumerate(zip(_STAGE_CHANNELS, blocks, strict=True)):
            layers = []
            for j in range(n):
                layers.append(SqueezeNextBlock(ch, scale(c), 2 if i > 0 and j == 0 else 1))
                ch = scale(c)
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.head = ConvBNAct(ch, scale(128), 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(scale(128), num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.stages(self.stem(x)))
        return self.fc(self.pool(x).flatten(1))  # (B, 128, 1, 1) -> (B, 128)


@register_model((3, 32, 32), "cifar10", "SqueezeNext, arXiv:1803.10615")
def squeezenext(
    num_classes: int | None = None, in_chans: int = 3, width_mult: float = 1.0, imagenet: bool = False
) -> nn.Module:
    """1.0-SqNxt-23 (``width_mult`` = 1.0); ``num_classes`` defaults to 10, or 1000 with ``imagenet=True``."""
    classes = num_classes if num_classes is not None else (1000 if imagenet else 10)
    return SqueezeNext(classes, in_chans, width_mult, _STAGE_BLOCKS_23, imagenet)
