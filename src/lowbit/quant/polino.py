"""Bucketed quantizers of Polino, Pascanu and Alistarh (2018): uniform levels, or learned quantization points.

The flattened tensor is cut into buckets of ``bucket_size`` consecutive values (the last one is padded
with its own last value, which changes neither its minimum nor its maximum). Each bucket b is scaled to
[0, 1] by its own minimum ``beta_b`` and range ``alpha_b = max_b - min_b``, snapped to one of ``s = 2^k``
points in [0, 1], and scaled back:

    u = (x - beta_b) / alpha_b                            in [0, 1]; alpha_b = 1 where a bucket is constant
    uniform:  Q(x) = beta_b + alpha_b * round(u (s - 1)) / (s - 1)     (or unbiased stochastic rounding)
    points:   Q(x) = beta_b + alpha_b * p[argmin_i |u - p_i|]          p = s learned points ("differentiable")

so every bucket holds at most 2^k distinct values. Storing a bucket costs ``k * bucket_size`` bits plus
two floats (``beta_b``, ``alpha_b``): about ``k + 64 / bucket_size`` bits per weight (k + 0.25 at 256).

Gradients: the weight gets a straight-through estimator (``dQ/dx = 1``; ``alpha_b`` and ``beta_b`` are
treated as constants), which is how quantized distillation trains its full-precision shadow weights. The
learned points get the exact gradient of the piecewise-constant map, ``dL/dp_i = sum_{j: idx_j = i}
alpha_{b(j)} dL/dQ_j``, which is what differentiable quantization descends on.

References:
    Polino, Pascanu, Alistarh, "Model compression via distillation and quantization", arXiv:1802.05668.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from lowbit.quant.base import Quantizer, register_quantizer

__all__ = ["bucketize_tensor", "bucketed_uniform", "bucketed_points", "BucketedUniform", "BucketedPoints"]

_MAX_BITS = 16


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= _MAX_BITS:
        raise ValueError(f"bits must be an int in [1, {_MAX_BITS}], got {bits!r}")
    return bits


def _check_bucket(bucket_size: int | None) -> int | None:
    if bucket_size is not None and (isinstance(bucket_size, bool) or not isinstance(bucket_size, int)
                                    or bucket_size < 1):
        raise ValueError(f"bucket_size must be a positive int (values per bucket) or None (one bucket for the "
                         f"whole tensor), got {bucket_size!r}")
    return bucket_size


def bucketize_tensor(x: torch.Tensor, bucket_size: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut ``x`` into buckets and scale each to [0, 1].

    Returns ``(u, beta, alpha)``: ``u`` of shape ``(buckets, bucket_size)`` (the last bucket padded with its
    last value), the per-bucket minimum ``beta`` and range ``alpha`` of shape ``(buckets, 1)``, so that
    ``x = (beta + alpha * u).flatten()[:x.numel()]``. A constant bucket gets ``alpha = 1`` (``u = 0``). A NaN
    in a bucket makes that bucket's ``beta`` and ``u`` NaN. Nothing here is differentiable (constants).

    Example:
        >>> u, beta, alpha = bucketize_tensor(torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0]), bucket_size=2)
        >>> u.tolist(), beta.flatten().tolist(), alpha.flatten().tolist()
        ([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]], [1.0, 2.0, 5.0], [2.0, 1.0, 1.0])
    """
    flat = x.detach().reshape(-1)
    size = flat.numel() if bucket_size is None else _check_bucket(bucket_size)
    pad = (-flat.numel()) % size
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    b = flat.view(-1, size)  # (buckets, bucket_size)
    beta = b.amin(dim=1, keepdim=True)
    alpha = b.amax(dim=1, keepdim=True) - beta
    alpha = torch.where(alpha > 0, alpha, torch.ones_like(alpha))  # a constant bucket: u = 0, Q(x) = x
    return (b - beta) / alpha, beta, alpha


def _unbucket(q: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return q.reshape(-1)[: like.numel()].view(like.shape)


def bucketed_uniform(x: torch.Tensor, bits: int, bucket_size: int | None = 256, stochastic: bool = False,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Polino et al.'s bucketed uniform quantizer.

    Forward: per bucket b of ``bucket_size`` consecutive values (flattened order),
    ``Q(x) = beta_b + alpha_b * r(u (s - 1)) / (s - 1)`` with ``u = (x - beta_b) / alpha_b``, ``s = 2^bits``,
    ``beta_b = min``, ``alpha_b = max - min`` of the bucket, and ``r = round`` (half to even) or, with
    ``stochastic``, unbiased stochastic rounding (``floor(v) + 1`` with probability ``v - floor(v)``, so
    ``E[Q(x)] = x``). Each bucket's minimum and maximum are represented exactly.
    Gradient: straight-through, ``dQ/dx = 1`` (``alpha_b``, ``beta_b`` are constants).

    Args:
        x: any tensor (a weight).
        bits: k, 1 to 16: ``2^k`` levels per bucket.
        bucket_size: values per bucket (the paper uses 256); None: one bucket for the whole tensor.
        stochastic: unbiased stochastic rounding instead of round-to-nearest.
        generator: optional ``torch.Generator`` for the stochastic rounding (default: torch's global RNG).

    Example:
        >>> bucketed_uniform(torch.tensor([0.0, 0.1, 0.5, 0.8, 3.0, 3.0]), bits=1, bucket_size=4)
        tensor([0.0000, 0.0000, 0.8000, 0.8000, 3.0000, 3.0000])

    References:
        Polino, Pascanu, Alistarh, "Model compression via distillation and quantization", arXiv:1802.05668.
    """
    n = 2 ** _check_bits(bits) - 1
    if x.numel() == 0:
        return x
    u, beta, alpha = bucketize_tensor(x, bucket_size)
    v = u * n
    if stochastic:
        low = torch.floor(v)
        up = torch.rand(v.shape, generator=generator, dtype=v.dtype, device=v.device) < (v - low)
        v = low + up.to(v.dtype)
    else:
        v = torch.round(v)
    q = _unbucket(beta + alpha * (v / n), x)
    return q + (x - x.detach())  # exactly q forward; identity gradient to x


def _nearest(u: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Index into ``points`` (any order) of the point nearest to each ``u`` (ties: the smaller point)."""
    sorted_p, order = torch.sort(points.detach())
    mids = (sorted_p[1:] + sorted_p[:-1]) / 2
    return order[torch.bucketize(u, mids)]


def bucketed_points(x: torch.Tensor, points: torch.Tensor, bucket_size: int | None = 256) -> torch.Tensor:
    """Polino et al.'s non-uniform bucketed quantizer with (learnable) quantization points.

    Forward: per bucket b, ``Q(x) = beta_b + alpha_b * p[i*]`` with ``i* = argmin_i |u - p_i|``,
    ``u = (x - beta_b) / alpha_b``, ``beta_b = min``, ``alpha_b = max - min`` of the bucket; the points ``p`` are
    in the normalized [0, 1] coordinates and shared by all buckets of the tensor.
    Gradient: to ``x`` straight-through (``dQ/dx = 1``); to the points, exact: ``dL/dp_i = sum over values j
    snapped to p_i of alpha_{b(j)} dL/dQ_j`` (differentiable quantization).

    Args:
        x: any tensor (a weight).
        points: 1-D tensor of quantization points (any order, typically in [0, 1]; may require grad).
        bucket_size: values per bucket (the paper uses 256); None: one bucket for the whole tensor.

    Example:
        >>> p = torch.tensor([0.0, 0.2, 1.0], requires_grad=True)
        >>> y = bucketed_points(torch.tensor([0.0, 1.5, 3.0, 10.0]), p, bucket_size=None)  # alpha = 10
        >>> y
        tensor([ 0.,  2.,  2., 10.], grad_fn=<AddBackward0>)
        >>> y.sum().backward(); p.grad  # two values snapped to 0.2, each contributes alpha = 10
        tensor([10., 20., 10.])

    References:
        Polino, Pascanu, Alistarh, "Model compression via distillation and quantization", arXiv:1802.05668.
    """
    if points.dim() != 1 or points.numel() == 0:
        raise ValueError(f"points must be a non-empty 1-D tensor, got shape {tuple(points.shape)}")
    if x.numel() == 0:
        return x
    u, beta, alpha = bucketize_tensor(x, bucket_size)
    idx = _nearest(u, points)
    q = _unbucket(beta + alpha * points.to(x.dtype)[idx], x)  # differentiable in the points only
    return q + (x - x.detach())


@register_quantizer("bucketed_uniform")
class BucketedUniform(Quantizer):
    """Bucketed uniform quantizer (quantized distillation); see :func:`bucketed_uniform`.

    Forward: per bucket of ``bucket_size`` values, ``beta_b + alpha_b * round(u (2^k - 1)) / (2^k - 1)``,
    ``u = (x - min_b) / (max_b - min_b)``; stochastic rounding (if set) only in training mode, so that
    evaluation is deterministic. Gradient: straight-through to ``x``.

    ``levels()`` is None (every bucket has its own ``2^k`` levels); after a forward, ``scale`` is the step
    ``alpha_b / (2^k - 1)`` of each bucket (shape ``(buckets,)``) and ``offset`` the minimum ``beta_b``.

    Args:
        bits: k, 1 to 16 (default 4).
        bucket_size: values per bucket (default 256, as the paper); None for one bucket per tensor.
        stochastic: unbiased stochastic rounding in training mode (default False: round to nearest).

    Example:
        >>> q = BucketedUniform(bits=2, bucket_size=4)
        >>> q(torch.tensor([0.0, 0.4, 0.7, 3.0]))  # levels 0, 1, 2, 3
        tensor([0., 0., 1., 3.])

    References:
        Polino, Pascanu, Alistarh, "Model compression via distillation and quantization", arXiv:1802.05668.
    """

    def __init__(self, bits: int = 4, bucket_size: int | None = 256, stochastic: bool = False) -> None:
        super().__init__()
        self.bit_width = _check_bits(bits)
        self.bucket_size = _check_bucket(bucket_size)
        self.stochastic = bool(stochastic)
        self.offset: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel():
            _, beta, alpha = bucketize_tensor(x, self.bucket_size)
            self.scale, self.offset = (alpha / (2**self.bit_width - 1)).flatten(), beta.flatten()
        return bucketed_uniform(x, self.bit_width, self.bucket_size, self.stochastic and self.training)

    def extra_repr(self) -> str:
        return f"bit_width={self.bit_width}, bucket_size={self.bucket_size}, stochastic={self.stochastic}"


@register_quantizer("bucketed_points")
class BucketedPoints(Quantizer):
    """Bucketed quantizer with ``2^k`` learned quantization points (differentiable quantization).

    Forward: per bucket, ``beta_b + alpha_b * p[argmin_i |u - p_i|]``, ``u = (x - min_b) / (max_b - min_b)``
    (see :func:`bucketed_points`). The points ``p`` are an ``nn.Parameter`` in [0, 1] coordinates, shared by
    the buckets of the tensor. Gradient: straight-through to ``x``; ``dL/dp_i = sum_{j -> p_i} alpha_b dL/dQ_j``
    to the points. With ``init="uniform"`` the points start at ``i / (2^k - 1)``, which is exactly
    :class:`BucketedUniform` with round-to-nearest; with ``init="quantile"`` they start, when the layer adopts
    its weight (``init_from``), at the quantiles ``(i + 1/2) / 2^k`` of the weight's normalized values.

    ``levels()`` is None (per-bucket levels); ``normalized_levels()`` gives the sorted points.

    Args:
        bits: k, 1 to 16 (default 2): ``2^k`` points.
        bucket_size: values per bucket (default 256, as the paper); None for one bucket per tensor.
        init: ``"uniform"`` (default) or ``"quantile"``.

    Example:
        >>> q = BucketedPoints(bits=1, bucket_size=None)
        >>> q.points.data = torch.tensor([0.0, 0.5])
        >>> q(torch.tensor([0.0, 1.5, 4.0]))  # alpha = 4: levels 0 and 2
        tensor([0., 2., 2.], grad_fn=<AddBackward0>)

    References:
        Polino, Pascanu, Alistarh, "Model compression via distillation and quantization", arXiv:1802.05668.
    """

    def __init__(self, bits: int = 2, bucket_size: int | None = 256,
                 init: Literal["uniform", "quantile"] = "uniform") -> None:
        super().__init__()
        self.bit_width = _check_bits(bits)
        self.bucket_size = _check_bucket(bucket_size)
        if init not in ("uniform", "quantile"):
            raise ValueError(f"init must be 'uniform' or 'quantile', got {init!r}")
        self.init = init
        self.points = nn.Parameter(torch.linspace(0, 1, 2**bits))

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor) -> None:
        """With ``init="quantile"``, place the points at quantiles of ``weight``'s normalized bucket values."""
        if self.init != "quantile" or weight.numel() == 0:
            return
        u = bucketize_tensor(weight, self.bucket_size)[0].flatten().float()
        if u.numel() > 1 << 20:  # torch.quantile's input limit; a strided subsample keeps the shape of the law
            u = u[:: u.numel() // (1 << 20) + 1]
        s = 2**self.bit_width
        qs = (torch.arange(s, dtype=torch.float32) + 0.5) / s
        self.points.copy_(torch.quantile(u, qs).to(self.points))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bucketed_points(x, self.points, self.bucket_size)

    def normalized_levels(self) -> torch.Tensor:
        """The sorted points in [0, 1] bucket coordinates (the same for every bucket)."""
        return torch.sort(self.points.detach()).values

    def extra_repr(self) -> str:
        return f"bit_width={self.bit_width}, bucket_size={self.bucket_size}, init={self.init!r}"
