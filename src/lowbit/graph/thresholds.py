"""Batch norm + sign as one threshold per channel (Yonekawa & Nakahara 2017; FINN's streamlining).

After a binary layer, ``sign(BN(z))`` with ``z = scale * acc + bias`` is a step function of the accumulator:
for an eval-mode batch norm ``BN(z) = gamma (z - mu) / sqrt(var + eps) + beta``,

    gamma > 0:   sign(BN(z)) = +1  <=>  z >= mu - beta sqrt(var + eps) / gamma
    gamma < 0:   sign(BN(z)) = +1  <=>  z <= mu - beta sqrt(var + eps) / gamma      (the direction flips)
    gamma = 0:   sign(BN(z)) = sign(beta), a constant channel

and the same for ``acc`` after dividing by ``scale`` (a negative scale flips the direction once more). lowbit's
sign convention is sign(0) = +1 (:func:`lowbit.quant.binary.ste_sign`), so the comparison includes equality.

Three functions:

- :func:`bn_sign_thresholds` gives that real-valued threshold (float64) with its direction, the FINN/BNN
  "MultiThreshold" form of one BN + sign;
- :func:`integer_thresholds` turns it into an integer threshold for integer accumulators (the popcount
  domain of a binary layer), *verified* against the float32 eval-mode BN + sign that PyTorch computes, so that
  a rounding in float32 can never make a packed model disagree with the PyTorch model;
- :func:`float_thresholds` does the same in the float32 domain (the smallest/largest float32 value whose sign is
  +1), for a real-valued first layer whose output is a float.

The verification works because every float32 implementation of ``gamma (z - mu) / sqrt(var + eps) + beta``
built from correctly rounded operations is monotone in ``z``: ``sign(BN(z))`` is a step function on the
integers (or on the float32 values), and a bisection that evaluates the real thing finds its step exactly.

    import torch
    from lowbit.graph.thresholds import bn_sign_thresholds, integer_thresholds
    bn = torch.nn.BatchNorm1d(4).eval()
    th = bn_sign_thresholds(bn)                   # real thresholds, directions, constant channels
    t, flip = integer_thresholds(th)              # out = +1 where (acc <= t if flip else acc >= t)

References:
    Yonekawa & Nakahara, "On-Chip Memory Based Binarized Convolutional Deep Neural Network Applying Batch
    Normalization Free Technique on an FPGA", IPDPSW 2017 (doi:10.1109/IPDPSW.2017.95).
    Umuroglu et al., "FINN: A Framework for Fast, Scalable Binarized Neural Network Inference",
    arXiv:1612.07119 (thresholds instead of batch norm + sign).
    Umuroglu & Jahre, "Streamlined Deployment for Quantized Neural Networks", arXiv:1709.04060.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Thresholds", "bn_sign_thresholds", "integer_thresholds", "float_thresholds", "apply_thresholds"]

# Integer accumulators are searched in [-ACC_LIMIT, ACC_LIMIT]: every integer there is exact in float32 (2^24),
# so the float32 reference sees the accumulator itself. A threshold outside means "constant on that range".
ACC_LIMIT = 2**24


@dataclass(frozen=True)
class Thresholds:
    """The per-channel step function ``sign(BN(scale * acc + bias))`` of one eval-mode batch norm.

    ``out_c = +1`` where ``acc >= threshold_c`` (``flip_c`` False) or ``acc <= threshold_c`` (``flip_c`` True),
    else -1; where ``constant_c`` is +1 or -1 the output is that constant whatever ``acc`` is (``gamma_c = 0``
    or ``scale_c = 0``), and ``threshold_c`` is then +-inf so that the comparison gives the same answer.

    Attributes:
        threshold: float64 tensor [C], the real-valued threshold on ``acc``.
        flip: bool tensor [C], True where the comparison is "less or equal" (gamma * scale < 0).
        constant: int8 tensor [C]: 0 for a normal channel, +1 / -1 for a constant one.
        reference: ``acc (float tensor [M, C]) -> {-1, +1} tensor [M, C]``, the float32 (the BN's dtype)
            eval-mode ``sign(BN(scale * acc + bias))`` of PyTorch itself; :func:`integer_thresholds` and
            :func:`float_thresholds` check their answers against it. Not part of equality or repr.
    """

    threshold: Tensor
    flip: Tensor
    constant: Tensor
    reference: Callable[[Tensor], Tensor] | None = field(default=None, compare=False, repr=False)

    @property
    def num_channels(self) -> int:
        return int(self.threshold.numel())


def _bn_params(bn: nn.Module) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)):
        raise TypeError(f"bn_sign_thresholds takes an nn.BatchNorm1d or nn.BatchNorm2d, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{type(bn).__name__} has no running statistics (track_running_stats=False): in eval "
                         "mode it normalizes with the batch's own statistics, which no fixed threshold can express")
    c = bn.num_features
    w = bn.weight.detach() if bn.weight is not None else torch.ones(c, dtype=bn.running_mean.dtype)
    b = bn.bias.detach() if bn.bias is not None else torch.zeros(c, dtype=bn.running_mean.dtype)
    mean, var = bn.running_mean.detach(), bn.running_var.detach()
    for name, t in (("weight", w), ("bias", b), ("running_mean", mean), ("running_var", var)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{type(bn).__name__}.{name} holds NaN or inf; a threshold needs finite statistics")
    if (var + bn.eps <= 0).any():
        raise ValueError(f"{type(bn).__name__}: running_var + eps must be > 0 in every channel")
    return w.clone(), b.clone(), mean.clone(), var.clone(), float(bn.eps)


def _per_channel(name: str, t: Tensor | None, c: int, dtype: torch.dtype) -> Tensor | None:
    if t is None:
        return None
    t = torch.as_tensor(t).detach()
    if t.dim() == 0:
        t = t.expand(c)
    t = t.reshape(-1)
    if t.numel() != c:
        raise ValueError(f"{name} must be a scalar or hold one value per channel ({c}), got {t.numel()} values")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds NaN or inf")
    return t.to(dtype).clone()


def bn_sign_thresholds(
    bn: nn.BatchNorm1d | nn.BatchNorm2d, bias: Tensor | None = None, scale: Tensor | None = None
) -> Thresholds:
    """The per-channel threshold form of ``sign(BN(scale * acc + bias))`` for an eval-mode batch norm.

    Formula (real numbers, float64): with ``s_c = sqrt(var_c + eps)``, ``z_c = mu_c - beta_c s_c / gamma_c`` the
    zero of the BN, and ``threshold_c = (z_c - bias_c) / scale_c``:

        out_c = +1  <=>  acc >= threshold_c   if gamma_c * scale_c > 0   (flip_c False)
                         acc <= threshold_c   if gamma_c * scale_c < 0   (flip_c True)
        out_c = sign(BN(bias_c))              if gamma_c = 0 or scale_c = 0   (constant_c = +-1)

    with sign(0) = +1. The real-valued threshold can sit on a float32 rounding boundary; for an exact
    integer or float32 comparison use :func:`integer_thresholds` / :func:`float_thresholds`, which check
    against ``reference`` (PyTorch's own float32 BN + sign).

    Args:
        bn: an ``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` with running statistics (its eval-mode function is used
            whatever its ``training`` flag; affine or not).
        bias: the bias added before the BN (e.g. a conv/linear bias), a scalar or [C]; None: 0.
        scale: a factor on the accumulator before the bias (e.g. XNOR-Net's per-channel alpha), scalar or
            [C]; None: 1. The reference evaluates ``BN(fl(fl(scale * acc) + bias))``.

    Returns:
        :class:`Thresholds` with ``threshold`` (float64 [C]), ``flip`` (bool [C]), ``constant`` (int8 [C]).

    Example:
        >>> bn = nn.BatchNorm1d(2).eval()
        >>> with torch.no_grad():
        ...     _ = bn.weight.copy_(torch.tensor([2.0, -1.0])); _ = bn.bias.copy_(torch.tensor([1.0, 1.0]))
        >>> th = bn_sign_thresholds(bn)   # var = 1: +1 where acc >= -0.5 (ch 0), acc <= 1 (ch 1)
        >>> th.threshold.round(decimals=4), th.flip
        (tensor([-0.5000,  1.0000], dtype=torch.float64), tensor([False,  True]))

    References:
        Yonekawa & Nakahara, "On-Chip Memory Based Binarized Convolutional Deep Neural Network Applying Batch
        Normalization Free Technique on an FPGA", IPDPSW 2017.
        Umuroglu et al., "FINN: A Framework for Fast, Scalable Binarized Neural Network Inference",
        arXiv:1612.07119.
    """
    w, b, mean, var, eps = _bn_params(bn)
    c = w.numel()
    dtype = mean.dtype
    bias_t = _per_channel("bias", bias, c, dtype)
    scale_t = _per_channel("scale", scale, c, dtype)
    ndim = 4 if isinstance(bn, nn.BatchNorm2d) else 2

    def reference(acc: Tensor) -> Tensor:
        """PyTorch's eval-mode ``sign(BN(scale * acc + bias))``; ``acc`` [M, C]; returns a float {-1, +1} [M, C]."""
        z = acc.to(dtype)
        if scale_t is not None:
            z = z * scale_t
        if bias_t is not None:
            z = z + bias_t
        z = z.reshape(z.shape + (1,) * (ndim - 2))  # [M, C] or [M, C, 1, 1]: the layout of the BN kind
        y = F.batch_norm(z, mean, var, w, b, training=False, momentum=0.0, eps=eps).reshape(acc.shape)
        return torch.where(y < 0, -1.0, 1.0)  # sign(0) = +1, as lowbit's _sign

    w64, b64, m64, v64 = (t.double() for t in (w, b, mean, var))
    sd = torch.sqrt(v64 + eps)
    s64 = scale_t.double() if scale_t is not None else torch.ones(c, dtype=torch.float64)
    bias64 = bias_t.double() if bias_t is not None else torch.zeros(c, dtype=torch.float64)
    degenerate = (w64 == 0) | (s64 == 0)
    safe_w = torch.where(w64 == 0, 1.0, w64)
    safe_s = torch.where(s64 == 0, 1.0, s64)
    z0 = m64 - b64 * sd / safe_w  # the zero of the BN in its input z
    threshold = (z0 - bias64) / safe_s
    flip = (w64 * s64) < 0
    # gamma = 0 (or scale = 0): BN(z) is beta (or BN(bias)) for every acc; in float32, as the reference says
    const_out = reference(torch.zeros(1, c, dtype=dtype))[0]
    constant = torch.where(degenerate, const_out, torch.zeros(c)).to(torch.int8)
    inf = torch.full((c,), float("inf"), dtype=torch.float64)
    threshold = torch.where(constant > 0, -inf, torch.where(constant < 0, inf, threshold))
    flip = flip & ~degenerate
    return Thresholds(threshold=threshold, flip=flip, constant=constant, reference=reference)


def _bisect(pred: Callable[[Tensor], Tensor], lo: Tensor, hi: Tensor) -> Tensor:
    """Per channel, the smallest integer k in (lo, hi] with ``pred(k)`` True, given pred(lo) False, pred(hi)
    True and pred monotone (False ... False True ... True). int64 tensors [C]."""
    while True:
        open_ = hi - lo > 1
        if not open_.any():
            return hi
        mid = torch.where(open_, lo + (hi - lo) // 2, hi)
        p = pred(mid)
        hi = torch.where(open_ & p, mid, hi)
        lo = torch.where(open_ & ~p, mid, lo)


def integer_thresholds(
    th: Thresholds, lo: int = -ACC_LIMIT, hi: int = ACC_LIMIT
) -> tuple[Tensor, Tensor]:
    """Exact integer thresholds for integer accumulators: ``out = +1 <=> (acc <= t if flip else acc >= t)``.

    For each channel, ``t`` is the smallest integer ``acc`` in ``[lo, hi]`` whose PyTorch float32 output is +1
    (``flip`` False), or the largest one (``flip`` True). It starts from the float64 threshold of
    :func:`bn_sign_thresholds` and bisects with ``th.reference`` (the float32 eval-mode BN + sign) on the
    integers, so the comparison agrees with PyTorch on *every* integer of ``[lo, hi]``, also where float32
    rounding moves the step by one. A channel that is +1 on the whole range gets ``t = lo`` (``hi`` when
    flipped), one that is -1 everywhere ``t = hi + 1`` (``lo - 1`` when flipped); constant channels
    (``th.constant``) become such a threshold, so no special case remains.

    Args:
        th: from :func:`bn_sign_thresholds` (with its ``reference``).
        lo, hi: the range of the accumulator (a binary dot product of length K: ``[-K, K]``); within
            ``[-2^24, 2^24]``, where every integer is exact in float32.

    Returns:
        ``(t, flip)``: int64 [C] and bool [C].

    Example:
        >>> bn = nn.BatchNorm1d(1).eval()
        >>> with torch.no_grad(): _ = bn.running_mean.fill_(2.5)
        >>> integer_thresholds(bn_sign_thresholds(bn), -8, 8)   # BN(acc) = acc - 2.5 (about): +1 from 3
        (tensor([3]), tensor([False]))
    """
    if th.reference is None:
        raise ValueError("integer_thresholds needs Thresholds with a reference (from bn_sign_thresholds)")
    lo, hi = int(lo), int(hi)
    if not -ACC_LIMIT <= lo <= hi <= ACC_LIMIT:
        raise ValueError(f"need -2^24 <= lo <= hi <= 2^24 (integers exact in float32), got lo={lo}, hi={hi}")
    c = th.num_channels
    flip = th.flip.clone()

    def plus(k: Tensor) -> Tensor:  # the float32 output at integer acc k (one k per channel) is +1
        return th.reference(k.to(torch.float64).view(1, c)).view(c) > 0

    # pred is monotone False..True along the search axis: acc itself (normal) or -acc (flipped)
    def pred(u: Tensor) -> Tensor:
        return plus(torch.where(flip, -u, u))

    lo_t = torch.where(flip, torch.full((c,), -hi), torch.full((c,), lo)).long()  # search axis u in [lo_u, hi_u]
    hi_t = torch.where(flip, torch.full((c,), -lo), torch.full((c,), hi)).long()
    # the float64 guess, then a bracket around it, widened until it holds the step (or hits the range ends)
    guess = torch.where(flip, -th.threshold, th.threshold)
    guess = torch.nan_to_num(guess, posinf=float(ACC_LIMIT + 1), neginf=float(-ACC_LIMIT - 1))
    g = guess.clamp(lo_t.double() - 1, hi_t.double() + 1).ceil().long()
    width = torch.ones(c, dtype=torch.long)
    a = (g - 1).clamp(lo_t - 1, hi_t)  # want pred(a) False (or a = lo_u - 1)
    b = g.clamp(lo_t, hi_t + 1)  # want pred(b) True (or b = hi_u + 1)
    for _ in range(64):
        a_ok = (a < lo_t) | ~pred(a.clamp(lo_t, hi_t))
        b_ok = (b > hi_t) | pred(b.clamp(lo_t, hi_t))
        if bool((a_ok & b_ok).all()):
            break
        width = width * 2
        a = torch.where(a_ok, a, (a - width).clamp(min=lo_t - 1))
        b = torch.where(b_ok, b, (b + width).clamp(max=hi_t + 1))
    # bisect in (a, b] with the virtual values pred(lo_u - 1) = False, pred(hi_u + 1) = True
    lo_v, hi_v = lo_t - 1, hi_t + 1

    def pred_v(u: Tensor) -> Tensor:
        inside = pred(u.clamp(lo_t, hi_t))
        return torch.where(u < lo_t, False, torch.where(u > hi_t, True, inside))

    u = _bisect(pred_v, a.clamp(lo_v, hi_v), b.clamp(lo_v, hi_v))  # smallest u with +1 (hi_u + 1: never)
    t = torch.where(flip, -u, u)
    return t, flip


def _f32_key(x: Tensor) -> Tensor:
    """float32 -> int64 key, increasing with the value (-0.0 and +0.0 adjacent)."""
    i = x.to(torch.float32).view(torch.int32).long()
    return torch.where(i < 0, -(i & 0x7FFFFFFF) - 1, i)


def _key_f32(k: Tensor) -> Tensor:
    i = torch.where(k < 0, (-(k + 1)) | -0x80000000, k)
    return i.to(torch.int32).view(torch.float32)


_MAX_F32_KEY = int(_f32_key(torch.tensor(torch.finfo(torch.float32).max)))


def float_thresholds(th: Thresholds) -> tuple[Tensor, Tensor]:
    """Exact float32 thresholds: ``out = +1 <=> (x <= t if flip else x >= t)`` for every finite float32 ``x``.

    ``t`` is the smallest (largest, when flipped) finite float32 ``x`` whose PyTorch float32 eval-mode
    ``sign(BN(scale * x + bias))`` is +1, found by bisection over the ordered float32 values with
    ``th.reference``; +-inf where a channel is -1 / +1 for every finite x. For a real-valued layer (the first one
    of a BNN) whose float32 output is compared against it. NaN compares False, so NaN inputs must be
    rejected before (the packed runtime does).

    Args:
        th: from :func:`bn_sign_thresholds` (with its ``reference``).

    Returns:
        ``(t, flip)``: float32 [C] and bool [C].

    Example:
        >>> bn = nn.BatchNorm1d(1).eval()
        >>> with torch.no_grad(): _ = bn.bias.fill_(-0.25)
        >>> t, flip = float_thresholds(bn_sign_thresholds(bn))
        >>> float(t) > 0.2499 and float(t) < 0.2501
        True
    """
    if th.reference is None:
        raise ValueError("float_thresholds needs Thresholds with a reference (from bn_sign_thresholds)")
    c = th.num_channels
    flip = th.flip.clone()

    def pred(u: Tensor) -> Tensor:  # search axis: the key of x (normal) or of -x (flipped)
        x = _key_f32(u)
        x = torch.where(flip, -x, x)
        return th.reference(x.view(1, c)).view(c) > 0

    lo_v = torch.full((c,), -_MAX_F32_KEY - 1, dtype=torch.long)
    hi_v = torch.full((c,), _MAX_F32_KEY + 1, dtype=torch.long)

    def pred_v(u: Tensor) -> Tensor:
        inside = pred(u.clamp(-_MAX_F32_KEY, _MAX_F32_KEY))
        return torch.where(u < -_MAX_F32_KEY, False, torch.where(u > _MAX_F32_KEY, True, inside))

    u = _bisect(pred_v, lo_v, hi_v)
    x = _key_f32(u.clamp(-_MAX_F32_KEY, _MAX_F32_KEY))
    inf = torch.tensor(float("inf"), dtype=torch.float32)
    x = torch.where(u > _MAX_F32_KEY, inf, torch.where(u < -_MAX_F32_KEY, -inf, x))
    return torch.where(flip, -x, x), flip


def apply_thresholds(acc: Tensor, t: Tensor, flip: Tensor, dim: int = 1) -> Tensor:
    """``where(flip, acc <= t, acc >= t)`` as +-1 (float) with the channels along ``dim``: the threshold
    function, as a plain PyTorch reference for the packed kernels.

    Example:
        >>> apply_thresholds(torch.tensor([[0, 3, 5]]), torch.tensor([3, 3, 3]), torch.tensor([False, True, False]))
        tensor([[-1.,  1.,  1.]])
    """
    shape = [1] * acc.dim()
    shape[dim] = -1
    t, flip = t.view(shape), flip.view(shape)
    on = torch.where(flip, acc <= t, acc >= t)
    return torch.where(on, 1.0, -1.0)
