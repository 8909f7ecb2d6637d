"""SqueezeNet v1.0: AlexNet-level accuracy with 50x fewer parameters, built from Fire modules.

Fire module: a 1x1 "squeeze" conv to ``s`` channels -> ReLU, then two parallel "expand" convs, 1x1 and
3x3 (``e`` channels each) -> ReLU, concatenated on channels (2e out). v1.0 (paper Table 1): conv1
96@7x7/2 -> maxpool 3/2 -> fire2-4 -> maxpool -> fire5-8 -> maxpool -> fire9 -> dropout 0.5 ->
conv10 1x1 to the classes -> ReLU -> global average pool. No batch norm and no fully connected
layer; convolutions have biases. The ImageNet net has 1,248,424 parameters (paper: 1.2M, 4.8MB).

CIFAR adaptation (default, 32x32 input): conv1 becomes 96@3x3 with stride 1 (padding 1) instead of
7x7/2; the three 3x3/2 max pools (ceil mode) are kept, so the maps are 32 -> 16 -> 8 -> 4 before the
pool. ``imagenet=True`` gives the original 224x224 net and 1000 classes.

References:
    Iandola et al., "SqueezeNet: AlexNet-level accuracy with 50x fewer parameters and <0.5MB model
    size", arXiv:1602.07360.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.models._registry import register_model

__all__ = ["Fire", "SqueezeNet", "squeezenet"]

# fire2 .. fire9 of v1.0: (squeeze channels s, expand channels e of each of the 1x1 and 3x3 branches)
_FIRES = [(16, 64), (16, 64), (32, 128), (32, 128), (48, 192), (48, 192), (64, 256), (64, 256)]
_POOL_BEFORE = {0, 3, 7}  # indices into _FIRES: the 3x3/2 max pools after conv1, fire4 and fire8


class Fire(nn.Module):
    def __init__(self, in_ch: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(in_ch, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.squeeze(x))
        return torch.cat([self.relu(self.expand1x1(x)), self.relu(self.expand3x3(x))], 1)  # (B, 2e, H, W)


class SqueezeNet(nn.Module):
    def __init__(
        self, num_classes: int = 10, in_chans: int = 3, imagenet: bool = False, dropout: float = 0.5
    ) -> None:
        super().__init__()
        self.input_shape = (in_chans, 224, 224) if imagenet else (in_chans, 32, 32)
        conv1 = nn.Conv2d(in_chans, 96, 7, stride=2) if imagenet else nn.Conv2d(in_chans, 96, 3, padding=1)
        layers: list[nn.Module] = [conv1, nn.ReLU(inplace=True)]
        ch = 96
        for i, (s, e) in enumerate(_FIRES):
            if i in _POOL_BEFORE:
                layers.append(nn.MaxPool2d(3, 2, ceil_mode=True))
            layers.append(Fire(ch, s, e))
            ch = 2 * e
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Conv2d(ch, num_classes, 1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is self.classifier[1]:
                    nn.init.normal_(m.weight, 0.0, 0.01)  # conv10: small, as in the reference
                else:
                    nn.init.kaiming_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x)).flatten(1)  # (B, classes, 1, 1) -> (B, classes)


@register_model((3, 32, 32), "cifar10", "SqueezeNet, arXiv:1602.07360")
def squeezenet(
    num_classes: int | None = None, in_chans: int = 3, imagenet: bool = False, dropout: float = 0.5
) -> nn.Module:
    """``num_classes`` defaults to 10, or 1000 with ``imagenet=True``."""
    classes = num_classes if num_classes is not None else (1000 if imagenet else 10)
    return SqueezeNet(classes, in_chans, imagenet, dropout)
