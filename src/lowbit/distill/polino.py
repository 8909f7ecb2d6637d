"""Quantized distillation and differentiable quantization (Polino, Pascanu, Alistarh 2018).

Both start by giving the student's layers the bucketed quantizers of :mod:`lowbit.quant.polino`:

* **Quantized distillation**: :func:`quantize_bucketed_` with uniform levels, then train with
  :class:`~lowbit.distill.kd.KnowledgeDistillation`: the distillation loss is computed on the quantized
  student (``w_q = Q(w)`` in the forward pass) and its gradient, passed straight through ``Q``, updates the
  full-precision shadow weights ``w``, which are re-quantized at the next step.
* **Differentiable quantization**: :func:`quantize_bucketed_` with ``learned_points=True`` (``2^k`` points
  per layer, shared by its buckets, starting at the uniform levels), then train *only the points*
  (:func:`train_points_only`) by gradient descent on the (distillation) loss; the weights stay as they are.

    quantize_bucketed_(student, bits=2)                          # quantized distillation
    fit(student, data, cfg, callbacks=[KnowledgeDistillation(teacher)])

    quantize_bucketed_(student, bits=2, learned_points=True)     # differentiable quantization
    with train_points_only(student):
        fit(student, data, cfg, callbacks=[KnowledgeDistillation(teacher)])

References:
    Polino, Pascanu, Alistarh, "Model compression via distillation and quantization", arXiv:1802.05668.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from torch import nn

from lowbit.quant.api import QuantConfig, QuantReport, quantize_
from lowbit.quant.polino import BucketedPoints

__all__ = ["bucketed_config", "quantize_bucketed_", "quantization_points", "train_points_only"]


def bucketed_config(bits: int, bucket_size: int | None = 256, stochastic: bool = False, learned_points: bool = False,
                    init: Literal["uniform", "quantile"] = "uniform", keep_first_last: bool = True) -> QuantConfig:
    """The :class:`~lowbit.quant.QuantConfig` that gives every Conv2d/Linear weight a bucketed quantizer.

    ``bucketed_uniform`` (``bits``, ``bucket_size``, ``stochastic``) or, with ``learned_points``,
    ``bucketed_points`` (``bits``, ``bucket_size``, ``init``); activations stay float, as in the paper. With
    ``keep_first_last`` (default) the first and last layer stay float (lowbit's default policy; say so when
    reporting). Invalid values raise a ``ValueError`` naming the argument.

    Example:
        >>> bucketed_config(4).rules["*"].weight
        {'name': 'bucketed_uniform', 'bits': 4, 'bucket_size': 256, 'stochastic': False}
    """
    weight: dict[str, Any]
    if learned_points:
        if stochastic:
            raise ValueError("stochastic rounding applies to uniform levels; learned points snap to the nearest")
        weight = {"name": "bucketed_points", "bits": bits, "bucket_size": bucket_size, "init": init}
    else:
        weight = {"name": "bucketed_uniform", "bits": bits, "bucket_size": bucket_size, "stochastic": stochastic}
    return QuantConfig(rules={"*": {"weight": weight}}, keep_first_last=keep_first_last)


def quantize_bucketed_(model: nn.Module, bits: int, bucket_size: int | None = 256, stochastic: bool = False,
                       learned_points: bool = False, init: Literal["uniform", "quantile"] = "uniform",
                       keep_first_last: bool = True) -> QuantReport:
    """Quantize ``model``'s weights in place with Polino et al.'s bucketed quantizers (:func:`bucketed_config`).

    Returns ``lowbit.quant.quantize_``'s per-layer report.

    Example:
        >>> from lowbit.models import create_model
        >>> net = create_model("lenet5")
        >>> quantize_bucketed_(net, bits=2).quantized
        ['conv2', 'fc1']

    References:
        Polino, Pascanu, Alistarh, "Model compression via distillation and quantization", arXiv:1802.05668.
    """
    return quantize_(model, bucketed_config(bits, bucket_size, stochastic, learned_points, init, keep_first_last))


def quantization_points(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{layer name: points}`` of every :class:`~lowbit.quant.polino.BucketedPoints` in ``model``."""
    return {name.removesuffix(".weight_quantizer"): m.points for name, m in model.named_modules()
            if isinstance(m, BucketedPoints)}


@contextmanager
def train_points_only(model: nn.Module) -> Iterator[dict[str, nn.Parameter]]:
    """Within the block, only the learned quantization points of ``model`` require gradients.

    Every other parameter gets ``requires_grad = False`` (``lowbit.train.fit`` builds its optimizer from
    the parameters that require gradients), and is restored on exit. Batch-norm running statistics still
    follow the quantized weights in training mode. Raises a ``ValueError`` when the model has no learned
    points (quantize it with ``quantize_bucketed_(..., learned_points=True)`` first).

    Example:
        >>> from lowbit.models import create_model
        >>> net = create_model("lenet5")
        >>> _ = quantize_bucketed_(net, bits=2, learned_points=True)
        >>> with train_points_only(net) as points:
        ...     sorted(points), sum(p.requires_grad for p in net.parameters())
        (['conv2', 'fc1'], 2)
    """
    points = quantization_points(model)
    if not points:
        raise ValueError(f"{type(model).__name__} has no learned quantization points; quantize it with "
                         "quantize_bucketed_(model, bits, learned_points=True) first")
    keep = {id(p) for p in points.values()}
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
        yield points
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(before[name])
