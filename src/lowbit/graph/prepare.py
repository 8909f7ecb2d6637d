"""Preparing a float model for int8 integer-only inference: trace, fuse, place quantization points.

    qmodel = prepare_ptq(model, Int8Config())            # or prepare_qat(model, cfg) for training
    calibrate(qmodel, data.loader("train", 128), n_batches=16)
    int_model = convert(qmodel)                           # lowbit.graph.lower: the integer model

``prepare_*`` traces a copy of the model with ``torch.fx`` and

1. fuses ``Conv2d -> BatchNorm2d -> ReLU/ReLU6`` into :class:`~lowbit.nn.fused.ConvBnAct2d` (the batch norm
   folded into the weights, in training too, as the paper's Figure C.8) and ``Linear -> ReLU`` into
   :class:`~lowbit.nn.fused.LinearAct`, each with an ``int8_weight`` quantizer (per output channel,
   ``[-127, 127]``); the fused module keeps the conv's name (``layer1.0.conv1``);
2. puts an activation quantizer (:class:`~lowbit.nn.layers.QuantAct` with a ``uint8_act`` quantizer) where an
   integer kernel produces a new tensor: after the model's input, after each fused layer, after each
   addition (after its ReLU when one follows) and after each global average pool. The ReLU/ReLU6 of a fused
   layer is not a separate quantization point: the output range starts at 0, so it is the output clamp;
3. checks that every other operation is one the integer lowering runs on integers unchanged in scale
   (max pooling, flatten/reshape/view, slicing, zero padding, dropout, identity, a lone ReLU) and raises
   :class:`LoweringError` naming the module and the operation otherwise, before any calibration is spent.

Residual additions: both inputs keep their own scales and the integer addition rescales them to a common
one with int32 fixed-point arithmetic and requantizes the sum (:class:`lowbit.graph.qops.QAdd`); this costs
no accuracy at a join of two different ranges (a shared scale would have to cover both).

References:
    Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
    Inference", arXiv:1712.05877 (Sections 2.4, 3.1, 3.2).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import fx, nn

from lowbit.nn.fused import ConvBnAct2d, LinearAct
from lowbit.nn.layers import QuantAct
from lowbit.quant.affine import AffineQuantizer

__all__ = ["Int8Config", "LoweringError", "prepare_qat", "prepare_ptq", "calibrate", "freeze_bn", "freeze_observers",
           "quantizers_of", "module_path", "ACT_QUANT", "is_int8_prepared", "QATSchedule"]

ACT_QUANT = "act_quant"  # the ModuleDict holding the activation quantization points


class LoweringError(ValueError):
    """An operation of the model that the int8 integer lowering cannot run (names the module and the op)."""


class Int8Config(BaseModel):
    """How to quantize for integer-only inference. ``extra='forbid'``: a misspelled key is an error naming it.

    Example:
        >>> Int8Config(calibration="percentile").activation
        'uint8'
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    version: Literal[1] = 1
    weight_bits: Literal[8, 7] = Field(
        8, description="8: weights in [-127, 127] (the paper); 7: [-63, 63], the 'reduced range' that x86 AVX2 "
                       "u8s8 kernels without VNNI need to never saturate their int16 pair sums")
    per_channel: bool = Field(True, description="one weight scale per output channel (else per tensor)")
    activation: Literal["uint8", "int8"] = Field(
        "uint8", description="activation type: uint8 (what onnxruntime's x86 int8 kernels take) or int8")
    calibration: Literal["minmax", "percentile", "mse"] = Field(
        "minmax", description="activation range observer of post-training calibration")
    percentile: float = Field(99.99, gt=50, le=100, description="for calibration: percentile")
    ema_momentum: float = Field(0.01, gt=0, le=1, description="QAT: EMA momentum of the activation ranges")
    rounding: Literal["gemmlowp", "single", "fp32"] = Field(
        "gemmlowp", description="requantization: gemmlowp's doubling high multiply + rounding shift (the paper; "
                                "rounds twice), one rounding of the 64-bit product (closer to float runtimes), or "
                                "fp32: float32's roundings in integers (bit-exact with onnxruntime's kernels)")

    def weight_spec(self) -> dict[str, Any]:
        return {"name": "int8_weight", "bits": self.weight_bits, "per_channel": self.per_channel}

    def act_spec(self, qat: bool) -> dict[str, Any]:
        if qat:
            observer: dict[str, Any] = {"name": "ema", "momentum": self.ema_momentum}
        elif self.calibration == "percentile":
            observer = {"name": "percentile", "percentile": self.percentile}
        else:
            observer = {"name": self.calibration}
        return {"name": f"{self.activation}_act", "observer": observer}


# ----------------------------------------------------------------------------------- op classification

_RELUS = {"relu": "relu", "relu6": "relu6"}


def _act_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """'relu' / 'relu6' when ``node`` is one (module or function form), else None."""
    if node.op == "call_module":
        m = modules[node.target]
        if type(m) is nn.ReLU:
            return "relu"
        if type(m) is nn.ReLU6 or (type(m) is nn.Hardtanh and (m.min_val, m.max_val) == (0.0, 6.0)):
            return "relu6"
    elif node.op == "call_function" and node.target in (F.relu, torch.relu, torch.relu_):
        return "relu"
    elif node.op == "call_function" and node.target is F.relu6:
        return "relu6"
    elif node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu"
    return None


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add):
        return len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)
    return node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs


def _is_global_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        m = modules[node.target]
        return type(m) is nn.AdaptiveAvgPool2d and tuple(_pair(m.output_size)) == (1, 1)
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return tuple(_pair(size)) == (1, 1)
    return False


def _pair(v: Any) -> tuple[Any, Any]:
    return (v, v) if not isinstance(v, (tuple, list)) else tuple(v)  # type: ignore[return-value]


_SHAPE_METHODS = {"flatten", "reshape", "view", "size", "contiguous", "squeeze", "unsqueeze"}
_SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}


def _is_transparent(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """An op the integer model runs on integers with the scale and zero point unchanged."""
    if node.op == "call_module":
        m = modules[node.target]
        return type(m) in (nn.MaxPool2d, nn.Dropout, nn.Identity, nn.Flatten) or _act_kind(node, modules) is not None
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS or _act_kind(node, modules) is not None
    if node.op == "call_function":
        if node.target in _SHAPE_FUNCTIONS or node.target is F.dropout:
            return True
        if node.target is operator.getitem:
            return True
        if node.target is F.pad:
            mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
            value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
            return mode == "constant" and value in (None, 0, 0.0)
        return _act_kind(node, modules) is not None
    return False


def module_path(node: fx.Node) -> str:
    """The model path of the module a node belongs to (``layer1.0``), or ``(top level)``."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1]
        return str(path[0] if isinstance(path, tuple) else path) or "(top level)"
    return "(top level)"


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"module {type(modules[node.target]).__name__}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    if node.op == "get_attr":
        return f"constant {node.target}"
    return f"function {getattr(node.target, '__name__', node.target)}"


SUPPORTED = ("Conv2d (+BatchNorm2d) (+ReLU/ReLU6), Linear (+ReLU), tensor + tensor (+ReLU), AdaptiveAvgPool2d(1), "
             "MaxPool2d, flatten/reshape/view, slicing, F.pad with zeros, Dropout, Identity, ReLU/ReLU6")


def _unsupported(node: fx.Node, modules: dict[str, nn.Module]) -> LoweringError:
    return LoweringError(
        f"int8 lowering: cannot run {_describe(node, modules)} (node {node.name!r} in {module_path(node)}) with "
        f"integer arithmetic; supported: {SUPPORTED}. Replace the operation, or keep this model float")


# ----------------------------------------------------------------------------------------------- tracing


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 (fx raises many kinds; the message is what matters)
        raise LoweringError(f"int8 lowering: torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); data-dependent control flow must be "
                            "removed before integer lowering") from e


def _sole_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _set_module(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def _fuse(gm: fx.GraphModule, weight_spec: dict[str, Any]) -> None:
    """Conv2d [-> BatchNorm2d] [-> ReLU/ReLU6] and Linear [-> ReLU/ReLU6] into fused modules, in place."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(modules.get(node.target)) not in (nn.Conv2d, nn.Linear):
            continue
        layer = modules[node.target]
        if sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target) > 1:
            raise LoweringError(f"int8 lowering: the layer {node.target} is called more than once; a shared layer "
                                "cannot be fused with the different batch norms that follow its calls")
        chain, bn, act = [node], None, None
        nxt = _sole_user(node)
        if isinstance(layer, nn.Conv2d) and nxt is not None and nxt.op == "call_module" \
                and type(modules[nxt.target]) is nn.BatchNorm2d:
            bn = modules[nxt.target]
            chain.append(nxt)
            nxt = _sole_user(nxt)
        if nxt is not None and _act_kind(nxt, modules) is not None:
            act = _act_kind(nxt, modules)
            chain.append(nxt)
        fused: nn.Module
        if isinstance(layer, nn.Conv2d):
            fused = ConvBnAct2d(layer, bn, act, dict(weight_spec))  # type: ignore[arg-type]
        else:
            fused = LinearAct(layer, act, dict(weight_spec))  # type: ignore[arg-type]
        fused.train(layer.training)
        _set_module(gm, node.target, fused)
        last = chain[-1]
        if last is not node:
            last.replace_all_uses_with(node)
            for dead in reversed(chain[1:]):
                gm.graph.erase_node(dead)
    gm.delete_all_unused_submodules()


def _insert_act_quant(gm: fx.GraphModule, act_spec: dict[str, Any]) -> None:
    """A QuantAct after the input, each fused layer, each addition (after its ReLU) and each global pool."""
    modules = dict(gm.named_modules())
    holder = nn.ModuleDict()
    gm.add_module(ACT_QUANT, holder)
    points: list[tuple[fx.Node, str]] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            points.append((node, f"input_{node.name}"))
        elif node.op == "call_module" and isinstance(modules.get(node.target), (ConvBnAct2d, LinearAct)):
            points.append((node, str(node.target).replace(".", "_")))
        elif _is_add(node):
            nxt = _sole_user(node)
            points.append((nxt if nxt is not None and _act_kind(nxt, modules) else node, node.name))
        elif _is_global_pool(node, modules):
            points.append((node, node.name))
        elif node.op in ("output", "get_attr") or _is_transparent(node, modules):
            continue
        else:
            raise _unsupported(node, modules)
    for node, name in points:
        holder[name] = QuantAct(dict(act_spec))
        with gm.graph.inserting_after(node):
            q = gm.graph.call_module(f"{ACT_QUANT}.{name}", (node,))
        node.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)


def _prepare(model: nn.Module, config: Int8Config, qat: bool) -> fx.GraphModule:
    if not isinstance(config, Int8Config):
        raise TypeError(f"expected an Int8Config, got {type(config).__name__} (use Int8Config.model_validate(...))")
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model)
    model.train(qat)
    gm = _trace(model)
    _fuse(gm, config.weight_spec())
    _insert_act_quant(gm, config.act_spec(qat))
    gm.graph.lint()
    gm.recompile()
    gm.train(qat)
    gm.lowbit_int8 = {"config": config.model_dump(mode="json"), "qat": qat}  # type: ignore[assignment]
    for attr in ("lowbit_name", "lowbit_kwargs", "input_shape"):
        if hasattr(model, attr):
            setattr(gm, attr, getattr(model, attr))
    # recorded so that a checkpoint of the prepared model rebuilds it (lowbit.train.load_model)
    gm.lowbit_transforms = [*getattr(model, "lowbit_transforms", []), {"int8_prepare": dict(gm.lowbit_int8)}]
    return gm


def replay_prepare(model: nn.Module, record: dict[str, Any]) -> fx.GraphModule:
    """Re-apply a recorded ``prepare_qat`` / ``prepare_ptq`` (a checkpoint's ``transforms`` entry) to a fresh
    model; the checkpoint's tensors (weights, observer ranges, scales) are loaded into the result after."""
    if not isinstance(record, dict) or not isinstance(record.get("qat"), bool):
        raise ValueError(f"an int8_prepare record needs 'config' and a boolean 'qat', got {record!r}")
    config = Int8Config.model_validate(record.get("config"))
    gm = prepare_qat(model, config) if record["qat"] else prepare_ptq(model, config)
    # the observers take their per-channel shapes on the first batch: one placeholder batch gives every buffer
    # the shape of the checkpoint's (whose values then replace them)
    shape = getattr(model, "input_shape", None)
    if shape is None and isinstance(getattr(model, "lowbit_name", None), str):
        from lowbit.models import model_entry

        shape = model_entry(model.lowbit_name).input_shape
    if shape is None:
        raise ValueError("the model's input shape is unknown (not a zoo model): cannot size its int8 observers")
    calibrate(gm, [torch.zeros(1, *shape)], 1)
    return gm


def prepare_qat(model: nn.Module, config: Int8Config | None = None) -> fx.GraphModule:
    """A copy of ``model`` ready for int8 quantization-aware training (in training mode).

    Batch norms are folded into the quantized conv weights during training (batch statistics with the
    running-statistics correction, :class:`~lowbit.nn.fused.ConvBnAct2d`); activation ranges are
    exponential moving averages (``ema_momentum``). Run :func:`calibrate` on a few batches first so that the
    ranges start from data, train (``lowbit.train.fit``), optionally :func:`freeze_bn` towards the end, then
    ``convert``.

    Raises:
        LoweringError: an operation the integer model cannot run (naming its module and op), or a model
            torch.fx cannot trace.

    Example:
        >>> from lowbit.models import create_model
        >>> qat = prepare_qat(create_model("lenet5"))
        >>> type(qat.conv1).__name__, qat.training
        ('ConvBnAct2d', True)

    References:
        Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
        Inference", arXiv:1712.05877 (Section 3).
    """
    return _prepare(model, config or Int8Config(), qat=True)


def prepare_ptq(model: nn.Module, config: Int8Config | None = None) -> fx.GraphModule:
    """A copy of ``model`` (in eval mode) with fused layers and calibration observers at every quantization
    point; :func:`calibrate` it, then ``convert``. See :func:`prepare_qat` for what is fused and where.

    Example:
        >>> from lowbit.models import create_model
        >>> ptq = prepare_ptq(create_model("lenet5"), Int8Config(calibration="percentile"))
        >>> sorted(ptq.act_quant.keys())[:2]
        ['conv1', 'conv2']

    References:
        Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
        Inference", arXiv:1712.05877.
    """
    return _prepare(model, config or Int8Config(), qat=False)


def is_int8_prepared(model: nn.Module) -> bool:
    """Whether ``model`` came from :func:`prepare_qat` / :func:`prepare_ptq`."""
    return isinstance(model, fx.GraphModule) and hasattr(model, "lowbit_int8")


def quantizers_of(model: nn.Module) -> list[tuple[str, AffineQuantizer]]:
    """Every affine quantizer in ``model`` with its module name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AffineQuantizer)]


@torch.no_grad()
def calibrate(model: nn.Module, data: Iterable[Any], n_batches: int, show_progress: bool = False) -> int:
    """Run ``n_batches`` batches of ``data`` (tensors or ``(x, y)`` pairs) through a prepared model in eval
    mode, observing every quantization point; returns the number of batches used.

    Activation quantizers only observe (their input passes through in float, as post-training calibration
    does); the ranges are fixed afterwards. For a QAT model (in training mode, as :func:`prepare_qat` returns
    it) this initializes the EMA ranges from data, with its fused batch norms on batch statistics as in QAT's
    forward (their running statistics are left as they were), since ranges observed under running statistics
    that differ from the batch's clip most activations once training starts.

    Raises:
        ValueError: ``n_batches < 1``, a model with no quantizers, ``data`` that yields no batch, or a NaN/inf
            activation (the observer refuses it).

    Example:
        >>> from lowbit.models import create_model
        >>> m = prepare_ptq(create_model("lenet5"))
        >>> calibrate(m, [torch.randn(4, 1, 28, 28)], n_batches=1)
        1
    """
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"n_batches must be an int >= 1 (calibration needs data), got {n_batches!r}")
    quants = quantizers_of(model)
    if not quants:
        raise ValueError("the model has no affine quantizers: prepare it first (prepare_ptq / prepare_qat)")
    was_training = model.training
    model.eval()
    # a QAT model (prepared in training mode) trains with batch-statistics batch norm: observe the ranges of that
    # forward, not of the running statistics, which can be far from them (a model trained briefly, or from
    # scratch); the running statistics are put back afterwards
    qat_bn = [m for m in model.modules() if isinstance(m, ConvBnAct2d) and m.bn is not None and not m.bn_frozen]
    qat_bn = qat_bn if was_training else []
    saved = [{k: v.clone() for k, v in m.bn.state_dict().items()} for m in qat_bn]  # type: ignore[union-attr]
    for m in qat_bn:
        m.train()
    for _, q in quants:
        q.calibrating = True
    used = 0
    try:
        from lowbit.train.progress import progress

        bar = progress(n_batches, "calibrate", "batch") if show_progress else None
        advance = bar.__enter__() if bar is not None else (lambda *a, **k: None)
        try:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            for batch in data:
                if used >= n_batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                if not isinstance(x, torch.Tensor):
                    raise TypeError(f"calibration batches are tensors or (x, y) pairs, got {type(x).__name__}")
                model(x.to(device))
                used += 1
                advance(1)
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)
    finally:
        for _, q in quants:
            q.calibrating = False
        for m, state in zip(qat_bn, saved, strict=True):
            m.bn.load_state_dict(state)  # type: ignore[union-attr]
        model.train(was_training)
    if used == 0:
        raise ValueError("calibration data gave no batch (an empty loader?): the ranges cannot be estimated")
    for name, q in quants:  # compute the ranges now: a failure names the quantization point
        try:
            q.scale  # noqa: B018
        except ValueError as e:
            raise ValueError(f"quantization point {name}: {e}") from None
    return used


def freeze_bn(model: nn.Module) -> int:
    """Switch every fused conv + batch norm to running statistics (paper: after enough QAT steps); returns
    how many were frozen."""
    fused = [m for m in model.modules() if isinstance(m, ConvBnAct2d) and m.bn is not None]
    for m in fused:
        m.freeze_bn()
    return len(fused)


def freeze_observers(model: nn.Module) -> int:
    """Stop updating the activation ranges (weights keep following their values); returns how many."""
    n = 0
    for _, q in quantizers_of(model):
        if getattr(q.observer, "running", True):
            q.observe = False
            n += 1
    return n



class QATSchedule:
    """A ``lowbit.train.fit`` callback: freeze batch-norm statistics, then the activation ranges, late in QAT.

    The paper switches from batch to running statistics after enough steps (the correction of
    :class:`~lowbit.nn.fused.ConvBnAct2d` makes training see the inference layer from then on), and the
    ranges settle before the end. Fractions are of ``total_steps``; ``None`` never freezes.

    Example:
        >>> cb = QATSchedule(total_steps=100, freeze_bn_at=0.5, freeze_observers_at=0.75)
        >>> cb.freeze_bn_step, cb.freeze_observers_step
        (50, 75)
    """

    def __init__(self, total_steps: int, freeze_bn_at: float | None = 0.5,
                 freeze_observers_at: float | None = 0.75) -> None:
        for name, v in (("freeze_bn_at", freeze_bn_at), ("freeze_observers_at", freeze_observers_at)):
            if v is not None and not 0 <= v <= 1:
                raise ValueError(f"{name} must be a fraction in [0, 1] of the training steps or None, got {v!r}")
        self.freeze_bn_step = None if freeze_bn_at is None else round(freeze_bn_at * total_steps)
        self.freeze_observers_step = None if freeze_observers_at is None else round(freeze_observers_at * total_steps)

    def after_step(self, model: nn.Module, step: int) -> None:
        if self.freeze_bn_step is not None and step >= self.freeze_bn_step:
            freeze_bn(model)
        if self.freeze_observers_step is not None and step >= self.freeze_observers_step:
            freeze_observers(model)
