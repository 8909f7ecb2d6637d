"""Importance criteria (what a prunable unit is and how much it matters) and threshold rules (how many go).

A pruner is (graph of coupled channels) x (importance criterion) x (schedule), as in Torch-Pruning. This
file holds the middle factor. A criterion maps a weight tensor to :class:`Units`: one score per prunable
unit (a weight, an output neuron/filter, an aligned group of weights), how many weights each unit holds,
and how to turn a keep-decision per unit back into a weight-shaped mask. A threshold rule decides which
units are kept:

    keep_by_sparsity(units, s)      per layer: drop the lowest-scoring units until a fraction s of the
                                    layer's weights is pruned (to the nearest unit)
    keep_by_quality(w, units, q)    Deep Compression: drop |w| < q * std(w), per layer
    keep_global(units_list, s)      one threshold across layers: drop the lowest-scoring units of all
                                    layers together until a fraction s of all their weights is pruned

Scores of already-pruned (zero) units are 0, so they are dropped first and pruning is monotone.

Example:
    >>> import torch
    >>> units = get_criterion("magnitude")(torch.tensor([[0.1, -2.0], [0.5, 0.0]]))
    >>> keep_by_sparsity(units, 0.5).tolist()
    [False, True, True, False]

References:
    Han et al., "Learning both Weights and Connections for Efficient Neural Networks", arXiv:1506.02626.
    Li et al., "Pruning Filters for Efficient ConvNets", arXiv:1608.08710.
    Fang et al., "DepGraph: Towards Any Structural Pruning" (Torch-Pruning), arXiv:2301.12900.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from lowbit._registry import Registry

__all__ = [
    "Criterion", "GroupNorm", "L1Filter", "Magnitude", "Units", "criteria", "get_criterion", "keep_by_quality",
    "keep_by_sparsity", "keep_global",
]


@dataclass(frozen=True)
class Units:
    """Prunable units of one weight tensor.

    Attributes:
        scores: ``(n,)`` float importance per unit (higher = more important).
        sizes: ``(n,)`` int64 number of weights in each unit.
        expand: maps a ``(n,)`` bool keep-vector to a bool mask of the weight's shape.
    """

    scores: torch.Tensor
    sizes: torch.Tensor
    expand: Callable[[torch.Tensor], torch.Tensor]

    @property
    def elementwise(self) -> bool:
        return bool((self.sizes == 1).all())


class Criterion(Protocol):
    """``criterion(weight) -> Units``; registered classes are frozen dataclasses (hyper-parameters as fields)."""

    def __call__(self, weight: torch.Tensor) -> Units: ...


criteria: Registry[Callable[..., Criterion]] = Registry("pruning criterion")


@criteria.register("magnitude")
@dataclass(frozen=True)
class Magnitude:
    """Unstructured magnitude: every weight is a unit, scored by its absolute value.

    Formula: ``score_i = |w_i|``.

    Example:
        >>> Magnitude()(torch.tensor([[-3.0, 1.0]])).scores.tolist()
        [3.0, 1.0]

    References:
        Han et al., "Learning both Weights and Connections for Efficient Neural Networks", arXiv:1506.02626.
    """

    def __call__(self, weight: torch.Tensor) -> Units:
        scores = weight.detach().abs().flatten().float()
        return Units(scores, torch.ones_like(scores, dtype=torch.int64), lambda keep: keep.view(weight.shape))


@criteria.register("l1_filter")
@dataclass(frozen=True)
class L1Filter:
    """Structured: one unit per output neuron (Linear row) or filter (Conv out-channel), scored by its L1 norm.

    Formula: ``score_o = sum_j |W[o, j]|`` over everything but the output dimension.

    Example:
        >>> L1Filter()(torch.tensor([[1.0, -1.0], [0.5, 0.0]])).scores.tolist()
        [2.0, 0.5]

    References:
        Li et al., "Pruning Filters for Efficient ConvNets", arXiv:1608.08710.
    """

    def __call__(self, weight: torch.Tensor) -> Units:
        w = weight.detach().flatten(1).float()  # (out, in * kh * kw)
        sizes = torch.full((w.shape[0],), w.shape[1], dtype=torch.int64)
        return Units(w.abs().sum(1), sizes, lambda keep: keep.view(-1, *[1] * (weight.dim() - 1)).expand(weight.shape))


@criteria.register("group_norm")
@dataclass(frozen=True)
class GroupNorm:
    """Aligned groups of ``group_size`` consecutive weights along the input dimension, scored by L2 norm.

    The weight is viewed as a matrix ``(out, in * kh * kw)`` in PyTorch's memory order (for a conv the
    im2col order: input channel, then kernel row, then kernel column). Group ``g`` of row ``o`` holds
    columns ``[g * k, (g + 1) * k)``; a last, shorter group takes the remainder when ``k`` does not divide
    the row. Keeping or dropping a group keeps or drops all its weights (Scalpel's SIMD-aware pruning).

    Formula: ``score_{o,g} = sqrt(sum_{j in group g} W[o, j]^2)``.

    Args:
        group_size: weights per group ``k`` (the SIMD width: 4 float32 lanes in 128-bit NEON/SSE, 8 in AVX2).

    Example:
        >>> GroupNorm(2)(torch.tensor([[3.0, 4.0, 0.0, 1.0]])).scores.tolist()
        [5.0, 1.0]

    References:
        Yu et al., "Scalpel: Customizing DNN Pruning to the Underlying Hardware Parallelism", ISCA 2017.
    """

    group_size: int = 4

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")

    def __call__(self, weight: torch.Tensor) -> Units:
        k = self.group_size
        w = weight.detach().flatten(1).float()  # (out, cols)
        out, cols = w.shape
        groups = -(-cols // k)
        padded = torch.nn.functional.pad(w, (0, groups * k - cols)).view(out, groups, k)  # (out, groups, k)
        sizes = torch.full((groups,), k, dtype=torch.int64)
        sizes[-1] = cols - (groups - 1) * k
        scores = padded.pow(2).sum(-1).sqrt().flatten()  # (out * groups,)

        def expand(keep: torch.Tensor) -> torch.Tensor:
            full = keep.view(out, groups, 1).expand(out, groups, k).reshape(out, groups * k)[:, :cols]
            return full.reshape(weight.shape)

        return Units(scores, sizes.repeat(out), expand)


def get_criterion(criterion: str | Criterion, **kwargs: Any) -> Criterion:
    """A criterion object from a registered name (built with ``kwargs``) or the object itself.

    Example:
        >>> get_criterion("group_norm", group_size=8)
        GroupNorm(group_size=8)
    """
    if isinstance(criterion, str):
        return criteria.get(criterion)(**kwargs)
    return criterion


def _drop_lowest(scores: torch.Tensor, sizes: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-vector dropping the lowest-scoring units so that the dropped weights are closest to
    ``sparsity * sum(sizes)`` (ties broken by position, so the result is deterministic)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    if scores.numel() == 0 or sparsity == 0.0:
        return keep
    order = torch.argsort(scores.cpu(), stable=True)
    cum = torch.cumsum(sizes.cpu()[order].double(), 0)  # weights dropped if the first i+1 units go
    target = sparsity * float(cum[-1])
    i = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64)).item())  # cum[i] >= target
    n = i + 1 if i < len(cum) else len(cum)
    if n > 0 and target - (float(cum[n - 2]) if n >= 2 else 0.0) < float(cum[n - 1]) - target:
        n -= 1  # stopping one unit earlier lands closer to the target
    keep[order[:n]] = False
    return keep.to(scores.device)


def keep_by_sparsity(units: Units, sparsity: float) -> torch.Tensor:
    """Per-layer target sparsity: drop the lowest-scoring units until ``sparsity`` of the weights are gone.

    Rule: units are dropped in ascending score order; the count is the one whose dropped weight total is
    nearest to ``sparsity * numel`` (for elementwise units: exactly ``round(sparsity * numel)``).

    Args:
        units: the layer's units from a criterion.
        sparsity: fraction of the layer's weights to prune, in [0, 1].

    Returns:
        ``(n,)`` bool, True = keep the unit.

    Example:
        >>> keep_by_sparsity(Magnitude()(torch.arange(10.0)), 0.3).sum().item()
        7

    References:
        Zhu & Gupta, "To prune, or not to prune", arXiv:1710.01878 (per-layer target sparsity).
    """
    return _drop_lowest(units.scores, units.sizes, sparsity)


def keep_by_quality(weight: torch.Tensor, units: Units, quality: float) -> torch.Tensor:
    """Deep Compression's threshold: prune the weights with ``|w| < quality * std(W)`` of the layer.

    Formula: ``threshold = q * std(W)``, ``std`` over all entries of the layer's weight tensor (including
    already-pruned zeros), with Bessel's correction (``torch.std`` default); keep ``|w| >= threshold``.

    Args:
        weight: the layer's weight tensor.
        units: its units; must be elementwise (criterion ``magnitude``), since the rule is defined on ``|w|``.
        quality: the quality parameter ``q >= 0``.

    Example:
        >>> w = torch.tensor([1.0, -1.0, 0.1, 3.0])
        >>> keep_by_quality(w, Magnitude()(w), 0.5).tolist()
        [True, True, False, True]

    References:
        Han et al., "Learning both Weights and Connections for Efficient Neural Networks", arXiv:1506.02626.
        Han et al., "Deep Compression", arXiv:1510.00149.
    """
    if not units.elementwise or units.scores.numel() != weight.numel():
        raise ValueError("the quality threshold q * std(W) is defined on |w|; use criterion 'magnitude' with it")
    if quality < 0:
        raise ValueError(f"quality must be >= 0, got {quality}")
    threshold = quality * weight.detach().float().std()
    return units.scores >= threshold


def keep_global(units: Sequence[Units], sparsity: float) -> list[torch.Tensor]:
    """One threshold across layers: drop the lowest-scoring units of all layers together.

    Rule: as :func:`keep_by_sparsity` on the concatenation of every layer's units, so ``sparsity`` is
    reached over all their weights together and layers with small weights lose more. Scores must be
    comparable across layers: true for ``magnitude`` and for ``group_norm`` with one group size; filter
    norms (``l1_filter``) grow with the filter size, so global filter pruning favours large filters.

    Args:
        units: the units of each layer.
        sparsity: fraction of all their weights to prune, in [0, 1].

    Returns:
        one ``(n_l,)`` bool keep-vector per layer.

    Example:
        >>> a, b = Magnitude()(torch.tensor([1.0, 2.0])), Magnitude()(torch.tensor([3.0, 4.0]))
        >>> [k.tolist() for k in keep_global([a, b], 0.5)]
        [[False, False], [True, True]]

    References:
        Frankle & Carbin, "The Lottery Ticket Hypothesis", arXiv:1803.03635 (global magnitude pruning).
    """
    if not units:
        return []
    scores, sizes = torch.cat([u.scores.cpu() for u in units]), torch.cat([u.sizes.cpu() for u in units])
    keep = _drop_lowest(scores, sizes, sparsity).split([u.scores.numel() for u in units])
    return [k.to(u.scores.device) for k, u in zip(keep, units, strict=True)]
