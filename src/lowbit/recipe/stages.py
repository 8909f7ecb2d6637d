"""Recipe stages: a registry of (typed config, ``run(ctx, cfg)``) pairs, and the built-in ones.

A stage is a function decorated with ``@register_stage(name, ConfigModel)``. The runner validates a
stage's YAML mapping (minus ``type``) with ``ConfigModel`` before anything runs, then calls
``run(ctx, cfg)``; a stage registered with ``check=`` has ``check(ctx, cfg)`` called first, for every
stage before any runs (to reject what would otherwise fail midway). What ``run`` returns is stored in
``results.json`` under the stage's key (its type; ``evaluate_2`` for the second ``evaluate``). New
capabilities add a module that registers its stages and is imported by :mod:`lowbit.recipe`; the runner
does not change.

    @register_stage("evaluate", EvaluateConfig)
    def evaluate_stage(ctx: Context, cfg: EvaluateConfig) -> dict[str, float]: ...
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from lowbit._registry import Registry
from lowbit.data import Dataset
from lowbit.train import TrainConfig, evaluate, fit, save_model

__all__ = [
    "Context", "StageDef", "stages", "register_stage", "NoOptions", "EvaluateConfig", "SummaryConfig", "SaveConfig",
]


@dataclass
class Context:
    """What the stages of one run share; stages transform ``model`` in place."""

    model: nn.Module
    data: Dataset
    run_dir: Path  # the recipe's ``output``
    data_dir: str | None = None
    resume: bool = False
    show_progress: bool = True
    recipe_name: str = ""
    stage_key: str = ""  # key of the running stage in ``results`` (set by the runner)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    # training callbacks that earlier stages installed (e.g. pruning masks); every train stage uses them
    callbacks: list[object] = field(default_factory=list)
    # named weight snapshots {label: {layer: flat numpy array}} for the report's distribution plots
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)


StageFn = Callable[[Context, Any], "dict[str, Any] | None"]


@dataclass(frozen=True)
class StageDef:
    """A registered stage: its name, its config model and the function that runs it."""

    name: str
    config: type[BaseModel]
    run: StageFn
    requires: tuple[str, ...] = ()  # stage types that must come earlier in the recipe
    check: Callable[[Context, Any], None] | None = None  # runs before any stage does (see register_stage)

    @property
    def doc(self) -> str:
        lines = (self.run.__doc__ or "").strip().splitlines()
        return lines[0] if lines else ""


stages: Registry[StageDef] = Registry("stage type")


class NoOptions(BaseModel):
    """The config of a stage that takes no options."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def register_stage(
    name: str, config: type[BaseModel] = NoOptions, requires: tuple[str, ...] = (),
    check: Callable[[Context, Any], None] | None = None,
) -> Callable[[StageFn], StageFn]:
    """Register ``run(ctx, cfg) -> results | None`` as stage ``name`` configured by ``config``;
    ``requires`` names stage types that must come earlier in a recipe (checked before anything runs).
    ``check(ctx, cfg)``, if given, runs for each such stage before the first stage runs and before anything
    is written, on the untouched model: it raises for what would otherwise fail midway through a run (a
    teacher that does not fit the data, say)."""

    def deco(fn: StageFn) -> StageFn:
        stages.register(name)(StageDef(name, config, fn, tuple(requires), check))
        return fn

    return deco


# ----------------------------------------------------------------------------------------- built-ins


@register_stage("train", TrainConfig)
def train_stage(ctx: Context, cfg: TrainConfig) -> dict[str, Any]:
    """Train the model (lowbit.train.fit); checkpoints in <output>/train, resumable with --resume."""
    res = fit(ctx.model, ctx.data, cfg, run_dir=ctx.run_dir / ctx.stage_key, resume=ctx.resume,
              callbacks=ctx.callbacks, show_progress=ctx.show_progress)
    print(f"{ctx.stage_key}: test acc {res.final['test_acc']:.2f}%  loss {res.final['test_loss']:.4f}")
    return dict(res.final)


class EvaluateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    split: Literal["test", "train"] = "test"
    batch_size: int = Field(256, ge=1)


@register_stage("evaluate", EvaluateConfig)
def evaluate_stage(ctx: Context, cfg: EvaluateConfig) -> dict[str, float]:
    """Loss and accuracy of the current model on the test (or train) split."""
    device = next(ctx.model.parameters()).device
    res = evaluate(ctx.model, ctx.data.loader(cfg.split, cfg.batch_size), device=str(device))
    print(f"{ctx.stage_key}: {cfg.split} acc {res['acc']:.2f}%  loss {res['loss']:.4f}")
    return {f"{cfg.split}_{k}": v for k, v in res.items()}


class SummaryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    input_shape: tuple[int, ...] | None = Field(None, description="one sample's shape; default: the data set's")
    file: str = Field("summary.json", description="written in the run directory")


@register_stage("summary", SummaryConfig)
def summary_stage(ctx: Context, cfg: SummaryConfig) -> dict[str, Any]:
    """Per-layer table (parameters, MACs, BOPs, storage); JSON in <output>/summary.json, totals in results."""
    from lowbit.analysis.summary import print_summary, summary_json  # lazy: the measure layer is optional here
    from lowbit.hw.counts import profile

    stats = profile(ctx.model, input_shape=cfg.input_shape or ctx.data.input_shape)
    print_summary(stats, title=f"{ctx.recipe_name}: {getattr(ctx.model, 'lowbit_name', type(ctx.model).__name__)}")
    text = summary_json(stats)
    (ctx.run_dir / cfg.file).write_text(text if text.endswith("\n") else text + "\n")
    return {"file": cfg.file, **json.loads(text).get("totals", {})}  # params, macs, bops, storage_bytes, ...


class SaveConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    path: str = Field("model.safetensors", description="relative to the run directory")

    @field_validator("path")
    @classmethod
    def _safetensors(cls, v: str) -> str:
        if not v.endswith(".safetensors"):
            raise ValueError(f"a model file ends in .safetensors, got {v!r}")
        return v


@register_stage("save", SaveConfig)
def save_stage(ctx: Context, cfg: SaveConfig) -> dict[str, str]:
    """Write the model's weights with the data set, its input shape and the results so far in the metadata."""
    path = save_model(ctx.run_dir / cfg.path, ctx.model, dataset=ctx.data.name,
                      input_shape=list(ctx.data.input_shape), results=ctx.results, recipe=ctx.recipe_name)
    print(f"{ctx.stage_key}: wrote {path}")
    return {"path": str(path)}
