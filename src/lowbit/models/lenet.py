"""LeNet-300-100 and LeNet-5 in the Caffe variants used by Deep Compression.

LeNet-300-100: 784-300-100-10 fully connected, ReLU (266,610 parameters).
LeNet-5 (Caffe): conv 20@5x5 -> maxpool 2 -> conv 50@5x5 -> maxpool 2 -> fc 500 -> ReLU -> fc 10
(431,080 parameters); unlike LeCun's original there is no nonlinearity after the convolutions.

References:
    LeCun et al., "Gradient-based learning applied to document recognition", Proc. IEEE 1998.
    Han et al., "Deep Compression", arXiv:1510.00149 (Table 1-3 use these variants).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.models._registry import register_model

__all__ = ["LeNet300100", "LeNet5", "lenet300_100", "lenet5"]


class LeNet300100(nn.Module):
    def __init__(self, num_classes: int = 10, in_features: int = 784) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, 1, 28, 28) -> (B, 784)
        return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 1, input_size: int = 28) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 20, 5)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.pool2 = nn.MaxPool2d(2)
        side = ((input_size - 4) // 2 - 4) // 2  # 28 -> 24 -> 12 -> 8 -> 4
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool2(self.conv2(self.pool1(self.conv1(x))))
        return self.fc2(self.relu(self.fc1(x.flatten(1))))


_DC = "Deep Compression, arXiv:1510.00149"


@register_model((1, 28, 28), "mnist", _DC)
def lenet300_100(num_classes: int = 10, in_features: int = 784) -> nn.Module:
    return LeNet300100(num_classes, in_features)


@register_model((1, 28, 28), "mnist", _DC)
def lenet5(num_classes: int = 10, in_chans: int = 1, input_size: int = 28) -> nn.Module:
    return LeNet5(num_classes, in_chans, input_size)
