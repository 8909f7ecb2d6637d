r"""Loss-aware weight quantization: LAB (binary) and LAQ/LAT (ternary, m-bit linear, m-bit logarithmic).

Plain quantizers (XNOR's :math:`\alpha = \mathrm{mean}|w|`, TWN) fit the quantized weights to the float
weights in the Euclidean norm. The loss-aware methods take one proximal Newton step on the loss instead,
with the diagonal Hessian approximated by Adam's second moment, which reduces to fitting in a
:math:`D`-weighted norm:

.. math::

    \hat w = \operatorname*{argmin}_{\hat w = \alpha b,\; b \in \mathcal{B}}\;
    \textstyle\sum_i d_i (w_i - \hat w_i)^2, \qquad d = \sqrt{\hat v} + \epsilon,

where :math:`\hat v = v / (1 - \beta_2^t)` is Adam's bias-corrected second-moment estimate of the
gradient of this layer's weights (so :math:`d` is exactly the denominator of Adam's step), and
:math:`\mathcal{B}` is :math:`\{\pm 1\}^n` (LAB), :math:`\{-1, 0, 1\}^n` (LAQ ternary), or an m-bit
linear or logarithmic grid (LAQ m-bit). Weights whose loss is more curved get fitted more closely.

How it attaches: each quantizer holds ``d`` (None = all ones) and the fitted scale ``alpha``; the engine
callback :class:`LossAware` finds the modules whose ``weight_quantizer`` is one of these quantizers,
checks the optimizer is Adam/AdamW, and after every optimizer step sets ``d`` from
``optimizer.state[weight]["exp_avg_sq"]``, clips the latent weights to ``[-clip, clip]`` and refits
``alpha``. Before the first step there is no Adam state and ``d = 1``: the quantizers then are the plain
fits (LAB = XNOR-Net's :math:`\alpha\,\mathrm{sign}(w)` with :math:`\alpha = \mathrm{mean}|w|`, LAQ
ternary = TWN's thresholding refined by the same alternating fit).

Persistence: ``alpha`` is a persistent buffer (a scalar) and ``d`` is not (it is Adam state, restored
with the optimizer: on a resumed run ``LossAware.on_fit_start`` rebuilds it from the restored state).
In training mode every forward refits ``alpha`` from the weights and ``d`` (the iterative fits
warm-start from the stored ``alpha``); in eval mode the stored ``alpha`` is used (as BatchNorm uses its
running statistics), so a saved model gives the same quantized weights after reloading without Adam's
state. ``LossAware`` refits ``alpha`` after every step, so the stored one always belongs to the current
weights (without it, the stored ``alpha`` is that of the last training forward, one step behind).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lowbit.quant.base import Quantizer, quantized_weights, register_quantizer
from lowbit.quant.ternary import TWN_RATIO, straight_through, ternarize

__all__ = [
    "lab_alpha", "lab_binarize", "laq_alpha", "laq_fit", "laq_ternary_exact_alpha", "project_to_grid",
    "linear_grid", "log_grid", "adam_preconditioner",
    "LossAwareQuantizer", "LAB", "LAQTernary", "LAQLinear", "LAQLog", "LossAware",
]

LAQ_ITERS = 10  # the authors' alternating fit stops after at most 10 rounds (LATa); ternary usually needs 2-4


def _sign(w: torch.Tensor) -> torch.Tensor:
    """±1 with sign(0) = +1, so that a binary output never contains 0."""
    return torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))


def _ones_if_none(d: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(w) if d is None else d.to(w.dtype)


@torch.no_grad()
def lab_alpha(w: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
    r"""LAB's scale :math:`\alpha = \|d \odot w\|_1 / \|d\|_1` (``d=None``: :math:`\mathrm{mean}|w|`)."""
    a = w.detach().abs()
    if d is None:
        return a.mean()
    d = d.to(a.dtype)
    return (d * a).sum() / d.sum()


def lab_binarize(w: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
    r"""LAB binary weights :math:`\alpha\,\mathrm{sign}(w)` with a straight-through gradient (see :class:`LAB`)."""
    return straight_through(w, lab_alpha(w, d) * _sign(w.detach()))


def linear_grid(bits: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """The non-negative normalized levels of LAQ linear: ``[0, 1/n, ..., 1]`` with ``n = 2**(bits-1) - 1``."""
    n = 2 ** (bits - 1) - 1
    dtype, device = (like.dtype, like.device) if like is not None else (torch.float32, None)
    return torch.arange(n + 1, dtype=dtype, device=device) / n


def log_grid(bits: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """The non-negative normalized levels of LAQ log: ``[0, 2**-(n-1), ..., 1/2, 1]``, ``n = 2**(bits-1) - 1``."""
    n = 2 ** (bits - 1) - 1
    dtype, device = (like.dtype, like.device) if like is not None else (torch.float32, None)
    powers = torch.arange(-(n - 1), 1, dtype=dtype, device=device)
    return torch.cat([torch.zeros(1, dtype=dtype, device=device), torch.exp2(powers)])


def project_to_grid(u: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The nearest point of ``{±g : g in grid}`` to each element of ``u`` (``grid`` ascending, from 0).

    Elements beyond the largest level clip to it; an element exactly halfway goes to the level nearer 0.
    Because the weighted objective is a sum over elements, this is also the exact ``D``-weighted
    projection for a fixed scale, whatever ``d`` is.
    """
    mids = (grid[1:] + grid[:-1]) / 2  # decision boundaries between neighbouring levels
    # bucketize: boundaries[i-1] < |u| <= boundaries[i] -> i. It needs a contiguous input: given a channels-last
    # weight it would copy it anyway, with a UserWarning in every channels-last training run.
    mag = grid[torch.bucketize(u.abs().contiguous(), mids)]
    return torch.where(mag > 0, torch.sign(u) * mag, torch.zeros_like(u))


@torch.no_grad()
def laq_alpha(w: torch.Tensor, b: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
    r"""The optimal scale for fixed codes: :math:`\alpha = \|b \odot d \odot w\|_1 / \|b \odot b \odot d\|_1`.

    (:math:`b` and :math:`w` share signs where :math:`b \ne 0`, so this is :math:`\sum d b w / \sum d b^2`,
    the :math:`d`-weighted least-squares fit; for ternary :math:`b` it is the :math:`d`-weighted mean of
    :math:`|w|` over the support.) Returns NaN when :math:`b = 0` everywhere.
    """
    d = _ones_if_none(d, w)
    return (d * b * w).sum() / (d * b * b).sum()


@torch.no_grad()
def laq_fit(w: torch.Tensor, grid: torch.Tensor, d: torch.Tensor | None = None, iters: int = LAQ_ITERS,
            b0: torch.Tensor | None = None) -> torch.Tensor:
    r"""LAQ's alternating :math:`d`-weighted fit of :math:`\alpha` for levels :math:`\alpha \cdot (\pm\mathrm{grid})`.

    Starting from codes ``b0`` (default ``sign(w)``), alternate
    :math:`\alpha \leftarrow \sum d b w / \sum d b^2` and :math:`b \leftarrow \Pi_{\mathrm{grid}}(w / \alpha)`
    until :math:`b` repeats (an exact fixed point) or ``iters`` rounds. Each half-step minimizes the
    weighted error over one block, so the error never increases. Returns :math:`\alpha`; the quantized
    weights are :math:`\alpha\,\Pi_{\mathrm{grid}}(w/\alpha)`.
    """
    w = w.detach()
    if torch.isnan(w).any():  # a diverged weight: let the NaN show in alpha and the output, never hide it
        return torch.full((), float("nan"), dtype=w.dtype, device=w.device)
    d = _ones_if_none(d, w)
    b = _sign(w) if b0 is None else b0
    alpha = laq_alpha(w, b, d)
    if not torch.isfinite(alpha) and b0 is not None:  # an all-zero start: begin again from sign(w)
        b = _sign(w)
        alpha = laq_alpha(w, b, d)
    if not torch.isfinite(alpha):  # d sums to 0 or w is empty: nothing to fit
        return torch.zeros((), dtype=w.dtype, device=w.device)
    for _ in range(iters):
        b_new = project_to_grid(w / alpha.clamp_min(torch.finfo(w.dtype).tiny), grid)
        if torch.equal(b_new, b):
            break
        b = b_new
        a = laq_alpha(w, b, d)
        if not torch.isfinite(a):
            break
        alpha = a
    return alpha


@torch.no_grad()
def laq_ternary_exact_alpha(w: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
    r"""The exact :math:`d`-weighted ternary fit (LATe): the global minimizer's :math:`\alpha`.

    For any :math:`\alpha` the best ternary codes keep the :math:`k` largest :math:`|w_i|`, and for a
    support :math:`S` the best scale leaves the error :math:`\sum d w^2 - (\sum_S d|w|)^2 / \sum_S d`. So
    sort :math:`|w|` descending, take cumulative sums, and pick the :math:`k` that maximizes
    :math:`(\sum_{\le k} d|w|)^2 / \sum_{\le k} d`; :math:`\alpha = \sum_{\le k} d|w| / \sum_{\le k} d`.
    """
    a = w.detach().abs().flatten()
    dd = _ones_if_none(d, w).flatten()
    order = a.argsort(descending=True)
    s1 = (dd * a)[order].cumsum(0)  # (n,) Σ_{top k} d|w|
    s0 = dd[order].cumsum(0)  # (n,) Σ_{top k} d
    k = (s1 * s1 / s0).argmax()
    return s1[k] / s0[k]


def adam_preconditioner(state: Mapping[str, Any], group: Mapping[str, Any], eps: float | None = None) -> torch.Tensor:
    r""":math:`d = \sqrt{v / (1 - \beta_2^t)} + \epsilon` from one parameter's Adam/AdamW state: Adam's denominator.

    Uses ``max_exp_avg_sq`` when the group has ``amsgrad`` (that is what Adam divides by then), and the
    group's ``eps`` unless ``eps`` is given.
    """
    step = float(state["step"])
    beta2 = float(group["betas"][1])
    v = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
    return (v / (1 - beta2**step)).sqrt() + (float(group["eps"]) if eps is None else eps)


class LossAwareQuantizer(Quantizer):
    """Base of the loss-aware quantizers: holds ``d`` (Adam's preconditioner) and the fitted ``alpha``.

    Subclasses define ``fit(w, d, prev) -> alpha`` (``prev``: the stored previous fit, for warm starts),
    ``codes(u)``, the normalized quantized values of ``u = w / alpha``, and ``_grid()``, the non-negative
    normalized levels; the output is ``alpha * codes(w / alpha)`` with a straight-through gradient.
    See the module docstring for how :class:`LossAware` sets ``d`` and when ``alpha`` is refitted.

    Args:
        clip: :class:`LossAware` clamps the latent weights to ``[-clip, clip]`` after each step
            (1.0 in the papers); None leaves them unclipped.
    """

    d: torch.Tensor | None
    alpha: torch.Tensor

    def __init__(self, clip: float | None = 1.0) -> None:
        super().__init__()
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be > 0 or None, got {clip}")
        self.clip = clip
        self.register_buffer("d", None, persistent=False)  # None = all ones (the plain, non-loss-aware fit)
        self.register_buffer("alpha", torch.tensor(float("nan")))  # NaN until the first fit

    def fit(self, w: torch.Tensor, d: torch.Tensor | None, prev: torch.Tensor | None) -> torch.Tensor:
        """The scale for ``w`` and ``d``; ``prev`` is the previous fit (None on the first), for warm starts."""
        raise NotImplementedError

    def codes(self, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def refit(self, w: torch.Tensor) -> torch.Tensor:
        """Fit ``alpha`` to ``w`` (and ``d``), store it and return it."""
        if self.d is not None and self.d.shape != w.shape:
            raise ValueError(f"{type(self).__name__}: d has shape {tuple(self.d.shape)} but the weight has "
                             f"{tuple(w.shape)}; one quantizer instance serves one weight tensor")
        prev = self.alpha.to(w.dtype) if bool(torch.isfinite(self.alpha)) else None
        alpha = self.fit(w.detach(), self.d, prev)
        self.alpha.copy_(alpha)
        return alpha.to(w.dtype)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        fitted = bool(torch.isfinite(self.alpha))
        alpha = self.refit(w) if self.training or not fitted else self.alpha.to(w.dtype)
        with torch.no_grad():
            q = alpha * self.codes(w.detach() / alpha.clamp_min(torch.finfo(w.dtype).tiny))
        return straight_through(w, q)

    def _grid(self) -> torch.Tensor:
        raise NotImplementedError

    def levels(self) -> torch.Tensor | None:
        """The sorted output values ``alpha * (±grid)``; None before the first fit."""
        if not torch.isfinite(self.alpha):
            return None
        g = self._grid().to(self.alpha)
        return self.alpha * torch.cat([-g[g > 0].flip(0), g])  # grid [0, ..., 1] -> [-1, ..., 0, ..., 1]

    def extra_repr(self) -> str:
        return f"bit_width={self.bit_width}, clip={self.clip}"


@register_quantizer("lab")
class LAB(LossAwareQuantizer):
    r"""Loss-aware binarization: :math:`\hat w = \alpha\,\mathrm{sign}(w)` with a :math:`d`-weighted scale.

    Forward (per layer), the closed-form proximal Newton step of the paper (Proposition 3.1):

    .. math::

        \alpha = \frac{\|d \odot w\|_1}{\|d\|_1}, \qquad \hat w = \alpha \cdot \mathrm{sign}(w),
        \qquad d = \sqrt{\hat v_{\mathrm{Adam}}} + \epsilon,

    with :math:`\mathrm{sign}(0) = +1`. Gradient: the gradient with respect to :math:`\hat w` is applied
    to the latent :math:`w` (straight-through, :math:`\partial L/\partial w = \partial L/\partial \hat w`,
    no clipping of the gradient); :class:`LossAware` then clips :math:`w` to :math:`[-1, 1]` after each
    step. Without :class:`LossAware` (or before the first Adam step) :math:`d = 1` and :math:`\alpha =
    \mathrm{mean}|w|`: the plain XNOR-Net/BWN weight binarization.

    Args:
        clip: latent weight clipping bound applied by :class:`LossAware` (1.0 in the paper); None: none.

    Example:
        >>> q = LAB()
        >>> w = torch.tensor([-0.5, 0.1, 0.3, -0.1])
        >>> q(w)  # d = 1: alpha = mean|w| = 0.25
        tensor([-0.2500,  0.2500,  0.2500, -0.2500])
        >>> q.d = torch.tensor([3.0, 1.0, 1.0, 1.0])  # what LossAware sets from Adam's state
        >>> q(w)  # alpha = (1.5 + 0.1 + 0.3 + 0.1) / 6
        tensor([-0.3333,  0.3333,  0.3333, -0.3333])

    References:
        Hou, Yao, Kwok, "Loss-aware Binarization of Deep Networks", arXiv:1611.01600.
    """

    bit_width = 1

    def fit(self, w: torch.Tensor, d: torch.Tensor | None, prev: torch.Tensor | None) -> torch.Tensor:
        return lab_alpha(w, d)  # closed form: no iterations, no warm start

    def codes(self, u: torch.Tensor) -> torch.Tensor:
        return _sign(u)

    def _grid(self) -> torch.Tensor:
        return torch.ones(1)

    @property
    def scale(self) -> torch.Tensor | None:  # type: ignore[override]
        """:math:`\\alpha` (the value of the binary level); None before the first fit."""
        return self.alpha if torch.isfinite(self.alpha) else None


@register_quantizer("laq_ternary")
class LAQTernary(LossAwareQuantizer):
    r"""Loss-aware ternarization (LAT): :math:`\hat w = \alpha b`, :math:`b \in \{-1, 0, 1\}^n`, fitted in the d-norm.

    Forward (per layer): the :math:`d`-weighted projection
    :math:`\min_{\alpha, b} \sum_i d_i (w_i - \alpha b_i)^2`, by default with the paper's alternating
    solver (LATa), started on the first fit from TWN's threshold:

    .. math::

        b^0 = \mathrm{sign}(w) \odot 1_{|w| > 0.7\,\mathrm{mean}|w|}, \qquad
        \alpha^j = \frac{\|b^{j-1} \odot d \odot w\|_1}{\|b^{j-1} \odot d\|_1}, \qquad
        b^j = \mathrm{sign}(w) \odot 1_{|w| > \alpha^j / 2},

    until :math:`b` repeats (a fixed point) or ``iters`` rounds; :math:`\hat w = \alpha\,b(\alpha)`.
    Later fits are warm-started from the previous :math:`\alpha` (:math:`b^0 = b(\alpha_{\mathrm{prev}})`):
    one training step changes :math:`w` little, so they usually stop after one or two rounds.
    With ``exact=True`` the global minimizer is found by sorting (LATe; see
    :func:`laq_ternary_exact_alpha`). Each alternating step cannot increase the weighted error, so the
    result of a first (cold) fit is never worse, in the :math:`d`-norm, than TWN's one-shot fit. With :math:`d = 1` (no
    :class:`LossAware`, or before the first Adam step) it is TWN's initialization refined to a fixed
    point of the plain Euclidean fit.

    Gradient: straight-through to the latent weights, :math:`\partial L/\partial w = \partial L/\partial \hat w`;
    :class:`LossAware` clips :math:`w` to :math:`[-1, 1]` after each step (as the authors' code does).

    Args:
        iters: the most alternating rounds (10, as in the authors' code).
        exact: use the exact sorted search (LATe) instead of the alternating fit.
        clip: latent weight clipping bound applied by :class:`LossAware`; None: none.

    Example:
        >>> q = LAQTernary()
        >>> w = torch.tensor([-1.0, -0.2, 0.05, 0.5, 1.5])
        >>> q(w)  # TWN start: support {-1.0, 0.5, 1.5}, alpha 1.0; then 0.5 <= alpha/2 drops out
        tensor([-1.2500,  0.0000,  0.0000,  0.0000,  1.2500])

    References:
        Hou, Kwok, "Loss-aware Weight Quantization of Deep Networks", arXiv:1802.08635.
    """

    bit_width = 2

    def __init__(self, iters: int = LAQ_ITERS, exact: bool = False, clip: float | None = 1.0) -> None:
        super().__init__(clip)
        if iters < 1:
            raise ValueError(f"iters must be >= 1, got {iters}")
        self.iters = iters
        self.exact = exact

    def fit(self, w: torch.Tensor, d: torch.Tensor | None, prev: torch.Tensor | None) -> torch.Tensor:
        if self.exact:
            return laq_ternary_exact_alpha(w, d)
        b0 = ternarize(w, TWN_RATIO * w.abs().mean() if prev is None else prev / 2)  # cold: TWN; warm: last codes
        return laq_fit(w, self._grid().to(w), d, self.iters, b0=b0)

    def codes(self, u: torch.Tensor) -> torch.Tensor:
        return ternarize(u, 0.5)  # b = sign(w) where |w| > alpha/2

    def _grid(self) -> torch.Tensor:
        return torch.tensor([0.0, 1.0])

    @property
    def scale(self) -> torch.Tensor | None:  # type: ignore[override]
        """:math:`\\alpha` (one integer step); None before the first fit."""
        return self.alpha if torch.isfinite(self.alpha) else None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, iters={self.iters}, exact={self.exact}"


class _LAQMultiBit(LossAwareQuantizer):
    """m-bit LAQ on a fixed normalized grid; subclasses give the grid."""

    def __init__(self, bits: int = 3, iters: int = LAQ_ITERS, clip: float | None = 1.0) -> None:
        super().__init__(clip)
        if not 2 <= bits <= 16:
            raise ValueError(f"bits must be in 2..16, got {bits}")
        if iters < 1:
            raise ValueError(f"iters must be >= 1, got {iters}")
        self.bits = bits
        self.bit_width = bits
        self.iters = iters

    def fit(self, w: torch.Tensor, d: torch.Tensor | None, prev: torch.Tensor | None) -> torch.Tensor:
        b0 = None if prev is None else self.codes(w / prev.clamp_min(torch.finfo(w.dtype).tiny))  # warm start
        return laq_fit(w, self._grid().to(w), d, self.iters, b0=b0)

    def codes(self, u: torch.Tensor) -> torch.Tensor:
        return project_to_grid(u, self._grid().to(u))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, iters={self.iters}"


@register_quantizer("laq_linear")
class LAQLinear(_LAQMultiBit):
    r"""Loss-aware m-bit quantization on linear levels :math:`\alpha \cdot \{-1, \dots, -1/n, 0, 1/n, \dots, 1\}`.

    Forward (per layer), :math:`n = 2^{m-1} - 1`, alternating :math:`d`-weighted fit from
    :math:`b^0 = \mathrm{sign}(w)` (so :math:`\alpha^1` is LAB's :math:`\|d \odot w\|_1 / \|d\|_1`):

    .. math::

        b^j = \frac{\mathrm{round}\!\left(\mathrm{clip}(w / \alpha^j, -1, 1) \cdot n\right)}{n}, \qquad
        \alpha^{j+1} = \frac{\|b^j \odot d \odot w\|_1}{\|b^j \odot b^j \odot d\|_1},

    until :math:`b` repeats or ``iters`` rounds; :math:`\hat w = \alpha\,b(\alpha)`. (Rounding sends exact
    halves towards 0.) From a cold start the m-bit alternation needs 10-50 rounds to reach a fixed point,
    more than the 10 allowed; later fits are warm-started from the previous :math:`\alpha`
    (:math:`b^0 = b(\alpha_{\mathrm{prev}})`), so over the first training steps :math:`\alpha` settles
    on a fixed point and then tracks it in a round or two per step. With :math:`d = 1` (no
    :class:`LossAware`, or before the first Adam step) this is the plain Euclidean alternating fit.
    Gradient: straight-through to the latent weights; :class:`LossAware` clips them to :math:`[-1, 1]`
    after each step.

    Args:
        bits: :math:`m`, the bits per weight (one of them the sign); 2 gives ternary levels.
        iters: the most alternating rounds.
        clip: latent weight clipping bound applied by :class:`LossAware`; None: none.

    Example:
        >>> q = LAQLinear(bits=3)
        >>> w = torch.tensor([-1.0, -0.3, 0.0, 0.5, 1.5])
        >>> q(w)  # alpha = 1.46 after 3 alternating rounds
        tensor([-0.9733, -0.4867,  0.0000,  0.4867,  1.4600])
        >>> (q(w) / q.scale).round()  # integer codes in -3..3; scale = alpha / 3
        tensor([-2., -1.,  0.,  1.,  3.])
        >>> (q.levels() / q.scale).round()
        tensor([-3., -2., -1.,  0.,  1.,  2.,  3.])

    References:
        Hou, Kwok, "Loss-aware Weight Quantization of Deep Networks", arXiv:1802.08635.
    """

    def _grid(self) -> torch.Tensor:
        return linear_grid(self.bits)

    @property
    def scale(self) -> torch.Tensor | None:  # type: ignore[override]
        """:math:`\\alpha / n`, the real value of one integer step; None before the first fit."""
        return self.alpha / (2 ** (self.bits - 1) - 1) if torch.isfinite(self.alpha) else None


@register_quantizer("laq_log")
class LAQLog(_LAQMultiBit):
    r"""Loss-aware m-bit quantization on log levels :math:`\alpha \cdot \{0, \pm 2^{-(n-1)}, \dots, \pm 1/2, \pm 1\}`.

    Forward (per layer), :math:`n = 2^{m-1} - 1` non-zero magnitudes; alternating :math:`d`-weighted fit
    from :math:`b^0 = \mathrm{sign}(w)`:

    .. math::

        b^j = \Pi_{\mathrm{log}}(w / \alpha^j), \qquad
        \alpha^{j+1} = \frac{\|b^j \odot d \odot w\|_1}{\|b^j \odot b^j \odot d\|_1},

    where :math:`\Pi_{\mathrm{log}}` maps each value to the nearest level (magnitudes above 1 clip to 1,
    below :math:`2^{-n}` go to 0; between :math:`2^{-k-1}` and :math:`2^{-k}` the boundary is their
    midpoint :math:`0.75 \cdot 2^{-k}`, which is what the authors' biased rounding of :math:`\log_2`
    computes). Cold start and warm starts as in :class:`LAQLinear`. With :math:`d = 1` this is the plain
    Euclidean alternating fit. Gradient: straight-through
    to the latent weights; :class:`LossAware` clips them to :math:`[-1, 1]` after each step.

    ``scale`` is None (the levels are not evenly spaced); ``alpha`` is the largest level.

    Args:
        bits: :math:`m`, the bits per weight (one of them the sign); 2 gives ternary levels.
        iters: the most alternating rounds.
        clip: latent weight clipping bound applied by :class:`LossAware`; None: none.

    Example:
        >>> q = LAQLog(bits=3)
        >>> w = torch.tensor([-1.0, -0.3, 0.1, 0.5, 0.9])
        >>> q(w) / q.alpha  # normalized levels 0, 1/4, 1/2, 1
        tensor([-1.0000, -0.2500,  0.0000,  0.5000,  1.0000])

    References:
        Hou, Kwok, "Loss-aware Weight Quantization of Deep Networks", arXiv:1802.08635.
    """

    def _grid(self) -> torch.Tensor:
        return log_grid(self.bits)


class LossAware:
    """Engine callback that makes the loss-aware quantizers loss-aware: feeds them Adam's second moment.

    Works with any model: it finds every weight whose quantizer is a :class:`LossAwareQuantizer` (``lab``,
    ``laq_ternary``, ``laq_linear``, ``laq_log``): layers with a ``weight_quantizer`` and the weight matrices of
    ``QuantLSTM`` / ``QuantGRU`` (:func:`lowbit.quant.base.quantized_weights`). With
    :func:`lowbit.train.fit` pass it in ``callbacks``; in a hand-written loop call :meth:`attach` once
    (it hooks the optimizer's ``step``), or call ``on_fit_start`` and then ``after_step`` after each step.

    - ``on_fit_start(model, optimizer)``: checks the optimizer is ``torch.optim.Adam``/``AdamW`` (the
      methods need its second moment), records the (weight, quantizer) pairs, and sets ``d`` from any
      optimizer state already there (a resumed run, which then continues exactly as if uninterrupted).
    - ``after_step(model, step)``: for each pair, clamps the weight to ``[-clip, clip]``, sets
      ``quantizer.d = sqrt(v / (1 - beta2**t)) + eps`` from ``optimizer.state[weight]`` and refits
      ``alpha``, so the next forward uses the new weights with the new curvature.

    Args:
        eps: the :math:`\\epsilon` of ``d``; None (default) uses the optimizer group's ``eps`` so ``d`` is
            exactly Adam's denominator (1e-8 by default, as in the papers).

    Example:
        >>> model = nn.Linear(4, 2)
        >>> model.weight_quantizer = LAB()
        >>> opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        >>> handle = LossAware().attach(model, opt)
        >>> torch.nn.functional.linear(torch.ones(1, 4), model.weight_quantizer(model.weight)).sum().backward()
        >>> opt.step()  # the hook sets d from Adam's state and clips the weight
        >>> model.weight_quantizer.d.shape
        torch.Size([2, 4])

    References:
        Hou, Yao, Kwok, "Loss-aware Binarization of Deep Networks", arXiv:1611.01600.
        Hou, Kwok, "Loss-aware Weight Quantization of Deep Networks", arXiv:1802.08635.
    """

    def __init__(self, eps: float | None = None) -> None:
        if eps is not None and not eps > 0:
            raise ValueError(f"eps must be > 0 or None, got {eps}")
        self.eps = eps
        self._optimizer: torch.optim.Optimizer | None = None
        self._targets: list[tuple[nn.Parameter, LossAwareQuantizer, dict[str, Any]]] = []

    def on_fit_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            raise TypeError(f"LossAware needs torch.optim.Adam or AdamW, got {type(optimizer).__name__}: the "
                            "loss-aware quantizers use Adam's second-moment estimate as the diagonal Hessian "
                            "(with lowbit.train.fit use TrainConfig(optimizer='adam'))")
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        targets: list[tuple[nn.Parameter, LossAwareQuantizer, dict[str, Any]]] = []
        weight_of: dict[int, tuple[str, torch.Tensor]] = {}
        for where, w, q in quantized_weights(model):
            if not isinstance(q, LossAwareQuantizer):
                continue
            if not isinstance(w, nn.Parameter):
                raise TypeError(f"{where} has a loss-aware weight quantizer but is not a weight parameter")
            if id(q) in weight_of:
                if weight_of[id(q)][1] is w:
                    continue  # the same weight reached twice (tied modules)
                raise ValueError(f"{where} and {weight_of[id(q)][0]} share one {type(q).__name__} instance; "
                                 "its d and alpha belong to one weight: give each layer its own quantizer")
            if id(w) not in group_of:
                raise ValueError(f"{where}.weight has a loss-aware quantizer but the optimizer does not train it")
            weight_of[id(q)] = (where, w)
            targets.append((w, q, group_of[id(w)]))
        if not targets:
            raise ValueError("LossAware found no module whose weight_quantizer is a loss-aware quantizer "
                             "(lab, laq_ternary, laq_linear, laq_log)")
        self._optimizer, self._targets = optimizer, targets
        self._refresh(after_step=False)  # a resumed run: d from the restored state; alpha was restored

    def after_step(self, model: nn.Module, step: int) -> None:
        self._refresh(after_step=True)

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """``on_fit_start`` now, and ``after_step`` after every ``optimizer.step()`` (for hand-written loops)."""
        self.on_fit_start(model, optimizer)
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self._refresh(after_step=True))

    @torch.no_grad()
    def _refresh(self, after_step: bool) -> None:
        if self._optimizer is None:
            raise RuntimeError("LossAware.after_step before on_fit_start: call on_fit_start(model, optimizer) first")
        for w, q, group in self._targets:
            if after_step and q.clip is not None:
                w.clamp_(-q.clip, q.clip)
            state = self._optimizer.state.get(w, {})
            if "exp_avg_sq" in state:
                q.d = adam_preconditioner(state, group, self.eps)
            if after_step:  # the stored alpha now belongs to the new weights (eval mode uses it)
                q.refit(w)
