"""DoReFa-Net: k-bit weights, activations and gradients with straight-through estimators.

    quantize_k(r) = round((2^k - 1) r) / (2^k - 1)                   r in [0, 1], identity gradient (STE)
    weights, k = 1:  sign(w) * E[|w|]                                 E over the whole tensor
    weights, k > 1:  2 quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1
    activations:     quantize_k(clip(x, 0, 1))
    gradients:       identity forward; backward quantizes dL/dx per sample to G bits with uniform noise

The paper keeps the first and last layers in full precision; that choice belongs to the per-layer rules
of the caller (``quantize_``), not to these quantizers. ``round`` is torch's round-half-to-even.

References:
    Zhou et al., "DoReFa-Net: Training Low Bitwidth Convolutional Neural Networks with Low Bitwidth
    Gradients", arXiv:1606.06160.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.quant.base import Quantizer, register_quantizer
from lowbit.quant.binary import ste_sign

__all__ = [
    "quantize_k", "dorefa_weight", "dorefa_act", "quantize_grad", "dorefa_grad", "DorefaWeight", "DorefaAct",
    "DorefaGrad",
]

_MAX_BITS = 16  # quantize_k on float32 is exact far beyond this; wider formats are not "low bit"


def _check_bits(name: str, bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= _MAX_BITS:
        raise ValueError(f"{name} must be an int in [1, {_MAX_BITS}], got {bits!r}")
    return bits


class _RoundSTE(torch.autograd.Function):
    """Forward: round(x). Backward: identity."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g


def quantize_k(x: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa's k-bit quantizer of values in [0, 1].

    Forward: ``quantize_k(r) = round((2^k - 1) r) / (2^k - 1)`` (k = ``bits``).
    Gradient: identity (straight-through): ``d quantize_k / dr = 1``.

    Args:
        x: values in [0, 1] (not clipped here).
        bits: k, 1 to 16.

    Example:
        >>> quantize_k(torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0]), bits=2)  # levels 0, 1/3, 2/3, 1
        tensor([0.0000, 0.3333, 0.6667, 1.0000, 1.0000])

    References:
        Zhou et al., "DoReFa-Net: Training Low Bitwidth Convolutional Neural Networks with Low Bitwidth
        Gradients", arXiv:1606.06160.
    """
    n = 2 ** _check_bits("bits", bits) - 1
    return _RoundSTE.apply(x * n) / n


def dorefa_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa's weight quantizer.

    Forward: k = 1: ``sign(w) * E`` with ``E = mean |w|`` over the whole tensor (sign(0) = +1);
    k > 1: ``2 quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2, k) - 1``, in {2i/(2^k - 1) - 1 : i = 0..2^k - 1}.
    Gradient: k = 1: identity through sign, E a constant (no gradient through it); k > 1: straight
    through the rounding only, exact through tanh and the max (autograd).

    Args:
        w: a weight tensor.
        bits: k, 1 to 16.

    Example:
        >>> w = torch.tensor([-1.0, -0.1, 0.2, 3.0])
        >>> dorefa_weight(w, bits=1)  # E = 1.075
        tensor([-1.0750, -1.0750,  1.0750,  1.0750])
        >>> dorefa_weight(w, bits=2)
        tensor([-1.0000, -0.3333,  0.3333,  1.0000])

    References:
        Zhou et al., "DoReFa-Net: Training Low Bitwidth Convolutional Neural Networks with Low Bitwidth
        Gradients", arXiv:1606.06160.
    """
    if _check_bits("bits", bits) == 1:
        e = w.detach().abs().mean()
        return ste_sign(w, clip_value=None) * e
    t = torch.tanh(w)
    m = t.abs().max().clamp_min(torch.finfo(t.dtype).tiny)  # all-zero weights would divide 0 by 0
    return 2 * quantize_k(t / (2 * m) + 0.5, bits) - 1


def dorefa_act(x: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa's activation quantizer.

    Forward: ``quantize_k(clip(x, 0, 1), k)``, in {i/(2^k - 1) : i = 0..2^k - 1}.
    Gradient: ``1{0 <= x <= 1}`` (the clip's derivative; straight through the rounding).

    Args:
        x: an activation tensor.
        bits: k, 1 to 16.

    Example:
        >>> dorefa_act(torch.tensor([-0.5, 0.1, 0.4, 0.6, 2.0]), bits=2)
        tensor([0.0000, 0.0000, 0.3333, 0.6667, 1.0000])

    References:
        Zhou et al., "DoReFa-Net: Training Low Bitwidth Convolutional Neural Networks with Low Bitwidth
        Gradients", arXiv:1606.06160.
    """
    return quantize_k(x.clamp(0, 1), bits)


def quantize_grad(g: torch.Tensor, bits: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """DoReFa's stochastic G-bit gradient quantizer (the backward rule of :func:`dorefa_grad`).

    Per sample s (dim 0), with ``m_s = max |g_s|`` and ``n = 2^G - 1``:
    ``x = g / m_s``; ``x = clip(x / 2 + 1/2 + N, 0, 1)`` with ``N ~ U(-0.5/n, +0.5/n)`` i.i.d. per element;
    ``q = 2 m_s (quantize_k(x, G) - 1/2)``. The noise makes the rounding stochastic, so E[q] = g; each
    sample takes at most 2^G values, ``m_s (2i/n - 1)``. Since n is odd, 0 is not one of them: a zero entry
    of a nonzero sample becomes +-m_s/n with equal probability (zero in expectation). A sample whose
    gradient is all zero stays zero.
    The noise comes from torch's RNG (``torch.manual_seed``) or ``generator``.

    Args:
        g: a gradient with the batch in dim 0 (a 0-dim tensor is one sample).
        bits: G, 1 to 16.
        generator: an optional ``torch.Generator`` for the noise.

    Example:
        >>> g = torch.tensor([[0.5, -1.0, 1.0]])
        >>> quantize_grad(g, bits=1)[0, 1:]  # the extremes -max and +max are kept exactly
        tensor([-1.,  1.])
    """
    n = 2 ** _check_bits("bits", bits) - 1
    rows = g.reshape(g.shape[0] if g.dim() else 1, -1)  # (S, elements per sample)
    m = rows.abs().amax(1, keepdim=True)  # (S, 1)
    x = rows / torch.where(m > 0, m, torch.ones_like(m))
    noise = (torch.rand(rows.shape, generator=generator, dtype=g.dtype, device=g.device) - 0.5) / n
    x = (x * 0.5 + 0.5 + noise).clamp(0, 1)
    q = (torch.round(x * n) / n - 0.5) * (2 * m)
    return q.reshape(g.shape)


class _DorefaGradFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bits: int) -> torch.Tensor:
        ctx.bits = bits
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return quantize_grad(g, ctx.bits), None


def dorefa_grad(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Identity forward; quantizes the incoming gradient to ``bits`` in backward (:func:`quantize_grad`).

    Forward: ``y = x``.
    Gradient: ``dL/dx = quantize_grad(dL/dy, G)``: per sample (dim 0) ``2 m (quantize_k(clip(g / (2m) + 1/2 + N,
    0, 1)) - 1/2)`` with ``m = max |g|`` and uniform noise ``N ~ U(-0.5/(2^G-1), +0.5/(2^G-1))``, unbiased.

    Args:
        x: any tensor with the batch in dim 0.
        bits: G, 1 to 16.

    Example:
        >>> x = torch.tensor([[0.3, -0.2]], requires_grad=True)
        >>> (dorefa_grad(x, bits=4) * torch.tensor([[2.0, -2.0]])).sum().backward()
        >>> x.grad  # +-max survive any noise
        tensor([[ 2., -2.]])

    References:
        Zhou et al., "DoReFa-Net: Training Low Bitwidth Convolutional Neural Networks with Low Bitwidth
        Gradients", arXiv:1606.06160.
    """
    return _DorefaGradFn.apply(x, _check_bits("bits", bits))


# ----------------------------------------------------------------------------------------------------
# Quantizers
# ----------------------------------------------------------------------------------------------------


@register_quantizer("dorefa_weight")
class DorefaWeight(Quantizer):
    """DoReFa's k-bit weight quantizer (see :func:`dorefa_weight`).

    Forward: k = 1: ``sign(w) * E[|w|]`` (E over the tensor); k > 1: ``2 quantize_k(tanh(w) / (2 max|tanh w|)
    + 1/2) - 1``. Gradient: straight through sign/round; E constant; exact through tanh and max.

    ``levels()`` is ``{2i/(2^k - 1) - 1}`` for k > 1 (e.g. k = 2: -1, -1/3, 1/3, 1) and None for k = 1, whose
    two levels +-E follow the weights; ``scale`` is E of the last forward for k = 1, else None.

    Args:
        bits: k, 1 to 16 (default 1, the paper's headline W1A2G6).

    Example:
        >>> q = DorefaWeight(bits=2)
        >>> q.levels()
        tensor([-1.0000, -0.3333,  0.3333,  1.0000])
        >>> q(torch.tensor([-2.0, -0.1, 0.1, 2.0]))
        tensor([-1.0000, -0.3333,  0.3333,  1.0000])

    References:
        Zhou et al., "DoReFa-Net: Training Low Bitwidth Convolutional Neural Networks with Low Bitwidth
        Gradients", arXiv:1606.06160.
    """

    def __init__(self, bits: int = 1) -> None:
        super().__init__()
        self.bit_width = _check_bits("bits", bits)
        self.scale: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bit_width == 1:
            self.scale = x.detach().abs().mean()
        return dorefa_weight(x, self.bit_width)

    def levels(self) -> torch.Tensor | None:
        if self.bit_width == 1:
            return None
        n = 2**self.bit_width - 1
        return torch.arange(n + 1, dtype=torch.float32) * (2 / n) - 1

    def extra_repr(self) -> str:
        return f"bit_width={self.bit_width}"


@register_quantizer("dorefa_act")
class DorefaAct(Quantizer):
    """DoReFa's k-bit activation quantizer, optionally also quantizing the gradient that flows back.

    Forward: ``quantize_k(clip(x, 0, 1), k)`` in {i/(2^k - 1)}. Gradient: ``1{0 <= x <= 1}`` (straight through
    the rounding). With ``grad_bits=G``, the gradient reaching ``x`` (after the clip's mask) is then
    quantized per sample to G bits with :func:`quantize_grad` (the layer is ``quantize_k(clip(fg(x)))`` with
    fg = :func:`dorefa_grad`). The paper puts fg on each layer's pre-activation output (before batch norm);
    as an input quantizer this sits after batch norm: for the paper's placement use :class:`DorefaGrad`
    right after the layer.

    ``levels()`` is ``{i/(2^k - 1)}``, ``scale = 1/(2^k - 1)``, ``zero_point = 0``.

    Args:
        bits: k, 1 to 16 (default 2, the paper's headline W1A2G6).
        grad_bits: G, 1 to 16, or None (default) for float gradients.

    Example:
        >>> q = DorefaAct(bits=2)
        >>> q(torch.tensor([-0.5, 0.1, 0.4, 0.6, 2.0]))
        tensor([0.0000, 0.0000, 0.3333, 0.6667, 1.0000])

    References:
        Zhou et al., "DoReFa-Net: Training Low Bitwidth Convolutional Neural Networks with Low Bitwidth
        Gradients", arXiv:1606.06160.
    """

    def __init__(self, bits: int = 2, grad_bits: int | None = None) -> None:
        super().__init__()
        self.bit_width = _check_bits("bits", bits)
        self.grad_bits = None if grad_bits is None else _check_bits("grad_bits", grad_bits)
        n = 2**bits - 1
        self.scale = torch.tensor(1 / n)
        self.zero_point = torch.tensor(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_bits is not None:
            x = dorefa_grad(x, self.grad_bits)
        return dorefa_act(x, self.bit_width)

    def levels(self) -> torch.Tensor:
        n = 2**self.bit_width - 1
        return torch.arange(n + 1, dtype=torch.float32) / n

    def extra_repr(self) -> str:
        return f"bit_width={self.bit_width}, grad_bits={self.grad_bits}"


@register_quantizer("dorefa_grad")
class DorefaGrad(Quantizer):
    """DoReFa's gradient quantizer as a module: the identity forward, G-bit gradients backward.

    Forward: ``y = x`` (so ``bit_width`` is 32: the values are not quantized). Gradient:
    ``quantize_grad(dL/dy, G)`` per sample (dim 0), stochastic and unbiased (see :func:`quantize_grad`).
    Put it right after a convolution or linear layer (the paper's placement) or compose it with
    activations through ``DorefaAct(bits, grad_bits=G)``.

    Args:
        grad_bits: G, 1 to 16 (default 6, the paper's headline W1A2G6).

    Example:
        >>> q = DorefaGrad(grad_bits=4)
        >>> q(torch.tensor([[0.25, -3.0]]))
        tensor([[ 0.2500, -3.0000]])

    References:
        Zhou et al., "DoReFa-Net: Training Low Bitwidth Convolutional Neural Networks with Low Bitwidth
        Gradients", arXiv:1606.06160.
    """

    bit_width = 32

    def __init__(self, grad_bits: int = 6) -> None:
        super().__init__()
        self.grad_bits = _check_bits("grad_bits", grad_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dorefa_grad(x, self.grad_bits)

    def extra_repr(self) -> str:
        return f"bit_width=32, grad_bits={self.grad_bits}"
