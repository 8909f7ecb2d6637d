"""The MNIST multi-layer perceptron of BinaryNet / BNN (Courbariaux et al. 2016).

784 inputs -> ``depth`` hidden layers of ``width`` units (paper: 3 x 4096), each
Linear -> BatchNorm1d -> activation, -> a Linear classifier. The hidden Linears have no bias, since
the batch norm right after them has its own shift (as in larq's BNN models). In the paper the
activation is the sign function, trained through a hard-tanh straight-through estimator; here the
float model uses ``act="relu"`` (default) or ``act="hardtanh"`` (the clipping the binarized version
needs), and lowbit's quantizers binarize it. With the defaults it has 36.8M parameters.

References:
    Courbariaux et al., "Binarized Neural Networks: Training Deep Neural Networks with Weights and
    Activations Constrained to +1 or -1", arXiv:1602.02830.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.models._layers import check_activation, check_positive_int
from lowbit.models._registry import register_model

__all__ = ["BinaryNetMLP", "mlp_bnn"]


class BinaryNetMLP(nn.Module):
    def __init__(
        self, num_classes: int = 10, in_features: int = 784, width: int = 4096, depth: int = 3, act: str = "relu"
    ) -> None:
        super().__init__()
        for name, value in (("width", width), ("depth", depth), ("in_features", in_features)):
            check_positive_int(name, value)
        make_act = check_activation(act, ("relu", "hardtanh"))
        layers: list[nn.Module] = []
        features = in_features
        for _ in range(depth):
            layers += [nn.Linear(features, width, bias=False), nn.BatchNorm1d(width), make_act()]
            features = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, 1, 28, 28) -> (B, 784)
        return self.fc(self.features(x))


@register_model((1, 28, 28), "mnist", "Binarized Neural Networks, arXiv:1602.02830")
def mlp_bnn(
    num_classes: int = 10, in_chans: int = 1, input_size: int = 28, width: int = 4096, depth: int = 3,
    act: str = "relu",
) -> nn.Module:
    return BinaryNetMLP(num_classes, in_chans * input_size * input_size, width, depth, act)
