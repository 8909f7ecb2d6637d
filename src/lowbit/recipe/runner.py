"""Run a validated recipe: build the model, load the data, then each stage in order.

Nothing is written before the model is built, the data set is loaded and one batch has gone through
the model, so a recipe whose parts do not fit together fails without leaving a run directory. The run
directory then holds ``resolved.yaml`` (the recipe with every default filled in) and ``results.json``
(rewritten after each stage: ``{"recipe", "command", "date", "machine", "results": {stage: {...}}}``).
"""

from __future__ import annotations

import datetime as _dt
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

__all__ = ["run_recipe", "build_model"]


def build_model(spec: ModelSpec) -> nn.Module:
    """The model a recipe starts from: a fresh registered one, or one rebuilt from a checkpoint."""
    if spec.checkpoint is not None:
        return load_model(spec.checkpoint, **spec.kwargs)[0]
    assert spec.name is not None  # the schema guarantees one of the two
    return create_model(spec.name, **spec.kwargs)


def _check_fits(model: nn.Module, data: Dataset, recipe: Recipe) -> None:
    """Push one test batch through ``model`` so a shape mismatch surfaces before anything runs."""
    x, _ = next(iter(data.loader("test", batch_size=2)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x.to(next(model.parameters()).device))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise RecipeError(f"{recipe.source}: model does not accept data set {data.name!r} "
                          f"(input {tuple(data.input_shape)}): {first}") from None
    finally:
        model.train(was_training)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {platform.system()}")


def run_recipe(
    recipe: Recipe, data_dir: str | None = None, resume: bool = False, show_progress: bool = True,
    command: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every stage of ``recipe``; returns the results (also written to ``<output>/results.json``).

    ``data_dir`` is used when the recipe's ``data.dir`` is unset; ``resume`` lets the train stage
    continue from its last checkpoint.
    """
    torch.manual_seed(recipe.seed)  # the initial weights of a fresh model
    model = build_model(recipe.model)
    data_dir = recipe.data.dir or data_dir
    data = load_dataset(recipe.data.name, data_dir)
    _check_fits(model, data, recipe)

    out = recipe.output
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "resolved.yaml", yaml.safe_dump(recipe.resolved(), sort_keys=False))
    ctx = Context(model, data, out, data_dir, resume, show_progress, recipe.name)
    header = {"recipe": recipe.name, "command": command or f"lowbit run {recipe.source}",
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": _machine()}
    seen: dict[str, int] = {}
    for i, call in enumerate(recipe.stages, 1):
        seen[call.type] = seen.get(call.type, 0) + 1
        ctx.stage_key = call.type if seen[call.type] == 1 else f"{call.type}_{seen[call.type]}"
        print(f"[{i}/{len(recipe.stages)}] {ctx.stage_key}", flush=True)
        ctx.results[ctx.stage_key] = stages.get(call.type).run(ctx, call.config) or {}
        _write(out / "results.json", json.dumps({**header, "results": ctx.results}, indent=2) + "\n")
    return ctx.results
