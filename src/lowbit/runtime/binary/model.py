"""Lowering a trained lowbit BNN onto the bit-packed runtime: :func:`pack_model` -> :class:`PackedModel`.

The model is traced with ``torch.fx`` (quantized layers and quantizers kept as leaves) and must be a chain of
modules. Its binary layers are the ``QuantConv2d`` / ``QuantLinear`` (or ``nn.Conv2d`` / ``nn.Linear``) whose input
quantizer is a plain sign (``ste_sign``, ``stochastic_sign`` in eval mode, ``swish_sign(scaled=False)``) and whose
weight quantizer is an unscaled sign. The lowering walks the chain in three domains:

    float   (the start)  torch runs the modules as they are (the real-valued first layer, in float32)
    acc     after a binary layer: integer XNOR-popcount accumulators
    bits    packed +-1 activations, NHWC, 64 channels per uint64 word

and converts, wherever a sign point (a binary layer's input quantizer) follows,

    float:  ..., [BatchNorm], {activation | MaxPool2d | Flatten}*, sign
            -> torch up to the BN; then ``x >= t`` per channel with an exact float32 threshold (``x <= t`` for a
               negative gamma; ``x >= 0`` without a BN); then the pools on bits
    acc:    BatchNorm, {activation | MaxPool2d | Flatten}*, sign
            -> one integer threshold per channel fused into the binary layer's kernel (a negative gamma is
               folded in by negating the weight row); then the pools on bits (max = OR)

The activations allowed between the BN and the sign are those that keep the sign: ``Hardtanh`` with
``min_val < 0 <= max_val``, ``Identity``, ``Dropout`` (eval). A ReLU there would make every sign +1. A binary
layer that no sign follows (the classifier) returns its integer accumulator as float32 (plus its bias), and the
rest of the model (e.g. a BatchNorm on the logits) runs in torch. Anything else raises
:class:`UnsupportedModelError` naming the module.

Exactness: every threshold is checked against PyTorch's own float32 batch norm
(:mod:`lowbit.graph.thresholds`), the popcount result is the exact integer the float32 conv / linear computes on
+-1 values, and zero padding is corrected exactly (:mod:`~lowbit.runtime.binary.kernels`). So the packed model
reproduces the eval-mode PyTorch model bit for bit in its binary part, and its logits are those of
``F.linear(x, w, b)`` on the same +-1 input. Not supported (error): a binary conv with a bias (oneDNN adds it in an
order that rounds differently from ``acc + bias``), scaled binary weights (XNOR-Net alpha, BNN+ ``swish_sign``:
the float32 sum of ``+-alpha`` rounds differently from ``alpha * acc``), max-pooling before the batch norm.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lowbit.nn import QuantLinear
    >>> net = nn.Sequential(QuantLinear(8, 70, bias=False, weight_quantizer="ste_sign"), nn.BatchNorm1d(70),
    ...                     nn.Hardtanh(), QuantLinear(70, 3, weight_quantizer="ste_sign", input_quantizer="ste_sign"))
    >>> net = net.eval()
    >>> packed = pack_model(net)
    >>> x = torch.randn(4, 8)
    >>> torch.equal(packed(x), net(x))
    True
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from lowbit.graph.thresholds import Thresholds, bn_sign_thresholds, float_thresholds, integer_thresholds
from lowbit.nn.layers import QuantAct, QuantConv2d, QuantLinear
from lowbit.quant.base import Quantizer
from lowbit.quant.binary import SteSign, StochasticSign, SwishSign
from lowbit.runtime.binary.kernels import (
    _maxpool_kernel,
    conv_out_size,
    conv_plan,
    conv_words,
    tap_sums,
    threshold_pack,
)
from lowbit.runtime.binary.pack import WORD_BITS, pack_signs, unpack_signs

__all__ = ["PackedModel", "UnsupportedModelError", "pack_model"]


class UnsupportedModelError(ValueError):
    """The model has a layer or a structure the packed binary runtime cannot lower; the message names it."""


# ----------------------------------------------------------------------------------------------------
# Activations between stages
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Bits:
    """Packed +-1 activations ``words`` [N, H, W, Cw] with ``c`` channels. ``layout``: "nchw" (a conv feature map),
    "nc" (a vector; H = W = 1) or "flat" (a flattened feature map: the torch tensor is NCHW.flatten(1))."""

    words: np.ndarray
    c: int
    layout: str

    def to_torch(self) -> Tensor:
        x = unpack_signs(self.words, self.c).permute(0, 3, 1, 2)  # [N, C, H, W]
        if self.layout == "nc":
            return x.reshape(x.shape[0], self.c)
        return x.flatten(1) if self.layout == "flat" else x.contiguous()


def _check_finite(x: Tensor, where: str) -> None:
    # max and min propagate NaN and see +-inf: two reductions, no temporary the size of x
    if not (torch.isfinite(x.amax()) and torch.isfinite(x.amin())):
        what = "NaN" if torch.isnan(x).any() else "inf"
        raise ValueError(f"{where} holds {what}: a binary activation needs a finite value to take its sign")


# ----------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------


class _Stage:
    name: str

    def __call__(self, x: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def nbytes(self) -> dict[str, int]:
        return {}

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class _FloatStage(_Stage):
    """torch modules / functions run as they are, in float."""

    name: str
    ops: list[tuple[str, Callable[[Tensor], Tensor]]]

    def __call__(self, x: Tensor) -> Tensor:
        for _, op in self.ops:
            x = op(x)
        return x

    def nbytes(self) -> dict[str, int]:
        total, packed = 0, 0
        for _, op in self.ops:
            if isinstance(op, _SignWeightLayer):
                packed += op.packed_weight_bytes
                bias = op.layer.bias
                total += 0 if bias is None else 4 * bias.numel()
            elif isinstance(op, nn.Module):
                total += sum(t.numel() * t.element_size() for t in (*op.parameters(), *op.buffers()))
        return {"float_bytes": total, "binary_weight_bytes": packed}

    def describe(self) -> str:
        return "torch float: " + ", ".join(n for n, _ in self.ops)


class _SignWeightLayer(nn.Module):
    """A real-input layer with unscaled sign weights (the first layer of a BNN), run in float32 by torch exactly as
    ``QuantLinear`` / ``QuantConv2d`` run it (``F.linear`` / ``F.conv2d`` with ``sign(W)``), with ``sign(W)`` computed
    once. Its size counts the weights as 1 bit each (they are stored packed and unpacked once at load)."""

    def __init__(self, layer: nn.Linear | nn.Conv2d) -> None:
        super().__init__()
        self.layer = _freeze(layer)
        self.layer.weight_quantizer = None  # type: ignore[assignment]
        with torch.no_grad():
            self.layer.weight.copy_(torch.where(layer.weight.detach() < 0, -1.0, 1.0))
        self.packed_weight_bytes = 8 * pack_signs(self.layer.weight.flatten(1)).size

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, self.layer.weight, self.layer.bias)
        return F.linear(x, self.layer.weight, self.layer.bias)


@dataclass
class _FloatToBits(_Stage):
    """float [N, C, H, W] or [N, C] -> packed bits ``x >= t`` (``x <= t`` where flipped), t exact in float32."""

    name: str
    t: Tensor | None  # float32 [C]; None: sign(x) itself (t = 0)
    flip: Tensor | None

    def __call__(self, x: Tensor) -> _Bits:
        if x.dim() not in (2, 4):
            raise ValueError(f"{self.name}: expected a [N, C] or [N, C, H, W] float tensor, got shape {tuple(x.shape)}")
        n, c = x.shape[:2]
        if self.t is None:  # sign(x): x >= 0
            t, flip = np.zeros(c, np.float32), np.zeros(c, np.bool_)
        else:
            if c != self.t.numel():
                raise ValueError(f"{self.name}: {self.t.numel()} thresholds for a tensor of {c} channels")
            t, flip = self._np
        h, w = (x.shape[2], x.shape[3]) if x.dim() == 4 else (1, 1)
        x3 = x.detach().to(torch.float32).contiguous().view(n, c, h * w).numpy()
        words_, bad = threshold_pack(x3, t, flip)
        if bad:
            _check_finite(x, f"the float output before {self.name}")
            raise ValueError(f"the float output before {self.name} holds {bad} non-finite values")
        return _Bits(words_.reshape(n, h, w, -1), c, "nchw" if x.dim() == 4 else "nc")

    def __post_init__(self) -> None:
        self._np = (None if self.t is None else
                    (self.t.numpy().astype(np.float32), self.flip.numpy().astype(np.bool_)))  # type: ignore[union-attr]

    def nbytes(self) -> dict[str, int]:
        return {"threshold_bytes": 0 if self.t is None else 4 * self.t.numel() + (self.t.numel() + 7) // 8}

    def describe(self) -> str:
        return "float -> bits " + ("(sign)" if self.t is None else f"({self.t.numel()} float32 thresholds)")


@dataclass
class _BinaryLayer(_Stage):
    """XNOR-popcount conv / linear on packed bits; thresholded (bits out) or not (float acc + bias out)."""

    name: str
    kind: str  # "conv" or "linear"
    w: np.ndarray  # uint64 [O, KH, KW, Cw] (linear: [O, 1, HW, Cw])
    c_in: int
    stride: int
    padding: int
    t: np.ndarray | None  # int64 [O] (flips folded into w) or None
    bias: Tensor | None  # float32 [O], added to the accumulator when t is None
    hw: int = 1  # linear: pixels per sample of the (flattened) input
    wsum: np.ndarray = field(init=False)
    plans: dict[tuple[int, int], tuple[np.ndarray, ...]] = field(init=False, repr=False)  # by input (H, W)

    def __post_init__(self) -> None:
        self.wsum = tap_sums(self.w, self.c_in)
        self.plans = {}

    @property
    def out_channels(self) -> int:
        return self.w.shape[0]

    def __call__(self, x: _Bits) -> _Bits | Tensor:
        if not isinstance(x, _Bits):
            raise TypeError(f"{self.name}: expected packed bits, got {type(x).__name__}")
        if x.c != self.c_in:
            raise ValueError(f"{self.name}: expected {self.c_in} input channels, got {x.c}")
        xw = x.words
        n, h, wd, cw = xw.shape
        if self.kind == "linear":
            if x.layout == "nchw":
                raise ValueError(f"{self.name}: a Linear needs a flattened input (add nn.Flatten / x.flatten(1))")
            if h * wd != self.hw:
                raise ValueError(f"{self.name}: expects {self.hw * self.c_in} input features, got {h * wd * x.c} "
                                 f"({x.c} channels x {h}x{wd})")
            xw = xw.reshape(n, 1, h * wd, cw)
            h, wd = 1, h * wd
        elif x.layout != "nchw":
            raise ValueError(f"{self.name}: a Conv2d needs a [N, C, H, W] input, got a flattened one")
        o, kh, kw, _ = self.w.shape
        if conv_out_size(h, kh, self.stride, self.padding) < 1 or conv_out_size(wd, kw, self.stride, self.padding) < 1:
            raise ValueError(f"{self.name}: a {kh}x{kw} kernel (padding {self.padding}) does not fit a {h}x{wd} input")
        plan = self.plans.get((h, wd))
        if plan is None:  # the border table and popcount limits of this input size, computed once
            plan = conv_plan(self.w, self.wsum, self.t, self.c_in, h, wd, self.stride, self.padding)
            if len(self.plans) < 16:
                self.plans[(h, wd)] = plan
        out = conv_words(xw, self.w, self.wsum, self.t, self.c_in, self.stride, self.padding, plan)
        if self.t is not None:
            return _Bits(out, o, "nchw" if self.kind == "conv" else "nc")
        n, oh, ow, _ = out.shape
        acc = out.reshape(n * oh * ow, o)
        y = torch.from_numpy(acc).to(torch.float32)  # exact: |acc| <= K < 2^24
        if self.kind == "conv":
            y = y.view(n, oh, ow, o).permute(0, 3, 1, 2).contiguous()
        if self.bias is not None:
            y = y + (self.bias.view(1, -1, 1, 1) if self.kind == "conv" else self.bias)
        return y

    def nbytes(self) -> dict[str, int]:
        out = {"binary_weight_bytes": self.w.nbytes}
        if self.t is not None:
            out["threshold_bytes"] = 4 * self.t.size  # int32 is enough: |t| <= K + 1 < 2^31
        if self.bias is not None:
            out["float_bytes"] = 4 * self.bias.numel()
        return out

    def describe(self) -> str:
        o, kh, kw, _ = self.w.shape
        geo = (f"{kh}x{kw} s{self.stride} p{self.padding}" if self.kind == "conv" else f"K={self.c_in * self.hw}")
        out = "bits (thresholds fused)" if self.t is not None else "float acc" + (" + bias" if self.bias is not None
                                                                                   else "")
        return f"binary {self.kind} {self.c_in * (1 if self.kind == 'conv' else self.hw)}->{o} {geo} -> {out}"


@dataclass
class _BitsMaxPool(_Stage):
    name: str
    kernel: int
    stride: int
    padding: int

    def __call__(self, x: _Bits) -> _Bits:
        if x.layout != "nchw":
            raise ValueError(f"{self.name}: max-pooling needs a [N, C, H, W] input")
        n, h, wd, cw = x.words.shape
        oh = conv_out_size(h, self.kernel, self.stride, self.padding)
        ow = conv_out_size(wd, self.kernel, self.stride, self.padding)
        if oh < 1 or ow < 1:
            raise ValueError(f"{self.name}: a {self.kernel}x{self.kernel} window does not fit a {h}x{wd} input")
        out = np.empty((n, oh, ow, cw), np.uint64)
        _maxpool_kernel(np.ascontiguousarray(x.words), self.kernel, self.stride, self.padding, oh, ow, out)
        return _Bits(out, x.c, "nchw")

    def describe(self) -> str:
        return f"bit max-pool (OR) {self.kernel}x{self.kernel} s{self.stride} p{self.padding}"


@dataclass
class _BitsFlatten(_Stage):
    name: str

    def __call__(self, x: _Bits) -> _Bits:
        return _Bits(x.words, x.c, "flat" if x.layout == "nchw" else x.layout)

    def describe(self) -> str:
        return "flatten (no copy)"


@dataclass
class _BitsToFloat(_Stage):
    name: str

    def __call__(self, x: _Bits) -> Tensor:
        return x.to_torch()

    def describe(self) -> str:
        return "bits -> float +-1"


# ----------------------------------------------------------------------------------------------------
# The packed model
# ----------------------------------------------------------------------------------------------------


class PackedModel:
    """A BNN lowered by :func:`pack_model`: float stages in torch, binary layers as XNOR-popcount kernels on bits.

    Call it like the model: ``packed(x)`` returns what ``model.eval()(x)`` returns (float32 tensor).

    Attributes:
        stages: the list of stages (``describe()`` prints them).
        binary_layers: names of the binary layers, in order.
    """

    def __init__(self, stages: list[_Stage]) -> None:
        self.stages = stages
        self.binary_layers = [s.name for s in stages if isinstance(s, _BinaryLayer)]

    @torch.no_grad()
    def forward(self, x: Tensor, trace: dict[str, Tensor] | None = None) -> Tensor:
        """Run the packed model on a float tensor ``x`` (the model's input). With a ``trace`` dict, the +-1 input of
        every binary layer is stored under its module name, in the layout the torch layer sees it."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"the input must be a float torch.Tensor, got {type(x).__name__}"
                            + (f" of dtype {x.dtype}" if isinstance(x, Tensor) else ""))
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"the input must have a non-empty batch dim, got shape {tuple(x.shape)}")
        _check_finite(x, "the input")
        y: Any = x.detach().cpu()
        for stage in self.stages:
            if trace is not None and isinstance(stage, _BinaryLayer):
                trace[stage.name] = y.to_torch()
            y = stage(y)
        if isinstance(y, _Bits):
            y = y.to_torch()
        return y

    __call__ = forward

    def nbytes(self) -> dict[str, int]:
        """Model size in bytes: packed binary weights, thresholds (int32 / float32 + a direction bit), float
        parameters (the real-valued layers run in torch, biases), and their total."""
        total: dict[str, int] = {"binary_weight_bytes": 0, "threshold_bytes": 0, "float_bytes": 0}
        for s in self.stages:
            for k, v in s.nbytes().items():
                total[k] += v
        total["total_bytes"] = sum(total.values())
        return total

    def describe(self) -> str:
        """One line per stage."""
        return "\n".join(f"{i:2d} {s.name:24s} {s.describe()}" for i, s in enumerate(self.stages))

    def __repr__(self) -> str:
        return f"PackedModel(\n{self.describe()}\n)"


# ----------------------------------------------------------------------------------------------------
# Lowering
# ----------------------------------------------------------------------------------------------------


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantConv2d, QuantLinear, QuantAct, Quantizer)) or super().is_leaf_module(m, qualname)


@dataclass
class _Op:
    name: str
    kind: str  # layer, bn, act, pool, flatten, sign, other
    module: nn.Module | None = None
    fn: Callable[[Tensor], Tensor] | None = None


def _is_sign(q: nn.Module | None) -> bool:
    """A quantizer whose eval-mode forward is exactly sign(x) with sign(0) = +1."""
    if isinstance(q, SteSign):
        return q.scaling is None
    if isinstance(q, SwishSign):
        return not q.scaled
    return isinstance(q, StochasticSign)


def _classify(name: str, m: nn.Module) -> _Op:
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        return _Op(name, "layer", m)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return _Op(name, "bn", m)
    if isinstance(m, nn.Hardtanh) and m.min_val < 0 <= m.max_val or isinstance(m, (nn.Identity, nn.Dropout)):
        return _Op(name, "act", m)
    if isinstance(m, nn.MaxPool2d):
        return _Op(name, "pool", m)
    if isinstance(m, nn.Flatten):
        if m.start_dim != 1 or m.end_dim != -1:
            return _Op(name, "other", m)
        return _Op(name, "flatten", m)
    if isinstance(m, QuantAct):
        if m.quantizer is None:
            return _Op(name, "act", m)
        return _Op(name, "sign" if _is_sign(m.quantizer) else "other", m)
    if isinstance(m, Quantizer):
        return _Op(name, "sign" if _is_sign(m) else "other", m)
    return _Op(name, "other", m)


def _trace_ops(model: nn.Module) -> list[_Op]:
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # data-dependent control flow and the like
        raise UnsupportedModelError(f"pack_model could not trace {type(model).__name__} with torch.fx: "
                                    f"{type(e).__name__}: {e}") from None
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise UnsupportedModelError(f"pack_model takes a model with one input, {type(model).__name__} has "
                                    f"{len(inputs)}")
    ops: list[_Op] = []
    prev = inputs[0]
    for node in nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            if node.args[0] is not prev:
                raise UnsupportedModelError("pack_model needs a chain of modules whose last one is the output")
            break
        target = getattr(node.target, "__name__", node.target)
        where = f"'{node.target}'" if node.op == "call_module" else f"{node.op} {target}"
        node_args = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
        if node_args != [prev] or node.args[0] is not prev or len(prev.users) != 1:
            raise UnsupportedModelError(f"pack_model supports a chain of modules (each feeding only the next); "
                                        f"{where} breaks the chain (a branch, residual or a computed shape)")
        if node.op == "call_module":
            ops.append(_classify(str(node.target), model.get_submodule(str(node.target))))
        elif _is_flatten(node):
            ops.append(_Op(str(node.name), "flatten", fn=lambda x: x.flatten(1)))
        else:
            raise UnsupportedModelError(f"pack_model cannot lower {where} (node '{node.name}'); supported are modules "
                                        "and x.flatten(1) / torch.flatten(x, 1)")
        prev = node
    return ops


def _is_flatten(node: fx.Node) -> bool:
    is_fn = node.op == "call_function" and node.target is torch.flatten
    is_method = node.op == "call_method" and node.target == "flatten"
    if not (is_fn or is_method):
        return False
    args = list(node.args[1:])
    start = node.kwargs.get("start_dim", args[0] if args else 0)
    end = node.kwargs.get("end_dim", args[1] if len(args) > 1 else -1)
    return start == 1 and end == -1


def _freeze(m: nn.Module) -> nn.Module:
    """A frozen eval-mode copy, so that later training of the source model does not change the packed one."""
    c = copy.deepcopy(m).eval()
    for p in c.parameters():
        p.requires_grad_(False)
    return c


def _bits_op(op: _Op, where: str) -> _Stage | None:
    """The bits-domain stage of a sign-preserving op (None: nothing to do on +-1 values)."""
    if op.kind == "act" or op.kind == "sign":
        return None
    if op.kind == "flatten":
        return _BitsFlatten(op.name)
    if op.kind == "pool":
        m = op.module
        assert isinstance(m, nn.MaxPool2d)
        k, s, p, d = (_square(v, op.name, a) for v, a in ((m.kernel_size, "kernel_size"), (m.stride, "stride"),
                                                            (m.padding, "padding"), (m.dilation, "dilation")))
        if d != 1 or m.ceil_mode or m.return_indices:
            raise UnsupportedModelError(f"'{op.name}': bit max-pooling supports dilation 1, ceil_mode=False and no "
                                        "return_indices")
        return _BitsMaxPool(op.name, k, s, p)
    raise UnsupportedModelError(f"'{op.name}' ({type(op.module).__name__ if op.module else 'function'}) {where}")


def _square(v: Any, name: str, attr: str) -> int:
    if isinstance(v, (tuple, list)):
        if len(set(v)) != 1:
            raise UnsupportedModelError(f"'{name}': the packed runtime needs a square {attr}, got {tuple(v)}")
        v = v[0]
    return int(v)


_BETWEEN = ("between a BatchNorm and the next binary layer only sign-preserving ops are allowed (Hardtanh with "
            "min_val < 0 <= max_val, Identity, Dropout, MaxPool2d, Flatten)")


def _split_sign_tail(ops: list[_Op]) -> tuple[list[_Op], _Op | None, list[_Op]]:
    """``ops`` = prefix + [BN] + post, post the longest tail of act/pool/flatten ops; returns (prefix, bn, post)."""
    i = len(ops)
    while i > 0 and ops[i - 1].kind in ("act", "pool", "flatten"):
        i -= 1
    post = ops[i:]
    if i > 0 and ops[i - 1].kind == "bn":
        return ops[:i - 1], ops[i - 1], post
    return ops[:i], None, post


def _check_relu(ops: list[_Op], layer: str) -> None:
    for op in ops:
        if isinstance(op.module, nn.ReLU):
            raise UnsupportedModelError(
                f"'{op.name}' is a ReLU before the sign of '{layer}': sign(relu(x)) is +1 for every x, so the binary "
                "layer would see a constant input; a BNN uses Hardtanh (or no activation) before the sign")


def _binary_weight(layer: nn.Module, name: str) -> Tensor:
    wq = getattr(layer, "weight_quantizer", None)
    if not _is_sign(wq) or isinstance(wq, StochasticSign):
        what = type(wq).__name__ if wq is not None else "no weight quantizer (float weights)"
        if isinstance(wq, SteSign) and wq.scaling or isinstance(wq, SwishSign):
            what += " with a scale (XNOR-Net alpha / BNN+): the float32 sum of +-alpha rounds differently from " \
                    "alpha * popcount, so it cannot be bit-exact"
        raise UnsupportedModelError(f"'{name}' has a binary (sign) input but {what}; the packed runtime needs "
                                    "unscaled sign weights (weight quantizer ste_sign)")
    with torch.no_grad():
        return torch.where(layer.weight.detach() < 0, -1.0, 1.0)


def _lower_binary(name: str, layer: nn.Module, c_prev: int, prev_layout: str) -> _BinaryLayer:
    w = _binary_weight(layer, name)
    if isinstance(layer, nn.Conv2d):
        if prev_layout != "nchw":
            raise UnsupportedModelError(f"'{name}': a Conv2d after a flattened activation")
        if layer.groups != 1 or _square(layer.dilation, name, "dilation") != 1:
            raise UnsupportedModelError(f"'{name}': binary convs need groups=1 and dilation 1")
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise UnsupportedModelError(f"'{name}': binary convs need numeric zero padding (padding_mode='zeros'), "
                                        f"got padding={layer.padding!r}, padding_mode={layer.padding_mode!r}")
        kh, kw = layer.kernel_size
        if layer.in_channels != c_prev:
            raise UnsupportedModelError(f"'{name}' takes {layer.in_channels} channels, the previous layer gives "
                                        f"{c_prev}")
        if layer.bias is not None:
            raise UnsupportedModelError(
                f"'{name}' is a binary conv with a bias: PyTorch's conv adds the bias in an order that rounds "
                "differently from acc + bias, so the packed model could not be bit-exact; train it with bias=False "
                "(the BatchNorm after it has its own shift)")
        words_ = pack_signs(w.permute(0, 2, 3, 1).numpy(), axis=-1)  # [O, KH, KW, Cw]
        return _BinaryLayer(name, "conv", words_, c_prev, _square(layer.stride, name, "stride"),
                            _square(layer.padding, name, "padding"), None, None)
    assert isinstance(layer, nn.Linear)
    if layer.in_features % c_prev:
        raise UnsupportedModelError(f"'{name}' takes {layer.in_features} features, not a multiple of the {c_prev} "
                                    "channels of its input")
    hw = layer.in_features // c_prev
    # torch flattens NCHW: feature index c * HW + pixel; the packed input is pixel-major, channels packed
    wp = w.view(layer.out_features, c_prev, hw).permute(0, 2, 1)  # [O, HW, C]
    words_ = pack_signs(wp.numpy(), axis=-1)[:, None]  # [O, 1, HW, Cw]
    bias = None if layer.bias is None else layer.bias.detach().to(torch.float32).clone()
    return _BinaryLayer(name, "linear", np.ascontiguousarray(words_), c_prev, 1, 0, None, bias, hw=hw)


def _attach_thresholds(stage: _BinaryLayer, bn: _Op | None, next_name: str) -> None:
    """Fuse sign(BN(acc + bias)) (or sign(acc + bias) without a BN) into ``stage`` as integer thresholds."""
    o = stage.out_channels
    k = stage.c_in * stage.w.shape[1] * stage.w.shape[2]
    if bn is not None:
        m = bn.module
        assert isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))
        if m.num_features != o:
            raise UnsupportedModelError(f"'{bn.name}' has {m.num_features} channels, '{stage.name}' gives {o}")
        th = bn_sign_thresholds(m, bias=stage.bias)
    else:
        th = _bias_sign_thresholds(stage.bias, o)
    t, flip = integer_thresholds(th, -k, k)
    w = stage.w.copy()
    f = flip.numpy()
    if f.any():  # acc <= t  <=>  -acc >= -t, and -acc is the dot product with the negated weight row
        w[f] = ~w[f]
        rem = stage.c_in % WORD_BITS
        if rem:
            w[f, ..., -1] &= np.uint64((1 << rem) - 1)  # keep the padding bits zero
    stage.w = np.ascontiguousarray(w)
    stage.wsum = tap_sums(stage.w, stage.c_in)
    stage.t = np.clip(np.where(f, -t.numpy(), t.numpy()), -k, k + 1).astype(np.int64)
    stage.bias = None


def _bias_sign_thresholds(bias: Tensor | None, c: int) -> Thresholds:
    """sign(acc + bias) with no batch norm, as :class:`Thresholds` with its float32 reference."""
    b = torch.zeros(c) if bias is None else bias

    def reference(acc: Tensor) -> Tensor:
        return torch.where(acc.to(torch.float32) + b < 0, -1.0, 1.0)

    return Thresholds(threshold=-b.double(), flip=torch.zeros(c, dtype=torch.bool),
                      constant=torch.zeros(c, dtype=torch.int8), reference=reference)


def _float_ops(ops: list[_Op]) -> list[tuple[str, Callable[[Tensor], Tensor]]]:
    out: list[tuple[str, Callable[[Tensor], Tensor]]] = []
    for op in ops:
        m = op.module
        if (isinstance(m, (QuantLinear, QuantConv2d)) and m.input_quantizer is None and _is_sign(m.weight_quantizer)
                and not isinstance(m.weight_quantizer, StochasticSign)):
            out.append((op.name, _SignWeightLayer(m)))
        elif m is not None:
            out.append((op.name, _freeze(m)))
        else:
            assert op.fn is not None
            out.append((op.name, op.fn))
    return out


def _is_binary_layer(op: _Op) -> bool:
    return op.kind == "layer" and _is_sign(getattr(op.module, "input_quantizer", None))


def pack_model(model: nn.Module) -> PackedModel:
    """Lower a trained lowbit BNN to the bit-packed XNOR-popcount runtime.

    The packed model computes ``model.eval()``'s function: the real-valued first layer in float32 (torch), every
    binary layer (sign input, sign weights) as an XNOR-popcount kernel with its batch norm + sign fused into one
    integer threshold per channel, max-pooling as an OR on bits, and the last binary layer's integer result plus
    whatever follows it (bias, BN on the logits) in float. See the module docstring for the rules.

    Args:
        model: a chain of modules, e.g. ``create_model("mlp_bnn", act="hardtanh")`` or ``create_model("vgg_small")``
            with ReLU replaced by Hardtanh, quantized by ``quantize_`` with ``ste_sign`` weights and inputs (the
            first layer's input float). Its running statistics are used, whatever its ``training`` flag; the
            parameters are copied, so the packed model does not follow later changes of ``model``.

    Returns:
        a :class:`PackedModel`; ``packed(x)`` equals ``model.eval()(x)``, ``packed.nbytes()`` gives its size.

    Raises:
        UnsupportedModelError: a module or a structure it cannot lower, named in the message.

    Example:
        >>> from lowbit.models import create_model
        >>> from lowbit.quant import QuantConfig, quantize_
        >>> net = create_model("mlp_bnn", width=96, depth=2, act="hardtanh")
        >>> _ = quantize_(net, QuantConfig(rules={"features.0": {"weight": "ste_sign"},
        ...                                      "*": {"weight": "ste_sign", "input": "ste_sign"}},
        ...                                keep_first_last=False))
        >>> packed = pack_model(net.eval())
        >>> x = torch.randn(5, 1, 28, 28)
        >>> torch.equal(packed(x), net(x))
        True

    References:
        Umuroglu et al., "FINN: A Framework for Fast, Scalable Binarized Neural Network Inference",
        arXiv:1612.07119.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"pack_model takes an nn.Module, got {type(model).__name__}")
    for pname, p in (*model.named_parameters(), *model.named_buffers()):
        if p.is_floating_point() and p.dtype != torch.float32:
            raise UnsupportedModelError(f"'{pname}' is {p.dtype}: the packed runtime reproduces float32 models")
    ops = _trace_ops(model)
    if not any(_is_binary_layer(op) for op in ops):
        raise UnsupportedModelError(f"{type(model).__name__} has no binary layer (a Conv2d/Linear whose input "
                                    "quantizer is a sign, e.g. ste_sign): there is nothing to pack")
    stages: list[_Stage] = []
    domain = "float"
    pending: list[_Op] = []  # ops since the last domain change
    last: _BinaryLayer | None = None
    bits_c, bits_layout = 0, "nchw"
    for op in ops:
        if op.kind in ("sign",) or _is_binary_layer(op):
            target = op.name
            if domain == "float":
                prefix, bn, post = _split_sign_tail(pending)
                if bn is None:  # sign of the float tensor itself: torch runs everything, the channels come at run time
                    _check_relu(prefix[-1:], target)
                    prefix, post = prefix + post, []
                if prefix:
                    stages.append(_FloatStage(prefix[0].name if len(prefix) == 1 else f"{prefix[0].name}..",
                                              _float_ops(prefix)))
                if bn is not None:
                    t, flip = float_thresholds(bn_sign_thresholds(bn.module))  # type: ignore[arg-type]
                    stages.append(_FloatToBits(bn.name, t, flip))
                    bits_c = bn.module.num_features  # type: ignore[union-attr]
                    bits_layout = "nchw" if isinstance(bn.module, nn.BatchNorm2d) else "nc"
                else:
                    stages.append(_FloatToBits(target + ".sign", None, None))
                    bits_c = 0  # taken from the binary layer's own size
                    bits_layout = "nc" if isinstance(op.module, nn.Linear) else "nchw"
                for p in post:
                    s = _bits_op(p, _BETWEEN)
                    if s is not None:
                        stages.append(s)
                        bits_layout = _next_layout(s, bits_layout)
            elif domain == "acc":
                assert last is not None
                bns = [i for i, p in enumerate(pending) if p.kind == "bn"]
                if bns and bns[0] > 0:
                    first = pending[0]
                    raise UnsupportedModelError(
                        f"'{first.name}' ({type(first.module).__name__ if first.module else 'function'}) comes between "
                        f"binary layer '{last.name}' and its BatchNorm '{pending[bns[0]].name}': the threshold needs "
                        "the BatchNorm right after the layer (e.g. max-pool after BN + activation, as VGG-Small does)")
                _check_relu(pending, target)
                bn = pending[0] if pending and pending[0].kind == "bn" else None
                post = pending[1:] if bn is not None else pending
                for p in post:
                    if p.kind == "bn":
                        raise UnsupportedModelError(f"'{p.name}': after binary layer '{last.name}' a BatchNorm must "
                                                    f"come first; {_BETWEEN}")
                _attach_thresholds(last, bn, target)
                bits_c, bits_layout = last.out_channels, "nchw" if last.kind == "conv" else "nc"
                for p in post:
                    s = _bits_op(p, f"after binary layer '{last.name}': " + _BETWEEN)
                    if s is not None:
                        stages.append(s)
                        bits_layout = _next_layout(s, bits_layout)
            else:  # bits: only sign-preserving ops can have come
                for p in pending:
                    s = _bits_op(p, "on packed bits: " + _BETWEEN)
                    if s is not None:
                        stages.append(s)
                        bits_layout = _next_layout(s, bits_layout)
            pending = []
            if op.kind == "sign":
                domain = "bits"
                continue
            if bits_c == 0:
                bits_c = _in_channels(op)
            last = _lower_binary(op.name, op.module, bits_c, bits_layout)  # type: ignore[arg-type]
            stages.append(last)
            domain = "acc"
            continue
        if domain == "bits" and op.kind not in ("act", "pool", "flatten"):
            # a float layer (or anything else) on +-1 values: unpack and continue in torch
            for p in pending:
                s = _bits_op(p, "on packed bits")
                if s is not None:
                    stages.append(s)
            stages.append(_BitsToFloat(op.name + ".unpack"))
            domain, pending = "float", []
        pending.append(op)
    if domain == "acc":
        tail = pending
    elif domain == "bits":
        for p in pending:
            s = _bits_op(p, "on packed bits")
            if s is not None:
                stages.append(s)
        tail = []
    else:
        tail = pending
    if tail:
        stages.append(_FloatStage(tail[0].name if len(tail) == 1 else f"{tail[0].name}..", _float_ops(tail)))
    return PackedModel(stages)


def _next_layout(stage: _Stage, layout: str) -> str:
    if isinstance(stage, _BitsFlatten) and layout == "nchw":
        return "flat"
    return layout


def _in_channels(op: _Op) -> int:
    """Channels of the sign point's input when no BN names them: the binary layer's own input size."""
    m = op.module
    if isinstance(m, nn.Conv2d):
        return m.in_channels
    if isinstance(m, nn.Linear):
        return m.in_features
    raise UnsupportedModelError(f"'{op.name}': cannot tell the channel count of this sign point; put it right before "
                                "a binary Conv2d / Linear or after a BatchNorm")
