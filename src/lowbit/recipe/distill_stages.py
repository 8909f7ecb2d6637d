"""Recipe stage ``distill``: train the recipe's model (the student) from a teacher.

    stages:
      - type: distill
        teacher: {checkpoint: bench/checkpoints/resnet20.safetensors}   # or {name: resnet56, kwargs: {}}
        method: kd                      # kd | fsp | quantized | differentiable
        temperature: 4.0                # kd, quantized, differentiable (default 4)
        alpha: 0.9                      # weight of the soft targets (default 0.9)
        train: {epochs: 10, lr: 0.05}   # the training (for fsp: stage 2, the task loss)
      # fsp:            fsp_train: {...} (stage 1, the FSP loss), student_modules/teacher_modules, weights, pool
      # quantized:      bits, bucket_size (256), stochastic (false), keep_first_last (true): the student is
      #                 quantized with bucketed uniform levels, then trained with the distillation loss
      # differentiable: bits, bucket_size, init (uniform), keep_first_last: learned points, trained alone

Options that do not apply to the chosen method are errors, not silently ignored. Checkpoints go to
``<output>/<stage key>`` (``.../fsp`` and ``.../task`` for the two FSP stages), resumable with --resume.
Glue only: the methods live in :mod:`lowbit.distill`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lowbit.recipe.schema import ModelSpec, RecipeError
from lowbit.recipe.stages import Context, register_stage
from lowbit.train import TrainConfig, evaluate, fit

__all__ = ["DistillConfig"]

_SOFT = ("kd", "quantized", "differentiable")  # the methods trained with Hinton's loss
_ONLY: dict[str, tuple[str, ...]] = {
    "temperature": _SOFT, "alpha": _SOFT,
    "fsp_train": ("fsp",), "student_modules": ("fsp",), "teacher_modules": ("fsp",), "weights": ("fsp",),
    "pool": ("fsp",),
    "bits": ("quantized", "differentiable"), "bucket_size": ("quantized", "differentiable"),
    "keep_first_last": ("quantized", "differentiable"), "stochastic": ("quantized",), "init": ("differentiable",),
}


class DistillConfig(BaseModel):
    """The ``distill`` stage: a teacher, a method and its options, the training. Unset options take the
    method's defaults; an option of another method is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    teacher: ModelSpec = Field(description="{checkpoint: path.safetensors} (a trained teacher) or {name: ..., kwargs}")
    method: Literal["kd", "fsp", "quantized", "differentiable"] = "kd"
    train: TrainConfig = Field(default_factory=TrainConfig, description="the training (fsp: stage 2, the task)")
    temperature: float | None = Field(None, gt=0, description="softmax temperature T (default 4)")
    alpha: float | None = Field(None, ge=0, le=1, description="weight of the soft-target term (default 0.9)")
    fsp_train: TrainConfig | None = Field(None, description="fsp stage 1 (the FSP loss only); required for fsp")
    student_modules: list[str] | None = Field(None, description="fsp points of the student; default layer1, ...")
    teacher_modules: list[str] | None = Field(None, description="fsp points of the teacher; default as the student")
    weights: list[float] | None = Field(None, description="fsp lambda per pair; default all 1")
    pool: bool | None = Field(None, description="fsp: average-pool a stage's larger input (default true)")
    bits: int | None = Field(None, ge=1, le=16, description="weight bits (quantized, differentiable)")
    bucket_size: int | None = Field(None, ge=1, description="values per bucket (default 256)")
    stochastic: bool | None = Field(None, description="quantized: stochastic rounding (default false)")
    init: Literal["uniform", "quantile"] | None = Field(None, description="differentiable: initial points")
    keep_first_last: bool | None = Field(None, description="first and last layer stay float (default true)")

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        wrong = [k for k, methods in _ONLY.items() if getattr(self, k) is not None and self.method not in methods]
        if wrong:
            raise ValueError("; ".join(f"{k} applies to method {' or '.join(_ONLY[k])}, not {self.method}"
                                       for k in wrong))
        if self.method == "fsp" and self.fsp_train is None:
            raise ValueError("method fsp needs fsp_train: the training config of stage 1 (the FSP loss)")
        if self.method in ("quantized", "differentiable") and self.bits is None:
            raise ValueError(f"method {self.method} needs bits (the weight bit width, e.g. 4 or 2)")
        replaced = self.fsp_train if self.method == "fsp" else self.train  # the training whose loss is replaced
        if replaced is not None and replaced.label_smoothing:
            key = "fsp_train" if self.method == "fsp" else "train"
            raise ValueError(f"{key}.label_smoothing must be 0: method {self.method} trains on its own loss there, "
                             "not on the cross-entropy")
        if self.method == "differentiable" and self.train.weight_decay:
            raise ValueError("method differentiable trains only the quantization points: set train.weight_decay "
                             "to 0 (weight decay would pull the points towards 0)")
        return self


def _build_teacher(ctx: Context, spec: ModelSpec) -> Any:
    from lowbit.recipe.runner import build_model  # lazy: the runner imports the stage registry

    return build_model(spec).to(next(ctx.model.parameters()).device).eval()


def _check_teacher(ctx: Context, cfg: DistillConfig) -> None:
    """Before anything runs: the teacher loads, accepts the data and has its classes (or vocabulary);
    otherwise a run would fail at the distill stage, after the stages before it."""
    from lowbit.recipe.runner import check_fits

    try:
        teacher = _build_teacher(ctx, cfg.teacher)
    except ValueError as e:  # CheckpointError: a missing, truncated, corrupt or foreign file
        raise RecipeError(f"stage {ctx.stage_key}: teacher: {e}") from None
    check_fits(teacher, ctx.data, f"stage {ctx.stage_key}: teacher {cfg.teacher.checkpoint or cfg.teacher.name}")


def _teacher(ctx: Context, spec: ModelSpec) -> Any:
    teacher = _build_teacher(ctx, spec)
    if spec.checkpoint is None:
        print(f"{ctx.stage_key}: warning: the teacher {spec.name!r} is freshly initialized, not trained; "
              "give {checkpoint: ...} to distill from a trained one")
    return teacher


@register_stage("distill", DistillConfig, check=_check_teacher)
def distill_stage(ctx: Context, cfg: DistillConfig) -> dict[str, Any]:
    """Train the model from a teacher: Hinton KD, FSP (two stages), quantized distillation or differentiable
    quantization (lowbit.distill)."""
    from lowbit.distill import FSPDistillation, KnowledgeDistillation, fsp_train, quantize_bucketed_, train_points_only

    teacher = _teacher(ctx, cfg.teacher)
    device = str(next(ctx.model.parameters()).device)
    teacher_res = evaluate(teacher, ctx.data.loader("test", 256), device=device)
    run_dir = ctx.run_dir / ctx.stage_key
    out: dict[str, Any] = {"method": cfg.method, "teacher_test_acc": teacher_res["acc"]}
    common = {"resume": ctx.resume, "show_progress": ctx.show_progress}
    if cfg.method == "fsp":
        assert cfg.fsp_train is not None
        fsp = FSPDistillation(teacher, cfg.student_modules, cfg.teacher_modules, cfg.weights,
                              True if cfg.pool is None else cfg.pool)
        first, res = fsp_train(ctx.model, fsp, ctx.data, cfg.fsp_train, cfg.train, run_dir,
                               callbacks=ctx.callbacks, **common)
        out["fsp_loss_final"] = first.history[-1]["train_loss"] if first.history else None
    else:
        kd = KnowledgeDistillation(teacher, 4.0 if cfg.temperature is None else cfg.temperature,
                                   0.9 if cfg.alpha is None else cfg.alpha)
        callbacks = [*ctx.callbacks, kd]
        if cfg.method == "kd":
            res = fit(ctx.model, ctx.data, cfg.train, run_dir, callbacks=callbacks, **common)
        else:
            assert cfg.bits is not None
            learned = cfg.method == "differentiable"
            report = quantize_bucketed_(ctx.model, cfg.bits, 256 if cfg.bucket_size is None else cfg.bucket_size,
                                        bool(cfg.stochastic), learned, cfg.init or "uniform",
                                        True if cfg.keep_first_last is None else cfg.keep_first_last)
            print(f"{ctx.stage_key}: {report}")
            out["quantized_layers"] = report.quantized
            if learned:
                with train_points_only(ctx.model):
                    res = fit(ctx.model, ctx.data, cfg.train, run_dir, callbacks=callbacks, **common)
            else:
                res = fit(ctx.model, ctx.data, cfg.train, run_dir, callbacks=callbacks, **common)
    out.update(res.final)
    print(f"{ctx.stage_key} ({cfg.method}): test acc {res.final['test_acc']:.2f}% "
          f"(teacher {teacher_res['acc']:.2f}%)")
    return out
