"""Test-only quantizers, registered once under ``test_*`` names, so that the layer and API tests do not
depend on the real methods they are not about (a bug in a real quantizer fails that quantizer's tests)."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.quant import Quantizer, register_quantizer

SIGN = "test_sign"


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.where(x == 0, torch.ones_like(x), torch.sign(x))  # sign(0) = +1; NaN stays NaN

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1)


@register_quantizer(SIGN)
class Sign(Quantizer):
    """Test-only: ``sign(x)`` in {-1, +1}, hard-tanh straight-through gradient."""

    bit_width = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SignSTE.apply(x)

    def levels(self) -> torch.Tensor:
        return torch.tensor([-1.0, 1.0])


@register_quantizer("test_uniform")
class Uniform(Quantizer):
    """Test-only: ``round(clamp(x, 0, 1) * n) / n`` with ``n = 2^bits - 1``, straight-through gradient.

    References:
        Zhou et al., "DoReFa-Net", arXiv:1606.06160 (the activation quantizer).
    """

    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        if bits < 1:
            raise ValueError(f"bits must be >= 1, got {bits}")
        self.bits = bits

    @property
    def bit_width(self) -> int:  # type: ignore[override]
        return self.bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = 2**self.bits - 1
        y = x.clamp(0, 1)
        return torch.round(y * n) / n + (y - y.detach())  # straight-through, exactly the level forward

    def levels(self) -> torch.Tensor:
        return torch.linspace(0, 1, 2**self.bits)


class Pact(Quantizer):
    """Test-only: k-bit uniform on ``[0, alpha]`` with a learned clip ``alpha`` (state in the state dict)."""

    def __init__(self, bits: int = 4, alpha: float = 1.0) -> None:
        super().__init__()
        self.bits = bits
        self.alpha = nn.Parameter(torch.tensor(alpha))

    @property
    def bit_width(self) -> int:  # type: ignore[override]
        return self.bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = 2**self.bits - 1
        y = torch.minimum(x.clamp(min=0), self.alpha)
        q = torch.round(y / self.alpha * n) * self.alpha / n
        return q + (y - y.detach())  # straight-through: the gradient of the clipped value
