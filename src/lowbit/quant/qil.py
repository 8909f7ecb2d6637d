r"""QIL: quantization intervals (center c, distance d, and gamma for weights) learned from the task loss.

Each quantized layer learns one interval :math:`[c - d, c + d]` for its weights and one for its input
activations. Values below the interval are pruned (to 0), values above are clipped (to 1), values inside
are mapped onto [0, 1] by the *transformer* and then rounded by the *discretizer*:

.. math::

    \alpha = \frac{0.5}{d}, \qquad \beta = 0.5 - \frac{0.5\,c}{d},

    T_W(w) = \begin{cases} 0 & |w| < c - d \\ \mathrm{sign}(w) & |w| > c + d \\
             \mathrm{sign}(w)\,(\alpha|w| + \beta)^{\gamma} & \text{otherwise} \end{cases}
    \qquad
    T_X(x) = \begin{cases} 0 & x < c - d \\ 1 & x > c + d \\ \alpha x + \beta & \text{otherwise} \end{cases}

    D(\hat v) = \mathrm{round}(\hat v \cdot q) / q, \qquad
    q = 2^{N-1} - 1 \text{ (weights, sign kept: } 2^N - 1 \text{ levels in } [-1, 1]),
    \quad q = 2^N - 1 \text{ (activations: } 2^N \text{ levels in } [0, 1]).

Gradients: the discretizer is straight-through (:math:`\partial D/\partial \hat v = 1`); the transformer is
differentiated exactly, so pruned and clipped values pass no gradient to the input, to c, d or gamma, and
inside the interval (weights, :math:`u = \alpha|w| + \beta`):

.. math::

    \frac{\partial T_W}{\partial w} = \gamma\,\alpha\,u^{\gamma-1}, \quad
    \frac{\partial T_W}{\partial c} = -\mathrm{sign}(w)\,\gamma\,u^{\gamma-1}\,\frac{0.5}{d}, \quad
    \frac{\partial T_W}{\partial d} = \mathrm{sign}(w)\,\gamma\,u^{\gamma-1}\,\frac{0.5\,(c - |w|)}{d^2}, \quad
    \frac{\partial T_W}{\partial \gamma} = \mathrm{sign}(w)\,u^{\gamma}\ln u

(activations: the same with :math:`\gamma = 1` and :math:`x` for :math:`|w|`, without the sign).

The output is the normalized value (weights in [-1, 1], activations in [0, 1]), as in the paper: the real
scale of the interval is absorbed by the batch normalization that follows each convolution. A network
without normalization after its quantized layers needs a scale of its own.

Initialization (not specified by the paper beyond "from the pre-trained network"): the first time a
quantizer sees data (weights: ``init_from`` when a layer adopts its float weight, else the first forward;
activations: the first forward, i.e. the first training batch) it sets the interval to :math:`[0, b]`, no
pruning and clipping at :math:`b`, with :math:`b` the clipping value of the uniform quantizer with the same
levels that minimizes the mean squared error to the data (a grid search over :math:`b \in (0, \max|v|]`), and
:math:`\gamma = 1`. The ``initialized`` flag is saved with the state, so a resumed run does not re-initialize.

Parametrization: the learned c and d are ``nn.Parameter`` scalars stored in units of ``unit``, a buffer set to
the initial clipping value :math:`b` (so they start at c = d = 0.5); the interval in the units of the data is
:math:`[\mathrm{unit}\,(c - |d|),\ \mathrm{unit}\,(c + |d|)]` (``interval``). The paper states c and d in
the units of the data; storing them relative to each layer's own scale lets one learning rate fit every layer
and every optimizer. Without it, on ResNet-20 (weights of magnitude ~0.05, an interval gradient summed over
all the weights of a layer, of order 1), SGD at lr 0.01 moved the weight intervals by several times their size
per step and some collapsed within 20 steps. The forward uses :math:`|d|` (at least ``1e-8``) and
:math:`\gamma` (learned for weights, also a plain scalar) clamped to [0.01, 100].

Progressive fine-tuning (paper: 32 -> 5 -> 4 -> 3 -> 2 bits): the state of a QIL quantizer (c, d, unit,
gamma) does not depend on its bit width, so the state dict of a model trained at N bits loads into the same model
quantized at N - 1 bits (``quantize_`` then ``load_state_dict``), which starts from the learned intervals.

References:
    Jung et al., "Learning to Quantize Deep Networks by Optimizing Quantization Intervals with Task Loss",
    arXiv:1808.05779.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.quant.base import Quantizer, register_quantizer

__all__ = ["qil_weight_transform", "qil_act_transform", "qil_discretize", "qil_act_quantize", "fit_clip", "QILWeight",
           "QILAct"]

_MAX_BITS = 16
_MIN_D = 1e-8  # the distance is used as |d|, at least this (d = 0 would divide by zero)
_GAMMA_RANGE = (0.01, 100.0)  # gamma <= 0 would invert or flatten the mapping
_TINY_BASE = 1e-6  # u^gamma is evaluated at u >= this inside the interval (u^(gamma-1) is infinite at 0)
_INIT_SAMPLES = 1 << 16  # at most this many values (an even stride through the tensor) for the init search
_INIT_GRID = 100  # candidate clipping values b = max|v| * i / 100, i = 1..100


def _check_bits(bits: int, low: int, what: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= _MAX_BITS:
        extra = " (q = 2^(N-1) - 1 is 0 at N = 1: use a binary quantizer such as ste_sign)" if low == 2 else ""
        raise ValueError(f"QIL {what} bits must be an int in [{low}, {_MAX_BITS}], got {bits!r}{extra}")
    return bits


def _distance(d: torch.Tensor) -> torch.Tensor:
    return d.abs().clamp_min(_MIN_D)


def qil_weight_transform(w: torch.Tensor, c: torch.Tensor, d: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    r"""QIL's weight transformer :math:`T_W`: prune below :math:`c - d`, clip above :math:`c + d`, sign kept.

    Forward: ``0`` where ``|w| < c - d``; ``sign(w)`` where ``|w| > c + d``; else
    ``sign(w) (alpha |w| + beta)^gamma`` with ``alpha = 0.5/d``, ``beta = 0.5 - 0.5 c/d``. A NaN stays NaN.
    Gradient: exact (autograd); zero for pruned and clipped weights (see the module docstring).

    Args:
        w: weights.
        c, d, gamma: the interval's center and half-width and the exponent (scalar tensors); ``|d|`` is used.

    Example:
        >>> c, d, gamma = torch.tensor(0.75), torch.tensor(0.5), torch.tensor(1.0)  # interval [0.25, 1.25]
        >>> qil_weight_transform(torch.tensor([-2.0, -0.5, 0.2, 1.0]), c, d, gamma)
        tensor([-1.0000, -0.2500,  0.0000,  0.7500])

    References:
        Jung et al., "Learning to Quantize Deep Networks by Optimizing Quantization Intervals with Task Loss",
        arXiv:1808.05779.
    """
    d = _distance(d)
    gamma = gamma.clamp(*_GAMMA_RANGE)
    a = w.abs()
    u = (0.5 / d) * a + (0.5 - 0.5 * c / d)  # alpha |w| + beta: 0 at c - d, 1 at c + d
    inside = torch.where(u > 0, u.clamp(_TINY_BASE, 1.0) ** gamma, torch.zeros_like(u))  # 0^gamma = 0 exactly
    mag = torch.where(a > c + d, torch.ones_like(u), torch.where(a < c - d, torch.zeros_like(u), inside))
    out = torch.sign(w) * mag
    return torch.where(torch.isnan(w), w, out)


def qil_act_transform(x: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    r"""QIL's activation transformer :math:`T_X` (gamma = 1): ``clip(alpha x + beta, 0, 1)``.

    Forward: ``0`` where ``x < c - d``, ``1`` where ``x > c + d``, else ``alpha x + beta`` with ``alpha = 0.5/d``,
    ``beta = 0.5 - 0.5 c/d``. Gradient: ``alpha`` to x, ``-0.5/d`` to c and ``0.5 (c - x)/d^2`` to d inside the
    interval, zero outside. A NaN stays NaN.

    Args:
        x: activations.
        c, d: the interval's center and half-width (scalar tensors); ``|d|`` is used.

    Example:
        >>> qil_act_transform(torch.tensor([-1.0, 0.5, 1.0, 3.0]), torch.tensor(1.0), torch.tensor(1.0))
        tensor([0.0000, 0.2500, 0.5000, 1.0000])

    References:
        Jung et al., "Learning to Quantize Deep Networks by Optimizing Quantization Intervals with Task Loss",
        arXiv:1808.05779.
    """
    d = _distance(d)
    return ((0.5 / d) * x + (0.5 - 0.5 * c / d)).clamp(0.0, 1.0)  # clamp keeps NaN, gradient 0 outside


def qil_discretize(v: torch.Tensor, q: int) -> torch.Tensor:
    """QIL's discretizer ``round(v q) / q`` with a straight-through gradient (``dD/dv = 1``).

    Args:
        v: transformed values (in [-1, 1] or [0, 1]).
        q: the number of steps per unit, >= 1.

    Example:
        >>> qil_discretize(torch.tensor([0.1, 0.4, 0.9]), q=3)
        tensor([0.0000, 0.3333, 1.0000])

    References:
        Jung et al., "Learning to Quantize Deep Networks by Optimizing Quantization Intervals with Task Loss",
        arXiv:1808.05779.
    """
    if isinstance(q, bool) or not isinstance(q, int) or q < 1:
        raise ValueError(f"the discretizer's q must be an int >= 1, got {q!r}")
    return torch.round(v.detach() * q) / q + (v - v.detach())  # exactly the level forward, identity backward


class _QILActFn(torch.autograd.Function):
    """``D(T_X(x))`` in a few in-place passes, with the hand-written gradients of :func:`qil_act_quantize`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, c: torch.Tensor, d: torch.Tensor, q: int) -> torch.Tensor:
        dd = _distance(d)
        u = x * (0.5 / dd) + (0.5 - 0.5 * c / dd)  # alpha x + beta
        inside = (u >= 0) & (u <= 1)  # the interval [c - d, c + d], ends included (as clamp's gradient)
        ctx.save_for_backward(x, inside, c, d)
        return u.clamp_(0.0, 1.0).mul_(q).round_().div_(q)  # NaN stays NaN

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, inside, c, d = ctx.saved_tensors
        dd = _distance(d)
        gi = g * inside  # dL/du inside the interval (straight through the rounding), 0 outside
        grad_x = gi * (0.5 / dd) if ctx.needs_input_grad[0] else None
        s = gi.sum()
        grad_c = -s * (0.5 / dd)  # du/dc = -0.5/d
        grad_dd = (c * s - (gi * x).sum()) * (0.5 / dd**2)  # du/dd = 0.5 (c - x) / d^2
        grad_d = grad_dd * torch.sign(d) * (d.abs() >= _MIN_D)  # through |d| clamped at _MIN_D
        return grad_x, grad_c.reshape(c.shape), grad_d.reshape(d.shape), None


def qil_act_quantize(x: torch.Tensor, c: torch.Tensor, d: torch.Tensor, q: int) -> torch.Tensor:
    """QIL's quantized activations ``D(T_X(x)) = round(clip(alpha x + beta, 0, 1) q) / q`` (one fused function).

    The same values and gradients as ``qil_discretize(qil_act_transform(x, c, d), q)`` in fewer passes over
    the activations. Gradient (straight through the rounding): inside ``[c - d, c + d]``, ``alpha = 0.5/d``
    to x, ``-0.5/d`` to c and ``0.5 (c - x)/d^2`` to d, summed over the tensor; zero outside.

    Args:
        x: activations.
        c, d: the interval's center and half-width (scalar tensors); ``|d|`` is used.
        q: steps per unit, ``2^N - 1`` for N bits.

    Example:
        >>> qil_act_quantize(torch.tensor([-1.0, 0.5, 1.0, 3.0]), torch.tensor(1.0), torch.tensor(1.0), q=3)
        tensor([0.0000, 0.3333, 0.6667, 1.0000])

    References:
        Jung et al., "Learning to Quantize Deep Networks by Optimizing Quantization Intervals with Task Loss",
        arXiv:1808.05779.
    """
    if isinstance(q, bool) or not isinstance(q, int) or q < 1:
        raise ValueError(f"the discretizer's q must be an int >= 1, got {q!r}")
    return _QILActFn.apply(x, c, d, q)


@torch.no_grad()
def fit_clip(values: torch.Tensor, q: int) -> torch.Tensor:
    """The clipping value ``b`` minimizing ``mean (v - b round(min(v/b, 1) q)/q)^2`` over non-negative ``v``.

    A grid search over ``b = max(v) i/100``, i = 1..100, on at most 65,536 values taken at an even stride (no
    random numbers are drawn). Returns a scalar tensor; 0 when every value is <= 0.

    Example:
        >>> fit_clip(torch.tensor([0.0, 1.0, 2.0, 3.0]), q=3)  # levels 0, 1, 2, 3 fit exactly
        tensor(3.)
    """
    v = values.detach().flatten().float().clamp_min(0)
    if v.numel() > _INIT_SAMPLES:
        v = v[:: -(-v.numel() // _INIT_SAMPLES)]
    top = v.max() if v.numel() else torch.tensor(0.0)
    if not top > 0:
        return torch.zeros((), dtype=values.dtype)
    b = top * torch.arange(1, _INIT_GRID + 1, dtype=v.dtype) / _INIT_GRID  # (G,)
    levels = torch.round((v[None, :] / b[:, None]).clamp(max=1.0) * q) / q * b[:, None]  # (G, n)
    err = (levels - v[None, :]).pow(2).mean(1)
    return b[err.argmin()].to(values.dtype)


class _QILBase(Quantizer):
    initialized: torch.Tensor
    unit: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Parameter(torch.tensor(0.5))  # the center, in units of ``unit``
        self.d = nn.Parameter(torch.tensor(0.5))  # the half-width, in units of ``unit``
        self.register_buffer("unit", torch.tensor(1.0))  # the initial clipping value b
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _init_interval(self, v: torch.Tensor, q: int) -> None:
        if not torch.isfinite(v).all():
            raise ValueError(f"{type(self).__name__}: cannot initialize the interval from a tensor with NaN or "
                             "infinite values")
        b = fit_clip(v, q)
        if b > 0:  # all-zero data: stay uninitialized, try again with the next tensor
            self.unit.fill_(float(b))
            self.c.fill_(0.5)
            self.d.fill_(0.5)
            self.initialized.fill_(True)

    def _center_distance(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """c and d in the units of the data (differentiable in the stored parameters)."""
        unit = self.unit.to(dtype)
        return unit * self.c.to(dtype), unit * self.d.to(dtype)

    @property
    def interval(self) -> tuple[float, float]:
        """``(unit (c - |d|), unit (c + |d|))``: values below the first are pruned, above the second clipped."""
        with torch.no_grad():
            c, d = self._center_distance(torch.float64)
        return float(c - _distance(d)), float(c + _distance(d))


@register_quantizer("qil_weight")
class QILWeight(_QILBase):
    r"""QIL's weight quantizer: a learned interval (c, d) and exponent gamma per layer, sign kept.

    Forward: :math:`D(T_W(w))` with :math:`q = 2^{N-1} - 1`, i.e. the :math:`2^N - 1` levels
    :math:`\{i/q : i = -q..q\}` (N = 2: -1, 0, 1; N = 4: multiples of 1/7). See :func:`qil_weight_transform`.

    Gradient: straight through the rounding; exact through the transformer, so the weights, c, d and gamma
    receive gradients only from weights inside the interval:
    :math:`\partial T_W/\partial w = \gamma\alpha u^{\gamma-1}`, :math:`\partial T_W/\partial c =
    -\mathrm{sign}(w)\gamma u^{\gamma-1}\,0.5/d`, :math:`\partial T_W/\partial d = \mathrm{sign}(w)\gamma
    u^{\gamma-1}\,0.5(c-|w|)/d^2`, :math:`\partial T_W/\partial\gamma = \mathrm{sign}(w)u^\gamma\ln u`, with
    :math:`u = \alpha|w| + \beta`.

    The interval starts at the mean-squared-error-optimal clipping b of the weights, ``[0, b]`` (``init_from``,
    called when a quantized layer adopts its float weight; else at the first forward), gamma at 1; c and d are
    stored in units of ``unit = b`` (see the module docstring), ``interval`` gives it in the units of the
    weights. ``levels()`` is fixed, ``scale = 1/q`` and ``zero_point = 0`` (of the normalized output).

    Args:
        bits: N, 2 to 16 (default 2: ternary levels -1, 0, 1).
        learn_gamma: train gamma (the paper); False keeps gamma = 1 (a linear interval).

    Example:
        >>> q = QILWeight(bits=3)
        >>> q.init_from(torch.tensor([-0.9, -0.3, 0.0, 0.3, 0.6, 0.9]))
        >>> [round(v, 4) for v in q.interval]  # no pruning, clipping at 0.9
        [0.0, 0.9]
        >>> q(torch.tensor([-0.9, -0.3, 0.0, 0.3, 0.6, 0.9]))
        tensor([-1.0000, -0.3333,  0.0000,  0.3333,  0.6667,  1.0000], grad_fn=<AddBackward0>)

    References:
        Jung et al., "Learning to Quantize Deep Networks by Optimizing Quantization Intervals with Task Loss",
        arXiv:1808.05779.
    """

    def __init__(self, bits: int = 2, learn_gamma: bool = True) -> None:
        super().__init__()
        self.bit_width = _check_bits(bits, 2, "weight")
        self.q = 2 ** (bits - 1) - 1
        self.learn_gamma = bool(learn_gamma)
        self.gamma = nn.Parameter(torch.tensor(1.0), requires_grad=self.learn_gamma)
        self.scale = torch.tensor(1.0 / self.q)
        self.zero_point = torch.tensor(0)

    def init_from(self, weight: torch.Tensor) -> None:
        """Set the interval to ``[0, b]`` (b: the MSE-optimal clipping of ``|weight|``, kept as ``unit``), gamma = 1."""
        self._init_interval(weight.detach().abs(), self.q)
        with torch.no_grad():
            self.gamma.fill_(1.0)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self.init_from(w)
        c, d = self._center_distance(w.dtype)
        t = qil_weight_transform(w, c, d, self.gamma.to(w.dtype))
        return qil_discretize(t, self.q)

    def levels(self) -> torch.Tensor:
        return torch.arange(-self.q, self.q + 1, dtype=torch.float32) / self.q

    def extra_repr(self) -> str:
        return f"bit_width={self.bit_width}, learn_gamma={self.learn_gamma}"


@register_quantizer("qil_act")
class QILAct(_QILBase):
    r"""QIL's activation quantizer: a learned interval (c, d) per layer, gamma = 1, output in [0, 1].

    Forward: :math:`D(T_X(x))` with :math:`q = 2^N - 1`: ``round(clip(alpha x + beta, 0, 1) q) / q``,
    ``alpha = 0.5/d``, ``beta = 0.5 - 0.5 c/d``; levels :math:`\{i/q : i = 0..q\}` (:func:`qil_act_quantize`).

    Gradient: straight through the rounding; inside the interval ``alpha`` to x, ``-0.5/d`` to c and
    ``0.5 (c - x)/d^2`` to d; zero outside (pruned and clipped activations).

    The interval starts at the mean-squared-error-optimal clipping b of the first batch it sees, ``[0, b]``; c
    and d are stored in units of ``unit = b``, ``interval`` gives it in the units of the activations.
    ``levels()`` is fixed, ``scale = 1/q``, ``zero_point = 0``.

    Args:
        bits: N, 1 to 16 (default 2).

    Example:
        >>> q = QILAct(bits=2)
        >>> q(torch.tensor([0.0, 1.0, 2.0, 3.0]))  # the first batch sets the interval [0, 3]
        tensor([0.0000, 0.3333, 0.6667, 1.0000], grad_fn=<_QILActFnBackward>)
        >>> q(torch.tensor([-1.0, 1.4, 9.0]))
        tensor([0.0000, 0.3333, 1.0000], grad_fn=<_QILActFnBackward>)

    References:
        Jung et al., "Learning to Quantize Deep Networks by Optimizing Quantization Intervals with Task Loss",
        arXiv:1808.05779.
    """

    def __init__(self, bits: int = 2) -> None:
        super().__init__()
        self.bit_width = _check_bits(bits, 1, "activation")
        self.q = 2**bits - 1
        self.scale = torch.tensor(1.0 / self.q)
        self.zero_point = torch.tensor(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self._init_interval(x.detach(), self.q)
        return qil_act_quantize(x, *self._center_distance(x.dtype), self.q)

    def levels(self) -> torch.Tensor:
        return torch.arange(self.q + 1, dtype=torch.float32) / self.q

    def extra_repr(self) -> str:
        return f"bit_width={self.bit_width}"
