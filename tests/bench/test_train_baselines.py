"""The helpers of bench.train_baselines."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bench import train_baselines as tb
from lowbit.train import save_model


def test_publish_rewrites_a_checkpoint_only_when_its_weights_change(tmp_path) -> None:  # noqa: ANN001
    model, dest = nn.Linear(3, 2), tmp_path / "committed.safetensors"
    save_model(tmp_path / "a.safetensors", model, results={"test_acc": 90.0})
    assert tb.publish(tmp_path / "a.safetensors", dest)
    before = dest.read_bytes()
    save_model(tmp_path / "b.safetensors", model, results={"test_acc": 90.0}, input_shape=[3])  # more metadata
    assert not tb.publish(tmp_path / "b.safetensors", dest)
    assert dest.read_bytes() == before
    with torch.no_grad():
        model.weight[0, 0] += 1e-3
    save_model(tmp_path / "c.safetensors", model, results={"test_acc": 90.0})
    assert tb.publish(tmp_path / "c.safetensors", dest)
    assert dest.read_bytes() == (tmp_path / "c.safetensors").read_bytes()


def test_a_warm_restart_names_what_it_needs(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    ckpt = tmp_path / "bench" / "checkpoints" / "resnet20-e80.safetensors"
    ckpt.parent.mkdir(parents=True)
    (tmp_path / "bench" / "results").mkdir()
    monkeypatch.setattr(tb, "CHECKPOINTS", ckpt.parent)
    monkeypatch.setattr(tb, "RESULTS", tmp_path / "bench" / "results")
    row = {"epochs": 80.0, "test_acc_pct": 88.55, "checkpoint": "bench/checkpoints/resnet20-e80.safetensors"}
    (tmp_path / "bench" / "results" / "baselines.json").write_text(json.dumps({"results": {"resnet20-e80": row}}))
    with pytest.raises(ValueError, match="needs --epochs"):
        tb.restart_parent("resnet20-e80", None)
    with pytest.raises(ValueError, match=r"no such finished baseline.*choose from \['resnet20-e80'\]"):
        tb.restart_parent("resnet20-e90", 40)
    with pytest.raises(ValueError, match="checkpoint .*resnet20-e80.safetensors is missing"):
        tb.restart_parent("resnet20-e80", 40)
    save_model(ckpt, nn.Linear(3, 2))
    parent = tb.restart_parent("resnet20-e80", 40)
    assert (parent["arch"], parent["epochs"], parent["test_acc_pct"]) == ("resnet20", 80.0, 88.55)
    assert (parent["path"], parent["checkpoint"]) == (ckpt, row["checkpoint"])


@pytest.mark.parametrize(("argv", "message"), [
    (["--swa"], "only apply to a --restart-from run"),
    (["--lr", "0.01"], "only apply to a --restart-from run"),
    (["--restart-from", "resnet20-e80", "--epochs", "30", "--swa"], "--swa needs --lr"),
])
def test_swa_and_lr_options_say_what_they_need(argv, message, monkeypatch, capsys) -> None:  # noqa: ANN001
    monkeypatch.setattr("sys.argv", ["train_baselines", *argv])
    with pytest.raises(SystemExit):
        tb.main()
    assert message in capsys.readouterr().err
