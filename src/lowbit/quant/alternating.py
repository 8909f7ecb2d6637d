r"""Alternating multi-bit quantization (Xu et al. 2018): :math:`w \approx \sum_{i=1}^k \alpha_i b_i`.

Each row :math:`w \in \mathbb{R}^n` of a weight matrix (or each activation vector) is approximated by
:math:`k` binary codes :math:`b_i \in \{-1, +1\}^n` with real coefficients :math:`\alpha_i`, i.e. it takes
one of the :math:`2^k` values :math:`\sum_i \alpha_i c_i`, :math:`c \in \{-1, +1\}^k`. The fit minimizes
:math:`\|w - B\alpha\|_2^2` (:math:`B = [b_1 \dots b_k]`, :math:`n \times k`) in two phases:

1. **Greedy initialization** (the residual method of earlier multi-bit work): :math:`r = w`; for
   :math:`i = 1..k`: :math:`\alpha_i = \mathrm{mean}|r|`, :math:`b_i = \mathrm{sign}(r)`,
   :math:`r \leftarrow r - \alpha_i b_i` (each step is the optimal 1-bit fit of the residual).
2. **Alternating minimization**, ``iters`` cycles (the paper: 2 suffice):

   - codes fixed: :math:`\alpha = (B^\top B)^{-1} B^\top w`, the least-squares coefficients;
   - coefficients fixed: every element goes to the nearest of the :math:`2^k` values
     :math:`v_c = \sum_i \alpha_i c_i`. The paper does this with a binary search tree over the sorted
     values: sort them, take the midpoints of neighbours as decision boundaries, and find each element's
     interval by binary search (:math:`k` comparisons instead of :math:`2^k`); here
     :func:`torch.searchsorted` over the midpoints.

   Each half-step minimizes the error over one block of variables, so the error never increases:
   alternating :math:`\le` greedy :math:`\le` 1-bit (:math:`\alpha\,\mathrm{sign}(w)`).

Codes are held as integers ``c`` in :math:`[0, 2^k)` per element: bit :math:`i` of ``c`` set means
:math:`b_i = +1`, clear means :math:`-1`. ``sign(0) = +1``. The least-squares step is solved in float64 with
a minimum-norm solver, so a rank-deficient :math:`B` (a constant or all-zero row, :math:`n < k`) is fine.

The paper quantizes the weights row-wise during training (straight-through gradient) and the
activations (an LSTM's input and hidden state) online at every step with the same method, 2 cycles.

References:
    Xu, Yao, Chen, Zhu, Lin, Zhang, Wang, Lin, Zha, "Alternating Multi-bit Quantization for Recurrent
    Neural Networks", ICLR 2018, arXiv:1802.00150.
"""

from __future__ import annotations

import torch

from lowbit.quant.base import Quantizer, register_quantizer
from lowbit.quant.ternary import straight_through

__all__ = [
    "sign_table", "greedy_fit", "least_squares_alpha", "assign_codes", "reconstruct", "alternating_fit",
    "alternating_quantize", "AlternatingQuant", "MAX_BITS",
]

MAX_BITS = 8  # 2**8 = 256 candidate values per row; the paper uses 2-4 bits
PAPER_ITERS = 2  # "two alternating cycles are enough" (Xu et al., Section 3)


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [1, {MAX_BITS}], got {bits!r}")
    return bits


def _check_iters(iters: int) -> int:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters (alternating cycles) must be an int >= 0, got {iters!r}")
    return iters


def _check_rows(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D (rows, elements) tensor, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"expected a floating-point tensor, got {w.dtype}")


def sign_table(
    bits: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """The :math:`(2^k, k)` sign table: row ``c``, column ``i`` is +1 if bit ``i`` of ``c`` is set, else -1.

    Example:
        >>> sign_table(2)
        tensor([[-1., -1.],
                [ 1., -1.],
                [-1.,  1.],
                [ 1.,  1.]])
    """
    _check_bits(bits)
    c = torch.arange(2**bits, device=device)[:, None]  # (2^k, 1)
    set_ = (c >> torch.arange(bits, device=device)) & 1  # (2^k, k)
    return (2 * set_ - 1).to(dtype)


@torch.no_grad()
def greedy_fit(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Greedy residual fit of each row: :math:`\alpha_i = \mathrm{mean}|r|`, :math:`b_i = \mathrm{sign}(r)`,
    :math:`r \leftarrow r - \alpha_i b_i` for :math:`i = 1..k`.

    Args:
        w: ``(rows, n)`` float tensor, one row per independently quantized vector.
        bits: :math:`k`, the number of binary codes.

    Returns:
        ``(alpha, codes)``: ``alpha`` ``(rows, k)`` in ``w``'s dtype, ``codes`` ``(rows, n)`` int64 in
        :math:`[0, 2^k)` (bit ``i`` set: :math:`b_i = +1`).

    Example:
        >>> alpha, codes = greedy_fit(torch.tensor([[3.0, -1.0, 1.0, -3.0]]), 2)
        >>> alpha, reconstruct(alpha, codes)
        (tensor([[2., 1.]]), tensor([[ 3., -1.,  1., -3.]]))
    """
    _check_rows(w)
    _check_bits(bits)
    r = w.detach().clone()
    codes = torch.zeros(w.shape, dtype=torch.int64, device=w.device)
    one = torch.ones((), dtype=w.dtype, device=w.device)
    alphas = []
    for i in range(bits):
        a = r.abs().mean(dim=1, keepdim=True)  # (rows, 1): the optimal scale of a 1-bit fit of r
        sign = torch.copysign(one, r)  # +1 for +0 (a tie: +-a are equally near)
        codes.add_(sign > 0, alpha=1 << i)
        r -= a * sign
        alphas.append(a)
    return torch.cat(alphas, dim=1), codes


_SINGULAR = 1e-9  # a Cholesky pivot below this fraction of its diagonal entry: B is (numerically) rank deficient


@torch.no_grad()
def least_squares_alpha(w: torch.Tensor, codes: torch.Tensor, bits: int) -> torch.Tensor:
    r"""The optimal coefficients for fixed codes, per row: :math:`\alpha = (B^\top B)^{+} B^\top w`.

    :math:`B^\top B` and :math:`B^\top w` are formed from each row's count and sum of the elements per
    code (a :math:`2^k`-bin histogram) and solved in float64 by Cholesky; rows whose codes are linearly
    dependent (an all-zero or constant row, :math:`n < k`) get the minimum-norm solution instead, which is
    still a minimizer.

    Args:
        w: ``(rows, n)`` float tensor.
        codes: ``(rows, n)`` int64 codes in :math:`[0, 2^k)`.
        bits: :math:`k`.

    Returns:
        ``alpha`` ``(rows, k)`` in ``w``'s dtype.
    """
    _check_rows(w)
    _check_bits(bits)
    if codes.shape != w.shape:
        raise ValueError(f"codes have shape {tuple(codes.shape)}, the rows {tuple(w.shape)}; they must match")
    m = 2**bits
    rows = w.shape[0]
    wd = w.detach().double()
    zeros = torch.zeros(rows, m, dtype=torch.float64, device=w.device)
    cnt = zeros.scatter_add(1, codes, torch.ones((), dtype=torch.float64, device=w.device).expand(wd.shape))
    sums = zeros.scatter_add(1, codes, wd)  # (rows, 2^k): per-code element counts and sums
    s = sign_table(bits, torch.float64, w.device)  # (2^k, k)
    gram = torch.einsum("rc,ci,cj->rij", cnt, s, s)  # (rows, k, k) = B^T B
    rhs = (sums @ s).unsqueeze(-1)  # (rows, k, 1) = B^T w
    chol, info = torch.linalg.cholesky_ex(gram)
    pivots = chol.diagonal(dim1=1, dim2=2) ** 2  # (rows, k)
    bad = (info != 0) | (pivots < _SINGULAR * gram.diagonal(dim1=1, dim2=2)).any(dim=1)
    if not bool(bad.any()):
        return torch.cholesky_solve(rhs, chol).squeeze(-1).to(w.dtype)
    sol = torch.empty_like(rhs)
    sol[bad] = torch.linalg.pinv(gram[bad], hermitian=True) @ rhs[bad]  # rank deficient: the minimum-norm solution
    good = ~bad
    sol[good] = torch.cholesky_solve(rhs[good], chol[good])
    return sol.squeeze(-1).to(w.dtype)


@torch.no_grad()
def assign_codes(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    r"""The optimal codes for fixed coefficients: each element's nearest of the :math:`2^k` values.

    The binary-search-tree assignment of the paper: sort each row's candidate values
    :math:`v_c = \sum_i \alpha_i c_i`; the midpoints of neighbours are the decision boundaries, i.e. the
    inner nodes of a balanced binary search tree whose leaves are the sorted values. Every element walks
    down the tree with :math:`k` comparisons (not :math:`2^k`): at a node with leaves ``[lo, lo + 2s)``
    it goes right (``lo += s``) when it is above the boundary between leaf ``lo + s - 1`` and ``lo + s``.

    Args:
        w: ``(rows, n)`` float tensor.
        alpha: ``(rows, k)`` coefficients.

    Returns:
        ``codes`` ``(rows, n)`` int64 in :math:`[0, 2^k)`.

    Example:
        >>> assign_codes(torch.tensor([[2.9, 0.2, -1.4]]), torch.tensor([[2.0, 1.0]]))  # values -3, -1, 1, 3
        tensor([[3, 1, 2]])
    """
    _check_rows(w)
    if alpha.dim() != 2 or alpha.shape[0] != w.shape[0]:
        raise ValueError(f"alpha must be (rows, k) with rows = {w.shape[0]}, got shape {tuple(alpha.shape)}")
    bits = _check_bits(alpha.shape[1])
    values = alpha.to(w.dtype) @ sign_table(bits, w.dtype, w.device).T  # (rows, 2^k): v_c
    sorted_values, order = values.sort(dim=1)
    mids = (sorted_values[:, 1:] + sorted_values[:, :-1]) / 2  # (rows, 2^k - 1): the tree's inner nodes
    w = w.detach()
    lo = torch.zeros(w.shape, dtype=torch.int64, device=w.device)  # (rows, n): leftmost leaf of the subtree
    for level in range(bits):
        half = 1 << (bits - 1 - level)  # leaves in each half of the current subtree
        lo.add_(w > mids.gather(1, lo + (half - 1)), alpha=half)
    return order.gather(1, lo)


def reconstruct(alpha: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    r"""The quantized rows :math:`\sum_i \alpha_i b_i` from ``(rows, k)`` coefficients and ``(rows, n)`` codes."""
    if alpha.dim() != 2 or codes.dim() != 2 or alpha.shape[0] != codes.shape[0]:
        raise ValueError(f"alpha (rows, k) and codes (rows, n) must share rows; got {tuple(alpha.shape)} "
                         f"and {tuple(codes.shape)}")
    values = alpha @ sign_table(_check_bits(alpha.shape[1]), alpha.dtype, alpha.device).T  # (rows, 2^k)
    return values.gather(1, codes)


@torch.no_grad()
def alternating_fit(w: torch.Tensor, bits: int, iters: int = PAPER_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Greedy initialization, then ``iters`` cycles of (least-squares :math:`\alpha`, nearest-value codes).

    Args:
        w: ``(rows, n)`` float tensor; every row is fitted on its own.
        bits: :math:`k` binary codes per row, 1 to 8.
        iters: alternating cycles (0: the greedy fit; the paper uses 2).

    Returns:
        ``(alpha, codes)`` as :func:`greedy_fit`; :func:`reconstruct` gives the quantized rows.

    Example:
        >>> w = torch.tensor([[3.0, 1.0, -1.0, -3.0, 1.0, 1.0]])  # = 2 b1 + 1 b2 exactly
        >>> reconstruct(*alternating_fit(w, 2, iters=0))  # greedy: alpha = (1.67, 0.89), not exact
        tensor([[ 2.5556,  0.7778, -0.7778, -2.5556,  0.7778,  0.7778]])
        >>> reconstruct(*alternating_fit(w, 2))  # least squares on the greedy codes finds alpha = (2, 1)
        tensor([[ 3.,  1., -1., -3.,  1.,  1.]])
    """
    _check_iters(iters)
    alpha, codes = greedy_fit(w, bits)
    for _ in range(iters):
        alpha = least_squares_alpha(w, codes, bits)
        codes = assign_codes(w, alpha)
    return alpha, codes


def _as_rows(x: torch.Tensor, per_row: bool) -> torch.Tensor:
    """``(rows, n)`` view: slices of the first dimension (``per_row`` and at least 2-D), else one row."""
    return x.reshape(x.shape[0], -1) if per_row and x.dim() >= 2 else x.reshape(1, -1)


def alternating_quantize(
    x: torch.Tensor, bits: int = 2, iters: int = PAPER_ITERS, per_row: bool = True
) -> torch.Tensor:
    r"""Alternating multi-bit quantization of ``x``, straight-through gradient (see :class:`AlternatingQuant`).

    Raises:
        ValueError: ``x`` holds NaN or infinite values (a diverged run), or bad ``bits`` / ``iters``.
    """
    _check_bits(bits)
    _check_iters(iters)
    if not x.is_floating_point():
        raise ValueError(f"alternating_quantize takes a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        return x
    if not bool(torch.isfinite(x).all()):
        bad = "NaN" if bool(torch.isnan(x).any()) else "infinite"
        raise ValueError(f"alternating_quantize: the input holds {bad} values (a diverged run?); the "
                         "least-squares fit needs finite numbers")
    work = torch.promote_types(x.dtype, torch.float32)  # fit half/bfloat16 tensors in float32
    rows = _as_rows(x.detach(), per_row).to(work)
    alpha, codes = alternating_fit(rows, bits, iters)
    q = reconstruct(alpha, codes).to(x.dtype).reshape(x.shape)
    return straight_through(x, q)


@register_quantizer("alternating")
class AlternatingQuant(Quantizer):
    r"""Alternating multi-bit quantization: each row becomes :math:`\sum_{i=1}^k \alpha_i b_i`, :math:`b_i = \pm1`.

    Forward, per row :math:`w` (a slice of the first dimension: one output unit of a weight matrix, one
    vector of a ``(batch, features)`` activation), refitted at every call (the module docstring has the
    details):

    .. math::

        \min_{\alpha \in \mathbb{R}^k,\; B \in \{\pm 1\}^{n \times k}} \|w - B\alpha\|_2^2,

    greedy initialization (:math:`\alpha_i = \mathrm{mean}|r|`, :math:`b_i = \mathrm{sign}(r)` on the
    residual), then ``iters`` cycles of :math:`\alpha = (B^\top B)^{-1} B^\top w` and nearest-value codes by
    binary search over the :math:`2^k` sorted values. The output takes at most :math:`2^k` distinct values
    per row. As a weight quantizer it acts on the latent weights; as an input quantizer it is the paper's
    online activation quantization (nothing is stored: the coefficients follow each vector).

    Gradient: straight-through, :math:`\partial L/\partial w = \partial L/\partial \hat w` (the paper
    trains with the STE; no clipping).

    Args:
        bits: :math:`k`, the number of binary codes per value (1 to 8); ``bit_width``.
        iters: alternating cycles after the greedy initialization (paper: 2; 0 gives the greedy method).
        per_row: one set of coefficients per slice of the first dimension (True, the paper's row-wise
            quantization) or one for the whole tensor.

    Raises:
        ValueError: at call time, for an input with NaN or infinite values.

    Example:
        >>> q = AlternatingQuant(bits=2)
        >>> w = torch.randn(4, 64)
        >>> out = q(w)
        >>> [len(torch.unique(row)) <= 4 for row in out]
        [True, True, True, True]
        >>> bool(((w - out) ** 2).sum() < ((w - w.abs().mean(1, keepdim=True) * w.sign()) ** 2).sum())
        True

    References:
        Xu et al., "Alternating Multi-bit Quantization for Recurrent Neural Networks", ICLR 2018,
        arXiv:1802.00150.
    """

    def __init__(self, bits: int = 2, iters: int = PAPER_ITERS, per_row: bool = True) -> None:
        super().__init__()
        self.bits = _check_bits(bits)
        self.iters = _check_iters(iters)
        if not isinstance(per_row, bool):
            raise ValueError(f"per_row must be True or False, got {per_row!r}")
        self.per_row = per_row

    @property
    def bit_width(self) -> int:  # type: ignore[override]
        return self.bits

    def levels(self) -> torch.Tensor | None:
        """None: the :math:`2^k` values are fitted to every row (and every activation vector) anew."""
        return None

    def fit(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha (rows, k), codes (rows, n))`` of ``x`` viewed as rows as in ``forward``: what a
        multi-bit kernel stores (the codes as ``k`` bit planes, the coefficients as floats)."""
        return alternating_fit(_as_rows(x.detach(), self.per_row).to(torch.promote_types(x.dtype, torch.float32)),
                               self.bits, self.iters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return alternating_quantize(x, self.bits, self.iters, self.per_row)

    def extra_repr(self) -> str:
        return f"bit_width={self.bits}, iters={self.iters}, per_row={self.per_row}"
