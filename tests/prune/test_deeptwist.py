import pytest
import torch

from lowbit.data import Dataset
from lowbit.models import create_model
from lowbit.prune import DeepTwist, PruneConfig, distort_, masks_of
from lowbit.train import TrainConfig, fit

CFG = TrainConfig(epochs=1, batch_size=32, lr=0.05, channels_last=False, checkpoint_every=0)  # 47 steps


class _Probe:
    """Records the sparsity of fc1 after every step (runs after DeepTwist in the callback list)."""

    def __init__(self) -> None:
        self.sparsity: list[float] = []

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        self.sparsity.append(float((model.fc1.weight == 0).float().mean()))


def test_deeptwist_distorts_every_sd_steps_and_at_the_end(digits: Dataset) -> None:
    torch.manual_seed(0)
    model = create_model("lenet300_100", in_features=64)
    twist = DeepTwist(PruneConfig(rules={"fc1": 0.9, "fc2": 0.8}), distortion_steps=20, total_steps=47)
    probe = _Probe()
    res = fit(model, digits, CFG, callbacks=[twist, probe], show_progress=False)
    assert twist.distortions == [20, 40, 47]
    assert probe.sparsity[19] == pytest.approx(0.9, abs=1e-4)  # right after a distortion
    assert probe.sparsity[20] < 0.5  # full-precision training in between: pruned weights come back
    assert float((model.fc1.weight == 0).float().mean()) == pytest.approx(0.9, abs=1e-4)  # final distortion
    assert float((model.fc2.weight == 0).float().mean()) == pytest.approx(0.8, abs=1e-4)
    assert float((model.fc3.weight == 0).float().mean()) == 0.0
    assert masks_of(model) == {}  # no masks: DeepTwist does not freeze the zeros
    assert res.final["test_acc"] > 50


def test_distort_with_quantization_keeps_pruned_weights_zero() -> None:
    torch.manual_seed(0)
    model = create_model("lenet300_100", in_features=64)

    def sign_scaled(w: torch.Tensor) -> torch.Tensor:  # binary weights {-a, +a}; maps 0 to 0 only by luck
        return torch.where(w >= 0, 1.0, -1.0) * w.abs().mean()

    s = distort_(model, PruneConfig(rules={"fc2": 0.5}), quantize=sign_scaled)
    w = model.fc2.weight.detach()
    assert s["fc2.weight"] == pytest.approx(0.5, abs=1e-4)
    assert len(torch.unique(w[w != 0].abs())) == 1  # one magnitude left
    twist = DeepTwist(PruneConfig(rules={"*": 0.7}), distortion_steps=1000)
    assert twist.finish(model)["fc1.weight"] == pytest.approx(0.7, abs=1e-4)
    with pytest.raises(ValueError, match="distortion_steps"):
        DeepTwist(distortion_steps=0)
