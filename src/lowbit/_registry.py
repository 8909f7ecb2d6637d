"""A tiny typed registry: one per extensible kind (models, datasets, recipe stages, ...).

    models = Registry[Callable[..., nn.Module]]("model")

    @models.register("lenet5")
    def lenet5(...): ...

    models.get("lenet5")      # the registered object
    models.get("lenet")       # KeyError listing every valid name
    models.list("resnet*")    # sorted names matching a glob

Strings exist only at the edges (YAML, CLI); inside, code passes the objects themselves.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["Registry", "UnknownNameError"]

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name that is not in a registry; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want plain text
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps snake_case names to objects of one kind."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator registering an object under ``name`` (default: its ``__name__``)."""

        def deco(obj: T) -> T:
            key = name or getattr(obj, "__name__", None)
            if not key:
                raise ValueError(f"cannot register an unnamed {self.kind}; pass name=")
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str | T) -> T:
        """The object registered as ``name``; a non-string is returned unchanged."""
        if not isinstance(name, str):
            return name
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._items), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{hint}; valid names: {', '.join(sorted(self._items))}"
            ) from None

    def list(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching the glob ``pattern``."""
        return sorted(fnmatch.filter(self._items, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)
