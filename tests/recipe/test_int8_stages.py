"""The int8 recipe stages on the 8x8 digits: calibrate (PTQ), qat, export_onnx."""

from __future__ import annotations

from pathlib import Path

import pytest

from lowbit.recipe import RecipeError, run_recipe, validate_recipe

TRAIN = {"type": "train", "epochs": 5, "batch_size": 32, "lr": 0.05, "channels_last": False}


def _recipe(tmp_path: Path, stages: list[dict]) -> dict:
    return {"version": 1, "name": "int8", "output": str(tmp_path / "run"), "seed": 0,
            "model": {"name": "lenet300_100", "kwargs": {"in_features": 64}}, "data": {"name": "digits"},
            "stages": [TRAIN, {"type": "evaluate"}, *stages]}


def test_calibrate_then_export(tmp_path: Path) -> None:
    res = run_recipe(validate_recipe(_recipe(tmp_path, [
        {"type": "calibrate", "batches": 4, "batch_size": 64, "calibration": "percentile"},
        {"type": "export_onnx"}])), show_progress=False)
    float_acc = res["evaluate"]["test_acc"]
    assert res["calibrate"]["batches"] == 4
    assert res["calibrate"]["int8_test_acc"] > float_acc - 3  # 8 bits: close to float
    assert abs(res["calibrate"]["int8_test_acc"] - res["calibrate"]["fake_quant_test_acc"]) < 2
    exp = res["export_onnx"]
    assert exp["ort_float_kernels"] == 0 and exp["ort_integer_kernels"] == 3
    assert Path(exp["path"]).stat().st_size == exp["size_bytes"]


def test_qat_fine_tunes_the_integer_model(tmp_path: Path) -> None:
    res = run_recipe(validate_recipe(_recipe(tmp_path, [
        {"type": "qat", "epochs": 2, "batch_size": 32, "lr": 0.01, "channels_last": False,
         "calibrate_batches": 2, "int8": {"weight_bits": 7}}])), show_progress=False)
    assert res["qat"]["int8_test_acc"] > res["evaluate"]["test_acc"] - 3
    assert (tmp_path / "run" / "qat" / "metrics.jsonl").exists()


def test_bad_configs_fail_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="calibration"):
        validate_recipe(_recipe(tmp_path, [{"type": "calibrate", "calibration": "kl"}]))
    with pytest.raises(RecipeError, match="batches"):
        validate_recipe(_recipe(tmp_path, [{"type": "calibrate", "batches": 0}]))
    with pytest.raises(RecipeError, match="weight_bit"):
        validate_recipe(_recipe(tmp_path, [{"type": "qat", "int8": {"weight_bit": 7}}]))
    assert not (tmp_path / "run").exists()


def test_calibrate_after_qat_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="starts from a float model"):
        run_recipe(validate_recipe(_recipe(tmp_path, [
            {"type": "calibrate", "batches": 1, "batch_size": 64},
            {"type": "qat", "epochs": 0.1, "batch_size": 64, "channels_last": False}])), show_progress=False)
