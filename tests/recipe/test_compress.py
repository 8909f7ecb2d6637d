"""The Deep Compression stages end to end on the 8x8 digits (seconds, not minutes)."""

import json
from pathlib import Path

import pytest
import torch

from lowbit.codec import CodecError, load_model
from lowbit.models import create_model
from lowbit.recipe import RecipeError, run_recipe, validate_recipe
from lowbit.recipe.compress import clean_state


def _recipe(tmp_path: Path, stages: list[dict]) -> dict:
    return {
        "version": 1, "name": "dc", "output": str(tmp_path / "run"), "seed": 0,
        "model": {"name": "lenet300_100", "kwargs": {"in_features": 64}},
        "data": {"name": "digits"}, "stages": stages,
    }


PIPELINE = [
    {"type": "train", "epochs": 6, "batch_size": 32, "lr": 0.05, "channels_last": False},
    {"type": "evaluate"},
    {"type": "prune", "rules": {"fc1": 0.9, "fc2": 0.8, "fc3": 0.5}},
    {"type": "train", "epochs": 3, "batch_size": 32, "lr": 0.02, "channels_last": False},
    {"type": "cluster", "types": {"Linear": 4}},
    {"type": "train", "epochs": 1, "batch_size": 32, "lr": 1e-4, "channels_last": False},
    {"type": "encode", "index_bits": {"fc1": 4, "Linear": 5}},
    {"type": "report"},
]


def test_prune_cluster_encode_report_end_to_end(tmp_path: Path) -> None:
    results = run_recipe(validate_recipe(_recipe(tmp_path, PIPELINE)), show_progress=False)
    run = tmp_path / "run"
    enc = results["encode"]
    assert enc["bit_exact"] and enc["file_bytes"] == (run / "model.lbz").stat().st_size
    # 10% of fc1, 20% of fc2, 50% of fc3 kept at 4 bits + indices: far smaller than float32
    assert enc["ratio"] > 8
    model, meta = load_model(run / "model.lbz")
    weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert all(len(torch.unique(w[w != 0])) <= 16 for w in weights.values())  # 4 bits: at most 16 values
    kept = (weights["fc1"] != 0).float().mean().item()
    assert 0.05 < kept <= 0.10 + 1e-6
    assert meta["dataset"] == "digits" and meta["model"]["kwargs"] == {"in_features": 64}
    assert enc["decoded_test_acc"] > results["evaluate"]["test_acc"] - 5  # a small budget, a wide margin
    report = (run / "report.md").read_text()
    assert "| fc1.weight | 19,200 |" in report and f"{enc['ratio']:.1f}x" in report
    assert (run / "weights.png").stat().st_size > 10_000
    assert json.loads((run / "results.json").read_text())["results"]["report"]["ratio"] == enc["ratio"]
    codec = json.loads((run / "codec_report.json").read_text())
    assert {t["name"]: t["index_bits"] for t in codec["tensors"]}["fc1.weight"] == 4


def test_clean_state_has_the_keys_of_a_fresh_model(tmp_path: Path) -> None:
    from lowbit.cluster import ClusterConfig, cluster_
    from lowbit.prune import PruneConfig, prune_

    model = create_model("lenet300_100")
    prune_(model, PruneConfig(rules={"*": 0.8}))
    cluster_(model, ClusterConfig(types={"Linear": 3}))
    state = clean_state(model)
    assert set(state) == set(create_model("lenet300_100").state_dict())
    assert torch.equal(state["fc1.weight"], model.fc1.weight.detach())
    assert model.fc1.weight.shape == (300, 784)  # the model itself still works afterwards


def test_report_without_encode_fails_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"stages\[1\] \(report\): needs a encode stage"):
        validate_recipe(_recipe(tmp_path, [{"type": "evaluate"}, {"type": "report"}]))
    assert not (tmp_path / "run").exists()


def test_bad_index_bits_is_a_validation_error(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="index bits must be in 1..16"):
        validate_recipe(_recipe(tmp_path, [{"type": "encode", "index_bits": {"Linear": 0}}]))


def test_a_forged_lbz_fails_to_load_with_the_codec_error(tmp_path: Path) -> None:
    run_recipe(validate_recipe(_recipe(tmp_path, [
        {"type": "prune", "rules": {"*": 0.5}}, {"type": "cluster", "types": {"Linear": 2}}, {"type": "encode"},
    ])), show_progress=False)
    path = tmp_path / "run" / "model.lbz"
    blob = bytearray(path.read_bytes())
    blob[200] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(CodecError):
        load_model(path)
