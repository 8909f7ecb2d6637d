import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lowbit.data import load_dataset
from lowbit.models import create_model
from lowbit.train import CheckpointError, TrainConfig, fit, load_checkpoint, load_model
from lowbit.train.schedule import lr_at

# A small, fast run: an MLP on the 8x8 digits, 47 steps per epoch.
CFG = TrainConfig(epochs=4, batch_size=32, lr=0.05, checkpoint_every=0, seed=1, channels_last=False)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("lenet300_100", in_features=64)


def test_fit_learns_digits_and_writes_its_files(tmp_path: Path) -> None:
    res = fit(_model(), load_dataset("digits"), CFG, run_dir=tmp_path, show_progress=False)
    assert res.final["test_acc"] > 90.0  # a linear model already gets ~95% here
    assert [h["epoch"] for h in res.history] == [1, 2, 3, 4]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4
    model, ckpt = load_model(tmp_path / "model.safetensors")
    assert ckpt.meta["results"]["test_acc"] == res.final["test_acc"]


def test_nan_loss_stops_with_a_clear_error() -> None:
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        fit(_model(), load_dataset("digits"), CFG.model_copy(update={"lr": 1e12}), show_progress=False)


_CHILD = textwrap.dedent(
    """
    import sys, time, torch
    torch.set_num_threads(1)
    from lowbit.data import load_dataset
    from lowbit.models import create_model
    from lowbit.train import TrainConfig, fit

    class Slow:  # makes the run long enough to be killed in the middle of an epoch
        def after_step(self, model, step):
            time.sleep(0.03)

    torch.manual_seed(0)
    model = create_model("lenet300_100", in_features=64)
    cfg = TrainConfig.model_validate_json(sys.argv[2])
    fit(model, load_dataset("digits"), cfg, run_dir=sys.argv[1], callbacks=[Slow()], show_progress=False)
    """
)


def test_resume_after_sigkill_gives_the_uninterrupted_result(tmp_path: Path) -> None:
    cfg = CFG.model_copy(update={"checkpoint_every": 5})
    # the conftest runs every test on one thread, as the child below does: the runs are comparable
    reference = fit(_model(), load_dataset("digits"), cfg, run_dir=tmp_path / "ref", show_progress=False)
    run = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(run), cfg.model_dump_json()])
    last, killed_at = run / "last.safetensors", None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if last.exists():
            step = load_checkpoint(last).meta["step"]  # atomic writes: never a half-written file
            if step >= 60:  # inside epoch 2 (47 steps per epoch)
                os.kill(child.pid, signal.SIGKILL)
                child.wait()
                killed_at = load_checkpoint(last).meta["step"]
                break
        time.sleep(0.01)
    assert killed_at is not None, "the child finished or stalled before it could be killed"
    assert killed_at % 47 != 0 and killed_at < 4 * 47  # killed mid-epoch, before the end
    assert not (run / "model.safetensors").exists()
    resumed = fit(_model(), load_dataset("digits"), cfg, run_dir=run, resume=True, show_progress=False)
    a = load_checkpoint(tmp_path / "ref" / "model.safetensors").group("model")
    b = load_checkpoint(run / "model.safetensors").group("model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.final == reference.final
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]


def test_resume_with_another_config_is_refused(tmp_path: Path) -> None:
    short = CFG.model_copy(update={"epochs": 1})
    fit(_model(), load_dataset("digits"), short, run_dir=tmp_path, show_progress=False)
    with pytest.raises(CheckpointError, match="different training config"):
        fit(_model(), load_dataset("digits"), CFG, run_dir=tmp_path, resume=True, show_progress=False)


def test_resume_with_other_parameter_groups_names_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same config, but the optimizer now groups the parameters differently (what a run written by an older lowbit
    meets after a config field that splits the groups was added): a CheckpointError naming the file."""
    short = CFG.model_copy(update={"epochs": 1})
    fit(_model(), load_dataset("digits"), short, run_dir=tmp_path, show_progress=False)

    def two_groups(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
        params = list(model.parameters())
        return torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=cfg.lr)

    monkeypatch.setattr("lowbit.train.engine.build_optimizer", two_groups)
    with pytest.raises(CheckpointError, match=r"last\.safetensors: .*grouped differently.*new run directory"):
        fit(_model(), load_dataset("digits"), short, run_dir=tmp_path, resume=True, show_progress=False)


def test_schedules() -> None:
    kw = dict(base_lr=1.0, total_steps=100, steps_per_epoch=10)
    assert lr_at("cosine", step=0, **kw) == 1.0 and abs(lr_at("cosine", step=50, **kw) - 0.5) < 1e-9
    assert lr_at("cosine", step=100, **kw) < 1e-9
    assert lr_at("step", step=35, milestones=(2, 3), gamma=0.1, **kw) == pytest.approx(0.01)
    assert lr_at("onecycle", step=25, **kw) == pytest.approx(1.0)
    assert lr_at("onecycle", step=0, **kw) == pytest.approx(1 / 25)
    assert lr_at("cosine", step=4, warmup_epochs=1, **kw) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="allowed"):
        lr_at("linear", step=0, **kw)


def test_config_errors_name_the_field() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValidationError, match="milestones"):
        TrainConfig(schedule="step")
    with pytest.raises(ValidationError, match="Extra inputs"):
        TrainConfig(learning_rate=0.1)


def test_fit_start_and_end_hooks_see_the_optimizer_and_change_the_final_result() -> None:
    class Probe:
        def on_fit_start(self, model, optimizer):
            self.optimizer = optimizer

        def on_fit_end(self, model):
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()  # a model of zeros predicts class 0 for everything

    probe = Probe()
    short = CFG.model_copy(update={"epochs": 1})
    res = fit(_model(), load_dataset("digits"), short, callbacks=[probe], show_progress=False)
    assert isinstance(probe.optimizer, torch.optim.SGD)
    assert res.history[-1]["test_acc"] > 50  # trained...
    assert res.final["test_acc"] < 20  # ...but the final numbers are measured after on_fit_end


@pytest.mark.parametrize("quantizer_wd", [0.0, 0.5])
def test_quantizer_parameters_get_their_own_weight_decay(quantizer_wd: float) -> None:
    from _quantizers import Pact
    from lowbit.nn import QuantLinear
    from lowbit.train.engine import build_optimizer

    layer = QuantLinear(4, 3, input_quantizer=Pact(alpha=2.0))
    cfg = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.5, quantizer_weight_decay=quantizer_wd)
    opt = build_optimizer(layer, cfg)
    for p in layer.parameters():
        p.grad = torch.zeros_like(p)  # a step on zero gradients moves a parameter by its weight decay only
    w0, alpha0 = layer.weight.detach().clone(), layer.input_quantizer.alpha.item()
    opt.step()
    torch.testing.assert_close(layer.weight.detach(), w0 * (1 - 0.1 * 0.5))
    assert layer.input_quantizer.alpha.item() == pytest.approx(alpha0 * (1 - 0.1 * quantizer_wd))
    assert len(opt.param_groups) == (1 if quantizer_wd == 0.5 else 2)


def test_resume_accepts_a_config_saved_before_a_field_was_added() -> None:
    from lowbit.train.engine import _same_config

    cfg = TrainConfig(epochs=2, lr=0.05)
    saved = cfg.model_dump(mode="json")
    assert _same_config(saved, cfg)
    del saved["quantizer_weight_decay"]  # written by a lowbit that had no such field: its default
    assert _same_config(saved, cfg)
    assert not _same_config({**saved, "lr": 0.1}, cfg)
    assert not _same_config({**saved, "no_such_field": 1}, cfg)
    assert not _same_config(None, cfg)
    assert not _same_config(saved, TrainConfig(epochs=2, lr=0.05, quantizer_weight_decay=1e-4))


# Stochastic weight averaging: a constant rate, the last 3 of 4 epoch ends averaged.
SWA = CFG.model_copy(update={"schedule": "constant", "swa_epochs": 3})


def test_swa_model_is_the_mean_of_the_last_epoch_end_weights() -> None:
    class Record:
        def __init__(self) -> None:
            self.weights: list[dict[str, torch.Tensor]] = []

        def after_epoch(self, model: torch.nn.Module, epoch: int) -> None:
            self.weights.append({k: v.detach().clone() for k, v in model.named_parameters()})

    rec = Record()  # the plain run follows the same trajectory: same seed, schedule and batches
    fit(_model(), load_dataset("digits"), SWA.model_copy(update={"swa_epochs": 0}), callbacks=[rec],
        show_progress=False)
    model = _model()
    res = fit(model, load_dataset("digits"), SWA, show_progress=False)
    for name, p in model.named_parameters():
        mean = torch.stack([w[name] for w in rec.weights[1:]]).mean(0)
        assert torch.allclose(p, mean, atol=1e-6), name
        assert not torch.allclose(p, rec.weights[-1][name], atol=1e-4), name  # not the last iterate
    assert res.final["test_acc"] > 90.0


def test_swa_re_estimates_batch_norm_on_the_training_data() -> None:
    torch.manual_seed(0)
    model = create_model("mlp_bnn", input_size=8, width=32, depth=2)
    data = load_dataset("digits")
    fit(model, data, SWA, show_progress=False)
    bn, first = model.features[1], model.features[0]
    with torch.no_grad():  # what the first batch norm sees, over the whole training set
        h = torch.cat([first(x.flatten(1)) for x, _ in data.loader("train", 256)])
    # the pass averages batch means: the last, smaller batch weighs a little more than its share
    assert torch.allclose(bn.running_mean, h.mean(0), atol=1e-2)
    assert h.mean(0).abs().max() > 0.5  # far from the initial statistics (0, 1) an average without the pass keeps
    assert torch.allclose(bn.running_var, h.var(0), rtol=0.05)  # per-batch variances, averaged
    assert model(next(iter(data.loader("test", 8)))[0]).isfinite().all()


def test_swa_resumes_to_the_uninterrupted_average(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = SWA.model_copy(update={"checkpoint_every": 5})
    reference = fit(_model(), load_dataset("digits"), cfg, run_dir=tmp_path / "ref", show_progress=False)
    from lowbit.train import engine

    real, calls = engine.evaluate, []

    def crash_in_epoch_3(*a, **k):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 3:  # the end of epoch 3, after its averaging and before its checkpoint
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(engine, "evaluate", crash_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        fit(_model(), load_dataset("digits"), cfg, run_dir=tmp_path / "run", show_progress=False)
    monkeypatch.setattr(engine, "evaluate", real)
    saved = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert saved.meta["step"] == 140  # the last checkpoint, inside epoch 3 (47 steps per epoch)
    assert saved.tensors["swa.n_averaged"].item() == 1  # the end of epoch 2 only: epoch 3's averaging is lost
    resumed = fit(_model(), load_dataset("digits"), cfg, run_dir=tmp_path / "run", resume=True, show_progress=False)
    a = load_checkpoint(tmp_path / "ref" / "model.safetensors")
    b = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert resumed.final == reference.final
    assert b.meta["swa"]["last_iterate"]["test_acc"] == reference.history[-1]["test_acc"]


def test_swa_errors_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="swa_epochs=5 averages more epochs than the run has"):
        CFG.model_copy(update={"swa_epochs": 5}).model_validate(CFG.model_dump() | {"swa_epochs": 5})
    with pytest.raises(ValueError, match="callbacks .* would be bypassed"):
        fit(_model(), load_dataset("digits"), SWA, callbacks=[object()], show_progress=False)
