"""Small building blocks and argument checks shared by the zoo files (plain torch modules only)."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

from torch import nn

__all__ = ["ConvBNAct", "make_divisible", "check_positive", "check_positive_int", "check_activation"]


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` without going below 90% of it.

    The channel rounding of the MobileNet v2 / EfficientNet reference code (TF ``_make_divisible``):
    hardware likes channel counts that are multiples of 8.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:  # never round down by more than 10%
        rounded += divisor
    return rounded


def check_positive(name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number > 0."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_positive_int(name: str, value: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "hardtanh": lambda: nn.Hardtanh(inplace=True),
}


def check_activation(act: str, allowed: tuple[str, ...]) -> Callable[[], nn.Module]:
    """The factory for activation ``act``; ``ValueError`` listing ``allowed`` for anything else."""
    if act not in allowed:
        raise ValueError(f"act must be one of {', '.join(repr(a) for a in allowed)}, got {act!r}")
    return _ACTIVATIONS[act]


class ConvBNAct(nn.Sequential):
    """``conv`` -> ``bn`` -> ``act`` (``act`` left out when ``act=None``); a bias-free convolution.

    ``groups=in_ch`` gives a depthwise convolution; padding keeps the size for odd kernels at stride 1.
    """

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int | tuple[int, int] = 3, stride: int = 1, groups: int = 1,
        act: Callable[[], nn.Module] | None = lambda: nn.ReLU(inplace=True),
    ) -> None:
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv=nn.Conv2d(in_ch, out_ch, (kh, kw), stride, (kh // 2, kw // 2), groups=groups, bias=False),
            bn=nn.BatchNorm2d(out_ch),
        )
        if act is not None:
            layers["act"] = act()
        super().__init__(layers)
