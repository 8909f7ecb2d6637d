"""Lowering a prepared (calibrated or quantization-aware trained) model to integer operations.

    int_model = convert(prepared)        # a torch.fx GraphModule of lowbit.graph.qops operations
    int_model(x)                         # float in, float out; integers in between ("integer mode")
    print(format_graph(int_model))       # the lowered graph, one line per node

``convert`` walks the prepared graph in order and replaces

- each activation quantization point on a float tensor by ``Quantize`` (float -> uint8/int8);
- each fused conv/linear (batch norm folded with running statistics, weights quantized per channel to int8,
  bias to int32 with scale ``S_in S_w``) together with the quantization point after it by ``QConv2d`` /
  ``QLinear``, its ReLU/ReLU6 becoming the output clamp;
- each addition (with its ReLU) and the quantization point after it by ``QAdd``, each global average pool
  by ``QGlobalAvgPool``;
- max pooling, padding, a lone ReLU by their integer forms, and shape operations (flatten, view, slicing)
  by themselves, on integers;
- a quantization point on an already quantized tensor by ``Dequantize -> Quantize``,

and puts ``Dequantize`` before each output. :func:`remove_identity_pairs` then removes every
``Dequantize -> Quantize`` pair of equal parameters and turns the others into one integer ``Requantize``.

Every integer parameter is checked while lowering: a bias that does not fit int32, or a layer whose
int32 accumulator could overflow, is a ``LoweringError`` naming the layer, never a silent wrap-around.

References:
    Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
    Inference", arXiv:1712.05877 (Section 2).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from lowbit.graph.prepare import (
    ACT_QUANT,
    LoweringError,
    _act_kind,
    _describe,
    _is_add,
    _is_global_pool,
    _is_transparent,
    is_int8_prepared,
    module_path,
)
from lowbit.graph.qops import (
    QOPS,
    Dequantize,
    QAdd,
    QClamp,
    QConv2d,
    QGlobalAvgPool,
    QLinear,
    QMaxPool2d,
    QPad,
    QParams,
    Quantize,
    Requantize,
)
from lowbit.nn.fused import ConvBnAct2d, LinearAct
from lowbit.nn.layers import QuantAct
from lowbit.quant.affine import INT32_MAX, AffineQuantizer

__all__ = ["convert", "remove_identity_pairs", "format_graph", "is_lowered", "input_qparams", "output_qparams"]


@dataclass
class _Value:
    node: fx.Node
    qp: QParams | None  # None: a float tensor, or not a tensor (a size)


class _Builder:
    def __init__(self) -> None:
        self.graph = fx.Graph()
        self.modules: dict[str, nn.Module] = {}

    def module(self, name: str, module: nn.Module, *args: Any) -> fx.Node:
        base, i = name, 1
        while name in self.modules:
            i += 1
            name = f"{base}_{i}"
        self.modules[name] = module
        return self.graph.call_module(name, tuple(args))


def _qparams(q: nn.Module, where: str) -> QParams:
    quant = q.quantizer if isinstance(q, QuantAct) else q
    if not isinstance(quant, AffineQuantizer):
        raise LoweringError(f"quantization point {where}: expected an affine quantizer, got {type(quant).__name__}")
    if quant.axis is not None:
        raise LoweringError(f"quantization point {where}: activations are quantized per tensor, not per channel")
    if not quant.initialized:
        raise LoweringError(f"quantization point {where} has never seen data: run calibrate() (or train) before "
                            "convert()")
    return QParams(float(quant.scale), int(quant.zero_point), quant.qmin, quant.qmax)


def _clamp(act: str | None, out: QParams) -> tuple[int, int]:
    if act is None:
        return out.qmin, out.qmax
    lo = max(out.qmin, out.zero_point)
    hi = out.qmax if act == "relu" else min(out.qmax, out.zero_point + round(6.0 / out.scale))
    return lo, hi


def _weighted(module: ConvBnAct2d | LinearAct, name: str, inp: QParams, out: QParams, rounding: str) -> nn.Module:
    """QConv2d / QLinear from a fused layer: folded float weights -> int8 per channel, bias -> int32."""
    with torch.no_grad():
        w, b = module.folded()
        w, b = w.detach().float().cpu(), b.detach().double().cpu()
        wq = module.weight_quantizer
        if not isinstance(wq, AffineQuantizer) or not wq.symmetric or wq.zero_point.abs().max() != 0 \
                or wq.qmin < -128 or wq.qmax > 127:
            raise LoweringError(f"{name}: the integer kernels take symmetric int8 weights (zero point 0); this "
                                f"layer's weight quantizer is {wq!r}")
        wq = copy.deepcopy(wq).cpu()  # the prepared model keeps its own quantizer state
        wq.observer.reset()
        wq.observe_tensor(w)
        w_scale = wq.scale.float().expand(w.shape[0]).contiguous()
        w_int = wq.quantize(w, dtype=torch.int8)
        bias = torch.round(b / (inp.scale * w_scale.double()))
    if bias.abs().max() > INT32_MAX:
        c = int(bias.abs().argmax())
        raise LoweringError(
            f"{name}: the bias of channel {c} ({float(b[c]):.4g}) does not fit int32 at scale S_in S_w = "
            f"{inp.scale * float(w_scale[c]):.3g}: the input's quantization range is degenerate (calibrate on "
            "representative data)")
    k = w_int[0].numel()  # products summed per output value
    worst = k * (inp.qmax - inp.qmin) * 127 + int(bias.abs().max())
    if worst > INT32_MAX:
        raise LoweringError(f"{name}: {k} products per output can overflow the int32 accumulator "
                            f"({worst} > 2^31 - 1); split the layer")
    m = inp.scale * w_scale.double() / out.scale  # the requantization multiplier per output channel
    if not bool(torch.isfinite(w).all()) or float(m.max()) >= 2.0**31:
        c = int(m.argmax()) if bool(torch.isfinite(m).all()) else int((~torch.isfinite(m)).nonzero()[0])
        raise LoweringError(
            f"{name}: the requantization multiplier S_in S_w / S_out of channel {c} is {float(m[c]):.3g} (it must be "
            f"below 2^31): its folded weights reach {float(w[c].abs().max()):.3g} against an output range of "
            f"{float(out.scale) * (out.qmax - out.qmin):.3g}. Folded weights that large mean the batch norm (or the "
            "training) has diverged: check the QAT loss and gradients, lower the learning rate or clip gradients "
            "(TrainConfig.grad_clip)")
    lo, hi = _clamp(module.act, out)
    if isinstance(module, ConvBnAct2d):
        c = module.conv
        return QConv2d(w_int, w_scale, bias.to(torch.int32), inp, out, lo, hi, c.stride, c.padding,  # type: ignore[arg-type]
                       c.dilation, c.groups, rounding)
    return QLinear(w_int, w_scale, bias.to(torch.int32), inp, out, lo, hi, rounding)


def _quant_user(node: fx.Node, modules: dict[str, nn.Module], what: str) -> fx.Node:
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module" or not isinstance(modules.get(users[0].target), QuantAct):
        raise LoweringError(f"int8 lowering: the output of {what} ({node.name}) must go to exactly one "
                            "quantization point; was the prepared graph edited?")
    return users[0]


def convert(model: nn.Module) -> fx.GraphModule:
    """The integer model of a prepared (``prepare_ptq`` + ``calibrate``, or ``prepare_qat`` + training) model.

    The returned ``GraphModule`` takes and returns float tensors; every operation in between runs on
    integers (see the module docstring and :mod:`lowbit.graph.qops`), bit-exactly as
    :func:`lowbit.runtime.integer.run_integer` does. The prepared model is not changed (it is put in eval
    mode while its ranges are read and then restored).

    Raises:
        TypeError: ``model`` was not prepared.
        LoweringError: a quantization point without a range (not calibrated), a layer whose integer
            parameters do not fit (bias beyond int32, accumulator overflow), an input of an integer
            operation that is not quantized.

    Example:
        >>> from lowbit.graph.prepare import prepare_ptq, calibrate
        >>> from lowbit.models import create_model
        >>> m = prepare_ptq(create_model("lenet5"))
        >>> _ = calibrate(m, [torch.randn(8, 1, 28, 28)], n_batches=1)
        >>> q = convert(m)
        >>> q.conv1.weight.dtype, q(torch.randn(2, 1, 28, 28)).shape
        (torch.int8, torch.Size([2, 10]))

    References:
        Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
        Inference", arXiv:1712.05877.
    """
    if not is_int8_prepared(model):
        raise TypeError("convert takes a model returned by prepare_ptq or prepare_qat (then calibrated or trained); "
                        f"got {type(model).__name__}")
    assert isinstance(model, fx.GraphModule)
    was_training = model.training
    model.eval()
    try:
        gm = _convert(model)
    finally:
        model.train(was_training)
    remove_identity_pairs(gm, str(model.lowbit_int8["config"].get("rounding", "gemmlowp")))
    gm.lowbit_int8 = dict(model.lowbit_int8, lowered=True)  # type: ignore[assignment]
    for attr in ("lowbit_name", "lowbit_kwargs", "input_shape"):
        if hasattr(model, attr):
            setattr(gm, attr, getattr(model, attr))
    return gm


def _convert(model: fx.GraphModule) -> fx.GraphModule:
    modules = dict(model.named_modules())
    rounding = str(model.lowbit_int8["config"].get("rounding", "gemmlowp"))
    b = _Builder()
    env: dict[fx.Node, _Value] = {}
    done: set[fx.Node] = set()

    def quantized(node: fx.Node, user: fx.Node) -> _Value:
        v = env[node]
        if v.qp is None:
            raise LoweringError(f"int8 lowering: the input {node.name} of {user.name} ({module_path(user)}) is not "
                                "quantized")
        return v

    for node in model.graph.nodes:
        if node in done:
            continue
        mod = modules.get(node.target) if node.op == "call_module" else None
        if node.op == "placeholder":
            env[node] = _Value(b.graph.placeholder(node.name), None)
        elif isinstance(mod, QuantAct):
            qp = _qparams(mod, str(node.target))
            v = env[node.args[0]]
            key = str(node.target).removeprefix(ACT_QUANT + ".")
            src = v.node if v.qp is None else b.module(f"dequantize_{key}", Dequantize(v.qp), v.node)
            env[node] = _Value(b.module(f"quantize_{key}", Quantize(qp), src), qp)
        elif isinstance(mod, (ConvBnAct2d, LinearAct)):
            x = quantized(node.args[0], node)
            q = _quant_user(node, modules, str(node.target))
            out = _qparams(modules[q.target], str(q.target))
            new = b.module(str(node.target), _weighted(mod, str(node.target), x.qp, out, rounding), x.node)  # type: ignore[arg-type]
            env[node] = env[q] = _Value(new, out)
            done.add(q)
        elif _is_add(node):
            a, c = quantized(node.args[0], node), quantized(node.args[1], node)
            act, last = None, node
            nxt = next(iter(node.users)) if len(node.users) == 1 else None
            if nxt is not None and _act_kind(nxt, modules):
                act, last = _act_kind(nxt, modules), nxt
                done.add(nxt)
            q = _quant_user(last, modules, f"the addition {node.name}")
            out = _qparams(modules[q.target], str(q.target))
            lo, hi = _clamp(act, out)
            new = b.module(node.name, QAdd(a.qp, c.qp, out, lo, hi, rounding), a.node, c.node)  # type: ignore[arg-type]
            env[node] = env[last] = env[q] = _Value(new, out)
            done.add(q)
        elif _is_global_pool(node, modules):
            x = quantized(node.args[0], node)
            q = _quant_user(node, modules, f"the pool {node.name}")
            out = _qparams(modules[q.target], str(q.target))
            name = str(node.target) if mod is not None else node.name
            new = b.module(name, QGlobalAvgPool(x.qp, out, rounding), x.node)  # type: ignore[arg-type]
            env[node] = env[q] = _Value(new, out)
            done.add(q)
        elif node.op == "output":
            def out_value(n: Any) -> Any:
                if not isinstance(n, fx.Node):
                    return n
                v = env[n]
                return v.node if v.qp is None else b.module(f"dequantize_{n.name}", Dequantize(v.qp), v.node)
            b.graph.output(fx.node.map_arg(node.args[0], out_value))
        elif node.op == "get_attr":
            raise LoweringError(f"int8 lowering: constant tensor {node.target} used in {module_path(node)}; "
                                "constants are not supported")
        elif _is_transparent(node, modules):
            env[node] = _transparent(node, mod, b, env, modules)
        else:
            from lowbit.graph.prepare import _unsupported

            raise _unsupported(node, modules)
    return fx.GraphModule(b.modules, b.graph, class_name="Int8Model")


def _transparent(node: fx.Node, mod: nn.Module | None, b: _Builder, env: dict[fx.Node, _Value],
                 modules: dict[str, nn.Module]) -> _Value:
    """Integer form of an op that keeps the scale: max pool, dropout/identity, ReLU clamp, zero pad, shapes."""
    first = node.args[0] if node.args else None
    v = env[first] if isinstance(first, fx.Node) else None
    act = _act_kind(node, modules)
    if type(mod) in (nn.Dropout, nn.Identity) or (node.op == "call_function" and node.target is F.dropout):
        return v  # type: ignore[return-value]  (identity at inference)
    if v is not None and v.qp is not None:
        qp = v.qp
        if isinstance(mod, nn.MaxPool2d):
            if mod.return_indices:
                raise LoweringError(f"int8 lowering: {node.target}: MaxPool2d(return_indices=True) is not supported")
            pool = QMaxPool2d(_two(mod.kernel_size), _two(mod.stride or mod.kernel_size), _two(mod.padding),
                              _two(mod.dilation), mod.ceil_mode, qp)
            return _Value(b.module(str(node.target), pool, v.node), qp)
        if act is not None:
            hi = qp.qmax if act == "relu" else min(qp.qmax, qp.zero_point + round(6.0 / qp.scale))
            return _Value(b.module(node.name, QClamp(max(qp.qmin, qp.zero_point), hi, qp), v.node), qp)
        if node.op == "call_function" and node.target is F.pad:
            pad = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
            return _Value(b.module(node.name, QPad(tuple(pad), qp), v.node), qp)
        if isinstance(mod, nn.Flatten):
            new = b.graph.call_function(torch.flatten, (v.node, mod.start_dim, mod.end_dim))
            return _Value(new, qp)
    elif act is not None or isinstance(mod, nn.MaxPool2d) or (node.op == "call_function" and node.target is F.pad):
        raise LoweringError(f"int8 lowering: {_describe(node, modules)} ({node.name} in {module_path(node)}) has an "
                            "input that is not quantized")
    new = b.graph.node_copy(node, lambda n: env[n].node)
    is_size = node.op == "call_method" and node.target == "size"
    return _Value(new, None if is_size or v is None else v.qp)


def _two(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def remove_identity_pairs(gm: fx.GraphModule, rounding: str = "gemmlowp") -> int:
    """Remove ``Dequantize -> Quantize`` pairs of equal parameters; replace the others by one ``Requantize``.

    Returns the number of pairs removed or merged. The graph is changed in place and recompiled.

    Example:
        >>> from lowbit.graph.qops import QParams
        >>> g = fx.Graph(); x = g.placeholder("x")
        >>> qp = QParams(0.1, 3, 0, 255)
        >>> mods = {"dq": Dequantize(qp), "q": Quantize(qp)}
        >>> _ = g.output(g.call_module("q", (g.call_module("dq", (x,)),)))
        >>> gm = fx.GraphModule(mods, g)
        >>> remove_identity_pairs(gm), [n.op for n in gm.graph.nodes]
        (1, ['placeholder', 'output'])
    """
    modules = dict(gm.named_modules())
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), Quantize):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module"
                and isinstance(modules.get(src.target), Dequantize)):
            continue
        dq, q = modules[src.target], modules[node.target]
        if dq.inp == q.out:
            node.replace_all_uses_with(src.args[0])
        else:
            name = f"requantize_{node.name}"
            gm.add_module(name, Requantize(dq.inp, q.out, rounding))
            with gm.graph.inserting_before(node):
                rq = gm.graph.call_module(name, (src.args[0],))
            node.replace_all_uses_with(rq)
        gm.graph.erase_node(node)
        if not src.users:
            gm.graph.erase_node(src)
        count += 1
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return count


def is_lowered(model: nn.Module) -> bool:
    """Whether ``model`` is an integer model from :func:`convert`."""
    return isinstance(model, fx.GraphModule) and bool(getattr(model, "lowbit_int8", {}).get("lowered"))


def input_qparams(gm: fx.GraphModule) -> list[QParams]:
    """The quantization of each ``Quantize`` applied to a graph input (in input order)."""
    modules = dict(gm.named_modules())
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], Quantize) \
                and isinstance(node.args[0], fx.Node) and node.args[0].op == "placeholder":
            out.append(modules[node.target].out)
    return out


def output_qparams(gm: fx.GraphModule) -> list[QParams | None]:
    """The quantization of each output before its final ``Dequantize`` (None for a float output)."""
    modules = dict(gm.named_modules())
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    result: list[QParams | None] = []
    outs = out_node.args[0]
    for n in outs if isinstance(outs, (tuple, list)) else [outs]:
        m = modules.get(n.target) if isinstance(n, fx.Node) and n.op == "call_module" else None
        result.append(m.inp if isinstance(m, Dequantize) else None)
    return result


def _short(module: nn.Module) -> str:
    text = module.extra_repr()
    return f"{type(module).__name__}({text})" if text else type(module).__name__


def format_graph(gm: fx.GraphModule, title: str | None = None) -> str:
    """One line per node: ``name = Op(parameters)(inputs)``; integer ops show their scales and zero points.

    Example:
        >>> g = fx.Graph(); x = g.placeholder("x"); _ = g.output(x)
        >>> print(format_graph(fx.GraphModule({}, g)))
        x = input
        return x
    """
    modules = dict(gm.named_modules())
    lines = [title] if title else []

    def names(args: Any) -> str:
        parts = []
        for a in args:
            if isinstance(a, fx.Node):
                parts.append(a.name)
            elif isinstance(a, (tuple, list)):
                parts.append("(" + ", ".join(x.name if isinstance(x, fx.Node) else repr(x) for x in a) + ")")
            else:
                parts.append(repr(a))
        return ", ".join(parts)

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            lines.append(f"{node.name} = input")
        elif node.op == "output":
            lines.append(f"return {names([node.args[0]]).strip('()')}")
        elif node.op == "call_module":
            m = modules[node.target]
            tag = "int" if isinstance(m, QOPS) and not isinstance(m, Dequantize) else ""
            tail = f"  [{tag}]" if tag else ""
            lines.append(f"{node.name} = {node.target}: {_short(m)}({names(node.args)}){tail}")
        elif node.op == "call_method":
            lines.append(f"{node.name} = .{node.target}({names(node.args)})")
        else:
            fn = getattr(node.target, "__name__", str(node.target))
            lines.append(f"{node.name} = {fn}({names(node.args)})")
    return "\n".join(lines)
