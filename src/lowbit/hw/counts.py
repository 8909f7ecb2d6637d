"""Per-layer parameters, MACs, bit widths, BOPs, storage and sparsity, counted by tracing one forward pass.

``profile(model)`` puts forward hooks on the layers, runs one example through the model (eval mode,
``torch.no_grad``; every module's training flag is restored afterwards) and reads the shapes that really
flowed, so strides, padding, dilation and data-dependent shapes need no static shape inference.

Counting rules (1 MAC = one multiply-accumulate; bias additions, activations, pooling, the affine of a norm
layer and the elementwise gate arithmetic of recurrent cells are not counted, as in the usual counters):

    Conv1d/2d/3d         out.numel() * (in_channels / groups) * prod(kernel_size)
                         (stride, padding and dilation only change out.numel(); depthwise is groups = in_channels)
    ConvTranspose        in.numel() * (out_channels / groups) * prod(kernel_size)
    Linear               out.numel() * in_features  (= batch * leading dims * in_features * out_features)
    RNN / GRU / LSTM     steps * sum over layers and directions of gates * hidden * (input_l + hidden)
                         gates = 1 / 3 / 4; steps = batch * T (or the length of a PackedSequence)
    *Cell                the same for one step
    MultiheadAttention   the q, k, v and output projections + Lq * Lk * embed_dim for each of QK^T and AV
    Embedding, norms     0 MACs; their parameters are listed

Counts are for the example's batch (1 unless ``example`` says otherwise). A module called several times
(weight sharing) adds its MACs on every call; a parameter shared by several modules is counted once, by
the first module that holds it (in ``named_modules`` order).

Bit widths follow the quantized-layer contract: a layer's ``weight_quantizer`` / ``input_quantizer`` (an
``nn.Module`` or ``None``) exposes ``bit_width``; a layer without them, or with ``None``, is 32-bit.
BOPs = MACs * weight_bits * act_bits (Baskin et al., "UNIQ", arXiv:1804.10969).

Storage rule: the weights (parameters named ``weight*`` or ``*_weight`` of a compute layer) take
``weight_bits`` each; every other parameter (biases, norm affine parameters, quantizer scales) stays 32-bit:
``storage_bytes = weight_params * weight_bits / 8 + other_params * 32 / 8``. Storage is dense (pruned zeros
are still stored; sparse formats belong to ``lowbit.codec``) and buffers such as batch-norm running
statistics are not counted. Sparsity is the fraction of weights that are exactly zero.

Example:
    >>> from lowbit.models import create_model
    >>> stats = profile(create_model("lenet5"))
    >>> stats.total_params, stats.layers[0].macs
    (431080, 288000)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

__all__ = ["LayerStats", "ModelStats", "profile"]

_NORMS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)
# Modules whose MACs we know how to count; a layer of one of these types is listed as one row, children included.
_COMPUTE: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear, nn.RNNBase, nn.RNNCellBase, nn.MultiheadAttention,
    nn.Embedding, nn.EmbeddingBag,
) + _NORMS
_QUANT_ATTRS = ("weight_quantizer", "input_quantizer")


@dataclass
class LayerStats:
    """Costs of one layer; ``sparsity`` is the fraction of its weights that are exactly zero (pruned).

    ``weight_params`` is how many of ``params`` are weights (stored at ``weight_bits``); the rest are 32-bit.
    """

    name: str
    type: str
    output_shape: tuple[int, ...]
    params: int
    macs: int
    weight_bits: int
    act_bits: int
    bops: int
    storage_bytes: float
    sparsity: float
    weight_params: int = 0


@dataclass
class ModelStats:
    """Per-layer :class:`LayerStats` of a model and its totals; ``input_shape`` excludes the batch."""

    layers: list[LayerStats]
    input_shape: tuple[int, ...]

    @property
    def total_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def total_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def total_bops(self) -> int:
        return sum(layer.bops for layer in self.layers)

    @property
    def total_storage_bytes(self) -> float:
        return sum(layer.storage_bytes for layer in self.layers)

    @property
    def float32_bytes(self) -> int:
        """Size of all parameters in float32, the reference for compression ratios."""
        return 4 * self.total_params

    @property
    def sparsity(self) -> float:
        """Zero weights / all weights over the whole model (0.0 when it has no weights)."""
        weights = sum(layer.weight_params for layer in self.layers)
        zeros = sum(round(layer.sparsity * layer.weight_params) for layer in self.layers)
        return zeros / weights if weights else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"input_shape": [...], "layers": [{field: value}, ...], "totals": {...}}``."""
        layers = [{**asdict(layer), "output_shape": list(layer.output_shape)} for layer in self.layers]
        totals = {
            "params": self.total_params,
            "macs": self.total_macs,
            "bops": self.total_bops,
            "storage_bytes": self.total_storage_bytes,
            "float32_bytes": self.float32_bytes,
            "sparsity": self.sparsity,
        }
        return {"input_shape": list(self.input_shape), "layers": layers, "totals": totals}


@dataclass
class _Entry:
    """A layer being counted: one row of the table once the forward pass is done."""

    name: str
    module: nn.Module
    whole: bool  # True: the row owns all the module's descendants (a compute or quantized layer)
    macs: int = 0
    output_shape: tuple[int, ...] | None = None
    counters: list[nn.Module] = field(default_factory=list)  # modules whose MACs go to this row


def profile(
    model: nn.Module, input_shape: tuple[int, ...] | None = None, example: torch.Tensor | None = None
) -> ModelStats:
    """Count parameters, MACs, bit widths, BOPs, storage and sparsity per layer in one forward pass.

    Args:
        model: any ``nn.Module``; quantized layers are recognized by their ``weight_quantizer`` /
            ``input_quantizer`` attributes.
        input_shape: the input without the batch dimension, e.g. ``(3, 32, 32)``; a 1-element shape ``(T,)``
            means token ids (the example is int64 zeros of shape ``(1, T)``), otherwise the example is
            ``randn(1, *input_shape)``. Default: ``model.input_shape`` if the model sets one, else the
            registry's shape for ``model.lowbit_name``.
        example: an input to use as is (its batch dimension counts); overrides ``input_shape``.

    Returns:
        :class:`ModelStats` with one row per layer that has parameters or MACs, in module order.

    Example:
        >>> stats = profile(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()), (3, 16, 16))
        >>> stats.total_macs == 16 * 16 * 8 * 3 * 9
        True
    """
    example, input_shape = _make_example(model, input_shape, example)
    entries = _find_layers(model)
    handles = []
    for entry in entries:
        handles.append(entry.module.register_forward_hook(_shape_hook(entry)))
        for counter in entry.counters:
            handles.append(counter.register_forward_hook(_mac_hook(entry), with_kwargs=True))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), _mha_fastpath_off():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
    layers = _layer_stats(entries)
    return ModelStats(layers, input_shape)


def _make_example(
    model: nn.Module, input_shape: tuple[int, ...] | None, example: torch.Tensor | None
) -> tuple[torch.Tensor, tuple[int, ...]]:
    if example is not None:
        shape = tuple(example.shape[1:])
        if input_shape is not None and tuple(input_shape) != shape:
            raise ValueError(f"input_shape {tuple(input_shape)} does not match the example's {shape} (less batch)")
        return example, shape
    if input_shape is None:
        input_shape = _default_input_shape(model)
    input_shape = tuple(int(s) for s in input_shape)
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    if len(input_shape) == 1:  # (T,): token ids for a language model
        return torch.zeros((1, *input_shape), dtype=torch.long, device=device), input_shape
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    return torch.randn((1, *input_shape), dtype=dtype, device=device), input_shape


def _default_input_shape(model: nn.Module) -> tuple[int, ...]:
    """The model's own ``input_shape`` (set by constructors whose input depends on their arguments, e.g.
    ``mobilenet_v1(imagenet=True)``), else the registry's shape for ``model.lowbit_name``."""
    own = getattr(model, "input_shape", None)
    if isinstance(own, (tuple, list)) and own and all(isinstance(s, int) for s in own):
        return tuple(own)
    name = getattr(model, "lowbit_name", None)
    if name is None:
        raise ValueError(
            f"{type(model).__name__} was not built by lowbit.models.create_model, so its input shape is "
            "unknown; pass input_shape= (without the batch dimension) or example="
        )
    from lowbit.models import model_entry

    return model_entry(name).input_shape


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, _COMPUTE) or any(hasattr(m, a) for a in _QUANT_ATTRS)


def _find_layers(model: nn.Module) -> list[_Entry]:
    """Candidate rows in module order: whole compute/quantized layers, and other modules with own parameters."""
    entries: list[_Entry] = []
    seen: set[int] = set()

    def visit(name: str, m: nn.Module) -> None:
        if id(m) in seen:
            return
        seen.add(id(m))
        if _is_layer(m):
            entries.append(_Entry(name, m, whole=True, counters=_counters(m)))
            return
        if any(True for _ in m.parameters(recurse=False)):
            entries.append(_Entry(name, m, whole=False))
        for child_name, child in m.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return entries


def _counters(m: nn.Module) -> list[nn.Module]:
    """The modules whose MACs make up ``m``'s: itself if countable, else its outermost countable descendants."""
    if isinstance(m, _COMPUTE):
        return [m]
    return [c for child in m.children() for c in _counters(child)]


def _shape_hook(entry: _Entry) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if entry.output_shape is None:
            t = _first_tensor(output)
            entry.output_shape = tuple(t.shape) if t is not None else ()

    return hook


def _mac_hook(entry: _Entry) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        entry.macs += _macs(module, args, kwargs, output)

    return hook


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, PackedSequence):
        return x.data
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (tuple, list)):
        for item in x:
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def _macs(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> int:
    """MACs of one call of a ``_COMPUTE`` module (see the module docstring for the rules)."""
    out = _first_tensor(output)
    if isinstance(m, nn.modules.conv._ConvNd):
        kernel = math.prod(m.kernel_size)
        if m.transposed:  # every input element is scattered into (out_channels / groups) * kernel outputs
            return _first_tensor(args).numel() * (m.out_channels // m.groups) * kernel
        return out.numel() * (m.in_channels // m.groups) * kernel
    if isinstance(m, nn.Linear):
        return out.numel() * m.in_features
    if isinstance(m, nn.Bilinear):
        return out.numel() * m.in1_features * m.in2_features
    if isinstance(m, nn.RNNBase):
        x = args[0] if args else kwargs["input"]
        if isinstance(x, PackedSequence):
            steps = x.data.shape[0]  # sum of the sequence lengths
        else:
            steps = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]  # (B, T, F) / (T, B, F) / (T, F)
        return steps * _rnn_step_macs(m)
    if isinstance(m, nn.RNNCellBase):
        x = args[0] if args else kwargs["input"]
        batch = x.shape[0] if x.dim() == 2 else 1
        gates = 4 if isinstance(m, nn.LSTMCell) else 3 if isinstance(m, nn.GRUCell) else 1
        return batch * gates * m.hidden_size * (m.input_size + m.hidden_size)
    if isinstance(m, nn.MultiheadAttention):
        return _mha_macs(m, args, kwargs)
    return 0  # Embedding (a lookup), norms (an elementwise affine)


def _rnn_step_macs(m: nn.RNNBase) -> int:
    """MACs of one time step of one sequence through all layers and directions."""
    gates = {"LSTM": 4, "GRU": 3}.get(m.mode, 1)  # RNN_TANH / RNN_RELU: one "gate"
    hidden, proj = m.hidden_size, getattr(m, "proj_size", 0) or 0
    state = proj or hidden  # an LSTM with proj_size feeds back (and outputs) the projected state
    dirs = 2 if m.bidirectional else 1
    total = 0
    for layer in range(m.num_layers):
        inp = m.input_size if layer == 0 else state * dirs
        total += dirs * (gates * hidden * (inp + state) + hidden * proj)
    return total


def _mha_macs(m: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    q = args[0] if len(args) > 0 else kwargs["query"]
    k = args[1] if len(args) > 1 else kwargs["key"]
    if q.dim() == 2:  # unbatched (L, E)
        batch, lq, lk = 1, q.shape[0], k.shape[0]
    elif m.batch_first:  # (B, L, E)
        batch, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    else:  # (L, B, E)
        batch, lq, lk = q.shape[1], q.shape[0], k.shape[0]
    e = m.embed_dim
    projections = lq * e * e + lk * m.kdim * e + lk * m.vdim * e + lq * e * e  # q, k, v in; out
    attention = 2 * lq * lk * e  # QK^T and AV, summed over the heads
    return batch * (projections + attention)


@contextmanager
def _mha_fastpath_off() -> Iterator[None]:
    """Transformer layers in eval + no_grad take a fused path that skips their submodules' hooks."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    previous = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(previous)


def _bits(layer: nn.Module, attr: str) -> int:
    quantizer = getattr(layer, attr, None)
    if quantizer is None:
        return 32
    bw = getattr(quantizer, "bit_width", None)
    if bw is None:
        raise TypeError(
            f"{type(layer).__name__}.{attr} is a {type(quantizer).__name__} without a bit_width; "
            "the quantizer contract (docs DESIGN.md) requires one"
        )
    bw = float(bw.item() if isinstance(bw, torch.Tensor) else bw)
    return max(1, math.ceil(bw - 1e-6))  # a ternary quantizer saying log2(3) = 1.58 bits is stored in 2


def _is_weight(layer: nn.Module, name: str) -> bool:
    """A weight (stored at weight_bits) is a ``weight*`` / ``*_weight`` parameter outside norms and quantizers."""
    *path, leaf = name.split(".")
    module = layer
    for part in [None, *path]:
        module = module if part is None else getattr(module, part)
        if isinstance(module, _NORMS) or hasattr(module, "bit_width"):
            return False
    return leaf.startswith("weight") or leaf.endswith("_weight")


def _zeros(layer: nn.Module, name: str, p: torch.Tensor) -> int:
    *path, leaf = name.split(".")
    owner = layer.get_submodule(".".join(path)) if path else layer
    if leaf.endswith("_orig") and hasattr(owner, leaf[: -len("_orig")] + "_mask"):
        # torch.nn.utils.prune keeps weight_orig and weight_mask; the effective weight is their product
        p = getattr(owner, leaf[: -len("_orig")])
    return int((p.detach() == 0).sum())


def _layer_stats(entries: list[_Entry]) -> list[LayerStats]:
    seen: set[int] = set()
    layers = []
    for entry in entries:
        weights = zeros = others = 0
        for name, p in entry.module.named_parameters(recurse=entry.whole):
            if id(p) in seen:  # shared: already counted by an earlier layer
                continue
            seen.add(id(p))
            if _is_weight(entry.module, name):
                weights += p.numel()
                zeros += _zeros(entry.module, name, p)
            else:
                others += p.numel()
        if weights + others == 0 and entry.macs == 0:
            continue  # an activation quantizer or a layer whose parameters were all counted elsewhere
        wbits, abits = _bits(entry.module, "weight_quantizer"), _bits(entry.module, "input_quantizer")
        layers.append(
            LayerStats(
                name=entry.name,
                type=type(entry.module).__name__,
                output_shape=entry.output_shape or (),
                params=weights + others,
                macs=entry.macs,
                weight_bits=wbits,
                act_bits=abits,
                bops=entry.macs * wbits * abits,
                storage_bytes=weights * wbits / 8 + others * 32 / 8,
                sparsity=zeros / weights if weights else 0.0,
                weight_params=weights,
            )
        )
    return layers
