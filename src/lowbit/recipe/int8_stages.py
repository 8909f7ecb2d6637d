"""Recipe stages of int8 integer-only inference: ``calibrate`` (post-training) and ``qat`` (fine-tuning),
and ``export_onnx`` (the integer model as ONNX QDQ for onnxruntime).

    stages:
      - {type: calibrate, batches: 16, calibration: percentile}     # PTQ: the baseline
    # or
      - {type: qat, epochs: 2, lr: 0.005, calibrate_batches: 8}      # QAT: fine-tune with fake quantization
      - {type: export_onnx, path: model.int8.onnx}

Both leave ``ctx.model`` as the prepared fake-quantized model (trainable, evaluable by later stages) and
report the test accuracy of the fake-quantized model and of the integer model (``lowbit.graph.convert``,
whose output is bit-exact with the integer interpreter). Either starts from a float model. A checkpoint
written by a later ``save`` stage holds the prepared model's tensors but cannot be rebuilt by
``lowbit.train.load_model`` (the int8 preparation is not a replayable transform yet); export instead.

Glue only: the methods live in :mod:`lowbit.graph` (prepare, calibrate, convert), :mod:`lowbit.nn.fused`
and :mod:`lowbit.export.onnx_qdq`.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lowbit.graph import Int8Config, QATSchedule, calibrate, convert, prepare_ptq, prepare_qat
from lowbit.graph.prepare import is_int8_prepared
from lowbit.recipe.stages import Context, register_stage
from lowbit.train import TrainConfig, evaluate, fit

__all__ = ["CalibrateConfig", "QATConfig", "ExportOnnxConfig"]

_INT8_FIELDS = set(Int8Config.model_fields)


class CalibrateConfig(Int8Config):
    """The ``calibrate`` stage: :class:`~lowbit.graph.Int8Config` plus how much data to calibrate on."""

    batches: int = Field(16, ge=1, description="training batches to calibrate the activation ranges on")
    batch_size: int = Field(128, ge=1)


class QATConfig(TrainConfig):
    """The ``qat`` stage: a :class:`~lowbit.train.TrainConfig` (a short fine-tuning budget) plus the int8
    settings and when to freeze batch norms and ranges (fractions of the training steps)."""

    int8: Int8Config = Field(default_factory=Int8Config)
    calibrate_batches: int = Field(8, ge=1, description="batches that initialize the ranges before training")
    freeze_bn_at: float | None = Field(0.5, ge=0, le=1, description="fraction of steps; null: never")
    freeze_observers_at: float | None = Field(0.75, ge=0, le=1, description="fraction of steps; null: never")


class ExportOnnxConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    path: str = Field("model.int8.onnx", description="relative to the run directory")


def _check_float(ctx: Context, stage: str) -> None:
    if is_int8_prepared(ctx.model):
        raise ValueError(f"{ctx.stage_key}: the {stage} stage starts from a float model, but an earlier stage already "
                         "prepared it for int8; use one of calibrate / qat")


def _accuracy(ctx: Context, model: Any) -> dict[str, float]:
    test = ctx.data.loader("test", 256)
    fake = evaluate(model, test)
    integer = evaluate(convert(model), test)
    return {"fake_quant_test_acc": fake["acc"], "int8_test_acc": integer["acc"], "int8_test_loss": integer["loss"]}


@register_stage("calibrate", CalibrateConfig)
def calibrate_stage(ctx: Context, cfg: CalibrateConfig) -> dict[str, Any]:
    """Post-training int8: fuse, calibrate the ranges on N training batches; reports float-sim and integer accuracy."""
    _check_float(ctx, "calibrate")
    prepared = prepare_ptq(ctx.model, Int8Config(**cfg.model_dump(include=_INT8_FIELDS)))
    loader = ctx.data.loader("train", cfg.batch_size, shuffle=True, augment=False, seed=0)
    used = calibrate(prepared, loader, cfg.batches, show_progress=ctx.show_progress)
    ctx.model = prepared
    res = {"batches": used, **_accuracy(ctx, prepared)}
    print(f"{ctx.stage_key}: int8 (PTQ, {used} batches) test acc {res['int8_test_acc']:.2f}%")
    return res


@register_stage("qat", QATConfig)
def qat_stage(ctx: Context, cfg: QATConfig) -> dict[str, Any]:
    """int8 quantization-aware training (BN folded during training); reports float-sim and integer accuracy."""
    _check_float(ctx, "qat")
    prepared = prepare_qat(ctx.model, cfg.int8)
    calib = ctx.data.loader("train", cfg.batch_size, shuffle=True, augment=False, seed=cfg.seed)
    calibrate(prepared, calib, cfg.calibrate_batches)
    prepared.train()
    train_cfg = TrainConfig(**cfg.model_dump(include=set(TrainConfig.model_fields)))
    steps = max(1, round(cfg.epochs * math.ceil(len(ctx.data.train) / cfg.batch_size)))
    schedule = QATSchedule(steps, cfg.freeze_bn_at, cfg.freeze_observers_at)
    res = fit(prepared, ctx.data, train_cfg, run_dir=ctx.run_dir / ctx.stage_key, resume=ctx.resume,
              callbacks=[*ctx.callbacks, schedule], show_progress=ctx.show_progress)
    ctx.model = prepared
    out = {**res.final, **_accuracy(ctx, prepared)}
    print(f"{ctx.stage_key}: int8 (QAT) test acc {out['int8_test_acc']:.2f}%")
    return out


@register_stage("export_onnx", ExportOnnxConfig)
def export_onnx_stage(ctx: Context, cfg: ExportOnnxConfig) -> dict[str, Any]:
    """Write the int8 model as ONNX QDQ; reports the file size and onnxruntime's integer/float kernel counts."""
    import torch

    from lowbit.export import export
    from lowbit.export.onnx_qdq import integer_kernel_report

    if not is_int8_prepared(ctx.model):
        raise ValueError(f"{ctx.stage_key}: export_onnx writes an int8 model; put a calibrate or qat stage before it")
    example = torch.zeros(1, *ctx.data.input_shape)
    path = export(ctx.model, ctx.run_dir / cfg.path, format="onnx-qdq", example=example)
    report = integer_kernel_report(path)
    print(f"{ctx.stage_key}: wrote {path} ({path.stat().st_size} bytes; onnxruntime: {report['integer']} integer "
          f"kernels, {report['float']} float)")
    return {"path": str(path), "size_bytes": path.stat().st_size, "ort_integer_kernels": report["integer"],
            "ort_float_kernels": report["float"]}
