"""ONNX export of an int8 model in QDQ form, which onnxruntime runs on its integer kernels.

    from lowbit.export import export
    export(int_model, "model.onnx", format="onnx-qdq", example=torch.randn(1, 3, 32, 32))

The model is a lowered integer model (:func:`lowbit.graph.lower.convert`; a prepared and calibrated model
is converted first). Each integer operation is written as the float operation between
``DequantizeLinear`` and ``QuantizeLinear`` nodes that carry its exact integer data: int8 weights with a
per-output-channel scale (axis 0, zero point 0), int32 biases with scale ``S_in S_w``, uint8/int8
activations with their scale and zero point. onnxruntime's graph optimizer (level "extended" and above)
fuses ``DQ -> Conv -> Q`` into ``QLinearConv``, ``DQ -> Gemm -> Q`` into ``QGemm``, ``DQ -> Add -> Q`` into
``QLinearAdd`` and ``DQ -> GlobalAveragePool -> Q`` into ``QLinearGlobalAveragePool``; a fused ReLU is
written as ``Relu`` before the ``Q`` only when the clamp is not already the output range (onnxruntime folds
it away then). Operations that do not change the scale (max pooling, zero padding with the zero point,
flatten, slicing, a lone ReLU clamp) are written directly on the integer tensors.

:func:`integer_kernel_report` loads a file in onnxruntime with a pinned optimization level, saves the
optimized graph and counts which convolutions and matrix products run as integer kernels and which
stayed float: the check that an "int8" file is not silently a float model.

Note (x86 without VNNI, e.g. AVX2-only CPUs): onnxruntime's u8s8 kernels there multiply with ``vpmaddubsw``,
whose int16 sum of two adjacent products saturates when both are large (e.g. 255 * 127 * 2 > 32767). Such
a result differs from the exact integer model. ``Int8Config(weight_bits=7)`` (weights in ``[-63, 63]``,
onnxruntime's "reduce_range") rules this out; with 8-bit weights it is rare but possible.

References:
    Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
    Inference", arXiv:1712.05877.
    ONNX operators QuantizeLinear / DequantizeLinear (opset 13: per-axis scales).
"""

from __future__ import annotations

import importlib.util
import operator
import os
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn

from lowbit.export import register_exporter, save_onnx
from lowbit.graph.lower import convert, is_lowered
from lowbit.graph.prepare import LoweringError, is_int8_prepared
from lowbit.graph.qops import (
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
from lowbit.timing import interleaved_medians

__all__ = ["export_onnx_qdq", "integer_kernel_report", "keep_float_if_slower", "cpu_has_vnni", "FLOAT_COMPUTE_OPS",
           "INTEGER_COMPUTE_OPS"]

OPSET = 17
# onnxruntime op types that do the heavy arithmetic, after its optimizer
FLOAT_COMPUTE_OPS = frozenset({"Conv", "MatMul", "Gemm", "ConvTranspose", "FusedConv", "FusedGemm", "FusedMatMul",
                               "NchwcConv"})
INTEGER_COMPUTE_OPS = frozenset({"QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger",
                                 "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention"})


class _Writer:
    """Accumulates ONNX nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._names: Counter[str] = Counter()

    def name(self, base: str) -> str:
        base = base.replace(".", "_")
        self._names[base] += 1
        return base if self._names[base] == 1 else f"{base}_{self._names[base]}"

    def const(self, base: str, value: np.ndarray) -> str:
        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), n))
        return n

    def node(self, op: str, inputs: list[str], base: str, **attrs: Any) -> str:
        out = self.name(base)
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(f"{base}_{op}"), **attrs))
        return out

    def qparams(self, base: str, qp: QParams) -> tuple[str, str]:
        return (self.const(f"{base}_scale", np.array(qp.scale, np.float32)),
                self.const(f"{base}_zero_point", np.array(qp.zero_point, qp.np_dtype)))

    def dq(self, x: str, qp: QParams, base: str) -> str:
        return self.node("DequantizeLinear", [x, *self.qparams(base, qp)], f"{base}_dq")

    def q(self, x: str, qp: QParams, base: str) -> str:
        return self.node("QuantizeLinear", [x, *self.qparams(base, qp)], base)


def _weights(w: _Writer, op: QConv2d | QLinear, base: str) -> tuple[str, str]:
    """Per-channel DQ of the int8 weight and the int32 bias (scale S_in S_w, axis 0)."""
    o = op.weight.shape[0]
    w_scale = op.w_scale.numpy().astype(np.float32)
    wt = w.const(f"{base}_weight_q", op.weight.numpy())
    wd = w.node("DequantizeLinear", [wt, w.const(f"{base}_weight_scale", w_scale),
                                     w.const(f"{base}_weight_zero_point", np.zeros(o, np.int8))], f"{base}_weight",
                axis=0)
    b_scale = (np.float32(op.inp.scale) * w_scale).astype(np.float32)
    bt = w.const(f"{base}_bias_q", op.bias.numpy().astype(np.int32))
    bd = w.node("DequantizeLinear", [bt, w.const(f"{base}_bias_scale", b_scale),
                                     w.const(f"{base}_bias_zero_point", np.zeros(o, np.int32))], f"{base}_bias", axis=0)
    return wd, bd


def _activation(w: _Writer, y: str, op: QConv2d | QLinear | QAdd, base: str) -> str:
    """A Relu / Clip before the output Q when the clamp is narrower than the output type's range."""
    out = op.out
    if (op.act_min, op.act_max) == (out.qmin, out.qmax):
        return y
    lo = (op.act_min - out.zero_point) * out.scale
    if op.act_max == out.qmax and op.act_min == max(out.qmin, out.zero_point):
        return w.node("Relu", [y], f"{base}_relu")
    hi = (op.act_max - out.zero_point) * out.scale
    return w.node("Clip", [y, w.const(f"{base}_clip_min", np.array(lo, np.float32)),
                           w.const(f"{base}_clip_max", np.array(hi, np.float32))], f"{base}_clip")


def _slice(w: _Writer, x: str, idx: Any, base: str, where: str) -> str:
    idx = idx if isinstance(idx, tuple) else (idx,)
    starts, ends, axes, steps = [], [], [], []
    for axis, s in enumerate(idx):
        if not isinstance(s, slice):
            raise LoweringError(f"onnx-qdq: {where}: only slicing with ':' ranges is exported, got {s!r}")
        if s == slice(None):
            continue
        step = 1 if s.step is None else s.step
        if step < 1:
            raise LoweringError(f"onnx-qdq: {where}: negative or zero slice steps are not exported")
        starts.append(0 if s.start is None else s.start)
        ends.append(np.iinfo(np.int64).max if s.stop is None else s.stop)
        axes.append(axis)
        steps.append(step)
    if not axes:
        return x
    arr = lambda v, n: w.const(f"{base}_{n}", np.array(v, np.int64))  # noqa: E731
    return w.node("Slice", [x, arr(starts, "starts"), arr(ends, "ends"), arr(axes, "axes"), arr(steps, "steps")], base)


def _emit(gm: fx.GraphModule, example: torch.Tensor) -> onnx.ModelProto:
    modules = dict(gm.named_modules())
    w = _Writer()
    env: dict[fx.Node, Any] = {}
    inputs, outputs = [], []
    with torch.no_grad():
        results = gm(example)
    out_shapes = [tuple(r.shape) for r in (results if isinstance(results, (tuple, list)) else [results])]
    for node in gm.graph.nodes:
        base = node.name
        val = lambda a: env[a] if isinstance(a, fx.Node) else a  # noqa: E731
        args = fx.node.map_aggregate(node.args, val)
        if node.op == "placeholder":
            inputs.append(helper.make_tensor_value_info(node.name, TensorProto.FLOAT, ["batch", *example.shape[1:]]))
            env[node] = node.name
        elif node.op == "output":
            outs = node.args[0] if isinstance(node.args[0], (tuple, list)) else [node.args[0]]
            for i, o in enumerate(outs):
                name = env[o]
                final = "output" if len(outs) == 1 else f"output_{i}"
                w.nodes.append(helper.make_node("Identity", [name], [final], name=w.name(f"{final}_identity")))
                outputs.append(helper.make_tensor_value_info(final, TensorProto.FLOAT, ["batch", *out_shapes[i][1:]]))
        elif node.op == "call_module":
            op = modules[node.target]
            x = args[0]
            if isinstance(op, Quantize):
                env[node] = w.q(x, op.out, base)
            elif isinstance(op, Dequantize):
                env[node] = w.dq(x, op.inp, base)
            elif isinstance(op, Requantize):
                env[node] = w.q(w.dq(x, op.inp, base + "_in"), op.out, base)
            elif isinstance(op, QConv2d):
                wd, bd = _weights(w, op, base)
                kh, kw = op.weight.shape[2:]
                (ph, pw) = op.padding
                y = w.node("Conv", [w.dq(x, op.inp, base + "_in"), wd, bd], f"{base}_conv", kernel_shape=[kh, kw],
                           strides=list(op.stride), pads=[ph, pw, ph, pw], dilations=list(op.dilation), group=op.groups)
                env[node] = w.q(_activation(w, y, op, base), op.out, base)
            elif isinstance(op, QLinear):
                wd, bd = _weights(w, op, base)
                y = w.node("Gemm", [w.dq(x, op.inp, base + "_in"), wd, bd], f"{base}_gemm", transB=1)
                env[node] = w.q(_activation(w, y, op, base), op.out, base)
            elif isinstance(op, QAdd):
                y = w.node("Add", [w.dq(args[0], op.a, base + "_a"), w.dq(args[1], op.b, base + "_b")], f"{base}_add")
                env[node] = w.q(_activation(w, y, op, base), op.out, base)
            elif isinstance(op, QGlobalAvgPool):
                y = w.node("GlobalAveragePool", [w.dq(x, op.inp, base + "_in")], f"{base}_pool")
                env[node] = w.q(y, op.out, base)
            elif isinstance(op, QMaxPool2d):
                (ph, pw) = op.padding
                env[node] = w.node("MaxPool", [x], base, kernel_shape=list(op.kernel_size), strides=list(op.stride),
                                   pads=[ph, pw, ph, pw], dilations=list(op.dilation), ceil_mode=int(op.ceil_mode))
            elif isinstance(op, QClamp):
                lo, hi = (w.const(f"{base}_{n}", np.array(v, op.qp.np_dtype))
                          for n, v in (("lo", op.lo), ("hi", op.hi)))
                env[node] = w.node("Clip", [x, lo, hi], base)
            elif isinstance(op, QPad):
                pad = list(op.pad)
                rank = 4
                pairs = [(pad[2 * i], pad[2 * i + 1]) if 2 * i + 1 < len(pad) else (0, 0) for i in range(rank)][::-1]
                pads = np.array([p[0] for p in pairs] + [p[1] for p in pairs], np.int64)
                env[node] = w.node("Pad", [x, w.const(f"{base}_pads", pads),
                                           w.const(f"{base}_value", np.array(op.qp.zero_point, op.qp.np_dtype))],
                                   base, mode="constant")
            else:
                raise LoweringError(f"onnx-qdq: node {node.name} runs {type(op).__name__}, which has no ONNX form")
        elif node.op in ("call_method", "call_function"):
            env[node] = _shape_op(w, node, args, base)
        else:
            raise LoweringError(f"onnx-qdq: cannot export node {node.name} ({node.op} {node.target})")
    graph = helper.make_graph(w.nodes, "lowbit_int8", inputs, outputs, w.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lowbit")
    return model


def _shape_op(w: _Writer, node: fx.Node, args: tuple[Any, ...], base: str) -> str:
    target = node.target
    x = args[0]
    if target in ("flatten", torch.flatten):
        start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0 if target is torch.flatten else 0)
        end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
        if end != -1:
            raise LoweringError(f"onnx-qdq: {node.name}: flatten(end_dim={end}) is not exported (only to the end)")
        return w.node("Flatten", [x], base, axis=int(start))
    if target in ("reshape", "view", torch.reshape):
        shape = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        if not all(isinstance(s, int) for s in shape):
            raise LoweringError(f"onnx-qdq: {node.name}: reshape to a size computed at run time is not exported; "
                                "use flatten")
        shape = [0 if i == 0 else s for i, s in enumerate(shape)]  # keep the batch size (0: copy the input dim)
        return w.node("Reshape", [x, w.const(f"{base}_shape", np.array(shape, np.int64))], base)
    if target == "contiguous":
        return x
    if target is operator.getitem:
        return _slice(w, x, args[1], base, node.name)
    raise LoweringError(f"onnx-qdq: node {node.name} calls {getattr(target, '__name__', target)}, which has no "
                        "integer ONNX form here")


@register_exporter("onnx-qdq")
def export_onnx_qdq(model: nn.Module, path: Path, example: torch.Tensor | None = None, check: bool = True,
                    verify_kernels: bool = True, float_model: nn.Module | None = None, speed_batch: int = 1,
                    threads: int = 1) -> Path:
    """Write an int8 model as ONNX with QuantizeLinear/DequantizeLinear (see the module docstring).

    Args:
        model: a lowered model (``lowbit.graph.lower.convert``) or a prepared, calibrated one (converted here).
        path: the ``.onnx`` file to write (atomically: a temporary file renamed).
        example: an input tensor (required); its shape, the batch dimension made dynamic, and the output
            shapes it gives are recorded in the file.
        check: run ``onnx.checker`` on the result.
        verify_kernels: load the file in onnxruntime (when installed) and warn (``RuntimeWarning``, naming the
            nodes) if its optimizer leaves any convolution or matrix product in float on this machine, e.g.
            int8 activations on x86 CPUs without VNNI: such a file is not an int8 model where it runs.
        float_model: the float model ``model`` was quantized from. When given, onnxruntime times the int8 file
            against this model's float ONNX at batch ``speed_batch`` with ``threads`` threads on this machine
            (:func:`keep_float_if_slower`); if int8 is slower, ``path`` gets the float model instead and a
            ``RuntimeWarning`` says so with both latencies.

    Returns:
        ``path``.

    Raises:
        TypeError: a float model (quantize it first: ``prepare_ptq`` + ``calibrate`` + ``convert``).
        LoweringError: an operation with no integer ONNX form (names the node).

    Example:
        >>> export(int_model, "m.onnx", format="onnx-qdq", example=torch.randn(1, 1, 28, 28))  # doctest: +SKIP

    References:
        Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
        Inference", arXiv:1712.05877.
    """
    if is_int8_prepared(model) and not is_lowered(model):
        model = convert(model)
    if not is_lowered(model):
        raise TypeError(f"onnx-qdq exports int8 models; {type(model).__name__} is float. Quantize it first: "
                        "lowbit.graph.prepare_ptq + calibrate + convert (or `lowbit export`, which calibrates)")
    assert isinstance(model, fx.GraphModule)
    if not isinstance(example, torch.Tensor):
        raise ValueError("onnx-qdq needs example=<an input tensor> (e.g. torch.randn(1, 3, 32, 32)) to record the "
                         "input and output shapes")
    proto = _emit(model, example)
    if check:
        onnx.checker.check_model(proto)
    path = Path(path)
    save_onnx(proto, path)
    if verify_kernels and importlib.util.find_spec("onnxruntime") is not None:
        report = integer_kernel_report(path)
        if report["float"]:
            warnings.warn(f"onnx-qdq: onnxruntime runs {report['float']} convolution/matrix nodes of {path.name} in "
                          f"float on this machine ({', '.join(report['float_nodes'][:5])}"
                          f"{' ...' if report['float'] > 5 else ''}); uint8 activations (Int8Config(activation="
                          "'uint8'), the default) run on its integer kernels", RuntimeWarning, stacklevel=3)
    if float_model is not None:
        speed = keep_float_if_slower(path, float_model, example, batch=speed_batch, threads=threads)
        if speed["kept"] == "float":
            warnings.warn(f"onnx-qdq: int8 is slower than float in onnxruntime at batch {speed_batch} on this machine "
                          f"({speed['int8_ms']:.3f} ms vs {speed['float_ms']:.3f} ms): wrote the float model to "
                          f"{path.name} instead", RuntimeWarning, stacklevel=3)
    return path


def _median_ms(sessions: dict[str, Any], x: np.ndarray, rounds: int, runs: int) -> dict[str, float]:
    """Median latency (ms) of each onnxruntime session on ``x``, timed in interleaved rounds so that a change
    in the machine's load hits both alike (:func:`lowbit.timing.interleaved_medians`)."""
    fns = {k: (lambda s=s: s.run(None, {s.get_inputs()[0].name: x})) for k, s in sessions.items()}
    return {k: 1e3 * v for k, v in interleaved_medians(fns, rounds, runs)["wall"].items()}


def keep_float_if_slower(path: str | os.PathLike[str], float_model: nn.Module, example: torch.Tensor,
                         batch: int = 1, threads: int = 1, rounds: int = 5, runs: int = 10) -> dict[str, Any]:
    """Time the int8 ONNX file at ``path`` against ``float_model`` exported as float ONNX, in onnxruntime at
    batch ``batch`` on this machine; if int8 is slower, replace ``path`` with the float file.

    Small models at batch 1 can lose in int8: the quantize/dequantize at the edges and the requantization
    between layers cost more than the integer arithmetic saves. Timing is the median of ``rounds`` interleaved
    rounds of ``runs`` runs each (both files under the same load).

    Returns:
        ``{"batch", "threads", "int8_ms", "float_ms", "speedup", "kept"}`` with ``kept`` "int8" or "float".

    Example:
        >>> keep_float_if_slower("m.onnx", float_model, torch.zeros(1, 3, 32, 32))["kept"]  # doctest: +SKIP
        'int8'
    """
    import onnxruntime as ort

    if batch < 1 or threads < 1:
        raise ValueError(f"batch and threads must be >= 1, got batch={batch}, threads={threads}")
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "float.onnx"
        _float_onnx(float_model, example, fp32)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
        sessions = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
                    for k, p in (("int8", path), ("float", fp32))}
        x = np.random.default_rng(0).standard_normal((batch, *example.shape[1:])).astype(np.float32)
        ms = _median_ms(sessions, x, rounds, runs)
        kept = "float" if ms["int8"] > ms["float"] else "int8"
        if kept == "float":
            save_onnx(onnx.load(str(fp32)), path)
    return {"batch": batch, "threads": threads, "int8_ms": round(ms["int8"], 4), "float_ms": round(ms["float"], 4),
            "speedup": round(ms["float"] / ms["int8"], 3), "kept": kept}


def _float_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """``model`` (float, eval mode) as float ONNX with a dynamic batch dimension, by torch's exporter."""
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"],
                              output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                              opset_version=OPSET)
    finally:
        model.train(was_training)


def cpu_has_vnni() -> bool:
    """Whether this (Linux, x86) CPU has int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX), with
    which onnxruntime's u8s8 kernels do not saturate; False where it cannot tell."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def session_options(level: str = "all", threads: int = 1) -> Any:
    """onnxruntime ``SessionOptions`` with the graph optimization ``level`` pinned ("basic", "extended" or "all"),
    ``threads`` intra-op threads, one inter-op thread and warnings silenced (level "all" warns when it saves the
    optimized graph); ValueError for an unknown level."""
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if level not in levels:
        raise ValueError(f"level must be one of {sorted(levels)}, got {level!r}")
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[level]
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    return so


def integer_kernel_report(path: str | os.PathLike[str], level: str = "extended", threads: int = 1) -> dict[str, Any]:
    """Which compute operations of an ONNX file onnxruntime runs as integer kernels, after its optimizer.

    Loads ``path`` with ``graph_optimization_level`` pinned (``"basic"``, ``"extended"`` or ``"all"``), saves
    the optimized graph (``SessionOptions.optimized_model_filepath``) and counts its op types.

    Returns:
        ``{"ops": {op_type: count}, "integer": n, "float": n, "float_nodes": [names], "level": level}``;
        ``float`` counts the float Conv/MatMul/Gemm-like nodes left.

    Example:
        >>> integer_kernel_report("m.onnx")["float"]          # doctest: +SKIP
        0
    """
    import onnxruntime as ort

    so = session_options(level, threads)
    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        so.optimized_model_filepath = str(opt)
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        graph = onnx.load(str(opt)).graph
    ops = Counter(n.op_type for n in graph.node)
    return {"ops": dict(sorted(ops.items())), "level": level,
            "integer": sum(c for op, c in ops.items() if op in INTEGER_COMPUTE_OPS),
            "float": sum(c for op, c in ops.items() if op in FLOAT_COMPUTE_OPS),
            "float_nodes": [n.name for n in graph.node if n.op_type in FLOAT_COMPUTE_OPS]}
