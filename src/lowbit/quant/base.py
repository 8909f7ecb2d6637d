"""The quantizer contract every method implements, and the quantizer registry.

A quantizer is an ``nn.Module`` whose ``forward(x)`` returns the fake-quantized tensor: the same shape
and float dtype as ``x``, holding only values the quantized format can represent. Training-time tricks
(straight-through estimators, regularizers, learned scales) live inside the quantizer; exporters, cost
models and kernels read only this contract:

    bit_width: int                         bits per quantized value (1 binary, 2 ternary, k for k-bit)
    scale: Tensor | None                   real value of one integer step, where meaningful
    zero_point: Tensor | None              the integer that represents real 0, where meaningful
    levels() -> Tensor | None              the finite set of real values the output takes, where fixed
    init_from(weight)                      optional: create weight-dependent parameters up front

The math and its custom gradient are plain functions (``torch.autograd.Function``) beside the class;
the class holds hyper-parameters and state and is registered by name:

    @register_quantizer("ste_sign")
    class SteSign(Quantizer): ...

    get_quantizer("ste_sign")                       # a fresh instance with default arguments
    get_quantizer({"name": "dorefa_weight", "bits": 2})
    get_quantizer(existing_instance)                # returned as is
    get_quantizer(None)                             # None: no quantization
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from lowbit._registry import Registry

__all__ = ["Quantizer", "quantizers", "register_quantizer", "get_quantizer", "QuantizerSpec", "quantized_weights"]


class Quantizer(nn.Module):
    """Base class of all quantizers (see the module docstring for the contract)."""

    bit_width: int = 32
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None

    def levels(self) -> torch.Tensor | None:
        """The sorted real values the output can take, when they are fixed (e.g. ``[-1, 1]``); else None."""
        return None

    def init_from(self, weight: torch.Tensor) -> None:
        """Called once with a layer's weight when a quantized layer adopts it (``from_float``), so that a
        weight quantizer whose parameters depend on the weight (e.g. a per-channel scale) creates them
        before any optimizer is built. Default: nothing."""

    def extra_repr(self) -> str:
        return f"bit_width={self.bit_width}"


Q = TypeVar("Q", bound=type[Quantizer])
quantizers: Registry[type[Quantizer]] = Registry("quantizer")

QuantizerSpec = str | Mapping[str, Any] | Quantizer | None


def register_quantizer(name: str) -> Callable[[Q], Q]:
    """Class decorator registering a :class:`Quantizer` subclass under ``name`` (snake_case)."""

    def deco(cls: Q) -> Q:
        if not (isinstance(cls, type) and issubclass(cls, Quantizer)):
            raise TypeError(f"register_quantizer({name!r}) decorates Quantizer subclasses, got {cls!r}")
        quantizers.register(name)(cls)
        return cls

    return deco


def get_quantizer(spec: QuantizerSpec) -> Quantizer | None:
    """A quantizer from a registered name, a ``{"name": ..., **kwargs}`` mapping, an instance, or None.

    Raises a ``KeyError`` listing the registered names for an unknown name, and a ``TypeError`` naming
    the quantizer and its accepted arguments for a wrong keyword.
    """
    if spec is None or isinstance(spec, Quantizer):
        return spec
    if isinstance(spec, str):
        name, kwargs = spec, {}
    elif isinstance(spec, Mapping):
        if "name" not in spec:
            raise ValueError(f"a quantizer mapping needs a 'name' key; got keys {sorted(spec)}")
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        name = str(spec["name"])
    else:
        raise TypeError(f"a quantizer is a name, a mapping with 'name', a Quantizer or None; got {type(spec).__name__}")
    cls = quantizers.get(name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        import inspect

        params = [p for p in inspect.signature(cls).parameters if p != "self"]
        raise TypeError(f"quantizer {name!r}: {e}; it takes: {', '.join(params) or 'no arguments'}") from None


def _latent(module: nn.Module, name: str) -> torch.Tensor | None:
    """The stored (leaf) tensor ``name`` of ``module``: under a parametrization its ``original``, under
    ``torch.nn.utils.prune`` its ``<name>_orig`` (the masked ``name`` is recomputed from it before each forward)."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original  # type: ignore[index,union-attr,return-value]
    orig = getattr(module, f"{name}_orig", None)
    if isinstance(orig, nn.Parameter):
        return orig
    w = getattr(module, name, None)
    return w if isinstance(w, torch.Tensor) else None


def quantized_weights(model: nn.Module) -> list[tuple[str, torch.Tensor | None, Quantizer]]:
    """``(name, latent weight, quantizer)`` for every quantized weight of ``model``: each module with a
    ``weight_quantizer`` (its ``weight``), and each matrix of a recurrent layer with ``weight_quantizers`` (one
    quantizer per ``weight_ih_l0``, ``weight_hh_l0``, ...). The weight is the stored leaf tensor the optimizer
    trains (under a parametrization, its ``original``), or None for a module that has a quantizer but no weight.

    Callbacks that act on quantized weights (clipping, loss-aware refits) use this so that they see every layer
    kind alike.
    """
    out: list[tuple[str, torch.Tensor | None, Quantizer]] = []
    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        per_matrix = getattr(m, "weight_quantizers", None)
        if isinstance(per_matrix, nn.ModuleDict):  # recurrent layers: one quantizer per weight matrix
            out.extend((prefix + name, _latent(m, name), q) for name, q in per_matrix.items()
                       if isinstance(q, Quantizer))
            continue
        q = getattr(m, "weight_quantizer", None)
        if isinstance(q, Quantizer):
            out.append((prefix + "weight", _latent(m, "weight"), q))
    return out
