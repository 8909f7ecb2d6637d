"""Hinton KD: the loss against the written-out formula, its gradient and T^2 scaling, the callback in ``fit``."""

from __future__ import annotations

import copy
import doctest
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit.distill.kd as kd_module
from lowbit.data import Split, load_dataset
from lowbit.distill import KnowledgeDistillation, kd_loss
from lowbit.models import create_model
from lowbit.train import TrainConfig, evaluate, fit


def _reference(zs: np.ndarray, zt: np.ndarray, y: np.ndarray, t: float, alpha: float) -> float:
    """alpha T^2 mean_rows sum_c p_t (log p_t - log p_s) + (1 - alpha) mean_rows -log softmax(z_s)[y], in float64."""
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lps, lpt = log_softmax(zs / t), log_softmax(zt / t)
    kl = (np.exp(lpt) * (lpt - lps)).sum(1).mean()
    ce = -log_softmax(zs)[np.arange(len(y)), y].mean()
    return alpha * t * t * kl + (1 - alpha) * ce


@pytest.mark.parametrize("t, alpha", [(1.0, 0.5), (4.0, 0.9), (20.0, 1.0), (2.5, 0.0)])
def test_loss_matches_the_formula(t: float, alpha: float) -> None:
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(16, 10, generator=g) * 3, torch.randn(16, 10, generator=g) * 3
    y = torch.randint(0, 10, (16,), generator=g)
    got = kd_loss(zs, zt, y, t, alpha).item()
    assert got == pytest.approx(_reference(zs.double().numpy(), zt.double().numpy(), y.numpy(), t, alpha), rel=1e-5)


def test_gradient_matches_the_closed_form() -> None:
    t, alpha, b = 3.0, 0.7, 8
    zs = torch.randn(b, 5, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(b, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (b,))
    kd_loss(zs, zt, y, t, alpha).backward()
    with torch.no_grad():
        soft = t * (torch.softmax(zs / t, 1) - torch.softmax(zt / t, 1))
        hard = torch.softmax(zs, 1) - F.one_hot(y, 5)
        expected = (alpha * soft + (1 - alpha) * hard) / b
    torch.testing.assert_close(zs.grad, expected)
    assert zt.grad is None  # the teacher's logits are constants


def test_t_squared_keeps_the_soft_gradient_scale_independent_of_temperature() -> None:
    """Hinton et al., section 2.1: at high T the soft gradient tends to (z_s - z_t) / (C B), whatever T."""
    b, c = 4, 10
    zs, zt = torch.randn(b, c, dtype=torch.float64), torch.randn(b, c, dtype=torch.float64)
    zs, zt = zs - zs.mean(1, keepdim=True), zt - zt.mean(1, keepdim=True)  # zero-mean logits
    y = torch.zeros(b, dtype=torch.long)
    limit = (zs - zt) / (c * b)
    grads = {}
    for t in (10.0, 40.0, 160.0):
        z = zs.clone().requires_grad_()
        kd_loss(z, zt, y, t, alpha=1.0).backward()
        grads[t] = z.grad
    for t, tol in ((40.0, 0.05), (160.0, 0.015)):  # the first neglected term is O(|z| / T)
        assert ((grads[t] - limit).norm() / limit.norm()).item() < tol
    ratio = grads[40.0].norm() / grads[160.0].norm()
    assert ratio.item() == pytest.approx(1.0, abs=0.02)  # without T^2 it would be 16


def test_alpha_zero_is_cross_entropy_and_ignores_the_teacher() -> None:
    zs = torch.randn(6, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    loss = kd_loss(zs, torch.randn(6, 4) * 100, y, temperature=7.0, alpha=0.0)
    torch.testing.assert_close(loss, F.cross_entropy(zs, y))
    loss.backward()
    torch.testing.assert_close(zs.grad, (torch.softmax(zs, 1) - F.one_hot(y, 4)).detach() / 6)


def test_sequence_logits_are_averaged_over_every_position() -> None:
    zs, zt = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    y = torch.randint(0, 7, (2, 3))
    torch.testing.assert_close(kd_loss(zs, zt, y, 2.0, 0.6), kd_loss(zs.flatten(0, 1), zt.flatten(0, 1), y.flatten(),
                                                                     2.0, 0.6))


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": 0.0}, "temperature must be a finite number > 0"),
    ({"temperature": -1.0}, "temperature must be a finite number > 0"),
    ({"temperature": math.inf}, "temperature must be a finite number > 0"),
    ({"alpha": 1.5}, r"alpha .* must be in \[0, 1\]"),
    ({"alpha": -0.1}, r"alpha .* must be in \[0, 1\]"),
])
def test_bad_temperature_or_alpha(kwargs: dict, match: str) -> None:
    z = torch.randn(2, 3)
    with pytest.raises(ValueError, match=match):
        kd_loss(z, z, torch.tensor([0, 1]), **kwargs)
    with pytest.raises(ValueError, match=match):
        KnowledgeDistillation(nn.Linear(2, 3), **kwargs)


def test_mismatched_logits_or_targets_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="same number of classes"):
        kd_loss(torch.randn(2, 10), torch.randn(2, 100), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target"):
        kd_loss(torch.randn(2, 10), torch.randn(2, 10), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="teacher must be an nn.Module"):
        KnowledgeDistillation("resnet20")  # type: ignore[arg-type]
    net = nn.Linear(2, 3)
    with pytest.raises(ValueError, match="the teacher is the student itself"):
        KnowledgeDistillation(net).on_fit_start(net, torch.optim.SGD(net.parameters(), lr=0.1))


def _mlp() -> nn.Module:
    return create_model("lenet300_100", in_features=64)


def test_callback_trains_the_student_and_leaves_the_teacher_alone() -> None:
    data = load_dataset("digits")
    teacher = create_model("mlp_bnn", in_chans=1, input_size=8, width=32, depth=1)  # has batch norm
    teacher.train()
    before = copy.deepcopy(teacher.state_dict())
    student = _mlp()
    w0 = student.fc1.weight.detach().clone()
    cfg = TrainConfig(epochs=0.2, batch_size=64, lr=0.05, checkpoint_every=0)
    fit(student, data, cfg, callbacks=[KnowledgeDistillation(teacher)], show_progress=False)
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running stats
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())
    assert not torch.equal(student.fc1.weight, w0)


class _ZeroLoss:
    def task_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return 0 * logits.sum()


def test_the_engine_trains_on_task_loss_instead_of_cross_entropy() -> None:
    data = load_dataset("digits")
    student = _mlp()
    w0 = copy.deepcopy(student.state_dict())
    cfg = TrainConfig(epochs=0.2, batch_size=64, lr=0.1, momentum=0.0, checkpoint_every=0)
    res = fit(student, data, cfg, callbacks=[_ZeroLoss()], show_progress=False)
    assert all(torch.equal(w0[k], v) for k, v in student.state_dict().items())  # zero loss: nothing moves
    assert res.history[-1]["train_loss"] == 0.0
    with pytest.raises(ValueError, match="at most one may replace"):
        fit(student, data, cfg, callbacks=[_ZeroLoss(), _ZeroLoss()], show_progress=False)
    with pytest.raises(ValueError, match="label_smoothing .* set it to 0"):
        fit(student, data, cfg.model_copy(update={"label_smoothing": 0.1}), callbacks=[_ZeroLoss()],
            show_progress=False)


def test_soft_targets_teach_a_class_the_student_never_sees() -> None:
    """Hinton et al., section 3: with every 3 removed from the transfer set, the distilled student still
    recognizes 3s from the teacher's soft targets on the other digits; trained on the labels alone it never
    predicts a class it was never given."""
    data = load_dataset("digits")
    torch.manual_seed(0)
    teacher = _mlp()
    fit(teacher, data, TrainConfig(epochs=15, batch_size=64, lr=0.05, checkpoint_every=0), show_progress=False)
    keep = data.train.y != 3
    no_threes = replace(data, train=Split(data.train.x[keep], data.train.y[keep]))
    threes = replace(data, test=Split(data.test.x[data.test.y == 3], data.test.y[data.test.y == 3]))
    assert evaluate(teacher, threes.loader("test", 256))["acc"] > 80
    cfg = TrainConfig(epochs=15, batch_size=64, lr=0.05, checkpoint_every=0)
    results = {}
    for name, callbacks in (("labels", []), ("kd", [KnowledgeDistillation(teacher, temperature=8.0, alpha=0.9)])):
        torch.manual_seed(1)
        student = _mlp()
        fit(student, no_threes, cfg, callbacks=callbacks, show_progress=False)
        results[name] = evaluate(student, threes.loader("test", 256))["acc"]
    assert results["labels"] < 5
    assert results["kd"] > 60  # about 90-95% across seeds


def test_doctests() -> None:
    res = doctest.testmod(kd_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0
