"""Scalpel: pruning shaped by the hardware's parallelism (SIMD-aware weight pruning and node pruning).

Two structured forms of pruning whose zeros a processor can actually skip:

* **SIMD-aware weight pruning** (:func:`simd_prune_`): weights are removed in aligned groups of
  ``simd_width`` consecutive weights along the input dimension, scored by the group's L2 norm, so every
  kept group is one dense SIMD vector (``lowbit.prune.simd`` packs and runs them). The paper uses it on
  microcontrollers, and together with node pruning on desktop CPUs.
* **Node pruning** (:func:`prune_nodes_`, :func:`shrink_nodes_`): whole neurons (Linear out-features) or
  channels (Conv2d out-channels) are removed; the layer *and* the next layer's input dimension shrink,
  so the matrices stay dense and smaller (the paper's choice for GPUs).

Coupled channels: removing output ``j`` of a layer removes input ``j`` of the layer that consumes it
(``HW`` consecutive inputs when a ``flatten`` lies between a Conv2d and a Linear), plus channel ``j`` of
every batch norm in between. :func:`node_couplings` finds these pairs by tracing the model with
``torch.fx``; it supports sequential chains (Linear -> Linear, Conv2d -> Conv2d, Conv2d -> flatten ->
Linear) through activations with ``f(0) = 0``, pooling, dropout and batch norm, and raises
:class:`UnsupportedStructureError` for anything else (residual adds, concatenation, grouped convs,
weight sharing, the output layer), naming the layer and the node that stops it.

Node selection differs from the paper: Scalpel learns a mask per node with a regularized training pass;
here nodes are ranked by an importance criterion (default: L1 norm of the node's weights) and the
masked model can be fine-tuned before :func:`shrink_nodes_` removes the nodes.

Example:
    >>> from lowbit.models import create_model
    >>> m = create_model("lenet300_100")
    >>> prune_nodes_(m, {"fc1": 0.5, "fc2": 0.5})
    {'fc1': (300, 150), 'fc2': (100, 50)}
    >>> m.fc2.weight.shape
    torch.Size([50, 150])

References:
    Yu, Lukefahr, Palframan, Dasika, Das, Mahlke, "Scalpel: Customizing DNN Pruning to the Underlying
    Hardware Parallelism", ISCA 2017 (no arXiv version).
    Fang et al., "DepGraph: Towards Any Structural Pruning" (Torch-Pruning), arXiv:2301.12900.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from lowbit.prune.criteria import Criterion, get_criterion, keep_by_sparsity
from lowbit.prune.masks import MASK_SUFFIX, attach_mask
from lowbit.prune.prune import PruneConfig, match_layers, prune_

__all__ = [
    "Coupling", "UnsupportedStructureError", "node_couplings", "prune_nodes_", "shrink_nodes_", "simd_prune_",
]

_LAYERS = (nn.Linear, nn.Conv2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# Modules and functions that keep channel j in place and map an all-zero channel to an all-zero channel
# (f(0) = 0), so a removed node's zero output changes nothing downstream.
_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.Tanh, nn.GELU, nn.SiLU, nn.Hardswish, nn.Identity, nn.Dropout,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
_PASS_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.hardtanh, F.gelu, F.silu, F.hardswish, F.dropout, F.max_pool2d, F.avg_pool2d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.relu, torch.tanh, F.tanh,
}
_PASS_METHODS = {"relu", "relu_", "tanh", "contiguous"}
_COMBINE = {operator.add, operator.iadd, operator.mul, operator.sub, torch.add, torch.mul, torch.sub, torch.cat,
            torch.stack, "add", "add_", "mul", "mul_", "sub"}


class UnsupportedStructureError(ValueError):
    """The model's graph around a layer is not a sequential chain node pruning can shrink."""


@dataclass(frozen=True)
class Coupling:
    """Who else changes when output channels of ``producer`` are removed.

    Attributes:
        producer: Linear/Conv2d whose outputs (rows / filters) go.
        norms: batch norms between producer and consumer, whose channels go too.
        consumer: the next Linear/Conv2d, whose inputs go.
        block: consumer inputs per producer channel: 1, or ``H * W`` when a flatten lies in between.
    """

    producer: str
    norms: tuple[str, ...]
    consumer: str
    block: int


def _flatten_dims(node: fx.Node) -> tuple[int, int]:
    args = list(node.args[1:])
    start = args[0] if args else node.kwargs.get("start_dim", 0)
    end = args[1] if len(args) > 1 else node.kwargs.get("end_dim", -1)
    return start, end


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # fx raises many types for data-dependent control flow
        raise UnsupportedStructureError(
            f"node pruning traces the model with torch.fx, which failed for {type(model).__name__}: {e}") from e


def node_couplings(
    model: nn.Module, layers: list[str] | None = None, skip_unsupported: bool = False
) -> dict[str, Coupling]:
    """Find, for each named Linear/Conv2d, the layer (and batch norms) coupled to its output channels.

    Rule: from the layer's node, follow the single user through channel-preserving, zero-preserving ops
    until the next Linear/Conv2d. Any branch (more than one user), unknown op, reshape other than
    ``flatten(1)``, grouped consumer conv, repeated call of a layer, or reaching the model output raises
    :class:`UnsupportedStructureError`.

    Args:
        model: the network (traced with ``torch.fx``).
        layers: producer names to analyse (default: every Linear/Conv2d).
        skip_unsupported: leave out the layers whose structure is unsupported instead of raising.

    Example:
        >>> from lowbit.models import create_model
        >>> node_couplings(create_model("lenet5"), ["conv2"])["conv2"]
        Coupling(producer='conv2', norms=(), consumer='fc1', block=16)
    """
    gm = _trace(model)
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    if layers is None:
        layers = [n for n, m in modules.items() if isinstance(m, _LAYERS) and n]
    out = {}
    for name in layers:
        node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == name), None)
        if node is None or not isinstance(modules.get(name), _LAYERS):
            raise UnsupportedStructureError(f"{name!r} is not a Linear/Conv2d called in the forward pass")
        try:
            out[name] = _follow(name, node, modules, calls)
        except UnsupportedStructureError:
            if not skip_unsupported:
                raise
    return out


def _follow(name: str, node: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int]) -> Coupling:
    producer = modules[name]

    def fail(why: str) -> UnsupportedStructureError:
        return UnsupportedStructureError(
            f"cannot remove output channels of {name!r}: {why}. Node pruning supports sequential chains "
            "(Linear -> Linear, Conv2d -> Conv2d, Conv2d -> flatten -> Linear) through activations with "
            "f(0) = 0, pooling, dropout and batch norm")

    if calls[name] > 1:
        raise fail(f"the layer is called {calls[name]} times (weight sharing)")
    norms: list[str] = []
    flattened, cur = False, node
    while True:
        users = list(cur.users)
        if len(users) != 1:
            what = ", ".join(f"{u.op} {getattr(u.target, '__name__', u.target)}" for u in users) or "nothing"
            raise fail(f"its output feeds {len(users)} nodes ({what}); branches and residual adds are not supported")
        u = users[0]
        if u.op == "output":
            raise fail("it is the model's output layer (its outputs are the model's outputs)")
        target = getattr(u.target, "__name__", u.target)
        if u.op != "call_module" and u.target in _COMBINE:
            raise fail(f"it feeds {u.op} {target}, an elementwise combination with another tensor (e.g. a residual "
                       "add) or a concatenation")
        if u.args[:1] != (cur,):
            raise fail(f"{u.op} {target} takes it as a secondary input")
        if u.op == "call_module":
            mod = modules[u.target]
            if isinstance(mod, _LAYERS):
                return _consumer(name, producer, u.target, mod, norms, flattened, calls, fail)
            if isinstance(mod, _NORMS) and not flattened:
                if not mod.affine:
                    raise fail(f"batch norm {u.target!r} has no affine parameters to zero a removed channel")
                norms.append(u.target)
            elif isinstance(mod, nn.Flatten) and (mod.start_dim, mod.end_dim) == (1, -1) and not flattened:
                flattened = True
            elif not isinstance(mod, _PASS_MODULES):
                raise fail(f"it feeds {type(mod).__name__} {u.target!r}, which is not known to keep channels in "
                           "place with f(0) = 0")
        elif u.op == "call_function" and u.target in _PASS_FUNCTIONS:
            pass
        elif (u.op, u.target) in (("call_function", torch.flatten), ("call_method", "flatten")):
            if _flatten_dims(u) != (1, -1) or flattened:
                raise fail(f"flatten with dims {_flatten_dims(u)}; only flatten(1) of (B, C, H, W) is supported")
            flattened = True
        elif u.op == "call_method" and u.target in _PASS_METHODS:
            pass
        else:
            raise fail(f"it feeds {u.op} {target}, which is not known to keep channels in place with f(0) = 0")
        cur = u


def _consumer(
    name: str, producer: nn.Module, cname: str, consumer: nn.Module, norms: list[str], flattened: bool,
    calls: dict[str, int], fail: Callable[[str], UnsupportedStructureError],
) -> Coupling:
    if calls[cname] > 1:
        raise fail(f"its consumer {cname!r} is called {calls[cname]} times (weight sharing)")
    channels = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
    if isinstance(consumer, nn.Conv2d):
        if isinstance(producer, nn.Linear) or flattened:
            raise fail(f"a Conv2d ({cname!r}) consumes a flattened or fully connected output")
        if consumer.groups != 1:
            raise fail(f"its consumer {cname!r} is a grouped convolution (groups={consumer.groups})")
        return Coupling(name, tuple(norms), cname, 1)
    if isinstance(producer, nn.Conv2d) and not flattened:
        raise fail(f"Linear {cname!r} is applied to the 4-D output without flatten(1)")
    if consumer.in_features % channels:
        raise fail(f"Linear {cname!r} has {consumer.in_features} inputs, not a multiple of {channels} channels")
    return Coupling(name, tuple(norms), cname, consumer.in_features // channels)


@torch.no_grad()
def prune_nodes_(
    model: nn.Module,
    rules: dict[str, float],
    criterion: str | Criterion = "l1_filter",
    shrink: bool = True,
) -> dict[str, tuple[int, int]]:
    """Node pruning: remove a fraction of the neurons/channels of matched layers (and shrink the next layer).

    Rule: in each layer matched by ``rules`` (module-name glob -> fraction of its output nodes to remove),
    the nodes with the lowest criterion score go (default ``l1_filter``: ``score_o = sum |W[o, :]|``; at
    least one node stays). A removed node's weight row, bias entry and the affine parameters of channel
    ``o`` of any batch norm before the consumer are masked to 0, so the masked model computes exactly what
    the shrunk model computes. With ``shrink=True`` the nodes are then removed (:func:`shrink_nodes_`);
    with ``shrink=False`` the masked model can be fine-tuned first (masks stay 0 under training).

    Args:
        model: a sequential-chain network (see :func:`node_couplings`); modified in place.
        rules: ``{"fc1": 0.5, "conv*": 0.25}``: fraction of nodes to remove per layer.
        criterion: per-node criterion (registered name or object) giving one score per output node.
        shrink: remove the masked nodes physically now.

    Returns:
        ``{layer: (nodes before, nodes after)}`` for the matched layers.

    Example:
        >>> from lowbit.models import create_model
        >>> prune_nodes_(create_model("lenet5"), {"conv1": 0.5, "conv2": 0.2})
        {'conv1': (20, 10), 'conv2': (50, 40)}

    References:
        Yu et al., "Scalpel: Customizing DNN Pruning to the Underlying Hardware Parallelism", ISCA 2017.
        Li et al., "Pruning Filters for Efficient ConvNets", arXiv:1608.08710 (L1 criterion).
    """
    layers = match_layers(model, rules)
    couplings = node_couplings(model, list(layers))  # fail before anything changes
    crit = get_criterion(criterion)
    modules = dict(model.named_modules())
    result = {}
    for name, (module, ratio) in layers.items():
        units = crit(module.weight)
        n = module.weight.shape[0]
        if units.scores.numel() != n:
            raise ValueError(f"criterion {crit!r} scores {units.scores.numel()} units in {name!r}, not one per "
                             f"output node ({n}); use 'l1_filter'")
        keep = keep_by_sparsity(units, ratio)
        if not keep.any():
            raise ValueError(f"rule {ratio} would remove every node of {name!r}; use a ratio < 1")
        _mask_nodes(module, keep, [modules[b] for b in couplings[name].norms])
        result[name] = (n, int(keep.sum()))
    if shrink:
        shrink_nodes_(model, list(layers))
    return result


def _mask_nodes(module: nn.Module, keep: torch.Tensor, norms: list[nn.Module]) -> None:
    rows = keep.to(module.weight.device)
    old = getattr(module, "weight" + MASK_SUFFIX, None)
    mask = rows.view(-1, *[1] * (module.weight.dim() - 1)).expand(module.weight.shape)
    attach_mask(module, "weight", mask if old is None else mask & old)
    for target in [module, *norms]:
        for pname in ("bias",) + (("weight",) if target is not module else ()):
            p = getattr(target, pname, None)
            if isinstance(p, nn.Parameter):
                prev = getattr(target, pname + MASK_SUFFIX, None)
                attach_mask(target, pname, rows if prev is None else rows & prev)


def _dead_nodes(module: nn.Module, norms: list[nn.Module]) -> torch.Tensor:
    """Bool per output node: removable without changing the output (all weights masked or zero, bias 0,
    batch norm affine 0)."""
    w = module.weight.detach()
    mask = getattr(module, "weight" + MASK_SUFFIX, None)
    dead = (w == 0).flatten(1).all(1)
    if mask is not None:
        dead &= ~mask.flatten(1).any(1)
    if module.bias is not None:
        dead &= module.bias.detach() == 0
    for bn in norms:
        dead &= (bn.weight.detach() == 0) & (bn.bias.detach() == 0)
    return dead


def _replace(module: nn.Module, name: str, index: tuple[slice | torch.Tensor, ...]) -> None:
    """Slice parameter (or buffer) ``name`` and its mask with ``index``, keeping masks and hooks working."""
    value = getattr(module, name)
    if value is None:
        return
    mask = getattr(module, name + MASK_SUFFIX, None)
    if isinstance(value, nn.Parameter):
        setattr(module, name, nn.Parameter(value.detach()[index].clone(), requires_grad=value.requires_grad))
        if mask is not None:
            attach_mask(module, name, mask[index])
    else:
        module._buffers[name] = value[index].clone()


@torch.no_grad()
def shrink_nodes_(model: nn.Module, layers: list[str] | None = None) -> dict[str, tuple[int, int]]:
    """Physically remove dead nodes: output rows/filters that are entirely masked (or zero) with zero bias.

    Rule: node ``o`` of a layer is dead if every weight of row ``o`` is masked or zero, its bias is 0 and
    the affine parameters of channel ``o`` in the batch norms up to the consumer are 0; then it contributes
    exactly 0 downstream. Dead nodes are removed from the layer, the batch norms (with their running
    statistics) and the consumer's inputs (``block`` consecutive inputs per channel after a flatten);
    masks are sliced along. The output of the model is unchanged. At least one node is kept per layer.

    Args:
        model: modified in place; optimizers built before must be rebuilt (parameters are replaced).
        layers: producers to shrink; an unsupported structure raises :class:`UnsupportedStructureError`
            (default: every Linear/Conv2d with dead nodes whose structure is supported; others are left).

    Returns:
        ``{layer: (nodes before, nodes after)}`` for the layers that changed.

    Example:
        >>> from lowbit.models import create_model
        >>> m = create_model("lenet300_100"); _ = prune_nodes_(m, {"fc1": 0.9}, shrink=False)
        >>> shrink_nodes_(m)
        {'fc1': (300, 30)}

    References:
        Yu et al., "Scalpel: Customizing DNN Pruning to the Underlying Hardware Parallelism", ISCA 2017.
    """
    modules = dict(model.named_modules())
    if layers is None:  # only layers with a dead node, and only supported ones: a residual net can shrink its chains
        layers = [n for n, m in modules.items() if isinstance(m, _LAYERS) and n and _dead_nodes(m, []).any()]
        if not layers:
            return {}
        couplings = node_couplings(model, layers, skip_unsupported=True)
    else:
        couplings = node_couplings(model, layers)
    plans = {}
    for name, c in couplings.items():
        dead = _dead_nodes(modules[name], [modules[b] for b in c.norms])
        if dead.all():
            dead[0] = False  # keep one node: a zero-width layer is not a layer
        if dead.any():
            plans[name] = (c, ~dead)
    result = {}
    for name, (c, keep) in plans.items():
        producer, consumer = modules[name], modules[c.consumer]
        idx = keep.nonzero().flatten()
        _replace(producer, "weight", (idx,))
        _replace(producer, "bias", (idx,))
        for b in c.norms:
            bn = modules[b]
            for field in ("weight", "bias", "running_mean", "running_var"):
                _replace(bn, field, (idx,))
            bn.num_features = len(idx)
        # channel j -> consumer inputs j*block .. j*block + block - 1
        cols = (idx.view(-1, 1) * c.block + torch.arange(c.block, device=idx.device)).flatten()
        _replace(consumer, "weight", (slice(None), cols))
        if isinstance(producer, nn.Linear):
            result[name] = (producer.out_features, len(idx))
            producer.out_features = len(idx)
        else:
            result[name] = (producer.out_channels, len(idx))
            producer.out_channels = len(idx)
        if isinstance(consumer, nn.Linear):
            consumer.in_features = len(cols)
        else:
            consumer.in_channels = len(idx)
    return result


def simd_prune_(
    model: nn.Module,
    rules: dict[str, float],
    simd_width: int = 4,
    layer_types: tuple[str, ...] = ("Linear", "Conv2d"),
) -> dict[str, float]:
    """SIMD-aware weight pruning: remove aligned groups of ``simd_width`` weights with the lowest L2 norm.

    Formula: view ``W`` as ``(out, in * kh * kw)``; group ``g`` of row ``o`` is columns
    ``[g * k, (g + 1) * k)`` with ``k = simd_width``; ``score_{o,g} = ||W[o, gk:(g+1)k]||_2``; per layer,
    the lowest-scoring groups are masked until the rule's fraction of the weights is gone. Every group is
    kept or removed whole, so each kept group is one aligned SIMD load.

    Args:
        model: modified in place (masks attached; fine-tune with them as for any pruning).
        rules: module-name glob -> target sparsity.
        simd_width: weights per group (4 for 128-bit float32 SIMD, 8 for AVX2).
        layer_types: which layer types the rules may match.

    Returns:
        ``{"fc1.weight": sparsity, ...}``.

    Example:
        >>> from lowbit.models import create_model
        >>> m = create_model("lenet300_100")
        >>> round(simd_prune_(m, {"*": 0.9}, simd_width=4)["fc1.weight"], 2)
        0.9

    References:
        Yu et al., "Scalpel: Customizing DNN Pruning to the Underlying Hardware Parallelism", ISCA 2017.
    """
    return prune_(model, PruneConfig(criterion="group_norm", group_size=simd_width, rules=rules,
                                     layer_types=layer_types))
