"""Fused layers for integer-only inference: conv + batch norm + ReLU/ReLU6, linear + ReLU, as one module.

An integer kernel runs ``conv -> bn -> act`` as one operation: the batch norm folded into the weights and
bias, the activation into the clamp of the output range. Quantization-aware training has to see the
weights the kernel will use, so :class:`ConvBnAct2d` quantizes the *folded* weights during training too,
as in Jacob et al. (Section 3.2, Figure C.8), with the running-statistics correction of Krishnamoorthi
(2018, Section 3.2.2):

    training (batch statistics, before ``freeze_bn()``):
        s = gamma / sqrt(running_var + eps)                     fold with the running std: stable weights
        y_q = conv(x, Q(W s))                                   the quantized folded weights, as at inference
        z = y_q / s  ~ conv(x, W)                               batch mean mu_B, var var_B of z (per channel)
        y = y_q * sqrt(running_var + eps) / sqrt(var_B + eps) + beta - gamma (mu_B - b) / sqrt(var_B + eps)
          = the batch-normalized output, gradients through mu_B and var_B as in batch norm;
        the running statistics are updated from mu_B, var_B as nn.BatchNorm2d does.
    frozen (``freeze_bn()``) and eval:
        y = conv(x, Q(W s)) + beta + (b - running_mean) s          exactly the folded inference layer.

``act`` (``"relu"`` or ``"relu6"``) follows; the integer kernel folds it into the output clamp. Without a
batch norm, ``ConvBnAct2d`` is ``act(conv(x, Q(W), b))``.

Example:
    >>> conv, bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
    >>> fused = ConvBnAct2d(conv, bn, act="relu").eval()
    >>> x = torch.randn(2, 3, 8, 8)
    >>> torch.allclose(fused(x), torch.relu(bn.eval()(conv(x))), atol=1e-5)   # no quantizer: the float layers
    True

References:
    Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
    Inference", arXiv:1712.05877 (Section 3.2, batch normalization folding).
    Krishnamoorthi, "Quantizing deep convolutional networks for efficient inference: A whitepaper",
    arXiv:1806.08342 (Section 3.2.2, the correction with running statistics, batch-norm freezing).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.quant.base import Quantizer, QuantizerSpec, get_quantizer

__all__ = ["ACTIVATIONS", "ConvBnAct2d", "LinearAct", "fold_bn_into_conv"]

Activation = Literal["relu", "relu6"] | None
ACTIVATIONS: dict[str, tuple[float, float]] = {"relu": (0.0, float("inf")), "relu6": (0.0, 6.0)}  # output clamps


def _check_act(act: str | None) -> str | None:
    if act is not None and act not in ACTIVATIONS:
        raise ValueError(f"act must be None, 'relu' or 'relu6', got {act!r}")
    return act


def _apply_act(y: torch.Tensor, act: str | None) -> torch.Tensor:
    if act == "relu":
        return F.relu(y)
    if act == "relu6":
        return F.relu6(y)
    return y


def fold_bn_into_conv(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of ``bn(conv(x))`` as one convolution, with ``bn``'s running statistics.

    ``W' = W s``, ``b' = beta + (b - mu) s``, ``s = gamma / sqrt(running_var + eps)`` per output channel
    (``gamma = 1``, ``beta = 0`` for a batch norm without affine parameters).

    Example:
        >>> conv, bn = nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4).eval()
        >>> bn.running_mean.fill_(0.5); bn.running_var.fill_(4.0)
        >>> w, b = fold_bn_into_conv(conv.weight, conv.bias, bn)
        >>> x = torch.randn(1, 2, 5, 5)
        >>> torch.allclose(F.conv2d(x, w, b), bn(conv(x)), atol=1e-5)
        True

    References:
        Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
        Inference", arXiv:1712.05877 (Section 3.2).
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm2d without running statistics (track_running_stats=False)")
    s = _bn_scale(bn)
    b = torch.zeros_like(bn.running_mean) if bias is None else bias
    beta = bn.bias if bn.bias is not None else torch.zeros_like(s)
    return weight * s.reshape(-1, *([1] * (weight.dim() - 1))), beta + (b - bn.running_mean) * s


def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    return gamma / torch.sqrt(bn.running_var + bn.eps)


class ConvBnAct2d(nn.Module):
    """``act(bn(conv(x)))`` with the batch norm folded into the (quantized) weights, training included.

    Forward, gradient: see the module docstring (batch statistics with the running-statistics
    correction until :meth:`freeze_bn`, then the exact folded layer). ``weight_quantizer`` is applied to the
    folded weight ``W s`` (e.g. ``int8_weight``: per output channel).

    Args:
        conv: the ``nn.Conv2d`` (its ``weight``/``bias`` parameters are shared, not copied).
        bn: the ``nn.BatchNorm2d`` that follows it, or ``None``.
        act: ``None``, ``"relu"`` or ``"relu6"``.
        weight_quantizer: a quantizer spec (instance, registered name, mapping) or ``None`` (float weights).

    Example:
        >>> layer = ConvBnAct2d(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), "relu6", "int8_weight")
        >>> layer(torch.randn(8, 1, 6, 6)).shape
        torch.Size([8, 4, 4, 4])

    References:
        Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
        Inference", arXiv:1712.05877 (Section 3.2, Figure C.8).
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, act: Activation = None,
                 weight_quantizer: QuantizerSpec = None) -> None:
        super().__init__()
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"ConvBnAct2d takes an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode {conv.padding_mode!r} cannot be folded into an integer kernel; "
                             "only 'zeros' is supported")
        if bn is not None:
            if type(bn) is not nn.BatchNorm2d:
                raise TypeError(f"ConvBnAct2d folds an nn.BatchNorm2d, got {type(bn).__name__}")
            if bn.num_features != conv.out_channels:
                raise ValueError(f"the batch norm has {bn.num_features} features, the conv {conv.out_channels} "
                                 "output channels")
            if not bn.track_running_stats:
                raise ValueError("a BatchNorm2d without running statistics cannot be folded for inference")
        self.conv = conv
        self.bn = bn
        self.act = _check_act(act)
        self.weight_quantizer: Quantizer | None = get_quantizer(weight_quantizer)
        if self.weight_quantizer is not None:
            self.weight_quantizer.to(conv.weight.device)
        self.bn_frozen = False

    def freeze_bn(self) -> None:
        """Stop using and updating batch statistics: train with the running ones (the inference layer)."""
        self.bn_frozen = True

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float weight and bias of the inference layer (batch norm folded with running statistics)."""
        if self.bn is None:
            w, b = self.conv.weight, self.conv.bias
            return w, b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        return fold_bn_into_conv(self.conv.weight, self.conv.bias, self.bn)

    def _q(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.weight_quantizer is None else self.weight_quantizer(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is None or not self.training or self.bn_frozen:
            w, b = self.folded()
            return _apply_act(self.conv._conv_forward(x, self._q(w), b), self.act)
        bn = self.bn
        std_r = torch.sqrt(bn.running_var + bn.eps).clone()  # before this batch updates the running statistics
        gamma = bn.weight if bn.weight is not None else torch.ones_like(std_r)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(std_r)
        s = gamma / std_r
        y_q = self.conv._conv_forward(x, self._q(self.conv.weight * s.reshape(-1, 1, 1, 1)), None)
        safe = torch.where(s == 0, torch.ones_like(s), s)  # gamma = 0: the channel is beta whatever z is
        z = y_q / safe.reshape(1, -1, 1, 1)  # ~ conv(x, W): its batch statistics are the batch norm's
        mean = z.mean((0, 2, 3))
        var = z.var((0, 2, 3), unbiased=False)
        with torch.no_grad():
            self._update_running(mean, var, z.numel() // z.shape[1])
        std_b = torch.sqrt(var + bn.eps)
        y = y_q * (std_r / std_b).reshape(1, -1, 1, 1) + (beta - gamma * mean / std_b).reshape(1, -1, 1, 1)
        return _apply_act(y, self.act)

    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        bn = self.bn
        assert bn is not None and bn.running_mean is not None and bn.running_var is not None
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked += 1
        m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        conv_bias = self.conv.bias.detach() if self.conv.bias is not None else 0.0
        unbiased = var * n / max(n - 1, 1)
        bn.running_mean.mul_(1 - m).add_(m * (mean.detach() + conv_bias))
        bn.running_var.mul_(1 - m).add_(m * unbiased.detach())

    def extra_repr(self) -> str:
        return f"act={self.act}, bn={'folded' if self.bn is not None else 'none'}, frozen={self.bn_frozen}"


class LinearAct(nn.Module):
    """``act(linear(x, Q(W), b))``: a linear layer with its weight quantizer and a fused ReLU/ReLU6.

    Forward: ``y = act(x Q(W)^T + b)``. Gradient: through ``Q``'s straight-through estimator.

    Args:
        linear: the ``nn.Linear`` (parameters shared).
        act: ``None``, ``"relu"`` or ``"relu6"``.
        weight_quantizer: a quantizer spec or ``None``.

    Example:
        >>> fc = nn.Linear(4, 2)
        >>> x = torch.randn(3, 4)
        >>> torch.equal(LinearAct(fc, "relu")(x), torch.relu(fc(x)))
        True

    References:
        Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
        Inference", arXiv:1712.05877 (Section 2.4, fused layers).
    """

    def __init__(self, linear: nn.Linear, act: Activation = None, weight_quantizer: QuantizerSpec = None) -> None:
        super().__init__()
        if type(linear) is not nn.Linear:
            raise TypeError(f"LinearAct takes an nn.Linear, got {type(linear).__name__}")
        self.linear = linear
        self.act = _check_act(act)
        self.weight_quantizer: Quantizer | None = get_quantizer(weight_quantizer)
        if self.weight_quantizer is not None:
            self.weight_quantizer.to(linear.weight.device)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        w, b = self.linear.weight, self.linear.bias
        return w, b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.linear.weight if self.weight_quantizer is None else self.weight_quantizer(self.linear.weight)
        return _apply_act(F.linear(x, w, self.linear.bias), self.act)

    def extra_repr(self) -> str:
        return f"act={self.act}"
