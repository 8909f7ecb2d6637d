"""The quantization verb: ``quantize_(model, QuantConfig(...))`` swaps layers for quantized ones in place.

Which layers: every ``nn.Conv2d`` and ``nn.Linear`` of the model (exactly those types: a subclass such as
``MultiheadAttention.out_proj`` may not call its own ``forward``, and already quantized layers are left
alone). Each gets a :class:`LayerQuant` (a weight and an input quantizer, either may be ``None``) by

1. a rule whose key is exactly the layer's name;
2. else, with ``keep_first_last`` (default), the first and the last of those layers in module order stay
   float, or get ``first_last`` when it is set (e.g. 8-bit);
3. else the first rule, in the order written, whose key is a glob matching the layer's name
   (``"features.*"``, ``"*"``) or the layer's type name (``"Conv2d"``, ``"Linear"``);
4. else the layer stays float.

A rule that matches no layer, or that every matching layer takes from another rule, is an error naming
the model's layers, so a typo never silently quantizes nothing. Quantizer names and arguments are checked
when the config is built, and every quantizer is built before the first layer is swapped.

    rules:                                            # the YAML of a recipe's quantize stage
      "*": {weight: ste_sign, input: ste_sign}
      Conv2d: {weight: {name: dorefa_weight, bits: 2}}
    keep_first_last: true
    first_last: {weight: {name: dorefa_weight, bits: 8}}

Keeping the first and the last layer in full (or 8-bit) precision is the usual practice of the binary and
low-bit literature (XNOR-Net, DoReFa-Net): they hold few of the MACs and much of the accuracy.

References:
    Rastegari et al., "XNOR-Net", arXiv:1603.05279 (first and last layer kept in full precision).
    Zhou et al., "DoReFa-Net", arXiv:1606.06160 (same practice, low-bit everywhere else).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from lowbit.quant.base import Quantizer, get_quantizer

__all__ = ["LAYER_TYPES", "LayerQuant", "LayerReport", "QuantConfig", "QuantReport", "describe_spec", "quantize_"]

LAYER_TYPES: dict[str, type[nn.Module]] = {"Conv2d": nn.Conv2d, "Linear": nn.Linear, "LSTM": nn.LSTM, "GRU": nn.GRU}

Spec = str | dict[str, Any]  # a registered quantizer name, or {"name": ..., **constructor arguments}


def _check_spec(spec: Spec | None) -> Spec | None:
    """Build ``spec`` once, so that an unknown name or an argument that does not fit fails at config time."""
    if spec is None:
        return None
    try:
        get_quantizer(spec)
    except (KeyError, TypeError) as e:  # an unknown name (the message lists the valid ones), a wrong argument
        raise ValueError(str(e)) from None
    except ValueError:
        raise
    except Exception as e:  # a quantizer's own check of its arguments, whatever it raises
        raise ValueError(f"quantizer {describe_spec(spec)}: {type(e).__name__}: {e}") from None
    return spec


def describe_spec(spec: Spec | Quantizer | None) -> str:
    """``None -> "float"``, ``"ste_sign" -> "ste_sign"``, ``{"name": "x", "bits": 2} -> "x(bits=2)"``."""
    if spec is None:
        return "float"
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Quantizer):
        return type(spec).__name__
    args = ", ".join(f"{k}={v!r}" for k, v in spec.items() if k != "name")
    return f"{spec.get('name')}({args})"


class LayerQuant(BaseModel):
    """The quantizers of one layer: each a registered name, a ``{"name": ..., **kwargs}`` mapping or None.

    ``None`` keeps that side float; a rule with both ``None`` keeps its layers float.

    Example:
        >>> LayerQuant().build()
        (None, None)
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    weight: Spec | None = Field(None, description="quantizer of the layer's weight; null = float")
    input: Spec | None = Field(None, description="quantizer of the layer's input activations; null = float")

    @field_validator("weight", "input")
    @classmethod
    def _known(cls, v: Spec | None) -> Spec | None:
        return _check_spec(v)

    def build(self) -> tuple[Quantizer | None, Quantizer | None]:
        """Fresh ``(weight_quantizer, input_quantizer)`` instances."""
        return get_quantizer(self.weight), get_quantizer(self.input)

    @property
    def is_float(self) -> bool:
        return self.weight is None and self.input is None


class QuantConfig(BaseModel):
    """How to quantize a model: per-layer rules by module-name glob or layer type, first/last layer policy.

    ``extra='forbid'``: a misspelled key is an error naming it. The same fields are the YAML keys of the
    ``quantize`` recipe stage; ``model_dump(mode="json")`` / ``model_validate`` round-trip it.

    Example:
        >>> cfg = QuantConfig(rules={"*": {"weight": None}}, keep_first_last=False)
        >>> QuantConfig.model_validate(cfg.model_dump(mode="json")) == cfg
        True
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    version: Literal[1] = 1
    rules: dict[str, LayerQuant] = Field(
        description="module-name glob, exact name or layer type (Conv2d, Linear) -> {weight: ..., input: ...}; "
                    "an exact name wins, then the first matching key in the order written")
    keep_first_last: bool = Field(
        True, description="the first and the last Conv2d/Linear (module order) stay float, or get first_last")
    first_last: LayerQuant | None = Field(
        None, description="quantizers for the first and last layer (e.g. 8-bit) instead of float")
    requantize: bool = Field(
        False, description="also decide layers already quantized (QuantConv2d/QuantLinear): a rule replaces their "
        "quantizers, and each new quantizer takes over its predecessor's state when the class and the tensor shapes "
        "match (QIL's c, d, gamma carry over from 4 to 3 to 2 bits); a layer no rule decides keeps its quantizers")

    @model_validator(mode="after")
    def _check(self) -> QuantConfig:
        if not self.rules:
            raise ValueError("rules is empty: give at least one {glob or type: {weight: ..., input: ...}}")
        if "" in self.rules:
            raise ValueError("a rule key is empty; use a module name, a glob ('*') or a type (Conv2d, Linear)")
        if self.first_last is not None and not self.keep_first_last:
            raise ValueError("first_last applies to the layers keep_first_last sets apart; with "
                             "keep_first_last: false, give those layers rules instead")
        return self


@dataclass(frozen=True)
class LayerReport:
    """What ``quantize_`` did to one layer. Bits are 32 for a float side; ``rule`` is the key that decided
    (``"first_last"`` for the ``first_last`` setting) or None; ``note`` says why a layer stayed float."""

    name: str
    type: str
    weight: str
    input: str
    weight_bits: int
    input_bits: int
    rule: str | None
    note: str = ""

    @property
    def quantized(self) -> bool:
        return self.weight != "float" or self.input != "float"


@dataclass(frozen=True)
class QuantReport:
    """Per-layer outcome of :func:`quantize_`; ``str()`` is a table, ``to_dict()`` is JSON-ready."""

    layers: tuple[LayerReport, ...]

    @property
    def quantized(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.quantized]

    @property
    def kept_float(self) -> dict[str, str]:
        """``{layer: why}`` for every layer left float."""
        return {layer.name: layer.note for layer in self.layers if not layer.quantized}

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [asdict(layer) for layer in self.layers], "quantized": self.quantized,
                "kept_float": self.kept_float}

    def __str__(self) -> str:
        head = ("layer", "type", "weight", "input", "W bits", "A bits", "rule")
        rows = [(lr.name, lr.type, lr.weight, lr.input, str(lr.weight_bits), str(lr.input_bits),
                 _rule_cell(lr))
                for lr in self.layers]
        widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
        right = {4, 5}  # the bit columns

        def line(r: tuple[str, ...]) -> str:
            cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
            return "  ".join(cells).rstrip()

        title = f"quantized {len(self.quantized)} of {len(self.layers)} layers"
        return "\n".join([title, line(head), *(line(r) for r in rows)])


def _rule_cell(lr: LayerReport) -> str:
    if not lr.quantized:
        return f"float: {lr.note}"
    return "first_last" if lr.rule == "first_last" else repr(lr.rule)


def _bits(q: Quantizer | None) -> int:
    if q is None:
        return 32
    bw = float(q.bit_width)
    return max(1, math.ceil(bw - 1e-6))  # as lowbit.hw.profile: log2(3) = 1.58 bits is stored in 2


def _matches(key: str, name: str, module: nn.Module) -> bool:
    return key == name or fnmatch.fnmatchcase(name, key) or key == type(module).__name__


def _eligible(model: nn.Module, requantize: bool = False) -> dict[str, nn.Module]:
    """Plain Conv2d/Linear layers by name (a shared module under its first name), in module order; with
    ``requantize`` also the QuantConv2d/QuantLinear layers."""
    from lowbit.nn.layers import QuantConv2d, QuantLinear

    types = tuple(LAYER_TYPES.values()) + ((QuantConv2d, QuantLinear) if requantize else ())
    return {n: m for n, m in model.named_modules() if type(m) in types}


def _requantize(layer: nn.Module, weight_q: Quantizer | None, input_q: Quantizer | None) -> None:
    """Give an already quantized layer new quantizers; each takes its predecessor's state when the class and the
    tensor shapes match (else it starts fresh, initialized from the weight as a new layer's would be)."""
    for attr, new in (("weight_quantizer", weight_q), ("input_quantizer", input_q)):
        old = getattr(layer, attr)
        if new is not None:
            new.to(device=layer.weight.device, dtype=layer.weight.dtype)
            if attr == "weight_quantizer":
                new.init_from(layer.weight)
            if type(old) is type(new):
                state = old.state_dict()
                mine = new.state_dict()
                if state.keys() == mine.keys() and all(state[k].shape == mine[k].shape for k in state):
                    new.load_state_dict(state)
            new.train(layer.training)
        setattr(layer, attr, new)


def _layer_list(layers: dict[str, nn.Module]) -> str:
    return ", ".join(f"{n or '(the model itself)'} ({type(m).__name__})" for n, m in layers.items()) or "none"


@dataclass
class _Decision:
    quant: LayerQuant | None  # None: float
    rule: str | None
    note: str = ""


def _plan(
    layers: dict[str, nn.Module], config: QuantConfig, filter_fn: Callable[[nn.Module, str], bool] | None
) -> dict[str, _Decision]:
    """Decide every layer (see the module docstring); raise on a rule that matches or decides nothing."""
    names = list(layers)
    matched = {key: [n for n in names if _matches(key, n, layers[n])] for key in config.rules}
    unmatched = [key for key, hits in matched.items() if not hits]
    if unmatched:
        raise ValueError(f"quantization rule(s) {unmatched} match no Conv2d/Linear layer (by name, glob or type); "
                         f"the model's layers are: {_layer_list(layers)}")
    ends = {names[0]: "first layer", names[-1]: "last layer"}
    if names[0] == names[-1]:
        ends = {names[0]: "first and last layer"}
    plan: dict[str, _Decision] = {}
    for name in names:
        module = layers[name]
        if filter_fn is not None and not filter_fn(module, name):
            plan[name] = _Decision(None, None, "excluded by filter_fn")
        elif name in config.rules:
            plan[name] = _Decision(config.rules[name], name)
        elif config.keep_first_last and name in ends:
            if config.first_last is None:
                plan[name] = _Decision(None, None, f"{ends[name]} (keep_first_last)")
            else:
                plan[name] = _Decision(config.first_last, "first_last")
        else:
            key = next((k for k in config.rules if _matches(k, name, module)), None)
            plan[name] = _Decision(config.rules[key] if key is not None else None, key,
                                   "no rule matches" if key is None else "")
    for key, hits in matched.items():  # every rule must decide at least one layer it matches
        if any(plan[n].rule == key or plan[n].note == "excluded by filter_fn" for n in hits):
            continue
        taken = ", ".join(f"{n} ({_taken_by(plan[n])})" for n in hits)
        raise ValueError(f"quantization rule {key!r} is never applied: the layers it matches are taken by other "
                         f"rules or settings: {taken}. Put specific rules before general ones, or name a first/last "
                         "layer exactly to override keep_first_last")
    for d in plan.values():
        if d.quant is not None and d.quant.is_float:
            d.quant, d.note = None, f"rule {d.rule!r} sets no quantizer"
    return plan


def _taken_by(d: _Decision) -> str:
    return f"rule {d.rule!r}" if d.rule not in (None, "first_last") else (d.rule or f"kept float: {d.note}")


def _references(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every ``(parent, attribute)`` holding each submodule, so a shared layer is replaced everywhere."""
    refs: dict[int, list[tuple[nn.Module, str]]] = {}
    seen: set[tuple[int, str]] = set()
    for _, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is not None and (id(parent), attr) not in seen:
                seen.add((id(parent), attr))
                refs.setdefault(id(child), []).append((parent, attr))
    return refs


def _mask_names(module: nn.Module) -> list[str]:
    """Parameters of ``module`` with a pruning mask (a buffer ``<param>_mask``, see lowbit.prune.masks)."""
    return [b[: -len("_mask")] for b, buf in module._buffers.items()
            if buf is not None and b.endswith("_mask") and b[: -len("_mask")] in module._parameters]


def quantize_(
    model: nn.Module, config: QuantConfig, filter_fn: Callable[[nn.Module, str], bool] | None = None
) -> QuantReport:
    """Swap the model's ``nn.Conv2d`` / ``nn.Linear`` layers for ``QuantConv2d`` / ``QuantLinear`` in place.

    Formula (per layer, with the quantizers of the rule that decides it, see the module docstring):

        y = op(Q_input(x), Q_weight(W), b)        Q = identity where the rule gives None

    Each layer gets fresh quantizer instances; its weight and bias (the same ``Parameter`` objects) and
    its pruning masks are carried over, so an optimizer built before still trains them (though it does
    not know the quantizers' own parameters: build the optimizer after quantizing). Pruning masks act on
    the latent float weight; whether a pruned weight is still 0 after quantization depends on the
    quantizer (a ternary one keeps 0, a binary one cannot represent it).

    Args:
        model: the network; modified in place (it cannot itself be a Conv2d/Linear: wrap it, or use
            ``QuantLinear.from_float``).
        config: a :class:`QuantConfig`.
        filter_fn: optional ``filter_fn(module, name) -> bool``; layers for which it is False stay float.

    Returns:
        A :class:`QuantReport`: per layer the quantizers, bit widths and the rule used, or why it stayed float.

    Raises:
        ValueError: a rule that matches no layer or decides none, or a model without Conv2d/Linear layers;
            nothing is changed then.

    Example:
        >>> from lowbit.models import create_model
        >>> model = create_model("lenet5")
        >>> report = quantize_(model, QuantConfig(rules={"*": {"weight": "ste_sign"}}))
        >>> report.quantized, report.kept_float
        (['conv2', 'fc1'], {'conv1': 'first layer (keep_first_last)', 'fc2': 'last layer (keep_first_last)'})

    References:
        Rastegari et al., "XNOR-Net", arXiv:1603.05279; Zhou et al., "DoReFa-Net", arXiv:1606.06160.
    """
    if not isinstance(config, QuantConfig):
        hint = " (validate a mapping with QuantConfig.model_validate)" if isinstance(config, Mapping) else ""
        raise TypeError(f"quantize_ takes a QuantConfig, got {type(config).__name__}{hint}")
    # lazy: lowbit.nn.layers imports lowbit.quant.base, and lowbit.quant imports this module
    from lowbit.nn.layers import QuantConv2d, QuantLinear
    from lowbit.nn.recurrent import QuantGRU, QuantLSTM

    quant_types: dict[type[nn.Module], Any] = {
        nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear, nn.LSTM: QuantLSTM, nn.GRU: QuantGRU}
    layers = _eligible(model, config.requantize)
    done = [] if config.requantize else [n for n, m in model.named_modules()
                                         if isinstance(m, tuple(quant_types.values()))]
    hint = (f" (already quantized, and re-decided only with requantize: true: {', '.join(done)})" if done else "")
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d/nn.Linear layer to quantize{hint}")
    if "" in layers:
        raise ValueError(f"the model itself is an nn.{type(model).__name__} and cannot be swapped in place; wrap it "
                         f"(nn.Sequential(layer)) or use {quant_types[type(model)].__name__}.from_float(layer)")
    try:
        plan = _plan(layers, config, filter_fn)
    except ValueError as e:
        raise ValueError(f"{e}{hint}") from None

    # build every quantized layer first: a quantizer that fails to build leaves the model untouched
    new: dict[str, nn.Module] = {}
    requant: dict[str, tuple[Quantizer | None, Quantizer | None]] = {}
    for name, d in plan.items():
        if d.quant is not None:
            wq, iq = d.quant.build()
            if type(layers[name]) in quant_types:
                new[name] = quant_types[type(layers[name])].from_float(layers[name], wq, iq)
            else:  # requantize: an already quantized layer keeps its module and gets new quantizers
                requant[name] = (wq, iq)
    for name, (wq, iq) in requant.items():
        _requantize(layers[name], wq, iq)

    refs = _references(model)
    for name, layer in new.items():
        old = layers[name]
        masked = _mask_names(old)
        if masked:  # move the masks with their gradient hooks (the parameters are shared)
            from lowbit.prune.masks import attach_mask, masks_of, remove_masks

            masks = masks_of(old)
            remove_masks(old)
            for p in masked:
                attach_mask(layer, p, masks[p])
        for parent, attr in refs[id(old)]:
            setattr(parent, attr, layer)

    # Record what was done as exact-name rules, so a checkpoint of this model can be rebuilt by
    # replaying it (lowbit.train.checkpoint.load_model), whatever rules, globs or filter_fn chose it.
    applied = QuantConfig(rules={n: d.quant for n, d in plan.items() if d.quant is not None}, keep_first_last=False,
                          requantize=config.requantize)
    model.lowbit_transforms = [*getattr(model, "lowbit_transforms", []),  # type: ignore[assignment]
                               {"quantize": applied.model_dump(mode="json")}]

    rows = []
    for name, d in plan.items():
        layer = new.get(name, layers[name])
        wq = getattr(layer, "weight_quantizer", None)
        iq = getattr(layer, "input_quantizer", None)
        if d.quant is None and (wq is not None or iq is not None):  # requantize: undecided, keeps its quantizers
            weight, inp = (type(q).__name__ if q is not None else "float" for q in (wq, iq))
            note = f"kept its quantizers ({d.note})"
        else:
            weight, inp = describe_spec(d.quant.weight if d.quant else None), describe_spec(d.quant.input if d.quant
                                                                                          else None)
            note = d.note
        rows.append(LayerReport(name=name, type=type(layers[name]).__name__, weight=weight, input=inp,
                                weight_bits=_bits(wq), input_bits=_bits(iq), rule=d.rule, note=note))
    return QuantReport(tuple(rows))


def replay_quantize(model: nn.Module, record: dict[str, Any]) -> nn.Module:
    """Re-apply a recorded ``quantize_`` (a checkpoint's ``transforms`` entry) to a fresh model; returns it."""
    quantize_(model, QuantConfig.model_validate(record))
    return model
