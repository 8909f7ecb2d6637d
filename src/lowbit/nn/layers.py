"""Quantized drop-in layers: ``QuantConv2d``, ``QuantLinear`` and the activation quantizer ``QuantAct``.

A quantized layer is its float layer (a subclass: ``isinstance(QuantConv2d(...), nn.Conv2d)``) with two
explicit, optional quantizers (:class:`lowbit.quant.Quantizer`):

    forward(x) = op(input_quantizer(x), weight_quantizer(W), b)         op = conv2d / linear

Either quantizer may be ``None`` (that side stays float); with both ``None`` the layer calls the float
layer's own ``forward`` and is bit-identical to it. The bias is never quantized. The latent float weight
``W`` is what the optimizer trains; the quantizer's straight-through estimator carries the gradient to it.

A quantizer is given as an instance, a registered name (``"ste_sign"``) or a mapping
(``{"name": "dorefa_weight", "bits": 2}``), resolved by :func:`lowbit.quant.get_quantizer`. The state dict
holds the float layer's keys (``weight``, ``bias``) plus each quantizer's own state under
``weight_quantizer.*`` / ``input_quantizer.*``. Cost models (:func:`lowbit.hw.profile`) read
``weight_quantizer.bit_width`` and ``input_quantizer.bit_width``; a missing quantizer counts as 32-bit.

Note:
    Binary weights: a sign quantizer's output does not change when a latent weight grows, so with a
    plain STE latent weights can drift far from 0 and stop flipping ("starved" weights, larq's warning).
    Use a quantizer whose STE cancels the gradient for ``|w| > 1`` (BNN's hard-tanh STE) or clip the latent
    weights to ``[-1, 1]`` after each step, as the BNN paper does.

Example:
    >>> import torch
    >>> from torch import nn
    >>> conv = nn.Conv2d(3, 8, 3)
    >>> q = QuantConv2d.from_float(conv)          # no quantizers: the same function as ``conv``
    >>> x = torch.randn(1, 3, 8, 8)
    >>> torch.equal(q(x), conv(x))
    True

References:
    Courbariaux et al., "Binarized Neural Networks", arXiv:1602.02830 (quantized weights and inputs,
    latent float weights, weight clipping).
    Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
    Inference", arXiv:1712.05877 (fake quantization of weights and activations during training).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lowbit.quant.base import Quantizer, QuantizerSpec, get_quantizer

__all__ = ["QuantAct", "QuantConv2d", "QuantLinear"]


def _bits(q: Quantizer | None) -> str:
    return "float" if q is None else str(q.bit_width)


def _check_float(module: nn.Module, float_type: type[nn.Module], quant_type: type[nn.Module]) -> None:
    """``from_float`` takes exactly ``float_type``: a subclass may compute something else in its forward."""
    if type(module) is not float_type:
        if parametrize.is_parametrized(module):
            raise ValueError(
                f"{quant_type.__name__}.from_float: the {float_type.__name__} is parametrized "
                f"({', '.join(module.parametrizations)}), e.g. by weight sharing; quantize before clustering, "
                "or bake the parametrization in first (lowbit.cluster.strip_sharing_)")
        raise TypeError(f"{quant_type.__name__}.from_float takes an nn.{float_type.__name__}, got "
                        f"{type(module).__name__} (a subclass may compute something else in its forward)")


def _layer_repr(layer: nn.Module, base: str) -> str:
    return f"{base}, weight_bits={_bits(layer.weight_quantizer)}, input_bits={_bits(layer.input_quantizer)}"


def _adopt(new: nn.Module, module: nn.Module) -> None:
    """Give ``new`` the float layer's parameters (the same objects), its extra buffers and training flag,
    and move the quantizers to the weight's device and dtype."""
    new.weight = module.weight
    new.bias = module.bias
    for name, buf in module._buffers.items():  # e.g. a pruning mask ``weight_mask``; plain layers have none
        new.register_buffer(name, buf, persistent=name not in module._non_persistent_buffers_set)
    for attr in ("weight_quantizer", "input_quantizer"):
        q = getattr(new, attr)
        if q is not None:
            q.to(device=module.weight.device, dtype=module.weight.dtype)
    if new.weight_quantizer is not None:  # weight-shaped quantizer parameters exist before any optimizer
        new.weight_quantizer.init_from(new.weight)
    new.train(module.training)


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose input and weight go through quantizers: ``conv2d(Q_a(x), Q_w(W), b)``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device, dtype: as for ``nn.Conv2d``.
        weight_quantizer: quantizer of the weight (instance, registered name, ``{"name": ...}`` mapping);
            ``None`` keeps the weight float.
        input_quantizer: quantizer of the input activations; ``None`` keeps them float.

    Example:
        >>> layer = QuantConv2d(3, 8, 3, padding=1)      # both None: exactly nn.Conv2d
        >>> layer(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 8, 16, 16])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        weight_quantizer: QuantizerSpec = None,
        input_quantizer: QuantizerSpec = None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self.weight_quantizer: Quantizer | None = get_quantizer(weight_quantizer)
        self.input_quantizer: Quantizer | None = get_quantizer(input_quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_quantizer is None and self.input_quantizer is None:
            return super().forward(x)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)
        return self._conv_forward(x, w, self.bias)  # handles padding_mode like nn.Conv2d.forward

    @classmethod
    def from_float(
        cls, module: nn.Conv2d, weight_quantizer: QuantizerSpec = None, input_quantizer: QuantizerSpec = None
    ) -> QuantConv2d:
        """A ``QuantConv2d`` with ``module``'s hyper-parameters, sharing its weight and bias ``Parameter``s.

        Extra buffers of ``module`` (e.g. a pruning mask) are carried over, hooks are not (``quantize_``
        re-attaches pruning masks with their gradient hooks). The quantizers are moved to the weight's
        device and dtype.

        Example:
            >>> conv = nn.Conv2d(1, 4, 3)
            >>> QuantConv2d.from_float(conv).weight is conv.weight
            True
        """
        _check_float(module, nn.Conv2d, cls)
        new = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                  module.dilation, module.groups, module.bias is not None, module.padding_mode, device="meta",
                  weight_quantizer=weight_quantizer, input_quantizer=input_quantizer)
        _adopt(new, module)
        return new

    def extra_repr(self) -> str:
        return _layer_repr(self, super().extra_repr())


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose input and weight go through quantizers: ``Q_a(x) Q_w(W)^T + b``.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        weight_quantizer: quantizer of the weight (instance, registered name, ``{"name": ...}`` mapping);
            ``None`` keeps the weight float.
        input_quantizer: quantizer of the input activations; ``None`` keeps them float.

    Example:
        >>> layer = QuantLinear(16, 4)                   # both None: exactly nn.Linear
        >>> layer(torch.randn(2, 16)).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        weight_quantizer: QuantizerSpec = None,
        input_quantizer: QuantizerSpec = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.weight_quantizer: Quantizer | None = get_quantizer(weight_quantizer)
        self.input_quantizer: Quantizer | None = get_quantizer(input_quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_quantizer is None and self.input_quantizer is None:
            return super().forward(x)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)
        return F.linear(x, w, self.bias)

    @classmethod
    def from_float(
        cls, module: nn.Linear, weight_quantizer: QuantizerSpec = None, input_quantizer: QuantizerSpec = None
    ) -> QuantLinear:
        """A ``QuantLinear`` with ``module``'s sizes, sharing its weight and bias ``Parameter``s.

        Extra buffers of ``module`` (e.g. a pruning mask) are carried over, hooks are not. The quantizers
        are moved to the weight's device and dtype.

        Example:
            >>> fc = nn.Linear(8, 2)
            >>> QuantLinear.from_float(fc).weight is fc.weight
            True
        """
        _check_float(module, nn.Linear, cls)
        new = cls(module.in_features, module.out_features, module.bias is not None, device="meta",
                  weight_quantizer=weight_quantizer, input_quantizer=input_quantizer)
        _adopt(new, module)
        return new

    def extra_repr(self) -> str:
        return _layer_repr(self, super().extra_repr())


class QuantAct(nn.Module):
    """Applies a quantizer to activations: ``y = Q(x)``; with ``None`` it is the identity.

    For quantization points that are not the input of a quantized layer, e.g. a residual branch's output
    or the activations fed to a pooling layer that an integer kernel will run.

    Args:
        quantizer: a quantizer (instance, registered name, ``{"name": ...}`` mapping) or ``None``.

    Example:
        >>> act = QuantAct()
        >>> x = torch.randn(4)
        >>> torch.equal(act(x), x)
        True
    """

    def __init__(self, quantizer: QuantizerSpec = None) -> None:
        super().__init__()
        self.quantizer: Quantizer | None = get_quantizer(quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.quantizer is None else self.quantizer(x)

    def extra_repr(self) -> str:
        return f"bits={_bits(self.quantizer)}"
