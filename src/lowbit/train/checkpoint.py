"""Checkpoints: one safetensors file (tensors) whose header carries a JSON state; never pickle.

A file is written to a temporary name in the same directory, flushed to disk and renamed, so a
crash leaves either the old file or the new one, never half of one. On load, the header is
validated, every tensor is checked against a SHA-256 stored in the header, and a model's tensors
are matched by name and shape with an error that lists every difference.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from torch import nn

__all__ = [
    "CheckpointError", "Checkpoint", "save_checkpoint", "load_checkpoint", "load_state_into",
    "load_model", "tensors_digest",
]

FORMAT = "lowbit-checkpoint"
VERSION = 1
_MAX_FILE_BYTES = 8 << 30  # refuse to read anything claiming to be a checkpoint above 8 GiB


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, truncated, or does not fit the model."""


@dataclass
class Checkpoint:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under ``prefix.`` with the prefix removed (e.g. ``group("model")``)."""
        cut = len(prefix) + 1
        return {k[cut:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Atomically write ``tensors`` and the JSON-serializable ``meta`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    header = {"format": FORMAT, "version": VERSION, "sha256": tensors_digest(clean), **meta}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(clean, tmp, metadata={"lowbit": json.dumps(header)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read and verify a checkpoint; any defect raises :class:`CheckpointError` saying what."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    size = path.stat().st_size
    if size > _MAX_FILE_BYTES:
        raise CheckpointError(f"{path}: {size} bytes is larger than the {_MAX_FILE_BYTES} allowed")
    try:
        # one read: a writer may atomically replace the file between two opens (a run being watched)
        data = path.read_bytes()
        tensors = load(data)
        (n,) = struct.unpack("<Q", data[:8])  # safetensors: u64 header length, then the JSON header
        raw_meta = (json.loads(data[8:8 + n]).get("__metadata__") or {}).get("lowbit")
    except (SafetensorError, OSError, ValueError, RuntimeError, struct.error) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    if raw_meta is None:
        raise CheckpointError(f"{path}: safetensors file without lowbit metadata; not a lowbit checkpoint")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt metadata header ({e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('version')!r}; this lowbit reads <= {VERSION}")
    if tensors_digest(tensors) != meta.get("sha256"):
        raise CheckpointError(f"{path}: tensor data does not match its checksum (file corrupted)")
    return Checkpoint(tensors, meta)


def load_state_into(module: nn.Module, state: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    """``load_state_dict`` that reports every missing, unexpected and mis-shaped tensor at once."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} in {where} vs {tuple(own[k].shape)} in model"
        for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape
    ]
    if missing or unexpected or shapes:
        lines = []
        if missing:
            lines.append(f"missing in {where}: {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"not in the model: {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
        lines.extend(f"shape mismatch {s}" for s in shapes[:20])
        raise CheckpointError(f"{where} does not fit {type(module).__name__}:\n  " + "\n  ".join(lines))
    module.load_state_dict(state)


# Transforms a model may have been through before it was saved, replayed in order on load. The table
# names functions by import path so that this substrate module does not import the method packages;
# only these entries can ever run (a name read from a file selects one of them, nothing else).
_REPLAY = {"quantize": ("lowbit.quant.api", "replay_quantize"),
           "int8_prepare": ("lowbit.graph.prepare", "replay_prepare")}


def rebuild(arch: Any, where: str, **overrides: Any) -> nn.Module:
    """A fresh model from an architecture record ``{"name", "kwargs", "transforms"}`` (see ``model_meta``)."""
    import importlib

    from lowbit.models import create_model

    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
        raise CheckpointError(f"{where}: metadata does not name the model architecture")
    model = create_model(arch["name"], **{**arch.get("kwargs", {}), **overrides})
    for record in arch.get("transforms", []):
        if not isinstance(record, dict) or len(record) != 1 or next(iter(record)) not in _REPLAY:
            raise CheckpointError(f"{where}: unknown model transform {record!r}; known: {', '.join(_REPLAY)}")
        (kind, config), = record.items()
        module, fn = _REPLAY[kind]
        try:
            model = getattr(importlib.import_module(module), fn)(model, config)
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{where}: cannot replay the recorded {kind!r} transform: {e}") from e
    return model


def load_model(path: str | os.PathLike[str], **overrides: Any) -> tuple[nn.Module, Checkpoint]:
    """Rebuild the model a checkpoint was saved from (by registry name, replaying recorded transforms
    such as ``quantize_``), restore pruning masks, and load its weights."""
    ckpt = load_checkpoint(path)
    model = rebuild(ckpt.meta.get("model"), str(path), **overrides)
    state = ckpt.group("model")
    if any(k.endswith("_mask") for k in state):  # a pruned model: masks are buffers beside their weights
        from lowbit.prune.masks import restore_masks

        try:
            restore_masks(model, state)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from e
    load_state_into(model, state, where=str(path))
    return model, ckpt
