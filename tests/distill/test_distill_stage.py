"""The recipe stage ``distill``: validation of method options, and tiny end-to-end runs on 'digits'."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lowbit.data import load_dataset
from lowbit.recipe import RecipeError, run_recipe, validate_recipe
from lowbit.train import evaluate, load_checkpoint, load_model

MLP = {"name": "lenet300_100", "kwargs": {"in_features": 64}}
FAST = {"batch_size": 64, "lr": 0.05, "checkpoint_every": 0}


def recipe(out: Path, model: dict[str, Any], stages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"version": 1, "name": out.name, "output": str(out), "model": model, "data": {"name": "digits"},
            "stages": stages}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """A LeNet-300-100 trained on the digits: its checkpoint and test accuracy."""
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    res = run_recipe(validate_recipe(recipe(out, MLP, [{"type": "train", "epochs": 4, **FAST},
                                                       {"type": "save"}])), show_progress=False)
    return out / "model.safetensors", res["train"]["test_acc"]


BAD = {
    "kd option on fsp": ({"method": "fsp", "temperature": 2.0, "fsp_train": {"epochs": 1}},
                         "temperature applies to method kd or quantized or differentiable, not fsp"),
    "fsp without stage 1": ({"method": "fsp"}, "method fsp needs fsp_train"),
    "quantized without bits": ({"method": "quantized"}, "method quantized needs bits"),
    "bits on kd": ({"method": "kd", "bits": 4}, "bits applies to method quantized or differentiable, not kd"),
    "stochastic on differentiable": ({"method": "differentiable", "bits": 2, "stochastic": True},
                                     "stochastic applies to method quantized, not differentiable"),
    "weight decay on points": ({"method": "differentiable", "bits": 2, "train": {"weight_decay": 1e-4}},
                               "set train.weight_decay to 0"),
    "label smoothing on kd": ({"train": {"label_smoothing": 0.1}}, "train.label_smoothing must be 0"),
    "unknown method": ({"method": "fitnet"}, "'kd', 'fsp', 'quantized' or 'differentiable'"),
    "bad alpha": ({"alpha": 2.0}, "alpha: Input should be less than or equal to 1"),
    "typo": ({"temprature": 2.0}, "unknown key (did you mean 'temperature'?)"),
    "no teacher": ({"teacher": None}, "teacher"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_invalid_distill_stages_fail_before_anything_runs(tmp_path: Path, case: str) -> None:
    options, expected = BAD[case]
    stage = {"type": "distill", "teacher": {"checkpoint": "teacher.safetensors"}, **options}
    if stage["teacher"] is None:
        del stage["teacher"]
    with pytest.raises(RecipeError) as err:
        validate_recipe(recipe(tmp_path / "run", MLP, [stage]), "bad.yaml")
    assert "stages[0]" in str(err.value) and expected in str(err.value)
    assert not (tmp_path / "run").exists()


def test_kd_then_quantized_distillation_reloads_to_the_same_accuracy(tmp_path: Path,
                                                                     teacher: tuple[Path, float]) -> None:
    path, teacher_acc = teacher
    out = tmp_path / "run"
    doc = recipe(out, MLP, [
        {"type": "distill", "teacher": {"checkpoint": str(path)}, "train": {"epochs": 3, **FAST}},
        {"type": "distill", "teacher": {"checkpoint": str(path)}, "method": "quantized", "bits": 4, "bucket_size": 100,
         "train": {"epochs": 1, **FAST, "lr": 0.01}},
        {"type": "evaluate"},
        {"type": "save"},
    ])
    results = run_recipe(validate_recipe(doc), show_progress=False)
    assert list(results) == ["distill", "distill_2", "evaluate", "save"]
    assert results["distill"]["method"] == "kd" and results["distill"]["teacher_test_acc"] == teacher_acc
    assert results["distill"]["test_acc"] > 60
    assert results["distill_2"]["quantized_layers"] == ["fc2"]  # first and last layer kept float by default
    model, _ = load_model(out / "model.safetensors")  # the bucketed quantizers are replayed from the record
    data_acc = evaluate(model, load_dataset("digits").loader("test", 256))["acc"]
    assert data_acc == pytest.approx(results["evaluate"]["test_acc"])
    assert (out / "distill" / "model.safetensors").exists() and (out / "distill_2" / "model.safetensors").exists()
    resolved = yaml.safe_load((out / "resolved.yaml").read_text())
    assert validate_recipe(resolved) == validate_recipe(doc)  # the resolved recipe is itself valid


def test_differentiable_quantization_changes_only_the_points(tmp_path: Path, teacher: tuple[Path, float]) -> None:
    path, _ = teacher
    out = tmp_path / "run"
    doc = recipe(out, {"checkpoint": str(path)}, [
        {"type": "distill", "teacher": {"checkpoint": str(path)}, "method": "differentiable", "bits": 2,
         "keep_first_last": False, "train": {"epochs": 0.5, **FAST, "lr": 0.01, "weight_decay": 0.0}},
        {"type": "save"},
    ])
    run_recipe(validate_recipe(doc), show_progress=False)
    before = load_checkpoint(path).group("model")
    after = load_checkpoint(out / "model.safetensors").group("model")
    points = [k for k in after if k.endswith("weight_quantizer.points")]
    assert len(points) == 3
    assert all(torch.equal(before[k], after[k]) for k in before)  # the weights are as the teacher's
    assert any(not torch.equal(after[k], torch.linspace(0, 1, 4)) for k in points)  # the points moved


def test_fsp_runs_both_stages(tmp_path: Path) -> None:
    out = tmp_path / "run"
    net = {"name": "resnet20", "kwargs": {"in_chans": 1}}
    doc = recipe(out, net, [{"type": "distill", "teacher": net, "method": "fsp",
                             "fsp_train": {"epochs": 0.1, **FAST, "optimizer": "adam", "lr": 1e-3},
                             "train": {"epochs": 0.1, **FAST}}])
    results = run_recipe(validate_recipe(doc), show_progress=False)["distill"]
    assert results["method"] == "fsp" and results["fsp_loss_final"] > 0 and "test_acc" in results
    assert (out / "distill" / "fsp" / "model.safetensors").exists()
    assert (out / "distill" / "task" / "model.safetensors").exists()


@pytest.mark.parametrize("case", ["other input shape", "other classes", "no such file", "corrupt file"])
def test_a_teacher_that_cannot_teach_fails_before_anything_runs(tmp_path: Path, case: str) -> None:
    """Checked before the first stage runs: a wrong teacher must not cost the stages before the distill one."""
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    teacher, expected = {
        "other input shape": ({"name": "lenet300_100"}, "teacher lenet300_100 does not accept data set 'digits' "
                              "(input (1, 8, 8)): mat1 and mat2 shapes cannot be multiplied"),
        "other classes": ({"name": "lenet300_100", "kwargs": {"in_features": 64, "num_classes": 5}},
                          "teacher lenet300_100 outputs 5 classes, data set 'digits' has 10"),
        "no such file": ({"checkpoint": str(tmp_path / "missing.safetensors")}, "no such checkpoint file"),
        "corrupt file": ({"checkpoint": str(corrupt)}, "stage distill: teacher: "),
    }[case]
    out = tmp_path / "run"
    doc = recipe(out, MLP, [{"type": "train", "epochs": 1, **FAST},
                            {"type": "distill", "teacher": teacher, "train": {"epochs": 1, **FAST}}])
    with pytest.raises(RecipeError) as err:
        run_recipe(validate_recipe(doc), show_progress=False)
    assert expected in str(err.value) and "stage distill" in str(err.value)
    assert not out.exists()  # the train stage before it never ran
