"""Whole models in a ``.lbz`` file: the architecture record in the header, every tensor inside.

    report = save_model("m.lbz", model_state, arch={"name": "lenet300_100", "kwargs": {}}, meta={...})
    model, meta = load_model("m.lbz")   # a fresh registered model with the decoded weights, bit-exact

``state`` is a plain state dict whose compressed entries are :class:`CompressedTensor` (pruned and
weight-shared) and whose other entries (biases, batch-norm statistics) are stored raw.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lowbit.codec._errors import CodecError
from lowbit.codec.container import CompressedTensor, load, save
from lowbit.codec.report import CodecReport

__all__ = ["save_model", "load_model"]


def save_model(
    path: str | os.PathLike[str],
    state: Mapping[str, CompressedTensor | torch.Tensor],
    arch: dict[str, Any],
    meta: dict[str, Any] | None = None,
) -> CodecReport:
    """Write a model's state dict to ``path`` with its architecture record (``{"name", "kwargs"}``)."""
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
        raise CodecError(f"arch must be {{'name': registered model, 'kwargs': {{...}}}}, got {arch!r}")
    return save(path, dict(state), {**(meta or {}), "model": arch})


def load_model(path: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the registered model named in the file and load its decoded tensors (strictly)."""
    from lowbit.train.checkpoint import CheckpointError, load_state_into, rebuild

    tensors, meta = load(path)
    try:
        model = rebuild(meta.get("model"), str(path))
    except CheckpointError as e:
        raise CodecError(str(e)) from None
    own = model.state_dict()
    # the file stores what the model holds; cast only where the dtype differs (a float32 codebook for a
    # float16 model, say), never the shape
    cast = {k: v.to(own[k].dtype) if k in own and own[k].dtype != v.dtype else v for k, v in tensors.items()}
    try:
        load_state_into(model, cast, where=str(path))
    except CheckpointError as e:
        raise CodecError(str(e)) from None
    return model, meta
