from pathlib import Path

import pytest
import torch

from lowbit.data import Dataset
from lowbit.models import create_model
from lowbit.prune import GradualPruning, PruneConfig, agp_sparsity, plot_sensitivity, sensitivity
from lowbit.train import TrainConfig, evaluate, fit


@pytest.mark.parametrize(
    "step,expected",
    [
        (0, 0.0),  # t = t0: s_i
        (10, 0.9 + (0.0 - 0.9) * (1 - 10 / 100) ** 3),
        (19, 0.9 + (0.0 - 0.9) * (1 - 10 / 100) ** 3),  # held until the next update step
        (50, 0.9 - 0.9 * 0.5**3),
        (90, 0.9 - 0.9 * 0.1**3),
        (100, 0.9),
        (1000, 0.9),
    ],
)
def test_agp_formula(step: int, expected: float) -> None:
    assert agp_sparsity(step, 0.0, 0.9, 0, 10, 10) == pytest.approx(expected, abs=1e-12)


def test_agp_with_start_and_initial_sparsity() -> None:
    assert agp_sparsity(5, 0.2, 0.8, 20, 4, 5) == 0.2  # before t0
    assert agp_sparsity(30, 0.2, 0.8, 20, 4, 5) == pytest.approx(0.8 + (0.2 - 0.8) * (1 - 10 / 20) ** 3)
    with pytest.raises(ValueError, match="n_updates"):
        agp_sparsity(0, 0.0, 0.5, 0, 0, 10)


def test_gradual_pruning_callback_in_fit(digits: Dataset) -> None:
    torch.manual_seed(0)
    model = create_model("lenet300_100", in_features=64)
    agp = GradualPruning(PruneConfig(rules={"fc1": 0.9, "fc2": 0.8}), every=5, n_updates=6, start=5)
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05, channels_last=False, checkpoint_every=0)
    fit(model, digits, cfg, callbacks=[agp], show_progress=False)  # 47 steps; pruning at 5, 10, ..., 35
    assert [s for s, _ in agp.history] == [5, 10, 15, 20, 25, 30, 35]
    fc1 = [h["fc1.weight"] for _, h in agp.history]
    assert fc1 == sorted(fc1) and fc1[0] == 0.0
    for (step, h), expected in zip(agp.history, fc1, strict=True):
        assert expected == pytest.approx(agp_sparsity(step, 0.0, 0.9, 5, 6, 5), abs=1 / model.fc1.weight.numel())
        assert h["fc2.weight"] == pytest.approx(agp_sparsity(step, 0.0, 0.8, 5, 6, 5), abs=1e-4)
    assert float((model.fc1.weight == 0).float().mean()) == pytest.approx(0.9, abs=1e-4)
    assert "fc3.weight_mask" not in model.state_dict()


def test_sensitivity_one_row_per_layer_and_ratio_and_png(digits: Dataset, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("lenet300_100", in_features=64)
    fit(model, digits, TrainConfig(epochs=2, batch_size=32, lr=0.05, channels_last=False, checkpoint_every=0),
        show_progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    test = digits.loader("test", 300)
    table = sensitivity(model, lambda m: evaluate(m, test)["acc"], ratios=(0.5, 0.9, 0.99))
    assert [(r.layer, r.sparsity) for r in table.rows] == [
        (layer, r) for layer in ("fc1", "fc2", "fc3") for r in (0.5, 0.9, 0.99)]
    assert table.baseline > 80
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # model restored
    assert table.as_dict()["fc3"][0.99] < table.baseline - 20  # the classifier cannot lose 99%
    assert set(table.max_sparsity(tolerance=1.0)) == {"fc1", "fc2", "fc3"}
    png = plot_sensitivity(table, tmp_path / "sens.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
