"""The model registry (timm-style): ``@register_model``, ``create_model``, ``list_models``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from lowbit._registry import Registry

__all__ = ["ModelEntry", "models", "register_model", "create_model", "list_models", "model_entry"]


@dataclass(frozen=True)
class ModelEntry:
    """A registered constructor and the input it expects by default."""

    name: str
    fn: Callable[..., nn.Module]
    input_shape: tuple[int, ...]  # (C, H, W) for images; (T,) token ids for language models
    dataset: str  # the data set it is meant for by default
    paper: str  # title and arXiv id

    @property
    def is_text(self) -> bool:
        return len(self.input_shape) == 1


models: Registry[ModelEntry] = Registry("model")


def register_model(
    input_shape: tuple[int, ...], dataset: str, paper: str, name: str | None = None
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a constructor ``fn(num_classes=..., **kwargs) -> nn.Module``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        models.register(key)(ModelEntry(key, fn, tuple(input_shape), dataset, paper))
        return fn

    return deco


def model_entry(name: str) -> ModelEntry:
    return models.get(name)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model; keyword arguments go to its constructor (``None`` values dropped).

    Unknown keyword arguments raise a ``TypeError`` naming the model and the accepted arguments.
    """
    entry = models.get(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    import inspect

    accepted = inspect.signature(entry.fn).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"model {name!r} does not take {', '.join(unknown)}; it takes: {', '.join(accepted)}"
        )
    model = entry.fn(**kwargs)
    model.lowbit_name = name  # type: ignore[assignment]  # kept for checkpoints and summaries
    model.lowbit_kwargs = dict(kwargs)  # type: ignore[assignment]
    return model


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of registered models matching a glob, e.g. ``list_models("resnet*")``."""
    return models.list(pattern)
