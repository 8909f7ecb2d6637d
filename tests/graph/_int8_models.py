"""Small models and calibrated int8 versions shared by the int8 graph, runtime and export tests."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.graph import Int8Config, calibrate, convert, prepare_ptq
from lowbit.models import create_model
from lowbit.models.mobilenet import MobileNetV2
from lowbit.models.resnet import CifarResNet


def _bn_stats(model: nn.Module) -> nn.Module:
    """Non-trivial batch-norm statistics, as a trained model has (fresh ones are mean 0, var 1)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.3, 0.3, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.3, 0.3, generator=g)
    return model.eval()


def small_models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return {
        "lenet5": (create_model("lenet5").eval(), (1, 28, 28)),
        "resnet8": (_bn_stats(CifarResNet(8, width=8)), (3, 16, 16)),  # residual adds, option-A shortcuts
        "mobilenet_v2": (_bn_stats(MobileNetV2(width_mult=0.25)), (3, 16, 16)),  # depthwise, ReLU6
    }


def int8(model: nn.Module, shape: tuple[int, ...], config: Int8Config | None = None,
         batches: int = 2) -> tuple[nn.Module, nn.Module]:
    """(prepared + calibrated, converted) versions of ``model``."""
    g = torch.Generator().manual_seed(2)
    prepared = prepare_ptq(model, config or Int8Config())
    calibrate(prepared, [torch.randn(16, *shape, generator=g) for _ in range(batches)], n_batches=batches)
    return prepared, convert(prepared)
