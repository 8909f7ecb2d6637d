"""Polino et al.: quantized distillation trains float shadow weights through bucketed quantizers; differentiable
quantization trains only the quantization points."""

from __future__ import annotations

import copy
import doctest

import pytest
import torch

import lowbit.distill.polino as polino_module
from lowbit.data import load_dataset
from lowbit.distill import (
    KnowledgeDistillation,
    bucketed_config,
    kd_loss,
    quantization_points,
    quantize_bucketed_,
    train_points_only,
)
from lowbit.models import create_model
from lowbit.nn import QuantLinear
from lowbit.quant.polino import BucketedPoints, BucketedUniform
from lowbit.train import TrainConfig, fit


def _mlp() -> torch.nn.Module:
    return create_model("lenet300_100", in_features=64)


def test_quantized_distillation_trains_float_shadow_weights_of_a_quantized_student() -> None:
    data = load_dataset("digits")
    torch.manual_seed(0)
    teacher, student = _mlp(), _mlp()
    report = quantize_bucketed_(student, bits=2, bucket_size=100)
    assert report.quantized == ["fc2"] and set(report.kept_float) == {"fc1", "fc3"}  # keep_first_last
    layer = student.fc2
    assert isinstance(layer, QuantLinear) and isinstance(layer.weight_quantizer, BucketedUniform)
    w0 = layer.weight.detach().clone()
    fit(student, data, TrainConfig(epochs=0.3, batch_size=64, lr=0.05, checkpoint_every=0),
        callbacks=[KnowledgeDistillation(teacher)], show_progress=False)
    w = layer.weight.detach()
    assert not torch.equal(w, w0)
    assert torch.unique(w).numel() > 4 * (w.numel() // 100)  # the shadow weights stay float ...
    q = layer.weight_quantizer(w).reshape(-1, 100)  # ... the forward pass sees at most 4 levels per bucket
    assert max(torch.unique(row).numel() for row in q) <= 4


def test_differentiable_quantization_moves_only_the_points_and_lowers_the_loss() -> None:
    """The 2-bit student learns points that imitate its own float version better than the uniform levels."""
    torch.manual_seed(0)
    student = _mlp()
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(3)  # larger logits than the initialization gives: a clear signal to match
    teacher = copy.deepcopy(student)
    quantize_bucketed_(student, bits=2, bucket_size=256, learned_points=True, keep_first_last=False)
    points = quantization_points(student)
    assert sorted(points) == ["fc1", "fc2", "fc3"]
    start = {k: p.detach().clone() for k, p in points.items()}
    state0 = copy.deepcopy({k: v for k, v in student.state_dict().items() if not k.endswith("points")})
    x = torch.randn(256, 1, 8, 8)
    with torch.no_grad():
        zt = teacher(x)

    def loss() -> torch.Tensor:
        return kd_loss(student(x), zt, zt.argmax(1), temperature=2.0, alpha=1.0)

    initial = loss().item()
    with train_points_only(student) as trained:
        assert {id(p) for p in student.parameters() if p.requires_grad} == {id(p) for p in trained.values()}
        opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=0.01)
        for _ in range(40):
            opt.zero_grad()
            loss().backward()
            opt.step()
    assert loss().item() < 0.8 * initial  # about 0.5x in practice
    assert all(p.requires_grad for p in student.parameters())  # restored on exit
    assert all(not torch.equal(start[k], p) for k, p in points.items())
    assert all(torch.equal(state0[k], v) for k, v in student.state_dict().items() if k in state0)  # weights kept


def test_learned_points_start_as_the_uniform_quantizer() -> None:
    torch.manual_seed(0)
    a, x = _mlp(), torch.randn(4, 1, 8, 8)
    b = copy.deepcopy(a)
    quantize_bucketed_(a, bits=3)
    quantize_bucketed_(b, bits=3, learned_points=True)
    assert isinstance(b.fc2.weight_quantizer, BucketedPoints)
    torch.testing.assert_close(a(x), b(x))


def test_errors() -> None:
    with pytest.raises(ValueError, match="has no learned quantization points"):
        with train_points_only(_mlp()):
            pass
    with pytest.raises(ValueError, match="stochastic rounding applies to uniform levels"):
        bucketed_config(2, stochastic=True, learned_points=True)
    with pytest.raises(ValueError, match="bits must be an int in"):
        bucketed_config(0)


def test_doctests() -> None:
    res = doctest.testmod(polino_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0
