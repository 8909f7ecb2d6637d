r"""Ternary weight quantizers: TWN (a closed-form fitted scale) and TTQ (two trained scales).

Both map a latent float weight ``w`` to three values; they differ in where the scales come from:

- **TWN** (Li, Zhang, Liu 2016): one scale :math:`\alpha` per layer (or per output channel) fitted to
  ``w`` in closed form at every forward; the threshold is :math:`\Delta = 0.7\,\mathrm{mean}|w|`.
- **TTQ** (Zhu, Han, Mao, Dally 2017): two ``nn.Parameter`` scales :math:`W_p, W_n` per layer, trained
  by gradient descent together with the latent weights; the threshold is a fraction of :math:`\max|w|`.

The math is in plain functions (``twn_fit``, ``twn_quantize``, ``ttq_quantize``) with their custom
gradients; the registered classes ``twn`` and ``ttq`` hold the hyper-parameters and state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.quant.base import Quantizer, register_quantizer

__all__ = ["straight_through", "ternarize", "twn_fit", "twn_quantize", "ttq_quantize", "TWN", "TTQ"]

TWN_RATIO = 0.7  # TWN's Δ* ≈ 0.7·E|w|: the optimal threshold for Gaussian-like weights (paper, Section 2)
TTQ_THRESHOLD = 0.05  # TTQ's t: Δ = t·max|w̃| on weights normalized to [-1, 1] (paper, Section 3)


class _StraightThrough(torch.autograd.Function):
    """Returns ``q`` in the forward pass; passes the incoming gradient unchanged to ``x``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return q.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The values of ``q`` (exactly) with the gradient of the identity in ``x``: ∂L/∂x = ∂L/∂q."""
    return _StraightThrough.apply(x, q.detach())


def ternarize(w: torch.Tensor, delta: torch.Tensor | float) -> torch.Tensor:
    """``sign(w)`` where ``|w| > delta``, else 0 (no gradient); ``delta`` broadcasts against ``w``."""
    return torch.where(w.abs() > delta, torch.sign(w), torch.zeros_like(w))  # +0, never -0, in the zero region


def _per_channel_view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.dim() - 1)))  # (C,) -> (C, 1, ..., 1), broadcasts over a weight


@torch.no_grad()
def twn_fit(w: torch.Tensor, per_channel: bool = False, ratio: float = TWN_RATIO) -> tuple[torch.Tensor, torch.Tensor]:
    r"""TWN's threshold and scale: :math:`\Delta = r\,\mathrm{mean}|w|`, :math:`\alpha = \mathrm{mean}_{|w|>\Delta}|w|`.

    Returns ``(delta, alpha)``: scalars, or shape ``(C,)`` over the first (output-channel) dimension with
    ``per_channel=True``. A group with no weight above its threshold (all zeros) gets ``alpha = 0``.
    """
    a = w.detach().abs()
    a = a.flatten(1) if per_channel else a.flatten().unsqueeze(0)  # (groups, elements per group)
    delta = ratio * a.mean(dim=1)
    above = (a > delta[:, None]).to(a.dtype)
    alpha = (a * above).sum(dim=1) / above.sum(dim=1).clamp_min(1)
    if not per_channel:
        return delta[0], alpha[0]
    return delta, alpha


def _twn_output(w: torch.Tensor, delta: torch.Tensor, alpha: torch.Tensor, per_channel: bool) -> torch.Tensor:
    if per_channel:
        delta, alpha = _per_channel_view(delta, w), _per_channel_view(alpha, w)
    return straight_through(w, alpha * ternarize(w.detach(), delta))


def twn_quantize(w: torch.Tensor, per_channel: bool = False, ratio: float = TWN_RATIO) -> torch.Tensor:
    """TWN ternary weights :math:`\\alpha\\,\\mathrm{ternarize}(w, \\Delta)` with a straight-through gradient."""
    return _twn_output(w, *twn_fit(w, per_channel, ratio), per_channel)


@register_quantizer("twn")
class TWN(Quantizer):
    r"""Ternary Weight Networks: weights in :math:`\{-\alpha, 0, +\alpha\}` with a closed-form fitted scale.

    Forward (per layer, or per output channel with ``per_channel=True``):

    .. math::

        \Delta = 0.7 \cdot \tfrac{1}{n}\textstyle\sum_i |w_i|, \qquad
        \alpha = \frac{1}{|I_\Delta|}\textstyle\sum_{i \in I_\Delta} |w_i|, \quad I_\Delta = \{i : |w_i| > \Delta\},

        q(w) = \alpha \cdot \mathrm{sign}(w) \cdot 1_{|w| > \Delta}.

    :math:`\alpha` is the paper's closed-form minimizer of :math:`\|w - \alpha t\|^2` for the ternary
    :math:`t` fixed by :math:`\Delta`, and :math:`0.7\,\mathrm{mean}|w|` its approximation of the optimal
    threshold. Both are recomputed from the current weights at every forward (no state).

    Gradient (straight-through, to the latent weights): :math:`\partial L/\partial w = \partial L/\partial q`.

    Args:
        per_channel: one :math:`(\Delta, \alpha)` per slice of the first dimension (output channel)
            instead of one per tensor.
        ratio: the threshold factor (0.7 in the paper).

    Example:
        >>> q = TWN()
        >>> w = torch.tensor([-1.0, -0.2, 0.05, 0.5, 1.5])
        >>> q(w)  # delta = 0.7 * 0.65 = 0.455; alpha = mean(1.0, 0.5, 1.5) = 1.0
        tensor([-1.,  0.,  0.,  1.,  1.])
        >>> q.levels()
        tensor([-1.,  0.,  1.])

    References:
        Li, Zhang, Liu, "Ternary Weight Networks", arXiv:1605.04711.
    """

    bit_width = 2

    def __init__(self, per_channel: bool = False, ratio: float = TWN_RATIO) -> None:
        super().__init__()
        if not ratio > 0:
            raise ValueError(f"TWN ratio must be > 0, got {ratio}")
        self.per_channel = per_channel
        self.ratio = ratio
        self._alpha: torch.Tensor | None = None  # the scale of the last forward (a function of w, not state)

    @property
    def scale(self) -> torch.Tensor | None:  # type: ignore[override]
        """:math:`\\alpha` of the last forward: a scalar, or ``(C,)`` per channel; None before any forward."""
        return self._alpha

    def levels(self) -> torch.Tensor | None:
        """``[-alpha, 0, alpha]`` after a per-tensor forward; None before one or with ``per_channel``."""
        if self._alpha is None or self.per_channel:
            return None
        return torch.stack([-self._alpha, torch.zeros_like(self._alpha), self._alpha])

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        delta, alpha = twn_fit(w, self.per_channel, self.ratio)
        self._alpha = alpha
        return _twn_output(w, delta, alpha, self.per_channel)

    def extra_repr(self) -> str:
        return f"bit_width={self.bit_width}, per_channel={self.per_channel}, ratio={self.ratio}"


class _TTQFunction(torch.autograd.Function):
    """TTQ's forward and its hand-written backward (see ``TTQ``)."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, w_p: torch.Tensor, w_n: torch.Tensor, t: float) -> torch.Tensor:
        delta = t * w.abs().max()  # Δ = t·max|w̃| on w̃ = w / max|w|, i.e. t·max|w| on w itself
        pos, neg = w > delta, w < -delta  # I_p, I_n; I_z is the rest
        ctx.save_for_backward(pos, neg, w_p, w_n)
        out = w_p * pos.to(w.dtype) - w_n * neg.to(w.dtype)
        return torch.where(torch.isnan(w), w, out)  # a NaN weight stays NaN (a threshold would hide it)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        pos, neg, w_p, w_n = ctx.saved_tensors
        grad_w = torch.where(pos, w_p * g, torch.where(neg, w_n * g, g))  # W_p·g on I_p, g on I_z, W_n·g on I_n
        grad_wp = (g * pos).sum()  # Σ_{I_p} ∂L/∂w^t
        grad_wn = -(g * neg).sum()  # Σ_{I_n} ∂L/∂w^t, times ∂w^t/∂W_n = -1 (see TTQ's docstring)
        return grad_w, grad_wp.reshape(w_p.shape), grad_wn.reshape(w_n.shape), None


def ttq_quantize(w: torch.Tensor, w_p: torch.Tensor, w_n: torch.Tensor,
                 threshold: float = TTQ_THRESHOLD) -> torch.Tensor:
    """TTQ ternary weights :math:`\\{-W_n, 0, W_p\\}` with the paper's gradients (see :class:`TTQ`)."""
    return _TTQFunction.apply(w, w_p, w_n, threshold)


@register_quantizer("ttq")
class TTQ(Quantizer):
    r"""Trained Ternary Quantization: weights in :math:`\{-W_n, 0, +W_p\}` with two trained scales per layer.

    Forward, with the latent weights normalized to :math:`[-1, 1]`, :math:`\tilde w = w / \max|w|`:

    .. math::

        \Delta = t \cdot \max|\tilde w| = t, \qquad
        w^t = \begin{cases} W_p & \tilde w > \Delta \quad (I_p) \\ 0 & |\tilde w| \le \Delta \quad (I_z) \\
        -W_n & \tilde w < -\Delta \quad (I_n) \end{cases}

    Gradients (paper, Section 3):

    .. math::

        \frac{\partial L}{\partial W_p} = \sum_{i \in I_p} \frac{\partial L}{\partial w^t_i}, \qquad
        \frac{\partial L}{\partial W_n} = -\sum_{i \in I_n} \frac{\partial L}{\partial w^t_i}, \qquad
        \frac{\partial L}{\partial \tilde w} = \begin{cases} W_p \cdot \partial L/\partial w^t & I_p \\
        1 \cdot \partial L/\partial w^t & I_z \\ W_n \cdot \partial L/\partial w^t & I_n \end{cases}

    Sign of :math:`\partial L/\partial W_n`: the paper prints :math:`\sum_{I_n}` without a sign;
    since :math:`w^t = -W_n` on :math:`I_n` the chain rule gives the minus, which is what the authors'
    released code computes (by automatic differentiation), and the only sign with which gradient descent
    moves :math:`W_n` towards a lower loss. The threshold is held constant (no gradient through
    :math:`\max|w|`), and the normalization is only used to place the threshold: the latent weights
    themselves are not rescaled, so the latent gradient is the scaled one above.

    Initialization of :math:`W_p, W_n`: with ``init=None`` (default) they are set at the first forward to
    the mean of :math:`|w|` over :math:`I_p` and over :math:`I_n` (the TWN-like fit of each sign), so a
    quantized layer starts close to its float weights, which keeps networks without a following
    BatchNorm trainable; ``init=1.0`` gives the initialization of the authors' code (the paper fine-tunes
    BatchNorm networks, where the scale of a layer does not matter).

    Args:
        threshold: :math:`t`, the threshold as a fraction of :math:`\max|w|` (0.05 in the paper).
        init: starting value of both scales; None = data-dependent at the first forward (see above).

    Example:
        >>> q = TTQ(init=1.0)
        >>> w = torch.tensor([-0.9, -0.02, 0.01, 0.3, 1.0], requires_grad=True)
        >>> q(w)  # delta = 0.05 * 1.0
        tensor([-1.,  0.,  0.,  1.,  1.], grad_fn=<_TTQFunctionBackward>)
        >>> q(w).sum().backward()
        >>> q.w_p.grad, q.w_n.grad  # |I_p| = 2, -|I_n| = -1
        (tensor(2.), tensor(-1.))

    References:
        Zhu, Han, Mao, Dally, "Trained Ternary Quantization", arXiv:1612.01064.
    """

    bit_width = 2
    initialized: torch.Tensor

    def __init__(self, threshold: float = TTQ_THRESHOLD, init: float | None = None) -> None:
        super().__init__()
        if not 0 <= threshold < 1:
            raise ValueError(f"TTQ threshold is a fraction of max|w| in [0, 1), got {threshold}")
        if init is not None and not init > 0:
            raise ValueError(f"TTQ init must be > 0 (or None for the data-dependent start), got {init}")
        self.threshold = threshold
        self.init = init
        self.w_p = nn.Parameter(torch.tensor(1.0 if init is None else float(init)))
        self.w_n = nn.Parameter(torch.tensor(1.0 if init is None else float(init)))
        self.register_buffer("initialized", torch.tensor(init is not None))

    @torch.no_grad()
    def _init_from(self, w: torch.Tensor) -> None:
        a = w.detach()
        delta = self.threshold * a.abs().max()
        for param, region in ((self.w_p, a[a > delta]), (self.w_n, -a[a < -delta])):
            if region.numel():
                param.fill_(region.mean().item())
        self.initialized.fill_(True)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self._init_from(w)
        return ttq_quantize(w, self.w_p.to(w.dtype), self.w_n.to(w.dtype), self.threshold)

    def levels(self) -> torch.Tensor:
        """``[-W_n, 0, W_p]`` (detached); sorted while both scales are positive."""
        w_p, w_n = self.w_p.detach(), self.w_n.detach()
        return torch.stack([-w_n, torch.zeros_like(w_p), w_p])

    def extra_repr(self) -> str:
        return f"bit_width={self.bit_width}, threshold={self.threshold}, init={self.init}"
