"""Trained quantization by weight sharing (Deep Compression, section 3): ``cluster_``, then fine-tune.

Each selected layer's surviving weights are clustered by 1-D k-means into ``2**bits`` shared values;
the layer's ``weight`` becomes a function of those centroids,

    W = where(kept, C[I], 0)        C: (k,) trainable centroids;  I: codes;  kept: mask (both buffers)

registered with :func:`torch.nn.utils.parametrize.register_parametrization`, so that ``module.weight``
is still a tensor of the usual shape and any training loop (``lowbit.train.fit``) fine-tunes the
centroids: autograd of the gather ``C[I]`` sums the weight gradient per cluster, which is the paper's
update ``dL/dC_k = sum_ij dL/dW_ij 1(I_ij = k)``. Pruned weights stay exactly zero.

State-dict keys of a shared layer ``fc1``: ``fc1.parametrizations.weight.original`` (the centroids,
shape (k,)), ``fc1.parametrizations.weight.0.codes`` (int32, weight's shape) and
``fc1.parametrizations.weight.0.mask`` (bool). :func:`strip_sharing_` turns the layer back into a
plain ``fc1.weight`` parameter holding ``C[I]``; :func:`shared_weights` hands the codebook, codes and
positions to the encoder (``lowbit.codec``).

    cluster_(model, ClusterConfig(types={"Linear": 4}))
    fit(model, data, TrainConfig(epochs=2, lr=0.01))      # trains the centroids (and biases)
    table = shared_weights(model)                         # for the sparse + Huffman container
    strip_sharing_(model)                                 # plain weights again, same state-dict keys

References:
    Han, Mao, Dally, "Deep Compression: Compressing Deep Neural Networks with Pruning, Trained
    Quantization and Huffman Coding", ICLR 2016, arXiv:1510.00149.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Annotated, Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.utils import parametrize

from lowbit.cluster.kmeans import Init, cluster_weight

__all__ = [
    "LAYER_TYPES", "ClusterConfig", "SharedWeight", "SharedLayer", "kept_mask", "cluster_", "shared_weights",
    "strip_sharing_", "is_shared",
]

# The layer types weight sharing applies to (their ``weight`` is the shared tensor). Subclasses count:
# a QuantConv2d is a Conv2d.
LAYER_TYPES: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d,
    "ConvTranspose1d": nn.ConvTranspose1d, "ConvTranspose2d": nn.ConvTranspose2d,
    "ConvTranspose3d": nn.ConvTranspose3d, "Embedding": nn.Embedding,
}
LayerType = Literal["Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
                    "ConvTranspose3d", "Embedding"]
Bits = Annotated[int, Field(ge=1, le=16)]


class ClusterConfig(BaseModel):
    """Which layers share weights, with how many bits, and how k-means starts.

    A layer of one of the ``LAYER_TYPES`` is clustered when its module name matches a glob of
    ``layers`` (first match in order gives its bits) or else when its type is a key of ``types``;
    names matching ``exclude`` are skipped. The defaults are the paper's: 8 bits (256 shared values)
    per convolution, 5 bits (32) per fully connected layer, linear initialization.

    A ``layers`` or ``exclude`` glob that matches no layer is an error (a typo would otherwise
    silently leave a layer in float), and so is a config that selects nothing.

    Example:
        >>> ClusterConfig(layers={"fc3": 6}, types={"Linear": 4}, init="density")  # doctest: +ELLIPSIS
        ClusterConfig(...)

    References:
        Han et al., "Deep Compression", arXiv:1510.00149, section 3 and Table 1-4 (bits per layer).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    version: Literal[1] = 1
    types: dict[LayerType, Bits] = Field(default_factory=lambda: {"Conv2d": 8, "Linear": 5},
                                         description="layer type -> bits per shared weight (1..16)")
    layers: dict[str, Bits] = Field(default_factory=dict,
                                    description="module-name glob -> bits; overrides types, first match wins")
    exclude: tuple[str, ...] = Field((), description="module-name globs left unclustered")
    init: Init = Field("linear", description="k-means initialization: linear (paper's best), density, random")
    max_iter: int = Field(300, ge=1, description="most Lloyd iterations per layer")
    seed: int = Field(0, description="seed of the random initialization")


class SharedWeight(nn.Module):
    """Parametrization ``W = where(mask, C[codes], 0)``: a weight made of ``2**bits`` shared values.

    Forward: ``W_ij = C_{I_ij}`` where ``mask_ij`` (kept), else exactly ``0`` (pruned).

    Gradient: ``dL/dC_k = sum_ij dL/dW_ij 1(I_ij = k) 1(mask_ij)`` -- the gather's backward is a
    scatter-add, so each centroid receives the summed gradient of the weights in its cluster, and
    pruned weights pass none. ``codes`` and ``mask`` are buffers; only ``C`` is trained.

    ``right_inverse(W)`` (used when registering and when assigning ``module.weight = W``) returns the
    least-squares centroids for the fixed codes, the mean of ``W`` over each cluster's kept positions
    (0 for a cluster without any).

    Args:
        codes: integer cluster index of every weight (any value where pruned), weight's shape.
        mask: bool, True where the weight survives pruning, weight's shape.
        bits: ``log2`` of the number of centroids, 1..16.

    Example:
        >>> layer = nn.Linear(3, 2)
        >>> p = SharedWeight(torch.tensor([[0, 1, 1], [1, 0, 0]]), torch.tensor([[1, 1, 0], [1, 1, 1]]).bool(), 1)
        >>> p(torch.tensor([-0.5, 0.5]))
        tensor([[-0.5000,  0.5000,  0.0000],
                [ 0.5000, -0.5000, -0.5000]])

    References:
        Han et al., "Deep Compression", arXiv:1510.00149, section 3 and Figure 3.
    """

    codes: torch.Tensor
    mask: torch.Tensor

    def __init__(self, codes: torch.Tensor, mask: torch.Tensor, bits: int) -> None:
        super().__init__()
        if codes.shape != mask.shape:
            raise ValueError(f"codes shape {tuple(codes.shape)} differs from mask shape {tuple(mask.shape)}")
        if not 1 <= bits <= 16:
            raise ValueError(f"bits must be in 1..16, got {bits}")
        self.bits = bits
        # int32 indexes directly (no int64 copy per forward); codes at pruned positions are 0, unused
        self.register_buffer("codes", torch.where(mask.bool(), codes, 0).to(torch.int32))
        self.register_buffer("mask", mask.bool().clone())

    @property
    def num_centroids(self) -> int:
        return 2**self.bits

    def forward(self, centroids: torch.Tensor) -> torch.Tensor:
        """``W = where(mask, C[codes], 0)``; backward: ``dL/dC_k = sum over kept (i, j) with I_ij = k of dL/dW_ij``."""
        return torch.where(self.mask, centroids[self.codes], centroids.new_zeros(()))

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """``C_k = mean{W_ij : I_ij = k, mask_ij}`` (0 for an empty cluster): the centroids closest to ``W``."""
        idx = self.codes[self.mask].long()  # (n_kept,)
        vals = weight.detach()[self.mask].to(torch.float64)
        k = self.num_centroids
        sums = torch.zeros(k, dtype=torch.float64, device=weight.device).index_add_(0, idx, vals)
        counts = torch.zeros(k, dtype=torch.float64, device=weight.device).index_add_(0, idx, torch.ones_like(vals))
        return (sums / counts.clamp(min=1)).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, kept={int(self.mask.sum())}/{self.mask.numel()}"


class SharedLayer(NamedTuple):
    """What the encoder needs from one shared layer: ``centroids`` (k,) float32 (the codebook),
    ``codes`` (n_kept,) int64 aligned with ``positions`` (n_kept,) int64, the ascending flat
    (row-major) indices of the kept weights, and the weight's ``shape``. ``bits = log2(k)``."""

    centroids: torch.Tensor
    codes: torch.Tensor
    positions: torch.Tensor
    shape: tuple[int, ...]


def kept_mask(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """Which entries of ``module.<name>`` survive pruning.

    ``kept = module.<name>_mask`` when the module has that buffer (pruning masks of
    :mod:`lowbit.prune`), else ``kept = (module.<name> != 0)``. No gradient.

    Args:
        module: the layer.
        name: the parameter's name.

    Returns:
        bool tensor of the parameter's shape.

    Example:
        >>> kept_mask(nn.Linear(4, 2)).shape
        torch.Size([2, 4])

    References:
        Han et al., "Learning both Weights and Connections for Efficient Neural Networks", arXiv:1506.02626.
    """
    weight = getattr(module, name)
    mask = getattr(module, f"{name}_mask", None)
    if isinstance(mask, torch.Tensor):
        if mask.shape != weight.shape:
            raise ValueError(f"{name}_mask shape {tuple(mask.shape)} differs from {name} shape {tuple(weight.shape)}")
        return mask.bool()
    return weight.detach() != 0


def is_shared(module: nn.Module) -> bool:
    """True when ``module.weight`` is parametrized by :class:`SharedWeight` (``W = where(kept, C[I], 0)``).

    Args:
        module: any module.

    Example:
        >>> is_shared(nn.Linear(2, 2))
        False

    References:
        Han et al., "Deep Compression", arXiv:1510.00149, section 3.
    """
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, SharedWeight) for p in module.parametrizations["weight"])  # type: ignore[union-attr]


def _type_name(module: nn.Module, cfg: ClusterConfig) -> str | None:
    for key in cfg.types:
        if isinstance(module, LAYER_TYPES[key]):
            return key
    return None


def _plan(model: nn.Module, cfg: ClusterConfig,
          filter_fn: Callable[[nn.Module, str], bool] | None) -> dict[str, tuple[nn.Module, int]]:
    """name -> (module, bits) of every layer ``cfg`` selects; errors name every problem at once."""
    candidates = [(n, m) for n, m in model.named_modules() if isinstance(m, tuple(LAYER_TYPES.values()))]
    listing = ", ".join(f"{n} ({type(m).__name__})" for n, m in candidates) or "none"
    problems = []
    for glob in [*cfg.layers, *cfg.exclude]:
        if not any(fnmatch.fnmatchcase(n, glob) for n, _ in candidates):
            problems.append(f"rule {glob!r} matches no layer")
    plan: dict[str, tuple[nn.Module, int]] = {}
    for name, module in candidates:
        if any(fnmatch.fnmatchcase(name, g) for g in cfg.exclude):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        bits = next((b for g, b in cfg.layers.items() if fnmatch.fnmatchcase(name, g)), None)
        if bits is None and (key := _type_name(module, cfg)) is not None:
            bits = cfg.types[key]
        if bits is None:
            continue
        if is_shared(module):
            problems.append(f"{name} already shares weights (strip_sharing_ it first)")
        elif parametrize.is_parametrized(module, "weight"):
            problems.append(f"{name}.weight already has a parametrization; weight sharing needs a plain parameter")
        elif not isinstance(getattr(module, "weight", None), nn.Parameter):
            problems.append(f"{name}.weight is not a parameter")
        plan[name] = (module, bits)
    if not plan and not problems:
        problems.append(f"the config selects no layer (types: {', '.join(cfg.types) or 'none'})")
    if problems:
        raise ValueError("cluster_: " + "; ".join(problems) + f". Layers: {listing}")
    return plan


def cluster_(model: nn.Module, config: ClusterConfig | None = None,
             filter_fn: Callable[[nn.Module, str], bool] | None = None) -> dict[str, int]:
    """Replace the weights of the selected layers by ``2**bits`` shared values each, in place.

    Per layer: ``kept = kept_mask(layer)``; ``C, I = kmeans(W[kept], k=2**bits)`` (1-D, over the
    surviving weights only, initialized per ``config.init``); then ``W = where(kept, C[I], 0)`` as a
    :class:`SharedWeight` parametrization whose trainable tensor is ``C`` (a new Parameter, without the
    old weight's hooks). The dense weight is no longer a parameter of the model, so an optimizer built
    afterwards neither updates nor decays it.

    Gradient: ``dL/dC_k = sum_ij dL/dW_ij 1(I_ij = k)`` over kept positions (pruned ones stay 0).
    Being a sum over the ``n_k`` weights of a cluster, a centroid's SGD step is about ``n_k`` times a
    single weight's: fine-tune with a learning rate well below the float training's (on the 8x8 digits,
    1e-3 after training at 0.05; 0.01 sent the 1- to 3-bit models to chance accuracy).

    Args:
        model: the network, changed in place.
        config: a :class:`ClusterConfig`; default the paper's 8 bits conv / 5 bits FC, linear init.
        filter_fn: optional ``(module, name) -> bool``; layers for which it is False are skipped.

    Returns:
        ``{layer name: bits}`` of the layers now sharing weights.

    Raises:
        ValueError: a rule matching no layer, nothing selected, or a layer already parametrized;
            the message lists the model's layers.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> cluster_(model, ClusterConfig(types={"Linear": 2}))
        {'0': 2, '2': 2}
        >>> int(model[0].weight.unique().numel()) <= 4
        True

    References:
        Han et al., "Deep Compression", arXiv:1510.00149, section 3.
    """
    cfg = config if config is not None else ClusterConfig()
    plan = _plan(model, cfg, filter_fn)
    for module, bits in plan.values():
        weight = module.weight
        kept = kept_mask(module)
        res = cluster_weight(weight, bits, kept, cfg.init, cfg.max_iter, cfg.seed)
        codes = torch.zeros(weight.shape, dtype=torch.int32, device=weight.device)
        codes.view(-1)[kept.flatten()] = res.codes.to(torch.int32)  # codes follow the flat order of kept
        shared = SharedWeight(codes, kept, bits)
        shared.param_order = list(module._parameters)  # to restore the state-dict key order when stripped
        # A fresh Parameter becomes the centroids (parametrize re-points its storage): hooks on the old
        # weight (e.g. lowbit.prune's gradient masks, shaped like the weight) must not ride along.
        module._parameters["weight"] = nn.Parameter(weight.detach(), requires_grad=weight.requires_grad)
        parametrize.register_parametrization(module, "weight", shared)
        with torch.no_grad():  # the k-means centroids (right_inverse gave the per-cluster means)
            module.parametrizations["weight"].original.copy_(res.centroids)
    return {name: bits for name, (_, bits) in plan.items()}


def shared_weights(model: nn.Module) -> dict[str, SharedLayer]:
    """The codebook and codes of every shared layer, for the encoder (``lowbit.codec.CompressedTensor``).

    For a layer with ``W = where(mask, C[I], 0)``: ``positions = flatnonzero(mask)`` (ascending, int64),
    ``codes = I.flatten()[positions]`` (int64), ``centroids = C`` (float32 copy), ``shape = W.shape``;
    so ``W.flatten()[positions] == centroids[codes]`` and all other entries are 0. No gradient.

    Args:
        model: a model after :func:`cluster_`.

    Returns:
        ``{layer name: SharedLayer(centroids, codes, positions, shape)}`` in module order.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 4))
        >>> _ = cluster_(model, ClusterConfig(types={"Linear": 3}))
        >>> entry = shared_weights(model)["0"]
        >>> torch.equal(model[0].weight.detach().flatten()[entry.positions], entry.centroids[entry.codes])
        True

    References:
        Han et al., "Deep Compression", arXiv:1510.00149, sections 2-4 (storage of index + codebook).
    """
    out = {}
    for name, module in model.named_modules():
        if not is_shared(module):
            continue
        plist = module.parametrizations["weight"]  # type: ignore[index]
        p = next(q for q in plist if isinstance(q, SharedWeight))
        positions = p.mask.flatten().nonzero().squeeze(1)  # (n_kept,) int64, ascending
        out[name] = SharedLayer(plist.original.detach().to(torch.float32).clone(),
                                p.codes.flatten()[positions].long(), positions, tuple(p.mask.shape))
    return out


def strip_sharing_(model: nn.Module) -> list[str]:
    """Bake every shared weight back into a plain ``weight`` parameter, in place.

    ``weight = where(mask, C[I], 0)`` exactly (the same float values the shared layer computed), the
    parametrization and its buffers disappear, and the state-dict keys (and their order) are those of
    the model before :func:`cluster_`, so the result loads into a fresh model of the same architecture.
    Afterwards the weights train independently again (no gradient sharing).

    Args:
        model: a model after :func:`cluster_`.

    Returns:
        the names of the layers stripped.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 4))
        >>> keys = list(model.state_dict())
        >>> _ = cluster_(model, ClusterConfig(types={"Linear": 2}))
        >>> strip_sharing_(model), list(model.state_dict()) == keys
        (['0'], True)

    References:
        Han et al., "Deep Compression", arXiv:1510.00149, section 3.
    """
    names = []
    for name, module in list(model.named_modules()):
        if not is_shared(module):
            continue
        p = next(q for q in module.parametrizations["weight"] if isinstance(q, SharedWeight))  # type: ignore[index]
        order = getattr(p, "param_order", None)
        module.parametrizations["weight"].original.grad = None  # a (k,) centroid gradient fits no dense weight
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        if order is not None and set(order) == set(module._parameters):
            for key in order:  # re-insert in the original order (removal appended weight last)
                module._parameters[key] = module._parameters.pop(key)
        names.append(name)
    return names
