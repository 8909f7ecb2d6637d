"""QONNX export: a lowbit BNN / low-bit model as QONNX, the quantized ONNX dialect that FINN compiles to FPGAs.

    from lowbit.export import export
    export(model, "bnn.onnx", format="qonnx", example=torch.randn(1, 1, 28, 28))

The model is traced with ``torch.fx`` (its quantized layers, batch norms, activations and pools as leaves) and
written node by node, in eval mode, with the example's fixed shape:

    QuantLinear / QuantConv2d     MatMul (weight stored transposed, in x out) / Conv, + Add for a Linear bias;
                                  the weight is a float initializer followed by its quantizer:
        binary weights            BipolarQuant(W, scale): scale 1 (BNN), or XNOR-Net's / BNN+'s / DoReFa-1's alpha
        dorefa_weight (k > 1)     Quant(tanh(W) / (2 max|tanh W|) + 1/2; scale 1/(2^k - 1), k bits unsigned),
                                  then Mul 2, Add -1 (the levels 2i/(2^k - 1) - 1)
        twn                       Quant(ternary codes in {-1, 0, 1}; scale alpha, 2 bits signed narrow)
        affine / int8_weight      Quant(W; its scale, zero point, bits, signed, narrow)
    input quantizers, QuantAct    binary (unscaled): BipolarQuant(x, 1); dorefa_act: Quant(x; 1/(2^k - 1), k bits
                                  unsigned); affine / uint8_act / int8_act: Quant(x; S, Z, bits, signed, narrow)
    BatchNorm1d/2d                BatchNormalization, or, lowered (below), nothing
    Hardtanh, ReLU, ReLU6         Clip, Relu, Clip; Identity and Dropout vanish
    MaxPool2d, Flatten, flatten,  MaxPool, Flatten, Reshape (static shape)
    view, reshape

Threshold lowering (FINN's streamlining; Yonekawa & Nakahara's BN-free form): where a layer feeds a batch norm,
optionally a sign-preserving activation (hardtanh with ``min < 0 <= max``, identity, dropout), then only max
pools and reshapes, and every consumer binarizes that tensor with an unscaled sign, ``sign(BN(acc + bias))``
becomes one ``MultiThreshold`` node per layer with one threshold per channel, ``out_dtype="BIPOLAR"``,
``out_scale=2``, ``out_bias=-1`` (output ``2 * [acc >= t] - 1``, the form FINN's ``ConvertBipolarMatMulToXnorPopcount``
expects), and the consumers' sign quantizers are left out (their input is already +-1; a max pool of +-1 values
commutes with the sign). Channels with a negative BN scale compare ``acc <= t``: the exporter multiplies them by -1
(a ``Mul`` with a +-1 per-channel vector before the MultiThreshold, which FINN absorbs into the binary weights)
and negates their thresholds. Thresholds come from :mod:`lowbit.graph.thresholds`: integers checked against
PyTorch's own float32 BN + sign when the accumulator is an integer (binary weights of scale 1 on a +-1 input),
else the exact float32 step of the same function. Where the pattern does not hold (a ReLU before the sign, a
pool before the BN, a consumer without a sign) the batch norm stays and the consumer gets a ``BipolarQuant``.

Exactness: the binary part is bit-exact (integer accumulators, thresholds verified on every integer); real-valued
parts (the first layer on a float image, k-bit and int8 layers, an unlowered BN) agree to float32 rounding, the
summation order of MatMul/Conv and of the Quant op's division by a float scale being the only differences. Every
weight's QONNX form is checked against the lowbit quantizer's output at export time.

Unsupported layers, functions or quantizers (recurrent layers, residual additions, TTQ, LQ-Nets, ...) raise a
``ValueError`` naming the module and the operation. Custom ops use the domain ``qonnx.custom_op.general``.

References:
    Pappalardo et al., "QONNX: Representing Arbitrary-Precision Quantized Neural Networks", arXiv:2206.07527.
    Umuroglu et al., "FINN: A Framework for Fast, Scalable Binarized Neural Network Inference",
    arXiv:1612.07119 (thresholds, bipolar MultiThreshold).
    Umuroglu & Jahre, "Streamlined Deployment for Quantized Neural Networks", arXiv:1709.04060.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from lowbit.export import register_exporter, save_onnx
from lowbit.graph.thresholds import bn_sign_thresholds, float_thresholds, integer_thresholds
from lowbit.nn.layers import QuantAct
from lowbit.quant.affine import AffineQuantizer
from lowbit.quant.base import Quantizer
from lowbit.quant.binary import SteSign, StochasticSign, SwishSign
from lowbit.quant.dorefa import DorefaAct, DorefaGrad, DorefaWeight
from lowbit.quant.ternary import TWN

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the qonnx exporter needs the onnx package: pip install 'lowbit[qonnx]'") from e

__all__ = ["QONNX_DOMAIN", "export_qonnx"]

QONNX_DOMAIN = "qonnx.custom_op.general"
OPSET = 13
INPUT_NAME, OUTPUT_NAME = "global_in", "global_out"

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_PASS = (nn.Identity, nn.Dropout)
_SUPPORTED_MODULES = (nn.Conv2d, nn.Linear, nn.ReLU, nn.Hardtanh, nn.MaxPool2d, nn.Flatten, QuantAct, Quantizer,
                      *_BN, *_PASS)
_SUPPORTED_WEIGHT = "none, ste_sign, stochastic_sign, swish_sign, dorefa_weight, twn, affine/int8_weight"
_SUPPORTED_ACT = "none, ste_sign, stochastic_sign, swish_sign(scaled=False), dorefa_act, dorefa_grad, affine/*_act"


class _Tracer(fx.Tracer):
    """Leaves: layers, quantizers and every torch.nn module but the containers (traced through)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        if isinstance(m, (nn.Conv2d, nn.Linear, Quantizer, QuantAct)):
            return True
        return super().is_leaf_module(m, qualname)


class _Graph:
    """The ONNX graph being written: nodes, initializers and the shape of every tensor."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple[int, ...]] = {}  # float tensors
        self.int_shapes: dict[str, tuple[int, ...]] = {}  # int64 initializers
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        clean = "".join(c if c.isalnum() or c in "_." else "_" for c in hint) or "t"
        return f"{clean}_{self._count}"

    def const(self, hint: str, value: Any) -> str:
        arr = np.asarray(value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value,
                         dtype=np.float32)
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(arr.copy(order="C"), name))  # keeps 0-d
        self.shapes[name] = tuple(arr.shape)
        return name

    def int_const(self, hint: str, values: tuple[int, ...]) -> str:
        """An int64 vector (a Reshape's target shape); it needs no ValueInfo of type float."""
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
        self.int_shapes[name] = (len(values),)
        return name

    def add(self, op: str, inputs: list[str], hint: str, shape: tuple[int, ...], domain: str = "",
            **attrs: Any) -> str:
        out = self.name(hint)
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), domain=domain or None, **attrs))
        self.shapes[out] = tuple(shape)
        return out


# ----------------------------------------------------------------------------------------------------------------
# quantizers


def _is_sign(q: Any) -> bool:
    """An unscaled binary quantizer: the output is sign(x) in {-1, +1} (sign(0) = +1)."""
    if isinstance(q, SteSign):
        return q.scaling is None
    if isinstance(q, SwishSign):
        return not q.scaled
    return isinstance(q, StochasticSign)


def _qname(q: Any) -> str:
    return type(q).__name__


def _check_same(ref: torch.Tensor, mine: torch.Tensor, where: str, exact: bool) -> None:
    """The QONNX form of a weight quantizer must give lowbit's quantized weight (exactly, or to float rounding)."""
    ok = torch.equal(ref, mine) if exact else torch.allclose(ref, mine, rtol=1e-5, atol=1e-6)
    if not ok:
        diff = float((ref - mine).abs().max())
        raise RuntimeError(f"layer {where!r}: the QONNX form of the weight quantizer does not reproduce lowbit's "
                           f"quantized weight (max difference {diff:g}); please report this")


def _weight(g: _Graph, layer: nn.Module, where: str, linear: bool) -> tuple[str, bool]:
    """The layer's (quantized) weight as ONNX tensors; returns (name, is_unit_binary: +-1 with scale 1)."""
    w = layer.weight.detach().float()
    q = getattr(layer, "weight_quantizer", None)
    layout: Callable[[torch.Tensor], torch.Tensor] = (lambda t: t.t()) if linear else (lambda t: t)
    chan = (1, -1) if linear else (-1,) + (1,) * (w.dim() - 1)  # a per-output-channel vector in the ONNX layout
    shape = tuple(layout(w).shape)
    if q is None:
        return g.const(f"{where}.weight", layout(w)), False
    ref = q(w).detach()  # also refreshes data-dependent scales (XNOR-Net's alpha, DoReFa's E, TWN's alpha)

    def scale_of(s: torch.Tensor | None) -> torch.Tensor:
        s = torch.ones(()) if s is None else s.detach().float()
        return s if s.dim() == 0 else s.reshape(chan)

    binary_scale: torch.Tensor | None = None
    if _is_sign(q):
        binary_scale = torch.ones(())
    elif isinstance(q, (SteSign, SwishSign)) or (isinstance(q, DorefaWeight) and q.bit_width == 1):
        binary_scale = scale_of(q.scale)
    if binary_scale is not None:
        s = binary_scale if binary_scale.dim() == 0 else binary_scale.reshape(
            (-1,) + (1,) * (w.dim() - 1))  # torch layout for the check
        _check_same(ref, torch.where(w >= 0, 1.0, -1.0) * s, where, exact=True)
        name = g.add("BipolarQuant", [g.const(f"{where}.weight", layout(w)), g.const(f"{where}.w_scale",
                     binary_scale)], f"{where}.weight_q", shape, domain=QONNX_DOMAIN)
        return name, bool(binary_scale.dim() == 0 and float(binary_scale) == 1.0)
    if isinstance(q, DorefaWeight):
        k, n = q.bit_width, 2**q.bit_width - 1
        t = torch.tanh(w)
        v = t / (2 * t.abs().max().clamp_min(torch.finfo(t.dtype).tiny)) + 0.5
        step = torch.tensor(1.0 / n)
        _check_same(ref, 2 * (torch.clamp(v / step, 0, n).round() * step) - 1, where, exact=False)
        qv = _quant(g, g.const(f"{where}.weight_v", layout(v)), g.const(f"{where}.w_scale", step), 0.0, k,
                    signed=False, narrow=False, hint=f"{where}.weight_q", shape=shape)
        doubled = g.add("Mul", [qv, g.const("two", 2.0)], f"{where}.weight_x2", shape)
        return g.add("Add", [doubled, g.const("minus_one", -1.0)], f"{where}.weight_levels", shape), False
    if isinstance(q, TWN):
        alpha = scale_of(q.scale)
        a = alpha if alpha.dim() == 0 else alpha.reshape((-1,) + (1,) * (w.dim() - 1))
        codes = (ref / a).round()
        _check_same(ref, codes * a, where, exact=True)
        return _quant(g, g.const(f"{where}.weight_codes", layout(codes)), g.const(f"{where}.w_scale", alpha), 0.0,
                      2, signed=True, narrow=True, hint=f"{where}.weight_q", shape=shape), False
    if isinstance(q, AffineQuantizer):
        if q.axis not in (None, 0):
            raise ValueError(f"layer {where!r}: a per-channel weight quantizer along axis {q.axis}; only per tensor "
                             "or per output channel (axis 0) has a QONNX form here")
        s, z = q.scale.detach().float(), q.zero_point.detach().float()
        st = s if s.dim() == 0 else s.reshape((-1,) + (1,) * (w.dim() - 1))
        zt = z if z.dim() == 0 else z.reshape((-1,) + (1,) * (w.dim() - 1))
        _check_same(ref, (torch.clamp(w / st + zt, q.qmin, q.qmax).round() - zt) * st, where, exact=False)
        return _quant(g, g.const(f"{where}.weight", layout(w)), g.const(f"{where}.w_scale", scale_of(s)),
                      scale_of(z), q.bits, signed=q.signed, narrow=q.narrow_range, hint=f"{where}.weight_q",
                      shape=shape), False
    raise ValueError(f"layer {where!r}: weight quantizer {_qname(q)} has no QONNX form in lowbit's exporter "
                     f"(supported: {_SUPPORTED_WEIGHT})")


def _quant(g: _Graph, x: str, scale: str, zero_point: Any, bits: int, signed: bool, narrow: bool, hint: str,
           shape: tuple[int, ...]) -> str:
    zp = g.const("zero_point", zero_point)
    bw = g.const("bitwidth", float(bits))
    return g.add("Quant", [x, scale, zp, bw], hint, shape, domain=QONNX_DOMAIN, signed=int(signed),
                 narrow=int(narrow), rounding_mode="ROUND")


def _act(g: _Graph, q: Any, x: str, shape: tuple[int, ...], where: str) -> tuple[str, bool]:
    """An activation quantizer on tensor ``x``; returns (name, output is +-1)."""
    if q is None or isinstance(q, DorefaGrad):  # DorefaGrad is the identity forward (it quantizes gradients)
        return x, False
    if _is_sign(q):
        one = g.const("one", 1.0)
        return g.add("BipolarQuant", [x, one], f"{where}.act_q", shape, domain=QONNX_DOMAIN), True
    if isinstance(q, DorefaAct):
        n = 2**q.bit_width - 1
        return _quant(g, x, g.const(f"{where}.a_scale", 1.0 / n), 0.0, q.bit_width, signed=False, narrow=False,
                      hint=f"{where}.act_q", shape=shape), False
    if isinstance(q, AffineQuantizer):
        if q.axis not in (None, 1):
            raise ValueError(f"layer {where!r}: an activation quantizer per channel along axis {q.axis}; only per "
                             "tensor or along the channel axis 1 has a QONNX form here")
        s, z = q.scale.detach().float(), q.zero_point.detach().float()
        chan = (1, -1) + (1,) * (len(shape) - 2)
        s, z = (s, z) if s.dim() == 0 else (s.reshape(chan), z.reshape(chan))
        return _quant(g, x, g.const(f"{where}.a_scale", s), z, q.bits, signed=q.signed, narrow=q.narrow_range,
                      hint=f"{where}.act_q", shape=shape), False
    if isinstance(q, (SteSign, SwishSign)):
        raise ValueError(f"layer {where!r}: activation quantizer {_qname(q)} scales by a factor computed from the data "
                         "(or learned per channel), which has no fixed QONNX form; use an unscaled sign")
    raise ValueError(f"layer {where!r}: activation quantizer {_qname(q)} has no QONNX form in lowbit's exporter "
                     f"(supported: {_SUPPORTED_ACT})")


# ----------------------------------------------------------------------------------------------------------------
# the threshold plan


def _module(gm: fx.GraphModule, n: fx.Node) -> nn.Module | None:
    return gm.get_submodule(n.target) if n.op == "call_module" else None  # type: ignore[arg-type]


def _is_method(n: fx.Node, *names: str) -> bool:
    return (n.op == "call_method" and n.target in names) or (
        n.op == "call_function" and getattr(n.target, "__name__", None) in names
        and getattr(n.target, "__module__", "") in ("torch", "torch._C._VariableFunctions", None))


def _sign_preserving(m: nn.Module | None) -> bool:
    """sign(m(y)) == sign(y) for every y (sign(0) = +1)."""
    if isinstance(m, _PASS):
        return True
    return isinstance(m, nn.Hardtanh) and m.min_val < 0 <= m.max_val  # nn.ReLU6 has min_val 0: excluded


def _commutes_with_sign(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Ops through which a +-1 tensor may flow before the consumers' sign: pools, reshapes, identities."""
    m = _module(gm, n)
    if isinstance(m, (nn.MaxPool2d, nn.Flatten) + _PASS):
        return True
    return _is_method(n, "flatten", "view", "reshape", "contiguous")


def _binarizes(gm: fx.GraphModule, n: fx.Node) -> bool:
    m = _module(gm, n)
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        return _is_sign(getattr(m, "input_quantizer", None))
    if isinstance(m, QuantAct):
        return _is_sign(m.quantizer)
    return _is_sign(m)


def _plan(gm: fx.GraphModule) -> dict[fx.Node, tuple[fx.Node, list[fx.Node]]]:
    """Layers whose BN + sign becomes a MultiThreshold: layer node -> (its BN node, the nodes it replaces)."""
    plan: dict[fx.Node, tuple[fx.Node, list[fx.Node]]] = {}
    for n in gm.graph.nodes:
        if not isinstance(_module(gm, n), (nn.Conv2d, nn.Linear)) or len(n.users) != 1:
            continue
        bn_node = next(iter(n.users))
        bn = _module(gm, bn_node)
        if not isinstance(bn, _BN) or bn.running_mean is None:
            continue
        dropped, cur = [bn_node], bn_node
        while len(cur.users) == 1 and _sign_preserving(_module(gm, next(iter(cur.users)))):
            cur = next(iter(cur.users))
            dropped.append(cur)
        frontier, ok, seen = list(cur.users), bool(cur.users), set()
        while ok and frontier:
            u = frontier.pop()
            if u in seen:
                continue
            seen.add(u)
            if u.op == "output":
                ok = False
            elif _is_method(u, "size"):
                continue
            elif _commutes_with_sign(gm, u) and u.args and u.args[0] in (cur, *seen):
                frontier.extend(u.users)
                ok = bool(u.users)
            elif not _binarizes(gm, u):
                ok = False
        if ok:
            plan[n] = (bn_node, dropped)
    return plan


# ----------------------------------------------------------------------------------------------------------------
# the export


def _where(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack")
    if n.op == "call_module":
        return str(n.target)
    if stack:
        path, kind = list(stack.values())[-1]
        return f"{path} ({getattr(kind, '__name__', kind)})"
    return "the model's forward"


def _shape(n: fx.Node) -> tuple[int, ...]:
    meta = n.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise ValueError(f"{_where(n)}: {n.op} {n.target} does not produce one tensor; the qonnx exporter needs a "
                         "chain of tensors")
    return tuple(meta.shape)


def _conv_pads(m: nn.Conv2d) -> list[int]:
    if m.padding_mode != "zeros":
        raise ValueError(f"Conv2d with padding_mode={m.padding_mode!r}: only zero padding has an ONNX Conv form")
    if isinstance(m.padding, str):  # 'valid' / 'same' (torch puts the odd extra pixel at the end)
        if m.padding == "valid":
            return [0, 0, 0, 0]
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size, strict=True)]
        return [total[0] // 2, total[1] // 2, total[0] - total[0] // 2, total[1] - total[1] // 2]
    ph, pw = m.padding
    return [ph, pw, ph, pw]


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


class _Exporter:
    def __init__(self, gm: fx.GraphModule, lower: bool) -> None:
        self.gm, self.g = gm, _Graph()
        self.plan = _plan(gm) if lower else {}
        self.replaced = {d: layer for layer, (_, dropped) in self.plan.items() for d in dropped}
        self.env: dict[fx.Node, str] = {}
        self.bipolar: dict[fx.Node, bool] = {}

    def run(self) -> tuple[str, tuple[int, ...], str, tuple[int, ...]]:
        inputs = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise ValueError(f"the model's forward takes {len(inputs)} tensors; the qonnx exporter handles one input")
        out_name, out_shape = "", ()
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                self.env[n], self.bipolar[n] = INPUT_NAME, False
                self.g.shapes[INPUT_NAME] = _shape(n)
            elif n.op == "output":
                arg = n.args[0]
                if not isinstance(arg, fx.Node) or arg not in self.env:
                    raise ValueError("the model must return one tensor (not a tuple, dict or constant)")
                out_name, out_shape = self.env[arg], _shape(arg)
            elif n in self.replaced:  # BN / act replaced by the layer's MultiThreshold
                self.env[n], self.bipolar[n] = self.env[n.args[0]], True
            elif n.op == "call_module":
                self._module(n, self.gm.get_submodule(n.target))
            elif n.op in ("call_function", "call_method"):
                self._function(n)
            else:  # get_attr: a parameter or buffer used directly in forward
                raise ValueError(f"{_where(n)}: the forward reads the tensor {n.target!r} directly ({n.op}); the "
                                 "qonnx exporter handles modules and reshapes only")
        return INPUT_NAME, self.g.shapes[INPUT_NAME], out_name, out_shape

    def _in(self, n: fx.Node) -> tuple[str, bool, tuple[int, ...]]:
        src = n.args[0] if n.args else None
        if not isinstance(src, fx.Node) or src not in self.env:
            raise ValueError(f"{_where(n)}: its input is not a tensor the exporter produced")
        return self.env[src], self.bipolar[src], _shape(src)

    def _set(self, n: fx.Node, name: str, bipolar: bool = False) -> None:
        self.env[n], self.bipolar[n] = name, bipolar

    def _module(self, n: fx.Node, m: nn.Module) -> None:
        where = str(n.target)
        if not isinstance(m, _SUPPORTED_MODULES):
            raise ValueError(f"unsupported module {where!r} ({type(m).__name__}): the qonnx exporter handles "
                             "Conv2d/Linear (quantized or not), BatchNorm1d/2d, ReLU, Hardtanh, MaxPool2d, Flatten, "
                             "Identity, Dropout, QuantAct and quantizers")
        if len(n.args) != 1 or n.kwargs:
            raise ValueError(f"{where} ({type(m).__name__}) is called with {len(n.args)} arguments; one tensor only")
        x, bip, in_shape = self._in(n)
        shape = _shape(n)
        g = self.g
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            self._layer(n, m, x, bip)
        elif isinstance(m, _BN):
            if m.running_mean is None or m.running_var is None:
                raise ValueError(f"{where} (BatchNorm) has no running statistics; eval mode needs them")
            c = m.num_features
            w = m.weight.detach() if m.weight is not None else torch.ones(c)
            b = m.bias.detach() if m.bias is not None else torch.zeros(c)
            inputs = [x, g.const(f"{where}.scale", w), g.const(f"{where}.bias", b),
                      g.const(f"{where}.mean", m.running_mean), g.const(f"{where}.var", m.running_var)]
            self._set(n, g.add("BatchNormalization", inputs, where, shape, epsilon=float(m.eps)))
        elif isinstance(m, nn.ReLU):
            self._set(n, g.add("Relu", [x], where, shape))
        elif isinstance(m, nn.Hardtanh):  # also ReLU6
            clip = [x, g.const("min", float(m.min_val)), g.const("max", float(m.max_val))]
            self._set(n, g.add("Clip", clip, where, shape))
        elif isinstance(m, _PASS):
            self._set(n, x, bip)
        elif isinstance(m, nn.MaxPool2d):
            if m.return_indices:
                raise ValueError(f"{where} (MaxPool2d) returns indices; not exportable")
            pads = _pair(m.padding)
            self._set(n, g.add("MaxPool", [x], where, shape, kernel_shape=_pair(m.kernel_size),
                               strides=_pair(m.stride), pads=pads + pads, dilations=_pair(m.dilation),
                               ceil_mode=int(m.ceil_mode)), bip)
        elif isinstance(m, nn.Flatten):
            self._reshape(n, x, bip, in_shape, m.start_dim, m.end_dim)
        elif isinstance(m, QuantAct):
            self._set(n, *_act(g, m.quantizer, x, shape, where))
        else:  # a Quantizer called as a module
            self._set(n, *_act(g, m, x, shape, where))

    def _reshape(self, n: fx.Node, x: str, bip: bool, in_shape: tuple[int, ...], start: int, end: int) -> None:
        shape = _shape(n)
        rank = len(in_shape)
        if start % rank == 1 and end % rank == rank - 1:
            self._set(n, self.g.add("Flatten", [x], "flatten", shape, axis=1), bip)
        else:
            target = self.g.int_const("shape", shape)
            self._set(n, self.g.add("Reshape", [x, target], "reshape", shape), bip)

    def _function(self, n: fx.Node) -> None:
        if _is_method(n, "size"):
            return  # only feeds view/reshape, whose static shape comes from the trace
        if _is_method(n, "contiguous"):
            x, bip, _ = self._in(n)
            self._set(n, x, bip)
            return
        if _is_method(n, "flatten"):
            x, bip, in_shape = self._in(n)
            start = n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0)
            end = n.args[2] if len(n.args) > 2 else n.kwargs.get("end_dim", -1)
            self._reshape(n, x, bip, in_shape, int(start), int(end))  # type: ignore[arg-type]
            return
        if _is_method(n, "view", "reshape"):
            x, bip, in_shape = self._in(n)
            self._reshape(n, x, bip, in_shape, 0, 0)  # a static Reshape to the traced shape
            return
        if n.target in (torch.relu, F.relu) or (n.op == "call_method" and n.target == "relu"):
            x, _, _ = self._in(n)
            self._set(n, self.g.add("Relu", [x], "relu", _shape(n)))
            return
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__qualname__", str(n.target))
        raise ValueError(f"unsupported operation {name!r} ({n.op}) in {_where(n)}: the qonnx exporter handles "
                         "modules and flatten/view/reshape (no residual additions, concatenations or other math)")

    def _layer(self, n: fx.Node, m: nn.Conv2d | nn.Linear, x: str, bip: bool) -> None:
        where, g = str(n.target), self.g
        in_shape, shape = _shape(n.args[0]), _shape(n)  # type: ignore[arg-type]
        iq = getattr(m, "input_quantizer", None)
        if iq is not None and not (_is_sign(iq) and bip):  # a +-1 input needs no sign
            x, bip = _act(g, iq, x, in_shape, where)
        linear = isinstance(m, nn.Linear)
        w, unit_binary = _weight(g, m, where, linear)
        lowered = n in self.plan
        bias = None if m.bias is None or lowered else g.const(f"{where}.bias", m.bias)
        if linear:
            y = g.add("MatMul", [x, w], where, shape)
            if bias is not None:
                y = g.add("Add", [y, bias], f"{where}.add_bias", shape)
        else:
            assert isinstance(m, nn.Conv2d)
            y = g.add("Conv", [x, w] + ([bias] if bias else []), where, shape, kernel_shape=list(m.kernel_size),
                      strides=list(m.stride), pads=_conv_pads(m), dilations=list(m.dilation), group=m.groups)
        if not lowered:
            self._set(n, y)
            return
        bn = self.gm.get_submodule(self.plan[n][0].target)  # type: ignore[arg-type]
        th = bn_sign_thresholds(bn, bias=None if m.bias is None else m.bias.detach())
        if unit_binary and bip:  # +-1 weights on a +-1 input: an integer accumulator in [-K, K]
            k = m.in_features if linear else (m.in_channels // m.groups) * math.prod(m.kernel_size)
            t, flip = integer_thresholds(th, -k, k)
            t = t.double()
        else:
            t, flip = float_thresholds(th)
            t = t.double()
        c = t.numel()
        chan = (1, c) + (1,) * (len(shape) - 2)
        if bool(flip.any()):  # acc <= t  <=>  -acc >= -t
            y = g.add("Mul", [y, g.const(f"{where}.sign_flip", torch.where(flip, -1.0, 1.0).reshape(chan))],
                      f"{where}.flipped", shape)
            t = torch.where(flip, -t, t)
        mt = g.add("MultiThreshold", [y, g.const(f"{where}.thresholds", t.float().reshape(c, 1))],
                   f"{where}.sign", shape, domain=QONNX_DOMAIN, out_dtype="BIPOLAR", out_scale=2.0, out_bias=-1.0)
        self._set(n, mt, True)


def _trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # torch.fx raises many kinds (TraceError, TypeError, ...)
        raise ValueError(f"torch.fx could not trace {type(model).__name__}: {e}; the qonnx exporter needs a forward "
                         "without data-dependent control flow") from e
    gm = fx.GraphModule(model, graph)
    ShapeProp(gm).propagate(example)
    return gm


@register_exporter("qonnx")
def export_qonnx(
    model: nn.Module, path: str | os.PathLike[str], example: torch.Tensor, lower_thresholds: bool = True
) -> Path:
    """Write ``model`` (in eval mode) as a QONNX file that FINN and ``qonnx``'s executor read.

    See the module docstring for the node mapping. The graph has the example's fixed shape (batch included),
    input ``global_in`` and the output of the last node; the model's training flags are restored afterwards and
    its parameters are not changed. The file is written to a temporary name and renamed.

    Args:
        model: a lowbit model (quantized layers, batch norms, activations, pools, flatten).
        path: the ``.onnx`` file to write.
        example: an input tensor (its shape is the graph's input shape).
        lower_thresholds: replace BN + sign by ``MultiThreshold`` where possible (default); False keeps
            ``BatchNormalization`` and a ``BipolarQuant`` on every binarized activation.

    Returns:
        The path written.

    Raises:
        ValueError: a module, function or quantizer without a QONNX form (named in the message), a model that
            ``torch.fx`` cannot trace, a bad example.

    Example:
        >>> from lowbit.export import export
        >>> export(model, "bnn.onnx", format="qonnx", example=torch.zeros(1, 1, 28, 28))  # doctest: +SKIP

    References:
        Pappalardo et al., "QONNX: Representing Arbitrary-Precision Quantized Neural Networks", arXiv:2206.07527.
        Umuroglu et al., "FINN: A Framework for Fast, Scalable Binarized Neural Network Inference",
        arXiv:1612.07119.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example, torch.Tensor) or not example.is_floating_point() or example.dim() < 1:
        raise ValueError("example must be a float tensor with a batch dimension (e.g. torch.zeros(1, 3, 32, 32))")
    path = Path(path)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            example = example.detach().float().cpu()
            gm = _trace(model, example)
            exporter = _Exporter(gm, lower_thresholds)
            in_name, in_shape, out_name, out_shape = exporter.run()
    finally:
        for m, training in modes.items():
            m.training = training
    g = exporter.g
    value_info = [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))
                  for name, shape in g.shapes.items() if name not in (in_name, out_name)]
    value_info += [helper.make_tensor_value_info(name, TensorProto.INT64, list(shape))
                   for name, shape in g.int_shapes.items()]
    graph = helper.make_graph(
        g.nodes, f"lowbit_{type(model).__name__}",
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, list(out_shape))],
        initializer=g.initializers, value_info=value_info,
    )
    proto = helper.make_model(graph, producer_name="lowbit", opset_imports=[
        helper.make_opsetid("", OPSET), helper.make_opsetid(QONNX_DOMAIN, 1)])
    proto.ir_version = 8  # readable by the onnx/onnxruntime versions FINN pins
    return save_onnx(proto, path)
