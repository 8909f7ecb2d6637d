r"""LQ-Nets: quantizers with a learned basis, fitted to the data by quantization error minimization (QEM).

A K-bit LQ-Nets quantizer has a basis :math:`v \in \mathbb{R}^K` and the :math:`2^K` levels
:math:`v^\top e` for every code :math:`e \in \{-1, 1\}^K` (weights) or :math:`e \in \{0, 1\}^K`
(activations). The forward maps each value to its nearest level:

.. math::

    Q(x, v) = v^\top e_l \quad \text{for } x \in (t_l, t_{l+1}], \qquad t_l = (q_{l-1} + q_l) / 2,

with :math:`q_1 < \dots < q_{2^K}` the sorted levels. Weights have one basis per output channel (dim 0),
activations one per layer. The basis is not trained by gradient descent: in training mode every forward
takes one QEM step on the data it quantizes, :math:`x` (a channel's weights, or a batch's activations: at
most ``QEM_SAMPLES`` of them, see :class:`LQNetsAct`):

1. codes: :math:`B = [e(x_1), \dots, e(x_N)] \in \{\cdot\}^{K \times N}`, each value's nearest-level code;
2. basis: :math:`v^* = (B B^\top + \delta I)^{-1} (B x + \delta v)`, the least-squares basis for these codes
   (:math:`\delta = 10^{-4}` keeps a direction the codes do not determine at its current value);
3. moving average: :math:`v \leftarrow m v + (1 - m) v^*` (:math:`m = 0.9`);

then quantizes :math:`x` with the updated basis (so the output lies on the levels that ``levels()`` reports).
Each step cannot increase :math:`\|x - Q(x, v)\|^2` on the data it is taken on: the squared error is convex
in :math:`v` for fixed codes, so the averaged :math:`v` is no worse than the old one, and re-assigning the
nearest codes only lowers it.

Gradient: straight-through. Weights: :math:`\partial Q/\partial x = 1`; activations: :math:`1` for
:math:`x \le q_{\max}` and 0 above the largest level (the gradient of :math:`\min(x, q_{\max})`, as in the
authors' implementation).

Initialization (from the data, as a start from a trained float network calls for; the authors' code starts
from a fixed basis scaled to the He initialization): :math:`v_i = a\,2^{i}`,
uniform levels reaching :math:`\max|x|` (weights, per channel) or :math:`\max x` (activations), then 10 QEM
steps without averaging. Weights: when a quantized layer adopts its float weight (``init_from``), else at the
first forward; activations: at the first forward (a batch without a positive value leaves the quantizer
uninitialized and is quantized with the default uniform basis on [0, 1]).

References:
    Zhang et al., "LQ-Nets: Learned Quantization for Highly Accurate and Compact Deep Neural Networks",
    arXiv:1807.10029.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lowbit.quant.base import Quantizer, register_quantizer

__all__ = ["code_matrix", "lq_levels", "lq_quantize", "qem_step", "init_basis", "LQNetsWeight", "LQNetsAct"]

_MAX_BITS = 8  # 2^8 levels; the nearest-level search and the K x K solve stay cheap
RIDGE = 1e-4  # delta in the QEM solve (the authors' code adds the same to B B^T and delta * v to B x)
INIT_QEM_STEPS = 10
QEM_SAMPLES = 1 << 17  # activations: the QEM statistics of a batch use at most this many values (see LQNetsAct)


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= _MAX_BITS:
        raise ValueError(f"LQ-Nets bits (the basis size K) must be an int in [1, {_MAX_BITS}], got {bits!r}")
    return bits


def _check_momentum(momentum: float) -> float:
    if not 0 <= momentum < 1:
        raise ValueError(f"LQ-Nets momentum (the basis moving-average factor) must be in [0, 1), got {momentum!r}")
    return float(momentum)


def _check_finite(x: torch.Tensor, who: str) -> None:
    if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():  # the sum is one fast pass; it can overflow
        raise ValueError(f"{who}: the input has NaN or infinite values (the nearest-level search would map them "
                         "to a level, and the basis update would become NaN)")


def code_matrix(bits: int, signed: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """All :math:`2^K` codes as rows, ``(2^K, K)``: row j holds the bits of j (bit i in column i), mapped to
    {-1, 1} when ``signed`` (weights) and kept in {0, 1} otherwise (activations).

    Example:
        >>> code_matrix(2, signed=True)
        tensor([[-1., -1.],
                [ 1., -1.],
                [-1.,  1.],
                [ 1.,  1.]])
    """
    k = _check_bits(bits)
    j = torch.arange(2**k)[:, None]
    bits_ = ((j >> torch.arange(k)[None, :]) & 1).to(dtype)
    return 2 * bits_ - 1 if signed else bits_


def lq_levels(basis: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted levels :math:`v^\\top e` of each basis row and the code index of each sorted level.

    Args:
        basis: ``(C, K)`` (one basis per row) or ``(K,)``.
        signed: codes in {-1, 1} (weights) or {0, 1} (activations).

    Returns:
        ``(levels, order)``, both ``(C, 2^K)`` (``(2^K,)`` for a 1-D basis): ``levels[c]`` ascending and
        ``order[c, l]`` the row of :func:`code_matrix` whose code gives ``levels[c, l]``.

    Example:
        >>> lq_levels(torch.tensor([1.0, 2.0]), signed=False)[0]
        tensor([0., 1., 2., 3.])
        >>> lq_levels(torch.tensor([1.0, 2.0]), signed=True)[0]
        tensor([-3., -1.,  1.,  3.])
    """
    e = code_matrix(basis.shape[-1], signed, basis.dtype).to(basis.device)
    return (basis @ e.T).sort(dim=-1)


_COMPARE_MAX = 3  # up to this many thresholds (K <= 2), counting exceeded thresholds beats a binary search


def _nearest(x2d: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted ``levels`` (C, L) for each value of ``x2d`` (C, N): the number of
    thresholds ``t_l`` (midpoints) below the value, so a value on a threshold goes to the lower level.
    Integer dtype: uint8 on the fast path for one basis and few levels, else int64."""
    mid = ((levels[:, 1:] + levels[:, :-1]) / 2).contiguous()  # (C, L-1) thresholds t_l
    if mid.shape[0] == 1 and mid.shape[1] <= _COMPARE_MAX:  # one basis (activations): a few passes over x
        idx = (x2d > mid[0, 0]).to(torch.uint8)  # uint8: 4 passes over x for K = 2, no int64 conversions
        for t in mid[0, 1:]:
            idx.add_(x2d > t)
        return idx
    if mid.shape[0] == 1:  # one basis: bucketize (right=False: t_l < x) is twice as fast as a batched search
        return torch.bucketize(x2d[0].contiguous(), mid[0])[None]
    return torch.searchsorted(mid, x2d.contiguous())


def _dense_flat(x: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """A 1-D view of ``x``'s storage order (no copy for a dense layout such as channels_last) and the function
    that gives a flat result of the same order back the shape and layout of ``x``."""
    perm = sorted(range(x.dim()), key=lambda i: -x.stride(i))
    xp = x.permute(perm)
    if not xp.is_contiguous():
        return x.reshape(-1), lambda flat: flat.view(x.shape)
    inverse = sorted(range(x.dim()), key=lambda i: perm[i])
    return xp.view(-1), lambda flat: flat.view(xp.shape).permute(inverse)


def lq_quantize(x: torch.Tensor, basis: torch.Tensor, signed: bool) -> torch.Tensor:
    """Each value of ``x`` replaced by its nearest level :math:`v^\\top e` (no gradient; see the classes).

    Args:
        x: ``(C, N)`` with a ``(C, K)`` basis (row c quantized with basis c), or any shape with a ``(K,)`` basis.
        basis: the basis, ``(C, K)`` or ``(K,)``.
        signed: codes in {-1, 1} (weights) or {0, 1} (activations).

    Example:
        >>> lq_quantize(torch.tensor([-0.2, 0.4, 1.6, 9.0]), torch.tensor([1.0, 2.0]), signed=False)
        tensor([0., 0., 2., 3.])
    """
    levels, _ = lq_levels(basis.detach(), signed)
    if basis.dim() == 1:
        flat, unflatten = _dense_flat(x.detach())
        return unflatten(levels.take(_nearest(flat[None], levels[None])[0].long()))
    return levels.gather(1, _nearest(x.detach(), levels).long())


@torch.no_grad()
def qem_step(x: torch.Tensor, basis: torch.Tensor, signed: bool, momentum: float = 0.9,
             ridge: float = RIDGE) -> torch.Tensor:
    r"""One QEM step: nearest codes for ``basis``, the least-squares basis for them, then the moving average.

    ``v* = (B B^T + ridge I)^{-1} (B x + ridge v)`` per row, returned as ``momentum v + (1 - momentum) v*``
    (a new tensor; ``basis`` is not modified). Solved in float64 from the per-code counts and sums of x.

    Args:
        x: ``(C, N)`` data with a ``(C, K)`` basis, or any shape with a ``(K,)`` basis.
        basis: the current basis.
        signed: codes in {-1, 1} (weights) or {0, 1} (activations).
        momentum: m in [0, 1); 0 gives the plain alternating least-squares step.
        ridge: delta >= 0.

    Example:
        >>> x = torch.tensor([0.0, 0.9, 2.1, 3.0, 3.1])
        >>> qem_step(x, torch.tensor([1.0, 2.0]), signed=False, momentum=0.0)  # B B^T = [[3, 2], [2, 3]]
        tensor([0.9200, 2.1200])
    """
    _check_momentum(momentum)
    one_d = basis.dim() == 1
    v = basis.detach()[None] if one_d else basis.detach()  # (C, K)
    x2d = _dense_flat(x.detach())[0][None] if one_d else x.detach()  # (C, N); one basis: any order will do
    c, k = v.shape
    n_codes = 2**k
    levels, order = lq_levels(v, signed)
    idx = _nearest(x2d, levels)  # (C, N): position of each value's level among the sorted levels
    flat = (idx + n_codes * torch.arange(c, device=x2d.device)[:, None]).flatten() if c > 1 else idx.flatten()
    counts = torch.bincount(flat, minlength=c * n_codes).view(c, n_codes).double()  # values per sorted level
    sums = torch.bincount(flat, weights=x2d.flatten().double(), minlength=c * n_codes).view(c, n_codes)
    e = code_matrix(k, signed, torch.float64).to(x2d.device)[order]  # (C, L, K): the code of each sorted level
    btb = torch.einsum("cj,cjk,cjl->ckl", counts, e, e) + ridge * torch.eye(k, dtype=torch.float64, device=v.device)
    btx = torch.einsum("cj,cjk->ck", sums, e) + ridge * v.double()  # (C, K)
    v_star = torch.linalg.solve(btb, btx)
    new = (momentum * v.double() + (1 - momentum) * v_star).to(v.dtype)
    return new[0] if one_d else new


@torch.no_grad()
def init_basis(x: torch.Tensor, bits: int, signed: bool, steps: int = INIT_QEM_STEPS) -> torch.Tensor:
    """A data-dependent start: uniform levels ``v_i = a 2^i`` reaching the largest value, then ``steps`` QEM steps
    without averaging.

    Args:
        x: ``(C, N)`` for one basis per row (returns ``(C, K)``), or a 1-D tensor for one basis (returns ``(K,)``).
        bits: K, 1 to 8.
        signed: codes in {-1, 1} (``a = max|x_c| / (2^K - 1)``) or {0, 1} (``a = max(x) / (2^K - 1)``).
        steps: QEM steps after the uniform start.

    Example:
        >>> init_basis(torch.tensor([0.0, 1.0, 2.0, 3.0]), bits=2, signed=False, steps=0)
        tensor([1., 2.])
    """
    k = _check_bits(bits)
    x2d = x.detach().reshape(1, -1) if x.dim() == 1 else x.detach()
    top = x2d.abs().amax(1) if signed else x2d.amax(1).clamp_min(0)  # (C,)
    basis = (top / (2**k - 1))[:, None] * 2.0 ** torch.arange(k, dtype=x2d.dtype, device=x2d.device)
    for _ in range(steps):
        basis = qem_step(x2d, basis, signed, momentum=0.0)
    return basis[0] if x.dim() == 1 else basis


class _ClippedStraightThrough(torch.autograd.Function):
    """Forward: ``q`` exactly. Backward: the gradient to ``x`` where ``x <= top``, 0 above (one saved mask)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, q: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x <= top)
        return q

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (passes,) = ctx.saved_tensors
        return g * passes, None, None


class _LQNetsBase(Quantizer):
    def __init__(self, bits: int, momentum: float) -> None:
        super().__init__()
        self.bit_width = _check_bits(bits)
        self.momentum = _check_momentum(momentum)

    def extra_repr(self) -> str:
        return f"bit_width={self.bit_width}, momentum={self.momentum}"


@register_quantizer("lqnets_weight")
class LQNetsWeight(_LQNetsBase):
    r"""LQ-Nets weight quantizer: levels :math:`v_c^\top e`, :math:`e \in \{-1, 1\}^K`, a basis per output channel.

    Forward: each weight of output channel c (dim 0; a 1-D tensor is one channel) becomes the nearest of the
    :math:`2^K` levels of :math:`v_c`. In training mode the bases first take one QEM step on the current
    weights (least squares for the current codes, moving average with ``momentum``; see the module docstring).

    Gradient: straight-through, :math:`\partial L/\partial w = \partial L/\partial Q`. The basis gets no
    gradient (it is a buffer, fitted by QEM).

    ``basis`` is a ``(C, K)`` buffer created by ``init_from`` (called when a quantized layer adopts its float
    weight) or at the first forward; ``channel_levels()`` gives the ``(C, 2^K)`` sorted levels and ``levels()``
    is None (the levels differ per channel).

    Args:
        bits: K, 1 to 8 (default 2).
        momentum: the basis moving-average factor m in [0, 1) (default 0.9, the paper's).

    Example:
        >>> q = LQNetsWeight(bits=1)
        >>> w = torch.tensor([[0.5, -1.5, 1.0], [-0.2, 0.2, 0.2]])
        >>> q.init_from(w)  # K = 1: v_c = mean |w_c|
        >>> q.basis
        tensor([[1.0000],
                [0.2000]])
        >>> q.eval()(w)
        tensor([[ 1.0000, -1.0000,  1.0000],
                [-0.2000,  0.2000,  0.2000]])

    References:
        Zhang et al., "LQ-Nets: Learned Quantization for Highly Accurate and Compact Deep Neural Networks",
        arXiv:1807.10029.
    """

    basis: torch.Tensor | None

    def __init__(self, bits: int = 2, momentum: float = 0.9) -> None:
        super().__init__(bits, momentum)
        self.register_buffer("basis", None)

    @staticmethod
    def _rows(w: torch.Tensor) -> torch.Tensor:
        return w.reshape(w.shape[0], -1) if w.dim() >= 2 else w.reshape(1, -1)  # (C, N)

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor) -> None:
        """Create the ``(C, K)`` basis from ``weight`` (uniform start, then QEM; see :func:`init_basis`)."""
        _check_finite(weight, type(self).__name__)
        self.basis = init_basis(self._rows(weight.detach()), self.bit_width, signed=True)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        _check_finite(w, type(self).__name__)
        rows = self._rows(w)
        if self.basis is None:
            self.init_from(w)
        assert self.basis is not None
        if self.basis.shape[0] != rows.shape[0]:
            raise ValueError(f"LQNetsWeight has {self.basis.shape[0]} channel bases but got a tensor with "
                             f"{rows.shape[0]} output channels (dim 0); use one quantizer per weight")
        if self.training:
            with torch.no_grad():
                self.basis.copy_(qem_step(rows, self.basis, True, self.momentum))
        q = lq_quantize(rows, self.basis.to(w.dtype), signed=True).reshape(w.shape)
        return q + (w - w.detach())

    def channel_levels(self) -> torch.Tensor | None:
        """The sorted levels of each output channel, ``(C, 2^K)``; None before the basis exists."""
        return None if self.basis is None else lq_levels(self.basis, True)[0]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        key = prefix + "basis"  # a lazily created basis: make room before loading a saved one
        if self.basis is None and key in state_dict:
            self.basis = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@register_quantizer("lqnets_act")
class LQNetsAct(_LQNetsBase):
    r"""LQ-Nets activation quantizer: levels :math:`v^\top e`, :math:`e \in \{0, 1\}^K`, one basis per layer.

    Forward: each activation becomes the nearest of the :math:`2^K` levels of :math:`v` (with a positive basis:
    0, the basis entries and their sums). In training mode the basis first takes one QEM step on the batch
    (least squares for the current codes, moving average with ``momentum``). The step's statistics (code
    counts and sums) use at most ``QEM_SAMPLES`` = 131,072 values of the batch, taken at an even stride: a
    sample of that size fixes a basis of K <= 8 entries to well within the noise that the moving average
    smooths anyway, and counting every value of a 128 x 16 x 32 x 32 batch would cost more than the
    convolution it feeds. The quantization itself covers every value.

    Gradient: :math:`\partial L/\partial x = \partial L/\partial Q \cdot 1\{x \le q_{\max}\}`, straight through the
    rounding and zero above the largest level. The basis gets no gradient (a buffer, fitted by QEM).

    The basis starts from the first batch (see :func:`init_basis`); ``levels()`` gives the sorted levels once
    it has (None before).

    Args:
        bits: K, 1 to 8 (default 2).
        momentum: the basis moving-average factor m in [0, 1) (default 0.9, the paper's).

    Example:
        >>> q = LQNetsAct(bits=2)
        >>> _ = q(torch.tensor([0.0, 1.0, 2.0, 3.0]))  # the first batch fits the basis (1, 2)
        >>> q.levels()
        tensor([0., 1., 2., 3.])
        >>> q.eval()(torch.tensor([-1.0, 0.4, 2.6, 7.0]))
        tensor([0., 0., 3., 3.])

    References:
        Zhang et al., "LQ-Nets: Learned Quantization for Highly Accurate and Compact Deep Neural Networks",
        arXiv:1807.10029.
    """

    basis: torch.Tensor
    initialized: torch.Tensor

    def __init__(self, bits: int = 2, momentum: float = 0.9) -> None:
        super().__init__(bits, momentum)
        k = self.bit_width
        self.register_buffer("basis", 2.0 ** torch.arange(k, dtype=torch.float32) / (2**k - 1))  # levels 0..1
        self.register_buffer("initialized", torch.tensor(False))

    @staticmethod
    def _sample(flat: torch.Tensor) -> torch.Tensor:
        """At most QEM_SAMPLES values at an even, odd stride (an odd stride visits every channel of any layout
        whose channel count is a power of two)."""
        if flat.numel() <= QEM_SAMPLES:
            return flat
        step = -(-flat.numel() // QEM_SAMPLES)
        return flat[:: step + 1 - step % 2]

    @torch.no_grad()
    def _init(self, sample: torch.Tensor) -> None:
        if sample.numel() and sample.max() > 0:  # else keep the default basis and try again with the next batch
            self.basis.copy_(init_basis(sample, self.bit_width, signed=False))
            self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_finite(x, type(self).__name__)
        flat, unflatten = _dense_flat(x.detach())
        if not bool(self.initialized):
            self._init(self._sample(flat))
        elif self.training:
            with torch.no_grad():
                self.basis.copy_(qem_step(self._sample(flat), self.basis, False, self.momentum))
        basis = self.basis.to(x.dtype)
        levels = lq_levels(basis, False)[0]
        q = unflatten(levels.take(_nearest(flat[None], levels[None])[0].long()))  # lq_quantize without a 2nd sort
        return _ClippedStraightThrough.apply(x, q, levels[-1])

    def levels(self) -> torch.Tensor | None:
        return lq_levels(self.basis, False)[0] if bool(self.initialized) else None
