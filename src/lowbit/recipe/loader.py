"""Reading recipe files and applying ``--set key.path=value`` overrides.

YAML is read with two fixes over PyYAML's safe loader: ``5e-4`` is a float (YAML 1.1 wants ``5.0e-4``)
and a key given twice in one mapping is an error instead of the last one silently winning.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from lowbit.recipe.schema import Recipe, RecipeError, validate_recipe

__all__ = ["read_yaml", "parse_value", "apply_overrides", "load_recipe"]


class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(  # floats in exponent notation without a dot: 1e-4, 5E3
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789"))


def read_yaml(text: str, source: str) -> Any:
    """Parse YAML ``text``; a syntax error becomes a :class:`RecipeError` naming ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(f"{where}: invalid YAML: {problem}") from None


def parse_value(text: str) -> Any:
    """A ``--set`` value as a YAML scalar: ``3`` -> 3, ``1e-3`` -> 0.001, ``null`` -> None, ``a`` -> 'a'."""
    try:
        return yaml.load(text, Loader=_Loader) if text.strip() else None
    except yaml.YAMLError:
        return text


def apply_overrides(doc: dict[str, Any], overrides: Iterable[str], source: str = "--set") -> dict[str, Any]:
    """A copy of ``doc`` with each ``a.b.0.c=value`` applied (``stages[0].epochs=3`` works too).

    Missing mapping keys are created (the schema then rejects unknown ones); a list index must exist.
    """
    doc = copy.deepcopy(doc)
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise RecipeError(f"{source} {item!r}: expected KEY.PATH=VALUE, e.g. stages.0.epochs=3")
        parts = re.sub(r"\[(\d+)\]", r".\1", key.strip()).split(".")
        node: Any = doc
        for depth, part in enumerate(parts):
            here = ".".join(parts[:depth]) or "the recipe"
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.lstrip("-").isdigit():
                    raise RecipeError(f"{source} {item!r}: {here} is a list; '{part}' is not an index")
                if not -len(node) <= int(part) < len(node):
                    raise RecipeError(f"{source} {item!r}: {here} has {len(node)} items; no index {part}")
                part = int(part)  # type: ignore[assignment]
            elif isinstance(node, dict):
                if not last and node.get(part) is None:
                    node[part] = {}
            else:
                raise RecipeError(f"{source} {item!r}: {here} is a {type(node).__name__}, not a mapping or list")
            if last:
                node[part] = parse_value(value)
            else:
                node = node[part]
    return doc


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Read, override and validate a recipe file; every error names the file."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise RecipeError(f"{source}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{source}: cannot read: {e}") from None
    doc = read_yaml(text, source)
    if not isinstance(doc, dict):
        got = "an empty file" if doc is None else f"a {type(doc).__name__}"
        raise RecipeError(f"{source}: the top level must be a mapping with model:, data: and stages:, got {got}")
    return validate_recipe(apply_overrides(doc, overrides), source)
