"""Binary quantizers: BNN's sign with a straight-through estimator (deterministic and stochastic),
XNOR-Net's scaling, BNN+'s SignSwish gradient with a trainable scale, and the two training callbacks
binary weights need (latent-weight clipping, the BNN+ regularizer).

Every quantizer here maps to exactly two values. The sign convention is sign(0) = +1 (``torch.sign``
would give 0, a third value that a 1-bit format cannot hold), so a zero input becomes +1 (+alpha). A NaN
input stays NaN (never a valid level, which would hide a diverged tensor).

    from lowbit.quant.binary import SteSign, ClipWeights
    layer.weight_quantizer = SteSign()                     # BNN weights in {-1, +1}
    fit(model, data, cfg, callbacks=[ClipWeights()])       # keep the latent weights in [-1, 1]

References:
    Courbariaux, Hubara et al., "Binarized Neural Networks: Training Deep Neural Networks with Weights and
    Activations Constrained to +1 or -1", arXiv:1602.02830.
    Rastegari et al., "XNOR-Net: ImageNet Classification Using Binary Convolutional Neural Networks",
    arXiv:1603.05279.
    Darabi et al., "BNN+: Improved Binary Network Training", arXiv:1812.11800.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from lowbit.quant.base import Quantizer, quantized_weights, register_quantizer

__all__ = [
    "ste_sign", "stochastic_sign", "hard_sigmoid", "swish_sign", "sign_swish", "sign_swish_grad",
    "SteSign", "StochasticSign", "SwishSign", "BINARY_QUANTIZERS", "binary_weights", "ClipWeights",
    "BnnPlusRegularizer",
]

Scaling = Literal["per_tensor", "per_channel"]


# ----------------------------------------------------------------------------------------------------
# Pure functions: the math and the custom gradients
# ----------------------------------------------------------------------------------------------------


def _sign(x: torch.Tensor) -> torch.Tensor:
    """sign(x) with sign(0) = +1: exactly two values, same dtype and device as ``x``. A NaN stays NaN, so a
    diverged tensor is not hidden behind valid levels (``torch.sign`` maps NaN to 0)."""
    return _keep_nan(_plus_minus_one(x >= 0, x), x)


def _plus_minus_one(positive: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """+1 where the bool tensor ``positive`` is True, else -1, in ``like``'s dtype and ``positive``'s memory
    format. (``2 * mask - 1``: on CPU about 4x faster than ``ones_like(...).masked_fill_``.)"""
    return positive.to(like.dtype).mul_(2).sub_(1)


def _keep_nan(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` with NaN wherever ``x`` is NaN. One cheap reduction decides whether the elementwise pass is
    needed: a NaN anywhere in ``x`` makes its sum NaN (so does +inf with -inf, which only costs the pass)."""
    if torch.isnan(x.sum()):
        y.masked_fill_(torch.isnan(x), float("nan"))
    return y


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """clip((x + 1) / 2, 0, 1): BNN's probability that stochastic binarization gives +1."""
    return ((x + 1) / 2).clamp(0, 1)


class _SignSTE(torch.autograd.Function):
    """Forward: sign(x) (deterministic, or stochastic when uniform draws ``u`` are given).
    Backward: g * 1{|x| <= clip_value}, or g unchanged when ``clip_value`` is None."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, clip_value: float | None, u: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.clip_value = clip_value
        if u is None:
            return _sign(x)
        return _keep_nan(_plus_minus_one(u < hard_sigmoid(x), x), x)  # +1 with probability hard_sigmoid(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (x,) = ctx.saved_tensors
        if ctx.clip_value is None:
            return g, None, None
        return g * (x.abs() <= ctx.clip_value).to(g.dtype), None, None


def ste_sign(x: torch.Tensor, clip_value: float | None = 1.0) -> torch.Tensor:
    """Binarize with BNN's straight-through estimator.

    Forward: ``q(x) = sign(x)`` with sign(0) = +1, so ``q(x)`` is in {-1, +1}.
    Gradient: ``dq/dx = 1{|x| <= clip_value}``, the derivative of hard tanh: the STE is cancelled for
    |x| > clip_value. ``clip_value=None`` passes the gradient unchanged (the plain identity STE).

    Args:
        x: any float tensor.
        clip_value: the STE passes gradients where |x| <= clip_value (BNN: 1).

    Example:
        >>> x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
        >>> ste_sign(x)
        tensor([-1., -1.,  1.,  1.,  1.], grad_fn=<_SignSTEBackward>)
        >>> ste_sign(x).sum().backward(); x.grad
        tensor([0., 1., 1., 1., 0.])

    References:
        Courbariaux, Hubara et al., "Binarized Neural Networks: Training Deep Neural Networks with Weights
        and Activations Constrained to +1 or -1", arXiv:1602.02830.
    """
    return _SignSTE.apply(x, clip_value, None)


def stochastic_sign(
    x: torch.Tensor, clip_value: float | None = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """BNN's stochastic binarization with the same straight-through estimator as :func:`ste_sign`.

    Forward: ``q(x) = +1`` with probability ``p = hard_sigmoid(x) = clip((x + 1) / 2, 0, 1)``, else -1;
    the draws come from torch's RNG (``torch.manual_seed``) or from ``generator``.
    Gradient: ``dq/dx = 1{|x| <= clip_value}`` (``clip_value=None``: identity).

    Args:
        x: any float tensor.
        clip_value: the STE passes gradients where |x| <= clip_value (BNN: 1).
        generator: an optional ``torch.Generator`` for the uniform draws.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> stochastic_sign(torch.tensor([-1.0, 1.0, 5.0, -5.0]), generator=g)  # p = 0, 1, 1, 0: certain
        tensor([-1.,  1.,  1., -1.])

    References:
        Courbariaux, Hubara et al., "Binarized Neural Networks: Training Deep Neural Networks with Weights
        and Activations Constrained to +1 or -1", arXiv:1602.02830.
    """
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return _SignSTE.apply(x, clip_value, u)


def sign_swish(x: torch.Tensor, beta: float | torch.Tensor = 5.0) -> torch.Tensor:
    """BNN+'s SignSwish, the smooth function whose derivative :func:`swish_sign` uses as its gradient:
    ``SS_beta(x) = 2 sigmoid(beta x) (1 + beta x (1 - sigmoid(beta x))) - 1`` (tends to sign(x) as beta grows).
    """
    s = torch.sigmoid(beta * x)
    return 2 * s * (1 + beta * x * (1 - s)) - 1


def sign_swish_grad(x: torch.Tensor, beta: float | torch.Tensor = 5.0) -> torch.Tensor:
    """``dSS_beta/dx = beta (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x))``.

    Computed as ``beta (2 - u t) (1 - t^2) / 2`` with ``u = beta x``, ``t = tanh(u / 2)``, the same value
    (1 + cosh u = 2 cosh^2(u/2) = 2 / (1 - t^2)) without the overflow of cosh for large |u|.
    """
    u = beta * x
    t = torch.tanh(u / 2)
    return beta * (2 - u * t) * (1 - t * t) / 2


class _SwishSignFn(torch.autograd.Function):
    """Forward: sign(x). Backward: the SignSwish derivative for x (and for beta when it is trained)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, beta)
        return _sign(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, beta = ctx.saved_tensors
        b = float(beta)
        # common = (2 - u t)(1 - t^2) / 2 with u = beta x, t = tanh(u / 2); with h = u / 2 that is
        # (1 - h t)(1 - t^2): dSS/dx = beta * common, dSS/dbeta = x * common. Written with in-place ops and
        # Python-scalar factors: a third of the passes over activation-sized tensors of the direct form.
        h = x * (b / 2)
        t = torch.tanh(h)
        common = h.mul_(t).neg_().add_(1).mul_(t.mul_(t).neg_().add_(1))  # (1 - h t) * (1 - t^2)
        gcommon = common.mul_(g)
        gbeta = (gcommon * x).sum().reshape(beta.shape) if ctx.needs_input_grad[1] else None
        gx = gcommon.mul_(b) if ctx.needs_input_grad[0] else None
        return gx, gbeta


def swish_sign(x: torch.Tensor, beta: float | torch.Tensor = 5.0) -> torch.Tensor:
    """Binarize with BNN+'s SignSwish straight-through estimator.

    Forward: ``q(x) = sign(x)`` with sign(0) = +1.
    Gradient: ``dq/dx = dSS_beta/dx = beta (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x))``, the derivative
    of ``SS_beta(x) = 2 sigmoid(beta x) (1 + beta x (1 - sigmoid(beta x))) - 1``. When ``beta`` is a tensor
    that requires grad it is trained with ``dq/dbeta = dSS_beta/dbeta = x (2 - beta x tanh(beta x / 2)) /
    (1 + cosh(beta x))``.

    Args:
        x: any float tensor.
        beta: the sharpness of SignSwish (BNN+ and its ports: 5); a float or a 0-dim tensor.

    Example:
        >>> x = torch.tensor([-1.0, 0.0, 0.3], requires_grad=True)
        >>> swish_sign(x, beta=5.0)
        tensor([-1.,  1.,  1.], grad_fn=<_SwishSignFnBackward>)
        >>> swish_sign(x, beta=5.0).sum().backward(); x.grad  # 5 (2 - 0) / (1 + 1) = 5 at x = 0
        tensor([-0.1950,  5.0000,  1.5620])

    References:
        Darabi et al., "BNN+: Improved Binary Network Training", arXiv:1812.11800.
    """
    if not isinstance(beta, torch.Tensor):
        beta = torch.tensor(float(beta), dtype=x.dtype, device=x.device)
    return _SwishSignFn.apply(x, beta)


def _channel_mean_abs(w: torch.Tensor) -> torch.Tensor:
    """mean |w_c| over all dims but 0, shaped to broadcast against ``w``: (C, 1, ..., 1)."""
    if w.dim() == 0:
        raise ValueError("a per-channel scale needs a tensor with a channel dim 0; got a 0-dim tensor")
    alpha = w.abs().reshape(w.shape[0], -1).mean(1)  # (C,)
    return alpha.view((-1,) + (1,) * (w.dim() - 1))


# ----------------------------------------------------------------------------------------------------
# Quantizers
# ----------------------------------------------------------------------------------------------------

_PLUS_MINUS_ONE = (-1.0, 1.0)


@register_quantizer("ste_sign")
class SteSign(Quantizer):
    """BNN's binarization ``sign(x)`` with the hard-tanh straight-through estimator, optionally scaled as in
    XNOR-Net (for weights).

    Forward: ``q(x) = sign(x)`` in {-1, +1} (sign(0) = +1); with ``scaling``, ``q(w) = alpha * sign(w)`` where
    ``alpha = mean |w|`` over the whole tensor (``"per_tensor"``) or, per output channel c (dim 0),
    ``alpha_c = mean |w_c|`` over all other dims (``"per_channel"``, XNOR-Net's binary-weight filters).
    Gradient: ``dsign/dx = 1{|x| <= clip_value}``. With scaling, alpha is differentiated through exactly
    (autograd), so ``dL/dw_j = alpha g_j 1{|w_j| <= clip_value} + (1/n) sign(w_j) sum_i g_i sign(w_i)``
    (n weights per channel, g = dL/dq); XNOR-Net's printed rule ``g_j (1/n + alpha dsign/dw_j)`` keeps only
    the i = j term of that sum.

    ``scale`` holds the alpha of the last forward (shape (C,) per channel, 0-dim per tensor; None before
    the first forward or unscaled); ``levels()`` is ``[-1, 1]`` unscaled, None when scaled (the levels
    follow the weights). The BNN paper also clips the latent real-valued weights to [-1, 1]: add
    :class:`ClipWeights` to the training callbacks.

    Args:
        clip_value: the STE passes gradients where |x| <= clip_value (BNN: 1; None: identity STE).
        scaling: None (BNN), ``"per_tensor"`` or ``"per_channel"`` (XNOR-Net weights).

    Example:
        >>> SteSign()(torch.tensor([-0.3, 0.0, 0.7]))
        tensor([-1.,  1.,  1.])
        >>> q = SteSign(scaling="per_channel")
        >>> q(torch.tensor([[0.5, -1.5], [-0.2, 0.2]]))
        tensor([[ 1.0000, -1.0000],
                [-0.2000,  0.2000]])
        >>> q.scale
        tensor([1.0000, 0.2000])

    References:
        Courbariaux, Hubara et al., "Binarized Neural Networks: Training Deep Neural Networks with Weights
        and Activations Constrained to +1 or -1", arXiv:1602.02830.
        Rastegari et al., "XNOR-Net: ImageNet Classification Using Binary Convolutional Neural Networks",
        arXiv:1603.05279.
    """

    bit_width = 1

    def __init__(self, clip_value: float | None = 1.0, scaling: Scaling | None = None) -> None:
        super().__init__()
        _check_clip(clip_value)
        if scaling not in (None, "per_tensor", "per_channel"):
            raise ValueError(f"scaling must be None, 'per_tensor' or 'per_channel'; got {scaling!r}")
        self.clip_value = clip_value
        self.scaling = scaling
        self.scale: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ste_sign(x, self.clip_value)
        if self.scaling is None:
            return y
        alpha = x.abs().mean() if self.scaling == "per_tensor" else _channel_mean_abs(x)
        self.scale = alpha.detach().flatten() if self.scaling == "per_channel" else alpha.detach()
        return alpha * y

    def levels(self) -> torch.Tensor | None:
        return None if self.scaling else torch.tensor(_PLUS_MINUS_ONE)

    def extra_repr(self) -> str:
        return f"bit_width=1, clip_value={self.clip_value}, scaling={self.scaling}"


@register_quantizer("stochastic_sign")
class StochasticSign(Quantizer):
    """BNN's stochastic binarization (training mode) with the hard-tanh straight-through estimator.

    Forward, training mode: ``q(x) = +1`` with probability ``hard_sigmoid(x) = clip((x + 1) / 2, 0, 1)``, else
    -1, drawn from torch's RNG (seed it with ``torch.manual_seed``). Eval mode: the deterministic
    ``sign(x)`` (sign(0) = +1), so evaluation is reproducible.
    Gradient: ``dq/dx = 1{|x| <= clip_value}``.

    Args:
        clip_value: the STE passes gradients where |x| <= clip_value (BNN: 1; None: identity STE).

    Example:
        >>> q = StochasticSign().eval()  # eval mode: deterministic sign
        >>> q(torch.tensor([-0.2, 0.0, 0.4]))
        tensor([-1.,  1.,  1.])

    References:
        Courbariaux, Hubara et al., "Binarized Neural Networks: Training Deep Neural Networks with Weights
        and Activations Constrained to +1 or -1", arXiv:1602.02830.
    """

    bit_width = 1

    def __init__(self, clip_value: float | None = 1.0) -> None:
        super().__init__()
        _check_clip(clip_value)
        self.clip_value = clip_value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stochastic_sign(x, self.clip_value) if self.training else ste_sign(x, self.clip_value)

    def levels(self) -> torch.Tensor:
        return torch.tensor(_PLUS_MINUS_ONE)

    def extra_repr(self) -> str:
        return f"bit_width=1, clip_value={self.clip_value}"


@register_quantizer("swish_sign")
class SwishSign(Quantizer):
    """BNN+'s binarization: sign forward, the SignSwish derivative backward, and a trainable scale.

    Forward: ``q(w) = alpha_c * sign(w)`` with a trainable ``alpha`` per output channel c (dim 0),
    initialized to ``mean |w_c|`` (over all other dims) from the first tensor it sees or by
    :meth:`init_scale`; with ``scaled=False`` (e.g. for activations) ``q(x) = sign(x)``. sign(0) = +1.
    Gradient: ``dsign/dx = dSS_beta/dx = beta (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x))``;
    ``dq/dalpha_c = sum of g * sign(w)`` over channel c; with ``trainable_beta`` also ``dSS_beta/dbeta``.
    BNN+ adds ``lam * sum |alpha - |w||`` (or its square) to the loss: :class:`BnnPlusRegularizer`.

    An optimizer only trains ``alpha`` if it exists when the optimizer is built: call
    :meth:`init_scale` (or run one forward) first, or train with :class:`BnnPlusRegularizer`, which
    initializes missing scales and hands them to the optimizer at ``on_fit_start``.

    ``scale`` is ``alpha`` (detached, shape (C,)), None before initialization or when unscaled;
    ``levels()`` is ``[-1, 1]`` unscaled, else None.

    Args:
        beta: the sharpness of SignSwish (default 5, as in the larq port).
        trainable_beta: learn beta by backpropagation (a scalar parameter).
        scaled: multiply by the trainable per-channel alpha (weights); False for activations.

    Example:
        >>> w = torch.tensor([[0.5, -1.5], [-0.2, 0.2]])
        >>> q = SwishSign(); _ = q.init_scale(w)  # alpha = mean |w_c| = (1.0, 0.2)
        >>> q(w)
        tensor([[ 1.0000, -1.0000],
                [-0.2000,  0.2000]], grad_fn=<MulBackward0>)
        >>> SwishSign(scaled=False)(torch.tensor([-0.1, 0.0]))
        tensor([-1.,  1.])

    References:
        Darabi et al., "BNN+: Improved Binary Network Training", arXiv:1812.11800.
    """

    bit_width = 1
    alpha: nn.Parameter | None
    beta: torch.Tensor

    def __init__(self, beta: float = 5.0, trainable_beta: bool = False, scaled: bool = True) -> None:
        super().__init__()
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if trainable_beta:
            self.beta = nn.Parameter(torch.tensor(float(beta)))
        else:
            self.register_buffer("beta", torch.tensor(float(beta)))
        self.trainable_beta, self.scaled = trainable_beta, scaled
        self.register_parameter("alpha", None)

    @property  # type: ignore[override]
    def scale(self) -> torch.Tensor | None:
        return self.alpha.detach() if self.alpha is not None else None

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor) -> None:
        """Create alpha from the layer's weight (``quantize_``/``from_float`` call this before training)."""
        if self.scaled:
            self.init_scale(weight)

    def init_scale(self, weight: torch.Tensor) -> nn.Parameter:
        """Set ``alpha_c = mean |w_c|`` from ``weight`` (creating the parameter if needed) and return it."""
        value = _channel_mean_abs(weight.detach()).flatten()
        if self.alpha is None or self.alpha.shape != value.shape:
            self.alpha = nn.Parameter(value.clone())
        else:
            with torch.no_grad():  # an existing alpha (e.g. made by init_from) is a leaf that requires grad
                self.alpha.copy_(value)
        return self.alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = swish_sign(x, self.beta)
        if not self.scaled:
            return y
        if self.alpha is None and x.requires_grad and torch.is_grad_enabled():  # being trained: say so
            warnings.warn("SwishSign created its trainable scale alpha at the first forward: an optimizer built "
                          "before this does not train it. Call init_scale(weight) before building the optimizer, "
                          "or train with BnnPlusRegularizer, which does it at on_fit_start.", stacklevel=2)
        if self.alpha is None:
            self.init_scale(x)
        assert self.alpha is not None
        if self.alpha.numel() != x.shape[0]:
            raise ValueError(f"SwishSign has {self.alpha.numel()} channel scales but got a tensor with "
                             f"{x.shape[0]} channels (dim 0); use one quantizer per weight")
        return self.alpha.view((-1,) + (1,) * (x.dim() - 1)) * y

    def levels(self) -> torch.Tensor | None:
        return None if self.scaled else torch.tensor(_PLUS_MINUS_ONE)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A lazily created alpha: make room for it before loading, so a saved quantizer loads into a fresh one.
        key = prefix + "alpha"
        if self.alpha is None and key in state_dict:
            self.alpha = nn.Parameter(torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"bit_width=1, beta={float(self.beta):g}, trainable_beta={self.trainable_beta}, "
                f"scaled={self.scaled}")


def _check_clip(clip_value: float | None) -> None:
    if clip_value is not None and not clip_value > 0:
        raise ValueError(f"clip_value must be > 0 or None, got {clip_value}")


BINARY_QUANTIZERS: tuple[type[Quantizer], ...] = (SteSign, StochasticSign, SwishSign)


# ----------------------------------------------------------------------------------------------------
# Training callbacks (lowbit.train.fit)
# ----------------------------------------------------------------------------------------------------


def binary_weights(model: nn.Module, types: tuple[type[Quantizer], ...] = BINARY_QUANTIZERS) -> list[torch.Tensor]:
    """The latent weights of ``model`` whose quantizer is one of ``types`` (linear, conv and recurrent layers)."""
    return [w for _, w, q in quantized_weights(model) if isinstance(q, types) and w is not None]


class ClipWeights:
    """Engine callback clipping latent real-valued weights to [-clip_value, clip_value] after every step.

    The BNN paper keeps the real-valued weights that the sign reads within [-1, 1]: outside, the STE
    cancels their gradient and they would only drift ("starved" weights). By default the weights are
    found in the model: those of modules with a ``weight_quantizer`` attribute holding a binary quantizer
    of this file (:class:`SteSign`, :class:`StochasticSign`, :class:`SwishSign`); or pass ``params``.

    Args:
        params: the tensors to clip; None finds them in the model at every call.
        clip_value: the bound (BNN: 1).

    Example:
        >>> lin = nn.Linear(2, 2); lin.weight_quantizer = SteSign()
        >>> with torch.no_grad(): _ = lin.weight.fill_(3.0)
        >>> ClipWeights().after_step(lin, step=1); lin.weight
        Parameter containing:
        tensor([[1., 1.],
                [1., 1.]], requires_grad=True)

    References:
        Courbariaux, Hubara et al., "Binarized Neural Networks: Training Deep Neural Networks with Weights
        and Activations Constrained to +1 or -1", arXiv:1602.02830.
    """

    def __init__(self, params: Iterable[torch.Tensor] | None = None, clip_value: float = 1.0) -> None:
        if not clip_value > 0:
            raise ValueError(f"clip_value must be > 0, got {clip_value}")
        self.params = list(params) if params is not None else None
        self.clip_value = clip_value

    def _targets(self, model: nn.Module) -> list[torch.Tensor]:
        return self.params if self.params is not None else binary_weights(model)

    def on_fit_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if not self._targets(model):
            raise ValueError("ClipWeights found no weight to clip: no module has a weight_quantizer that is one of "
                             f"{[c.__name__ for c in BINARY_QUANTIZERS]}; pass params= explicitly")
        self.after_step(model, 0)

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        for p in self._targets(model):
            p.clamp_(-self.clip_value, self.clip_value)

    def __repr__(self) -> str:
        which = "found in the model" if self.params is None else f"{len(self.params)} tensors"
        return f"ClipWeights(clip_value={self.clip_value}, params={which})"


class BnnPlusRegularizer:
    """Engine callback adding BNN+'s regularizer, which pulls every latent weight towards +-alpha.

    ``extra_loss(model) = lam * sum over modules m, weights i of R(alpha_c(i), w_i)`` with
    ``R1 = |alpha - |w||`` (``kind="l1"``) or ``R2 = (alpha - |w|)^2`` (``kind="l2"``), over every module whose
    ``weight_quantizer`` is a :class:`SwishSign`; alpha is that quantizer's per-channel scale (1 when it
    is built with ``scaled=False``). Both alpha and w receive its gradient.

    ``on_fit_start`` raises a ``ValueError`` when the model has no such module, and initializes any
    scale not created yet (``alpha_c = mean |w_c|``), adding it to the optimizer. Called directly on a
    model without such modules, ``extra_loss`` returns None.

    Args:
        lam: the regularization strength lambda (> 0).
        kind: ``"l1"`` (R1) or ``"l2"`` (R2).

    Example:
        >>> lin = nn.Linear(2, 1, bias=False); lin.weight_quantizer = SwishSign()
        >>> with torch.no_grad(): _ = lin.weight.copy_(torch.tensor([[0.5, -1.5]]))
        >>> _ = lin.weight_quantizer.init_scale(lin.weight)  # alpha = 1
        >>> BnnPlusRegularizer(lam=0.1, kind="l2").extra_loss(lin)  # 0.1 * (0.5^2 + 0.5^2)
        tensor(0.0500, grad_fn=<MulBackward0>)

    References:
        Darabi et al., "BNN+: Improved Binary Network Training", arXiv:1812.11800.
    """

    def __init__(self, lam: float, kind: Literal["l1", "l2"] = "l1") -> None:
        if not lam > 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        if kind not in ("l1", "l2"):
            raise ValueError(f"kind must be 'l1' or 'l2', got {kind!r}")
        self.lam, self.kind = lam, kind

    @staticmethod
    def _pairs(model: nn.Module) -> list[tuple[torch.Tensor, SwishSign]]:
        return [(m.weight, m.weight_quantizer) for m in model.modules()  # type: ignore[misc]
                if isinstance(getattr(m, "weight_quantizer", None), SwishSign)
                and isinstance(getattr(m, "weight", None), torch.Tensor)]

    def on_fit_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pairs = self._pairs(model)
        if not pairs:
            raise ValueError("BnnPlusRegularizer: the model has no module whose weight_quantizer is a SwishSign "
                             "(swish_sign); there is nothing to regularize")
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        new = [q.init_scale(w) for w, q in pairs if q.scaled and q.alpha is None]
        new = [p for p in new if id(p) not in known]
        if new:
            optimizer.add_param_group({"params": new})

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """``sum R(alpha, w)`` over the model (without lam); None when no module has a SwishSign weight."""
        total: torch.Tensor | None = None
        for w, q in self._pairs(model):
            if q.scaled and q.alpha is None:
                q.init_scale(w)
            alpha = q.alpha.view((-1,) + (1,) * (w.dim() - 1)) if q.scaled and q.alpha is not None else 1.0
            diff = alpha - w.abs()
            term = diff.abs().sum() if self.kind == "l1" else diff.pow(2).sum()
            total = term if total is None else total + term
        return total

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        r = self.penalty(model)
        return None if r is None else self.lam * r

    def __repr__(self) -> str:
        return f"BnnPlusRegularizer(lam={self.lam:g}, kind={self.kind!r})"
