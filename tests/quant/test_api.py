"""quantize_ and QuantConfig: per-layer rules, first/last layers, errors before any change, the report,
BOPs of a quantized model, and the ``quantize`` recipe stage on the 8x8 digits (seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from torch import nn

import lowbit
from _quantizers import SIGN, Sign  # test-only quantizers (tests/_quantizers.py)
from lowbit.hw import profile
from lowbit.models import create_model
from lowbit.nn import QuantLinear
from lowbit.quant import LayerQuant, QuantConfig, QuantReport, quantize_

U2, U4, U8 = ({"name": "test_uniform", "bits": b} for b in (2, 4, 8))


def _types(model: nn.Module) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}



# ------------------------------------------------------------------------------------------ rules


def test_glob_and_type_rules_keep_first_and_last_float_by_default() -> None:
    model = create_model("lenet5")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 1, 28, 28)
    cfg = QuantConfig(rules={"conv*": {"weight": U2}, "Linear": {"weight": SIGN, "input": U4}})
    report = quantize_(model, cfg)
    assert _types(model) == {"conv1": "Conv2d", "conv2": "QuantConv2d", "fc1": "QuantLinear", "fc2": "Linear"}
    assert model.conv2.weight_quantizer.bit_width == 2 and model.conv2.input_quantizer is None
    assert isinstance(model.fc1.weight_quantizer, Sign) and model.fc1.input_quantizer.bit_width == 4
    assert report.quantized == ["conv2", "fc1"]
    assert report.kept_float == {"conv1": "first layer (keep_first_last)", "fc2": "last layer (keep_first_last)"}
    rows = {r.name: r for r in report.layers}
    assert (rows["conv2"].rule, rows["conv2"].weight, rows["conv2"].weight_bits, rows["conv2"].input_bits) == \
        ("conv*", "test_uniform(bits=2)", 2, 32)
    assert (rows["fc1"].rule, rows["fc1"].weight, rows["fc1"].input, rows["fc1"].input_bits) == \
        ("Linear", SIGN, "test_uniform(bits=4)", 4)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())  # weights carried over unchanged
    assert model(x).shape == (2, 10)


def test_keep_first_last_false_quantizes_every_layer() -> None:
    model = create_model("lenet300_100")
    report = quantize_(model, QuantConfig(rules={"*": {"weight": SIGN}}, keep_first_last=False))
    assert report.quantized == ["fc1", "fc2", "fc3"] and report.kept_float == {}
    assert set(_types(model).values()) == {"QuantLinear"}


def test_first_last_gives_the_ends_higher_precision() -> None:
    model = create_model("lenet5")
    cfg = QuantConfig(rules={"*": {"weight": SIGN, "input": U2}}, first_last={"weight": U8, "input": U8})
    report = quantize_(model, cfg)
    bits = {r.name: (r.weight_bits, r.input_bits, r.rule) for r in report.layers}
    assert bits == {"conv1": (8, 8, "first_last"), "conv2": (1, 2, "*"), "fc1": (1, 2, "*"),
                    "fc2": (8, 8, "first_last")}
    assert model.conv1.weight_quantizer is not model.fc2.weight_quantizer  # fresh instances per layer


def test_exact_name_wins_over_keep_first_last_and_earlier_globs() -> None:
    model = create_model("lenet5")
    report = quantize_(model, QuantConfig(rules={"*": {"weight": SIGN}, "conv1": {"weight": U8}, "fc1": {}}))
    rows = {r.name: r for r in report.layers}
    assert (rows["conv1"].rule, rows["conv1"].weight_bits) == ("conv1", 8)
    assert rows["conv2"].rule == "*" and rows["fc2"].weight_bits == 32
    assert report.kept_float["fc1"] == "rule 'fc1' sets no quantizer" and type(model.fc1) is nn.Linear


def test_filter_fn_keeps_layers_float() -> None:
    model = create_model("lenet300_100")
    cfg = QuantConfig(rules={"*": {"weight": SIGN}}, keep_first_last=False)
    report = quantize_(model, cfg, filter_fn=lambda module, name: name != "fc2")
    assert report.kept_float == {"fc2": "excluded by filter_fn"} and type(model.fc2) is nn.Linear


def test_a_rule_matching_no_layer_lists_the_layers_and_changes_nothing() -> None:
    model = create_model("lenet5")
    with pytest.raises(ValueError, match=r"\['fc9', 'Conv1d'\] match no .*conv1 \(Conv2d\), conv2 \(Conv2d\), "
                                         r"fc1 \(Linear\), fc2 \(Linear\)"):
        quantize_(model, QuantConfig(rules={"*": {"weight": SIGN}, "fc9": {"weight": SIGN}, "Conv1d": {}}))
    assert _types(model) == {"conv1": "Conv2d", "conv2": "Conv2d", "fc1": "Linear", "fc2": "Linear"}


def test_a_shadowed_rule_is_an_error() -> None:
    model = create_model("lenet300_100")
    with pytest.raises(ValueError, match="rule 'Linear' is never applied.*fc1 \\(kept float: first layer"):
        quantize_(model, QuantConfig(rules={"*": {"weight": SIGN}, "Linear": {"weight": U2}}))
    with pytest.raises(ValueError, match="rule 'fc3\\*' is never applied"):  # only the last layer, kept float
        quantize_(model, QuantConfig(rules={"fc2": {"weight": SIGN}, "fc3*": {"weight": U2}}))
    assert "Quant" not in "".join(_types(model).values())


def test_unknown_quantizer_or_bad_arguments_fail_when_the_config_is_built() -> None:
    with pytest.raises(ValidationError, match=r"unknown quantizer 'test_sing'.*did you mean test_sign"):
        QuantConfig(rules={"*": {"weight": "test_sing"}})
    with pytest.raises(ValidationError, match=r"valid names:.*test_uniform"):
        QuantConfig(rules={"*": {"input": {"name": "nope"}}})
    with pytest.raises(ValidationError, match="unexpected keyword argument 'bitz'"):
        QuantConfig(rules={"*": {"weight": {"name": "test_uniform", "bitz": 2}}})
    with pytest.raises(ValidationError, match="bits must be >= 1"):
        QuantConfig(rules={"*": {"weight": {"name": "test_uniform", "bits": 0}}})
    with pytest.raises(ValidationError, match="needs a 'name' key"):
        LayerQuant(weight={"bits": 2})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        QuantConfig(rules={"*": {"weights": SIGN}})
    with pytest.raises(ValidationError, match="rules is empty"):
        QuantConfig(rules={})
    with pytest.raises(ValidationError, match="first_last applies"):
        QuantConfig(rules={"*": {}}, keep_first_last=False, first_last={"weight": U8})


def test_a_quantizer_that_fails_to_build_leaves_the_model_untouched() -> None:
    model = create_model("lenet300_100")
    # model_construct skips validation, as a config edited after it was built would
    bad = QuantConfig.model_construct(rules={"fc1": LayerQuant(weight=SIGN),
                                             "fc2": LayerQuant.model_construct(weight="no_such", input=None)},
                                      keep_first_last=False, first_last=None, version=1)
    with pytest.raises(KeyError, match="unknown quantizer 'no_such'"):
        quantize_(model, bad)
    assert set(_types(model).values()) == {"Linear"}


def test_model_errors() -> None:
    with pytest.raises(TypeError, match="QuantConfig.model_validate"):
        quantize_(create_model("lenet5"), {"rules": {"*": {"weight": SIGN}}})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="the model itself is an nn.Linear"):
        quantize_(nn.Linear(3, 2), QuantConfig(rules={"*": {"weight": SIGN}}))
    model = create_model("lenet300_100")
    cfg = QuantConfig(rules={"*": {"weight": SIGN}}, keep_first_last=False)
    quantize_(model, cfg)
    with pytest.raises(ValueError, match=r"layer to quantize \(already quantized, and re-decided only with "
                                         r"requantize: true: fc1, fc2"):
        quantize_(model, cfg)


def test_a_single_layer_is_first_and_last() -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    report = quantize_(model, QuantConfig(rules={"0": {"weight": SIGN}}))  # named exactly: quantized anyway
    assert report.quantized == ["0"]
    with pytest.raises(ValueError, match="kept float: first and last layer"):
        quantize_(nn.Sequential(nn.Linear(4, 2)), QuantConfig(rules={"*": {"weight": SIGN}}))


def test_a_shared_layer_is_replaced_everywhere() -> None:
    fc = nn.Linear(4, 4)
    model = nn.Sequential(nn.Linear(4, 4), fc, nn.ReLU(), fc, nn.Linear(4, 2))
    report = quantize_(model, QuantConfig(rules={"*": {"weight": SIGN}}))
    assert report.quantized == ["1"]  # a shared module is reported under its first name
    assert isinstance(model[1], QuantLinear) and model[3] is model[1]


def test_pruning_masks_move_to_the_quantized_layer_with_their_gradient_hooks() -> None:
    from lowbit.prune import PruneConfig, masks_of, prune_

    model = create_model("lenet300_100", in_features=16)
    prune_(model, PruneConfig(rules={"fc2": 0.5}))
    mask = masks_of(model)["fc2.weight"].clone()
    quantize_(model, QuantConfig(rules={"fc2": {"weight": U4}}))
    assert isinstance(model.fc2, QuantLinear) and torch.equal(masks_of(model)["fc2.weight"], mask)
    model(torch.randn(8, 16)).sum().backward()
    assert (model.fc2.weight.grad[~mask] == 0).all() and (model.fc2.weight.grad[mask] != 0).any()


def test_report_is_a_table_and_json() -> None:
    model = create_model("lenet5")
    report = quantize_(model, QuantConfig(rules={"*": {"weight": SIGN, "input": U4}}))
    assert isinstance(report, QuantReport)
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == "quantized 2 of 4 layers"
    assert lines[1].split() == ["layer", "type", "weight", "input", "W", "bits", "A", "bits", "rule"]
    assert lines[2].split()[:6] == ["conv1", "Conv2d", "float", "float", "32", "32"]
    assert "float: first layer (keep_first_last)" in lines[2]
    assert lines[3].split() == ["conv2", "Conv2d", SIGN, "test_uniform(bits=4)", "1", "4", "'*'"]
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["quantized"] == ["conv2", "fc1"] and doc["kept_float"]["fc2"] == "last layer (keep_first_last)"
    assert doc["layers"][1] == {"name": "conv2", "type": "Conv2d", "weight": SIGN, "input": "test_uniform(bits=4)",
                                "weight_bits": 1, "input_bits": 4, "rule": "*", "note": ""}


def test_config_round_trips_through_yaml_and_json() -> None:
    cfg = QuantConfig(rules={"features.*": {"weight": U2, "input": U4}, "Linear": {"weight": SIGN}},
                      first_last={"weight": U8, "input": U8})
    doc = cfg.model_dump(mode="json")
    assert doc["version"] == 1 and list(doc["rules"]) == ["features.*", "Linear"]  # the order is kept
    assert QuantConfig.model_validate(yaml.safe_load(yaml.safe_dump(doc, sort_keys=False))) == cfg
    assert QuantConfig.model_validate_json(cfg.model_dump_json()) == cfg
    with pytest.raises(ValidationError):
        QuantConfig.model_validate({**doc, "version": 2})


def test_top_level_export() -> None:
    assert lowbit.quantize_ is quantize_ and "quantize_" in lowbit.__all__


# ------------------------------------------------------------------------------------- cost model


def test_bops_of_a_quantized_lenet5() -> None:
    model = create_model("lenet5")
    quantize_(model, QuantConfig(rules={"*": {"weight": SIGN, "input": U4}}))
    stats = {layer.name: layer for layer in profile(model).layers}
    # MACs = output elements x inputs per output: conv1 20x24x24 x 1x5x5, conv2 50x8x8 x 20x5x5,
    # fc1 500 x 800, fc2 10 x 500; conv1 and fc2 stay float (32 x 32), conv2 and fc1 are W1 A4
    macs = {"conv1": 20 * 24 * 24 * 25, "conv2": 50 * 8 * 8 * 20 * 25, "fc1": 500 * 800, "fc2": 10 * 500}
    bits = {"conv1": (32, 32), "conv2": (1, 4), "fc1": (1, 4), "fc2": (32, 32)}
    for name, layer in stats.items():
        assert layer.macs == macs[name] and (layer.weight_bits, layer.act_bits) == bits[name]
        assert layer.bops == macs[name] * bits[name][0] * bits[name][1]
    assert sum(s.bops for s in stats.values()) == (288_000 + 5_000) * 1024 + (1_600_000 + 400_000) * 4
    # storage: conv2 and fc1 weights at 1 bit, everything else at 32
    assert stats["fc1"].storage_bytes == 800 * 500 / 8 + 500 * 4


# ------------------------------------------------------------------------------------ recipe stage


def _recipe(tmp_path: Path, stages: list[dict]) -> dict:
    return {
        "version": 1, "name": "qat", "output": str(tmp_path / "run"), "seed": 0,
        "model": {"name": "lenet300_100", "kwargs": {"in_features": 64}},
        "data": {"name": "digits"}, "stages": stages,
    }


def test_quantize_stage_then_train_then_summary(tmp_path: Path) -> None:
    from lowbit.recipe import run_recipe, validate_recipe

    stages = [
        {"type": "quantize", "rules": {"*": {"weight": SIGN, "input": U4}}},
        {"type": "train", "epochs": 1, "batch_size": 32, "lr": 0.01, "channels_last": False},
        {"type": "summary"},
    ]
    recipe = validate_recipe(_recipe(tmp_path, stages))
    assert recipe.resolved()["stages"][0]["keep_first_last"] is True  # defaults filled in resolved.yaml
    results = run_recipe(recipe, show_progress=False)
    assert results["quantize"]["quantized"] == ["fc2"]
    assert results["quantize"]["kept_float"] == {"fc1": "first layer (keep_first_last)",
                                                 "fc3": "last layer (keep_first_last)"}
    assert 0 <= results["train"]["test_acc"] <= 100
    # fc1 64 x 300 and fc3 100 x 10 at 32 x 32 bits, fc2 300 x 100 at W1 A4
    assert results["summary"]["bops"] == (64 * 300 + 100 * 10) * 32 * 32 + 300 * 100 * 1 * 4
    layers = {row["name"]: row for row in json.loads((tmp_path / "run" / "summary.json").read_text())["layers"]}
    assert (layers["fc2"]["type"], layers["fc2"]["weight_bits"], layers["fc2"]["act_bits"]) == ("QuantLinear", 1, 4)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())["results"]
    assert saved["quantize"]["layers"][1]["rule"] == "*"


def test_a_bad_quantizer_name_fails_validation_before_anything_runs(tmp_path: Path) -> None:
    from lowbit.recipe import RecipeError, validate_recipe

    stages = [
        {"type": "quantize", "rules": {"*": {"weight": "test_sgn"}}},
        {"type": "train", "epochs": 1, "batch_size": 32, "channels_last": False},
    ]
    with pytest.raises(RecipeError, match=r"stages\[0\]\.rules\.\*\.weight: unknown quantizer 'test_sgn' "
                                          r"\(did you mean test_sign.*valid names: .*test_uniform"):
        validate_recipe(_recipe(tmp_path, stages))
    with pytest.raises(RecipeError, match=r"stages\[0\]\.keep_first_lst: unknown key \(did you mean "
                                          "'keep_first_last'\\?\\)"):
        validate_recipe(_recipe(tmp_path, [{"type": "quantize", "rules": {"*": {}}, "keep_first_lst": False}]))
    assert not (tmp_path / "run").exists()


def test_swish_sign_scale_exists_before_the_optimizer_and_survives_a_checkpoint(tmp_path) -> None:
    from lowbit.models import create_model
    from lowbit.train import load_model, save_model

    model = create_model("lenet5")
    quantize_(model, QuantConfig(rules={"conv2": {"weight": "swish_sign"}}))
    alpha = model.conv2.weight_quantizer.alpha
    assert alpha is not None and alpha.shape == (50,)
    assert any(p is alpha for p in model.parameters())  # an optimizer built now trains it
    expected = model.conv2.weight.detach().abs().mean(dim=(1, 2, 3))
    assert torch.allclose(alpha.detach(), expected)
    with torch.no_grad():
        alpha.mul_(2)
    loaded, _ = load_model(save_model(tmp_path / "m.safetensors", model))
    assert torch.equal(loaded.conv2.weight_quantizer.alpha, alpha)


# ------------------------------------------------------------------------------------------ requantize


def _qil(bits: int) -> dict[str, dict]:
    return {"*": {"weight": {"name": "qil_weight", "bits": bits}, "input": {"name": "qil_act", "bits": bits}}}


def test_requantize_carries_qil_intervals_to_fewer_bits_and_replays_from_a_checkpoint(tmp_path: Path) -> None:
    from lowbit.train import load_model, save_model

    torch.manual_seed(0)
    model = create_model("lenet5").eval()
    quantize_(model, QuantConfig(rules=_qil(4)))
    model.train()
    model(torch.randn(8, 1, 28, 28))  # the activation intervals initialize on the first batch
    with torch.no_grad():  # learned intervals: moved away from their initial values
        for q in (model.conv2.weight_quantizer, model.conv2.input_quantizer):
            q.c.add_(0.1), q.d.sub_(0.05)
    old = {k: v.clone() for k, v in model.conv2.state_dict().items() if "quantizer" in k}
    with pytest.raises(ValueError, match="never applied.*re-decided only with requantize: true: conv2, fc1"):
        quantize_(model, QuantConfig(rules=_qil(3)))
    report = quantize_(model, QuantConfig(rules=_qil(3), requantize=True))
    assert report.quantized == ["conv2", "fc1"] and report.layers[1].weight_bits == 3
    assert model.conv2.weight_quantizer.bit_width == 3 and model.fc1.input_quantizer.bit_width == 3
    new = {k: v for k, v in model.conv2.state_dict().items() if "quantizer" in k}
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in old)  # c, d, gamma carried
    assert _types(model)["conv1"] == "Conv2d"  # keep_first_last still holds
    loaded, _ = load_model(save_model(tmp_path / "w3.safetensors", model))
    assert loaded.conv2.weight_quantizer.bit_width == 3
    x = torch.randn(4, 1, 28, 28)
    model.eval(), loaded.eval()
    assert torch.equal(loaded(x), model(x))


def test_requantize_starts_fresh_where_state_does_not_fit_and_keeps_undecided_layers() -> None:
    torch.manual_seed(0)
    model = create_model("lenet5")
    quantize_(model, QuantConfig(rules={"*": {"weight": {"name": "lqnets_weight", "bits": 2}}}))
    report = quantize_(model, QuantConfig(rules={"conv2": {"weight": {"name": "lqnets_weight", "bits": 3}}},
                                          requantize=True))
    assert model.conv2.weight_quantizer.bit_width == 3  # a 3-bit basis: not the 2-bit one's shape, fresh
    assert model.fc1.weight_quantizer.bit_width == 2  # no rule decides fc1: it keeps its quantizer
    row = {r.name: r for r in report.layers}["fc1"]
    assert row.quantized and row.weight_bits == 2 and "kept its quantizers" in row.note


def test_a_progressive_recipe_requantizes_and_its_model_reloads(tmp_path: Path) -> None:
    from lowbit.data import load_dataset
    from lowbit.recipe import run_recipe, validate_recipe
    from lowbit.train import evaluate, load_model

    train = {"type": "train", "epochs": 1, "batch_size": 32, "lr": 0.01, "channels_last": False}
    stages = [{"type": "quantize", "rules": _qil(4)}, train,
              {"type": "quantize", "requantize": True, "rules": _qil(2)}, train,
              {"type": "evaluate"}, {"type": "save", "path": "model.safetensors"}]
    results = run_recipe(validate_recipe(_recipe(tmp_path, stages)), show_progress=False)
    second = next(v for k, v in results.items() if k.startswith("quantize") and k != "quantize")
    assert second["quantized"] == ["fc2"] and second["layers"][1]["weight_bits"] == 2
    model, _ = load_model(tmp_path / "run" / "model.safetensors")
    assert model.fc2.weight_quantizer.bit_width == 2 and model.fc2.input_quantizer.bit_width == 2
    acc = evaluate(model, load_dataset("digits").loader("test", 256))["acc"]
    assert acc == pytest.approx(results["evaluate"]["test_acc"], abs=1e-9)
