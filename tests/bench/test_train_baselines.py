"""The helpers of bench.train_baselines."""

from __future__ import annotations

import torch
from bench.train_baselines import publish
from torch import nn

from lowbit.train import save_model


def test_publish_rewrites_a_checkpoint_only_when_its_weights_change(tmp_path) -> None:  # noqa: ANN001
    model, dest = nn.Linear(3, 2), tmp_path / "committed.safetensors"
    save_model(tmp_path / "a.safetensors", model, results={"test_acc": 90.0})
    assert publish(tmp_path / "a.safetensors", dest)
    before = dest.read_bytes()
    save_model(tmp_path / "b.safetensors", model, results={"test_acc": 90.0}, input_shape=[3])  # more metadata
    assert not publish(tmp_path / "b.safetensors", dest)
    assert dest.read_bytes() == before
    with torch.no_grad():
        model.weight[0, 0] += 1e-3
    save_model(tmp_path / "c.safetensors", model, results={"test_acc": 90.0})
    assert publish(tmp_path / "c.safetensors", dest)
    assert dest.read_bytes() == (tmp_path / "c.safetensors").read_bytes()
