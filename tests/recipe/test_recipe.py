"""Recipes: validation before anything runs, --set overrides, and a tiny end-to-end run on 'digits'."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ConfigDict

from lowbit.models import list_models
from lowbit.recipe import (
    Context,
    RecipeError,
    apply_overrides,
    load_recipe,
    read_yaml,
    register_stage,
    run_recipe,
    stages,
    validate_recipe,
)
from lowbit.train import TrainConfig, load_model


def tiny(out: Path) -> dict[str, Any]:
    """LeNet-300-100 on the 8x8 digits: about a second of training."""
    return {
        "version": 1, "name": "tiny", "output": str(out),
        "model": {"name": "lenet300_100", "kwargs": {"in_features": 64}},
        "data": {"name": "digits"},
        "stages": [
            {"type": "train", "epochs": 3, "batch_size": 64, "lr": 0.05, "checkpoint_every": 0},
            {"type": "evaluate"},
            {"type": "save", "path": "model.safetensors"},
        ],
    }


def write(path: Path, doc: Any) -> Path:
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


def set_key(dotted: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        node: Any = doc
        *parents, last = [int(p) if p.isdigit() else p for p in dotted.split(".")]
        for p in parents:
            node = node[p]
        node[last] = value

    return edit


BAD = {
    "typo in a stage key": (set_key("stages.0.epoch", 2), ["stages[0].epoch: unknown key", "did you mean 'epochs'"]),
    "typo at the top": (set_key("stagse", []), ["stagse: unknown key", "allowed: version, name, output"]),
    "wrong type": (set_key("stages.0.epochs", "three"), ["stages[0].epochs: Input should be a valid number"]),
    "out of range": (set_key("stages.0.epochs", 0), ["stages[0].epochs: Input should be greater than 0"]),
    "bad choice": (set_key("stages.0.optimizer", "sgdd"), ["stages[0].optimizer", "'sgd', 'adam' or 'adamw'"]),
    "unknown stage": (set_key("stages.1.type", "quantise"),
                      ["stages[1].type: unknown stage type 'quantise'", "quantize, report, save, summary, train"]),
    "unknown model": (set_key("model.name", "lenet7"), ["model.name: unknown model 'lenet7'", "valid names: "]),
    "bad model kwarg": (set_key("model.kwargs.in_feature", 64), ["model.kwargs", "takes: num_classes, in_features"]),
    "unknown dataset": (set_key("data.name", "mnsit"), ["data.name: unknown dataset 'mnsit'", "digits, mnist"]),
    "two model sources": (set_key("model.checkpoint", "x.safetensors"), ["model: give exactly one"]),
    "stage without type": (set_key("stages.2", {"path": "m.safetensors"}), ["stages[2]: missing 'type'"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_invalid_recipe_fails_before_any_stage_runs(tmp_path: Path, case: str) -> None:
    edit, expected = BAD[case]
    doc = tiny(tmp_path / "run")
    edit(doc)
    path = write(tmp_path / "bad.yaml", doc)
    with pytest.raises(RecipeError) as err:
        run_recipe(load_recipe(path), show_progress=False)
    msg = str(err.value)
    assert msg.startswith(f"{path}: "), msg
    for part in expected:
        assert part in msg, msg
    if case == "unknown model":
        assert set(list_models()) <= set(msg.split("valid names: ")[1].split(", "))
    assert not (tmp_path / "run").exists()


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    doc = tiny(tmp_path / "run")
    doc["model"]["name"] = "nope"
    doc["stages"][0]["lr"] = -1
    doc["stages"][2]["path"] = "model.pt"
    with pytest.raises(RecipeError) as err:
        validate_recipe(doc, "r.yaml")
    lines = str(err.value).splitlines()
    assert [line.split(":")[1].strip() for line in lines] == ["model.name", "stages[0].lr", "stages[2].path"]
    assert all(line.startswith("r.yaml: ") for line in lines)


@pytest.mark.parametrize("text, expected", [
    ("name: x\nstages: [\n", ":3:1: invalid YAML"),
    ("name: x\nname: y\n", ":2:1: invalid YAML: key 'name' appears twice"),
    ("- train\n- evaluate\n", ": the top level must be a mapping with model:, data: and stages:, got a list"),
    ("", ": the top level must be a mapping with model:, data: and stages:, got an empty file"),
])
def test_bad_yaml_names_the_file(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path / "r.yaml", text)
    with pytest.raises(RecipeError, match="invalid YAML|top level") as err:
        load_recipe(path)
    assert str(err.value).startswith(f"{path}{expected}")


def test_missing_file() -> None:
    with pytest.raises(RecipeError, match="nope.yaml: no such recipe file"):
        load_recipe("nope.yaml")


def test_model_that_does_not_fit_the_data_fails_before_writing(tmp_path: Path) -> None:
    doc = tiny(tmp_path / "run")
    doc["model"] = {"name": "lenet5"}  # 28x28 convolutions on 8x8 digits
    with pytest.raises(RecipeError, match="model does not accept data set 'digits'"):
        run_recipe(validate_recipe(doc, "r.yaml"), show_progress=False)
    assert not (tmp_path / "run").exists()


def test_model_with_other_classes_than_the_data_fails_before_writing(tmp_path: Path) -> None:
    doc = tiny(tmp_path / "run")
    doc["model"].setdefault("kwargs", {})["num_classes"] = 5  # it would train, and never predict classes 5-9
    with pytest.raises(RecipeError, match="r.yaml: model outputs 5 classes, data set 'digits' has 10"):
        run_recipe(validate_recipe(doc, "r.yaml"), show_progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stage", [
    "{type: train, lr: .inf}", "{type: train, weight_decay: .nan}", "{type: train, epochs: .inf}",
    "{type: distill, teacher: {name: lenet300_100}, temperature: .inf}",
])
def test_infinite_or_nan_numbers_are_refused(tmp_path: Path, stage: str) -> None:
    """YAML spells them .inf / .nan; a range check such as lr > 0 alone lets .inf through to a NaN loss."""
    text = f"model: {{name: lenet300_100}}\ndata: {{name: digits}}\nstages:\n  - {stage}\n"
    with pytest.raises(RecipeError, match=r"stages\[0\]\.\w+: Input should be a finite number"):
        load_recipe(write(tmp_path / "r.yaml", text))


def test_yaml_exponent_floats_are_floats() -> None:
    assert read_yaml("wd: 5e-4\nlr: 1E2\nn: 3\ns: 5e", "x") == {"wd": 5e-4, "lr": 100.0, "n": 3, "s": "5e"}


def test_overrides() -> None:
    doc = {"model": {"name": "lenet5"}, "stages": [{"type": "train"}, {"type": "save"}]}
    out = apply_overrides(doc, [
        "stages.0.epochs=3", "stages[1].path=m.safetensors", "model.kwargs.in_chans=3", "data.dir=null",
        "stages.0.lr=1e-3", "stages.0.nesterov=true", "stages.-1.type=evaluate", "name=a=b",
    ])
    assert out == {
        "model": {"name": "lenet5", "kwargs": {"in_chans": 3}}, "data": {"dir": None}, "name": "a=b",
        "stages": [{"type": "train", "epochs": 3, "lr": 1e-3, "nesterov": True},
                   {"type": "evaluate", "path": "m.safetensors"}],
    }
    assert doc["stages"][0] == {"type": "train"}  # the input is not modified


@pytest.mark.parametrize("item, expected", [
    ("stages.5.epochs=3", "stages has 2 items; no index 5"),
    ("stages.train.epochs=3", "stages is a list; 'train' is not an index"),
    ("model.name.x=1", "model.name is a str, not a mapping or list"),
    ("stages.0.epochs", "expected KEY.PATH=VALUE"),
])
def test_bad_override_paths(item: str, expected: str) -> None:
    doc = {"model": {"name": "lenet5"}, "stages": [{"type": "train"}, {"type": "save"}]}
    with pytest.raises(RecipeError, match=expected):
        apply_overrides(doc, [item])


def test_overrides_are_validated_like_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", tiny(tmp_path / "run"))
    assert load_recipe(path, ["stages.0.epochs=0.5"]).stages[0].config.epochs == 0.5
    with pytest.raises(RecipeError, match=r"r.yaml: stages\[0\].epochs: Input should be greater than 0"):
        load_recipe(path, ["stages.0.epochs=-1"])


def test_the_train_stage_config_is_train_config(tmp_path: Path) -> None:
    recipe = validate_recipe(tiny(tmp_path / "run"))
    assert recipe.stages[0].config == TrainConfig(epochs=3, batch_size=64, lr=0.05, checkpoint_every=0)
    assert recipe.output == tmp_path / "run"
    doc = tiny(tmp_path)
    del doc["output"]
    assert validate_recipe(doc).output == Path("runs/tiny")


def test_shipped_recipes_validate() -> None:
    root = Path(__file__).resolve().parents[2] / "recipes"
    paths = sorted(root.rglob("*.yaml"))
    assert root / "demo.yaml" in paths
    for path in paths:
        load_recipe(path)


def test_end_to_end_on_digits(tmp_path: Path) -> None:
    out = tmp_path / "run"
    doc = tiny(out)
    doc["stages"].append({"type": "evaluate", "split": "train"})
    recipe = validate_recipe(doc, "tiny.yaml")
    results = run_recipe(recipe, show_progress=False)

    assert list(results) == ["train", "evaluate", "save", "evaluate_2"]
    assert results["evaluate"]["test_acc"] > 60
    assert results["evaluate"]["test_acc"] == pytest.approx(results["train"]["test_acc"])
    assert results["evaluate_2"]["train_acc"] > 60
    written = json.loads((out / "results.json").read_text())
    assert written["results"] == results and written["recipe"] == "tiny"
    assert {"command", "date", "machine"} <= set(written)
    resolved = yaml.safe_load((out / "resolved.yaml").read_text())
    assert resolved["stages"][0]["momentum"] == 0.9  # defaults are filled in
    assert validate_recipe(resolved) == validate_recipe(doc)  # and it is itself a valid recipe
    assert (out / "train" / "last.safetensors").is_file()

    model, ckpt = load_model(out / "model.safetensors")
    assert ckpt.meta["dataset"] == "digits" and ckpt.meta["recipe"] == "tiny" and ckpt.meta["input_shape"] == [1, 8, 8]
    assert ckpt.meta["results"]["evaluate"] == results["evaluate"]
    assert model.fc1.in_features == 64

    again = run_recipe(recipe, resume=True, show_progress=False)  # the finished train stage is not redone
    assert again["train"] == results["train"]


def test_resume_refuses_a_stage_whose_recipe_changed_before_it(tmp_path: Path) -> None:
    out = tmp_path / "run"
    doc = tiny(out)
    doc["stages"] = [{"type": "prune", "threshold": "sparsity", "rules": {"*": 0.5}}, *doc["stages"]]
    first = run_recipe(validate_recipe(doc, "tiny.yaml"), show_progress=False)

    grown = {**doc, "stages": [*doc["stages"], {"type": "evaluate", "split": "train"}]}
    again = run_recipe(validate_recipe(grown, "tiny.yaml"), resume=True, show_progress=False)
    assert again["train"] == first["train"]  # a stage added at the end: the earlier ones resume as they were

    changed = {**doc, "stages": [{"type": "prune", "threshold": "sparsity", "rules": {"*": 0.8}}, *doc["stages"][1:]]}
    with pytest.raises(RecipeError, match="stage 2 'train'.*changed since its checkpoints"):
        run_recipe(validate_recipe(changed, "tiny.yaml"), resume=True, show_progress=False)
    fresh = run_recipe(validate_recipe(changed, "tiny.yaml"), show_progress=False)  # without --resume: starts over
    assert fresh["prune"]["total_sparsity"] > first["prune"]["total_sparsity"]
    run_recipe(validate_recipe(changed, "tiny.yaml"), resume=True, show_progress=False)  # and resumes from there


def test_model_from_checkpoint_and_summary_stage(tmp_path: Path) -> None:
    pytest.importorskip("lowbit.hw.counts")
    first = tiny(tmp_path / "a")
    first["stages"] = [{"type": "save"}]
    run_recipe(validate_recipe(first), show_progress=False)
    doc = {**first, "output": str(tmp_path / "b"),
           "model": {"checkpoint": str(tmp_path / "a" / "model.safetensors")},
           "stages": [{"type": "summary"}]}
    results = run_recipe(validate_recipe(doc), show_progress=False)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert results["summary"]["params"] == summary["totals"]["params"] == 64 * 300 + 300 + 300 * 100 + 100 + 1010


class ProbeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    factor: int = 2


@pytest.fixture
def probe_stage() -> Iterator[list[Context]]:
    """A stage registered for one test only (a later capability plugs in the same way)."""
    seen: list[Context] = []

    @register_stage("probe_for_tests", ProbeConfig)
    def probe(ctx: Context, cfg: ProbeConfig) -> dict[str, Any]:
        seen.append(ctx)
        return {"doubled": cfg.factor * len(ctx.results)}

    yield seen
    stages._items.pop("probe_for_tests")


def test_a_registered_stage_plugs_in(tmp_path: Path, probe_stage: list[Context]) -> None:
    doc = tiny(tmp_path / "run")
    doc["stages"] = [{"type": "evaluate"}, {"type": "probe_for_tests", "factor": 3}]
    with pytest.raises(RecipeError, match=r"stages\[0\].factor: Input should be a valid integer"):
        validate_recipe({**doc, "stages": [{"type": "probe_for_tests", "factor": "x"}]})
    results = run_recipe(validate_recipe(doc), show_progress=False)
    assert results["probe_for_tests"] == {"doubled": 3}
    ctx = probe_stage[0]
    assert ctx.data.name == "digits" and ctx.run_dir == tmp_path / "run" and "evaluate" in ctx.results
