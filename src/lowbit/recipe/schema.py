"""The recipe schema: typed, validated in full before any stage runs.

    version: 1
    name: demo
    output: runs/demo                      # run directory; default runs/<name>
    seed: 0                                # torch seed for building the model (the train stage has its own)
    model: {name: lenet5, kwargs: {}}      # or {checkpoint: path.safetensors, kwargs: {...overrides}}
    data: {name: mnist, dir: null}         # dir: else --data-dir, else $LOWBIT_DATA
    stages:                                # run in order; each mapping = type + that stage's config
      - {type: train, epochs: 2, lr: 0.05}
      - {type: evaluate}

Every error names the source, the key path and, where there is a choice, the allowed values:
``recipes/x.yaml: stages[0].epochs: Input should be greater than 0``.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from lowbit._registry import UnknownNameError
from lowbit.data import datasets
from lowbit.models import models
from lowbit.recipe.stages import stages

__all__ = ["RecipeError", "ModelSpec", "DataSpec", "RecipeFile", "StageCall", "Recipe", "validate_recipe"]


class RecipeError(ValueError):
    """A recipe that cannot run: bad YAML, a bad key or value, an unknown name. One line per problem."""


class ModelSpec(BaseModel):
    """Exactly one of ``name`` (a registered model) or ``checkpoint`` (a lowbit .safetensors file)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str | None = None
    checkpoint: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict, description="constructor arguments")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str | None) -> str | None:
        try:
            return v if v is None else models.get(v).name
        except UnknownNameError as e:
            raise ValueError(str(e)) from None

    @field_validator("kwargs")
    @classmethod
    def _accepted(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        name = info.data.get("name")
        if name is None:  # a checkpoint's constructor is known only once the file is read
            return v
        params = inspect.signature(models.get(name).fn).parameters
        unknown = sorted(set(v) - set(params))
        if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise ValueError(f"model {name!r} does not take {', '.join(unknown)}; it takes: {', '.join(params)}")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.name is None) == (self.checkpoint is None):
            raise ValueError("give exactly one of 'name' (a registered model) or 'checkpoint' (a file)")
        return self


class DataSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str
    dir: str | None = Field(None, description="data directory; default --data-dir, then $LOWBIT_DATA")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        try:
            datasets.get(v)
        except UnknownNameError as e:
            raise ValueError(str(e)) from None
        return v


class RecipeFile(BaseModel):
    """The top level of a recipe file; each stage is then checked against its own config model."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    version: Literal[1] = 1
    name: str = Field(min_length=1)
    output: str | None = Field(None, description="run directory; default runs/<name>")
    seed: int = Field(0, description="seeds torch before the model is built (its initial weights)")
    model: ModelSpec
    data: DataSpec
    stages: list[Any] = Field(min_length=1)  # each checked by _validate_stage


@dataclass(frozen=True)
class StageCall:
    """One validated stage of a recipe."""

    type: str
    config: BaseModel

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **self.config.model_dump(mode="json")}


@dataclass(frozen=True)
class Recipe:
    """A validated recipe with every default filled in."""

    name: str
    output: Path
    model: ModelSpec
    data: DataSpec
    stages: tuple[StageCall, ...]
    seed: int = 0
    source: str = "<recipe>"  # the file it came from, for messages
    version: int = 1

    def resolved(self) -> dict[str, Any]:
        """The recipe as YAML would spell it, with defaults filled (written as ``resolved.yaml``)."""
        return {
            "version": self.version, "name": self.name, "output": str(self.output), "seed": self.seed,
            "model": self.model.model_dump(mode="json", exclude_none=True),
            "data": self.data.model_dump(mode="json"),
            "stages": [s.to_dict() for s in self.stages],
        }


def validate_recipe(doc: Any, source: str = "<recipe>") -> Recipe:
    """Check a parsed recipe completely; raise one :class:`RecipeError` listing every problem."""
    if not isinstance(doc, Mapping):
        raise RecipeError(f"{source}: the top level must be a mapping with model:, data: and stages:, "
                          f"got {type(doc).__name__}")
    problems: list[str] = []
    head = None
    try:
        head = RecipeFile.model_validate(doc)
    except ValidationError as e:
        problems += [_join("", path, msg) for path, msg in _format(e, RecipeFile)]
    calls = []
    raw = doc.get("stages")
    for i, entry in enumerate(raw if isinstance(raw, list) else []):
        call = _validate_stage(entry, f"stages[{i}]", problems)
        if call is not None:
            calls.append(call)
    seen: list[str] = []
    for i, call in enumerate(calls):  # stages that need an earlier stage (e.g. report after encode)
        missing = [r for r in stages.get(call.type).requires if r not in seen]
        if missing:
            problems.append(f"stages[{i}] ({call.type}): needs a {' and a '.join(missing)} stage before it")
        seen.append(call.type)
    if problems or head is None:
        raise RecipeError("\n".join(f"{source}: {p}" for p in problems))
    return Recipe(head.name, Path(head.output or f"runs/{head.name}"), head.model, head.data, tuple(calls),
                  head.seed, source, head.version)


def _validate_stage(entry: Any, where: str, problems: list[str]) -> StageCall | None:
    if not isinstance(entry, Mapping):
        problems.append(f"{where}: a stage is a mapping with a 'type' key, got {type(entry).__name__}")
        return None
    if "type" not in entry:
        problems.append(f"{where}: missing 'type'; stage types: {', '.join(stages)}")
        return None
    try:
        stage = stages.get(str(entry["type"]))
    except UnknownNameError as e:
        problems.append(f"{where}.type: {e}")
        return None
    try:
        return StageCall(stage.name, stage.config.model_validate({k: v for k, v in entry.items() if k != "type"}))
    except ValidationError as e:
        problems += [_join(where, path, msg) for path, msg in _format(e, stage.config)]
        return None


def _join(where: str, path: str, msg: str) -> str:
    full = f"{where}.{path}" if where and path and not path.startswith("[") else where + path
    return f"{full}: {msg}" if full else msg


def _format(err: ValidationError, model: type[BaseModel]) -> list[tuple[str, str]]:
    """pydantic errors as (``key.path[0].sub``, message); an unknown key's message lists the allowed ones."""
    lines = []
    for e in err.errors(include_url=False):
        loc = list(e["loc"])
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        if e["type"] == "extra_forbidden":
            allowed = _fields_at(model, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            msg = f"unknown key{hint}; allowed: {', '.join(allowed)}"
        elif e["type"] == "value_error":
            msg = str(e["ctx"]["error"])
        else:
            msg = e["msg"]
        lines.append((path, msg))
    return lines


def _fields_at(model: type[BaseModel], loc: list[Any]) -> list[str]:
    """Field names of the (nested) model at ``loc``, e.g. ``["model"]`` -> ModelSpec's."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        sub = field.annotation if field is not None else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return []
        model = sub
    return list(model.model_fields)
