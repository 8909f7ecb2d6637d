"""Run a validated recipe: build the model, load the data, then each stage in order.

Nothing is written before the model is built, the data set is loaded, one batch has gone through
the model and every stage's own ``check`` has passed (a distillation teacher must take the data and
have its classes), so a recipe whose parts do not fit together fails without leaving a run directory. The run
directory then holds ``resolved.yaml`` (the recipe with every default filled in), ``results.json``
(rewritten after each stage: ``{"recipe", "command", "date", "machine", "results": {stage: {...}}}``) and
``lineage.json``: per stage, a fingerprint of everything its result depends on (seed, model, data and every
stage up to it). ``--resume`` refuses to continue a stage whose checkpoints were made under another
fingerprint: a changed earlier stage (a different quantize rule, another epoch count) would otherwise be
resumed into, silently or with a confusing shape error.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from lowbit.data import Dataset, load_dataset
from lowbit.models import create_model
from lowbit.recipe.schema import ModelSpec, Recipe, RecipeError
from lowbit.recipe.stages import Context, stages
from lowbit.train import load_model

__all__ = ["run_recipe", "build_model", "check_fits"]


def build_model(spec: ModelSpec) -> nn.Module:
    """The model a recipe starts from: a fresh registered one, or one rebuilt from a checkpoint."""
    if spec.checkpoint is not None:
        return load_model(spec.checkpoint, **spec.kwargs)[0]
    assert spec.name is not None  # the schema guarantees one of the two
    return create_model(spec.name, **spec.kwargs)


def check_fits(model: nn.Module, data: Dataset, what: str) -> torch.Tensor:
    """Push two test examples through ``model`` so that a shape mismatch, or an output of another number of
    classes than ``data`` has, surfaces before anything runs; returns the output. ``what`` names the model in
    the error (e.g. ``"recipe.yaml: model"``)."""
    x, _ = next(iter(data.loader("test", batch_size=2)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x.to(next(model.parameters()).device))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise RecipeError(f"{what} does not accept data set {data.name!r} "
                          f"(input {tuple(data.input_shape)}): {first}") from None
    finally:
        model.train(was_training)
    if out.shape[-1] != data.num_classes:
        kind = "symbols" if data.is_text else "classes"
        raise RecipeError(f"{what} outputs {out.shape[-1]} {kind}, data set {data.name!r} has {data.num_classes}: "
                          f"build it with num_classes={data.num_classes} (or give the data set it was made for)")
    return out


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {platform.system()}")


def _stage_keys(recipe: Recipe) -> list[str]:
    """Each stage's key: its type, with ``_2``, ``_3``, ... for repeats (``train``, ``evaluate``, ``evaluate_2``)."""
    seen: dict[str, int] = {}
    keys = []
    for call in recipe.stages:
        seen[call.type] = seen.get(call.type, 0) + 1
        keys.append(call.type if seen[call.type] == 1 else f"{call.type}_{seen[call.type]}")
    return keys


def _lineage(recipe: Recipe) -> dict[str, str]:
    """stage key -> fingerprint of the seed, model, data (not its directory) and stages up to that one."""
    doc = recipe.resolved()
    base = {"seed": doc["seed"], "model": doc["model"],
            "data": {k: v for k, v in doc["data"].items() if k != "dir"}}
    return {key: hashlib.sha256(json.dumps({**base, "stages": doc["stages"][: i + 1]}, sort_keys=True,
                                           default=str).encode()).hexdigest()[:16]
            for i, key in enumerate(_stage_keys(recipe))}


def _check_lineage(recipe: Recipe, lineage: dict[str, str]) -> None:
    """On resume: the first stage that left work behind (its directory under the output) under another
    fingerprint than the recipe's now is an error."""
    path = recipe.output / "lineage.json"
    if not path.exists():
        return
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RecipeError(f"{path}: unreadable ({e}); delete it, or run without --resume") from None
    for i, (key, fp) in enumerate(lineage.items(), 1):
        if key in before and before[key] != fp and (recipe.output / key).exists():
            raise RecipeError(
                f"{recipe.source}: cannot resume stage {i} '{key}': the seed, model, data or a stage up to it "
                f"changed since its checkpoints in {recipe.output / key} were written. Run without --resume to "
                "start over, or give the recipe a new output directory.")


def run_recipe(
    recipe: Recipe, data_dir: str | None = None, resume: bool = False, show_progress: bool = True,
    command: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every stage of ``recipe``; returns the results (also written to ``<output>/results.json``).

    ``data_dir`` is used when the recipe's ``data.dir`` is unset; ``resume`` lets the train stage
    continue from its last checkpoint (refused where the recipe up to that stage changed since: see the
    module's docstring).
    """
    torch.manual_seed(recipe.seed)  # the initial weights of a fresh model
    model = build_model(recipe.model)
    data_dir = recipe.data.dir or data_dir
    data = load_dataset(recipe.data.name, data_dir)
    check_fits(model, data, f"{recipe.source}: model")

    out = recipe.output
    lineage = _lineage(recipe)
    if resume:
        _check_lineage(recipe, lineage)
    ctx = Context(model, data, out, data_dir, resume, show_progress, recipe.name)
    for call, key in zip(recipe.stages, lineage, strict=True):
        check = stages.get(call.type).check
        if check is not None:
            ctx.stage_key = key
            check(ctx, call.config)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "resolved.yaml", yaml.safe_dump(recipe.resolved(), sort_keys=False))
    _write(out / "lineage.json", json.dumps(lineage, indent=2) + "\n")
    header = {"recipe": recipe.name, "command": command or f"lowbit run {recipe.source}",
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": _machine()}
    for i, (call, key) in enumerate(zip(recipe.stages, lineage, strict=True), 1):
        ctx.stage_key = key
        print(f"[{i}/{len(recipe.stages)}] {ctx.stage_key}", flush=True)
        ctx.results[ctx.stage_key] = stages.get(call.type).run(ctx, call.config) or {}
        _write(out / "results.json", json.dumps({**header, "results": ctx.results}, indent=2) + "\n")
    return ctx.results
