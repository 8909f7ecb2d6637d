"""Exporters: a trained lowbit model to a file another compiler or runtime executes.

    from lowbit.export import export, list_exporters
    export(model, "model.onnx", format="onnx-qdq", example=torch.randn(1, 3, 32, 32))

Each format is one module registering a function ``(model, path, example, **options) -> Path`` under its
name with :func:`register_exporter`; the module is imported on first use, so that onnx and qonnx are only
needed by the formats that use them. An unknown format is a ``KeyError`` listing the known ones.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lowbit._registry import Registry

__all__ = ["Exporter", "export", "exporters", "list_exporters", "register_exporter", "save_onnx"]

Exporter = Callable[..., Path]
exporters: Registry[Exporter] = Registry("export format")

# format name -> the module that registers it (imported lazily by ``export``)
_MODULES = {"onnx-qdq": "lowbit.export.onnx_qdq", "qonnx": "lowbit.export.qonnx"}


def register_exporter(name: str) -> Callable[[Exporter], Exporter]:
    """Decorator registering an exporter function under a format name (``"onnx-qdq"``)."""
    return exporters.register(name)


def _load(name: str) -> None:
    module = _MODULES.get(name)
    if module is not None and name not in exporters.list():
        importlib.import_module(module)


def list_exporters() -> list[str]:
    """The format names ``export`` accepts."""
    return sorted(set(exporters.list()) | set(_MODULES))


def export(model: Any, path: str | os.PathLike[str], format: str, **options: Any) -> Path:
    """Write ``model`` to ``path`` in ``format``; the options are the format's own (see its module)."""
    if format not in list_exporters():
        raise KeyError(f"unknown export format {format!r}; known: {', '.join(list_exporters())}")
    _load(format)
    return exporters.get(format)(model, Path(path), **options)


def save_onnx(proto: Any, path: Path) -> Path:
    """Write an ONNX ``ModelProto`` to ``path`` atomically (a temporary file renamed into place), so that a
    crash never leaves a half-written model where a runtime or compiler will look for it."""
    import tempfile

    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
