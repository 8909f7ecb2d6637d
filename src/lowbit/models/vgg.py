"""VGG-Small for CIFAR-10, the VGG-like network of BinaryConnect / BNN and LQ-Nets.

(2x128C3)-MP2-(2x256C3)-MP2-(2x512C3)-MP2-FC: six 3x3 convolutions (each conv -> BN -> ReLU, no bias)
in three pairs, a 2x2 max pool after each pair (32 -> 16 -> 8 -> 4), then the classifier on the
512 x 4 x 4 features. ``fc_hidden=()`` (default) is LQ-Nets' VGG-Small, one Linear 8192 -> 10
(4.66M parameters); ``fc_hidden=(1024, 1024)`` is the BNN / BinaryConnect net, with two hidden
Linear -> BN -> ReLU layers of 1024 (14.0M parameters). ``width_mult`` scales every conv width.

References:
    Courbariaux et al., "Binarized Neural Networks", arXiv:1602.02830 (and BinaryConnect, arXiv:1511.00363).
    Zhang et al., "LQ-Nets: Learned Quantization for Highly Accurate and Compact Deep Neural Networks",
    arXiv:1807.10029.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.models._layers import ConvBNAct, check_positive, check_positive_int
from lowbit.models._registry import register_model

__all__ = ["VGGSmall", "vgg_small"]


class VGGSmall(nn.Module):
    def __init__(
        self, num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0, fc_hidden: tuple[int, ...] = (),
        input_size: int = 32,
    ) -> None:
        super().__init__()
        check_positive("width_mult", width_mult)
        for h in fc_hidden:
            check_positive_int("each fc_hidden width", h)
        if input_size % 8:
            raise ValueError(f"input_size must be a multiple of 8 (three 2x2 max pools), got {input_size}")
        widths = [max(1, round(c * width_mult)) for c in (128, 256, 512)]
        layers: list[nn.Module] = []
        ch = in_chans
        for w in widths:
            layers += [ConvBNAct(ch, w), ConvBNAct(w, w), nn.MaxPool2d(2)]
            ch = w
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = []
        features = ch * (input_size // 8) ** 2  # 512 x 4 x 4 = 8192 at width 1
        for h in fc_hidden:
            head += [nn.Linear(features, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
            features = h
        head.append(nn.Linear(features, num_classes))
        self.classifier = nn.Sequential(*head)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).flatten(1)  # (B, 512, 4, 4) -> (B, 8192)
        return self.classifier(x)


@register_model((3, 32, 32), "cifar10", "LQ-Nets, arXiv:1807.10029; Binarized Neural Networks, arXiv:1602.02830")
def vgg_small(
    num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0, fc_hidden: tuple[int, ...] = ()
) -> nn.Module:
    return VGGSmall(num_classes, in_chans, width_mult, tuple(fc_hidden))
