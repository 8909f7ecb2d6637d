"""FSP matrices: against explicit loops, the pooling rule, shape errors, hooks on ResNet stages, two-stage training."""

from __future__ import annotations

import copy
import doctest
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit.distill.fsp as fsp_module
from lowbit.data import Dataset, Split, load_dataset
from lowbit.distill import FSPDistillation, FSPRecorder, fsp_loss, fsp_matrices, fsp_matrix, fsp_train, stage_modules
from lowbit.models import create_model
from lowbit.models.resnet import CifarResNet
from lowbit.train import TrainConfig
from lowbit.train.checkpoint import load_checkpoint, load_state_into


def _loop_fsp(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    b, m, h, w = f1.shape
    n = f2.shape[1]
    g = torch.zeros(b, m, n, dtype=torch.float64)
    for k in range(b):
        for i in range(m):
            for j in range(n):
                g[k, i, j] = sum(float(f1[k, i, s, t]) * float(f2[k, j, s, t]) for s in range(h) for t in range(w))
    return g / (h * w)


def test_fsp_matrix_matches_an_explicit_loop() -> None:
    f1, f2 = torch.randn(2, 3, 4, 5), torch.randn(2, 4, 4, 5)
    g = fsp_matrix(f1, f2)
    assert g.shape == (2, 3, 4)
    torch.testing.assert_close(g.double(), _loop_fsp(f1, f2), rtol=1e-5, atol=1e-6)


def test_larger_map_is_average_pooled_or_an_error() -> None:
    f1, f2 = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)  # a stride-2 stage: input twice the output's size
    pooled = F.avg_pool2d(f1, 2)
    torch.testing.assert_close(fsp_matrix(f1, f2).double(), _loop_fsp(pooled, f2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fsp_matrix(f2, f1), fsp_matrix(f2, pooled))  # either side may be the larger
    with pytest.raises(ValueError, match=r"different spatial sizes \(8, 8\) and \(4, 4\).*pool=True"):
        fsp_matrix(f1, f2, pool=False)
    with pytest.raises(ValueError, match="neither is at least as large"):
        fsp_matrix(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 8, 4))
    with pytest.raises(ValueError, match="4-D feature maps"):
        fsp_matrix(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="batch sizes"):
        fsp_matrix(torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4))


def test_fsp_loss_formula_weights_and_gradient() -> None:
    gt = [torch.randn(4, 3, 5), torch.randn(4, 2, 2)]
    gs = [torch.randn(4, 3, 5, requires_grad=True), torch.randn(4, 2, 2, requires_grad=True)]
    per_pair = [((a - b) ** 2).sum() / 4 for a, b in zip(gt, gs, strict=True)]  # mean over the batch
    torch.testing.assert_close(fsp_loss(gt, gs), per_pair[0] + per_pair[1])
    loss = fsp_loss(gt, gs, weights=[0.5, 2.0])
    torch.testing.assert_close(loss, 0.5 * per_pair[0] + 2.0 * per_pair[1])
    loss.backward()
    torch.testing.assert_close(gs[0].grad, 0.5 * 2 * (gs[0] - gt[0]).detach() / 4)


def test_fsp_loss_shape_errors_say_what_differs() -> None:
    with pytest.raises(ValueError, match=r"pair 1 \(b\).*16x32.*8x16.*same channel counts"):
        fsp_loss([torch.zeros(2, 3, 3), torch.zeros(2, 16, 32)], [torch.zeros(2, 3, 3), torch.zeros(2, 8, 16)],
                 names=["a", "b"])
    with pytest.raises(ValueError, match="pair one to one"):
        fsp_loss([torch.zeros(2, 3, 3)], [])
    with pytest.raises(ValueError, match="2 weights for 1 FSP pairs"):
        fsp_loss([torch.zeros(2, 3, 3)], [torch.zeros(2, 3, 3)], weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="finite numbers >= 0"):
        fsp_loss([torch.zeros(2, 3, 3)], [torch.zeros(2, 3, 3)], weights=[-1.0])


def test_recorder_on_resnet_stages_matches_the_stages_run_by_hand() -> None:
    net = CifarResNet(14, in_chans=1, width=4).eval()
    x = torch.randn(3, 1, 8, 8)
    assert stage_modules(net) == ["layer1", "layer2", "layer3"]
    got = fsp_matrices(net, x)
    with torch.no_grad():
        f0 = net.relu(net.bn1(net.conv1(x)))
        f1 = net.layer1(f0)
        f2 = net.layer2(f1)
        f3 = net.layer3(f2)
    expected = [fsp_matrix(f0, f1), fsp_matrix(F.avg_pool2d(f1, 2), f2), fsp_matrix(F.avg_pool2d(f2, 2), f3)]
    assert [tuple(g.shape) for g in got] == [(3, 4, 4), (3, 4, 8), (3, 8, 16)]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    rec = FSPRecorder(net, ["layer2.0", "layer3"])  # any named modules; training mode only
    with rec:
        net(x)
        with pytest.raises(RuntimeError, match="did not run"):
            rec.take()
    assert not net.layer1._forward_hooks and not net.layer1._forward_pre_hooks  # removed on exit


def test_module_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="no stage modules named layer1.*conv1"):
        stage_modules(create_model("lenet5"))
    net = CifarResNet(8, in_chans=1, width=4)
    with pytest.raises(ValueError, match=r"no module 'layer4' \(did you mean 'layer3'\?\).*layer1, layer2, layer3"):
        FSPRecorder(net, ["layer4"])
    inplace = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(inplace=True))
    with pytest.raises(RuntimeError, match="modified its input in place"):
        fsp_matrices(inplace, torch.randn(1, 1, 4, 4), ["1"])


def test_teacher_and_student_with_different_channels_at_a_pair_is_an_error() -> None:
    teacher, student = CifarResNet(8, in_chans=1, width=8), CifarResNet(8, in_chans=1, width=4)
    fsp = FSPDistillation(teacher)
    fsp.attach(student)
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"layer1.*teacher's matrix is 8x8.*student's 4x4.*same channel counts"):
        fsp.task_loss(student, x, torch.zeros(2, dtype=torch.long), student(x))
    fsp.remove()
    with pytest.raises(ValueError, match="3 student FSP points .* but 2 teacher points"):
        FSPDistillation(teacher, teacher_modules=["layer1", "layer2"]).attach(student)


def test_teacher_and_student_of_different_depths_and_resolutions_pair_by_stage() -> None:
    teacher, student = CifarResNet(20, in_chans=1, width=4), CifarResNet(8, in_chans=1, width=4)
    fsp = FSPDistillation(teacher)
    fsp.attach(student)
    x = torch.randn(2, 1, 8, 8)
    assert fsp.task_loss(student, x, torch.zeros(2, dtype=torch.long), student(x)).item() > 0
    fsp.remove()


def _small_digits() -> Dataset:
    data = load_dataset("digits")
    return replace(data, train=Split(data.train.x[:512], data.train.y[:512]),
                   test=Split(data.test.x[:128], data.test.y[:128]))


def _fsp_loss_on(teacher: nn.Module, student: nn.Module, x: torch.Tensor) -> float:
    student = copy.deepcopy(student).train()  # training mode (the hooks record then), on a copy
    fsp = FSPDistillation(teacher)
    fsp.attach(student)
    with torch.no_grad():
        value = fsp.task_loss(student, x, torch.zeros(len(x), dtype=torch.long), student(x)).item()
    fsp.remove()
    return value


def test_two_stage_training_fits_the_teachers_flows_then_the_task(tmp_path: Path) -> None:
    data = _small_digits()
    torch.manual_seed(0)
    teacher = CifarResNet(14, in_chans=1, width=4)
    student = CifarResNet(8, in_chans=1, width=4)
    fc0 = copy.deepcopy(student.fc.state_dict())
    teacher_state = copy.deepcopy(teacher.state_dict())
    x = next(iter(data.loader("train", 128)))[0]
    before = _fsp_loss_on(teacher, student, x)
    stage1 = TrainConfig(epochs=3, batch_size=64, optimizer="adam", lr=3e-3, checkpoint_every=0, eval_every=10)
    stage2 = TrainConfig(epochs=1, batch_size=64, lr=0.05, checkpoint_every=0)
    calls = []

    class Probe:  # extra callbacks take part in both stages
        def after_epoch(self, model: nn.Module, epoch: int) -> None:
            calls.append(epoch)

    first, _ = fsp_train(student, FSPDistillation(teacher), data, stage1, stage2, tmp_path, callbacks=[Probe()],
                         show_progress=False)
    assert calls == [0, 1, 2, 0]
    assert first.history[-1]["train_loss"] < first.history[0]["train_loss"]
    after_stage1 = CifarResNet(8, in_chans=1, width=4)
    load_state_into(after_stage1, load_checkpoint(tmp_path / "fsp" / "model.safetensors").group("model"))
    assert _fsp_loss_on(teacher, after_stage1, x) < 0.7 * before  # stage 1 fitted the teacher's flows ...
    assert all(torch.equal(fc0[k], v) for k, v in after_stage1.fc.state_dict().items())  # ... only them
    assert all(not torch.equal(fc0[k], v) for k, v in student.fc.state_dict().items())  # stage 2: the task
    assert (tmp_path / "task" / "model.safetensors").exists()
    assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in (*student.modules(), *teacher.modules()))


def test_doctests() -> None:
    res = doctest.testmod(fsp_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0
