import copy

import pytest
import torch
from torch import nn

from lowbit.data import Dataset
from lowbit.models import create_model
from lowbit.prune import (
    MaskCallback,
    PruneConfig,
    apply_masks_,
    attach_mask,
    mask_sparsity,
    masks_of,
    prune_,
    remove_masks,
    restore_masks,
)
from lowbit.train import TrainConfig, fit


def _model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("lenet300_100", in_features=64)


@pytest.mark.parametrize("optimizer,lr,wd", [("sgd", 0.05, 5e-4), ("adam", 1e-3, 1e-4), ("adamw", 1e-3, 1e-2)])
def test_masked_weights_stay_exactly_zero_through_fit(digits: Dataset, optimizer: str, lr: float, wd: float) -> None:
    model = _model()
    prune_(model, PruneConfig(rules={"*": 0.8}))
    masks = {k: v.clone() for k, v in masks_of(model).items()}
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(epochs=1, batch_size=32, optimizer=optimizer, lr=lr, momentum=0.9, weight_decay=wd,
                      channels_last=False, checkpoint_every=0)
    res = fit(model, digits, cfg, callbacks=[MaskCallback()], show_progress=False)
    assert res.final["test_acc"] > 20.0  # it learns (chance: 10%; one short epoch from a random 80%-pruned init)
    for key, mask in masks.items():
        w = model.get_parameter(key).detach()
        assert torch.equal(w[~mask], torch.zeros_like(w[~mask])), key
        assert not torch.equal(w[mask], before[key][mask]), f"{key}: kept weights were not trained"
        assert torch.equal(masks_of(model)[key], mask)


def test_gradient_hook_zeroes_masked_gradients_and_alone_keeps_zeros(digits: Dataset) -> None:
    model = _model()
    prune_(model, PruneConfig(rules={"fc1": 0.5}))
    mask = model.fc1.weight_mask
    x = torch.randn(8, 64)
    model(x).sum().backward()
    assert torch.equal(model.fc1.weight.grad[~mask], torch.zeros(int((~mask).sum())))
    assert model.fc1.weight.grad[mask].abs().sum() > 0
    # without MaskCallback, a fresh SGD(momentum, wd) still leaves the zeros untouched: zero grad, zero state
    cfg = TrainConfig(epochs=1, batch_size=32, lr=0.05, momentum=0.9, weight_decay=1e-3, channels_last=False,
                      checkpoint_every=0)
    fit(model, digits, cfg, show_progress=False)
    assert (model.fc1.weight.detach()[~mask] == 0).all()


def test_callback_undoes_momentum_collected_before_the_mask() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    for _ in range(3):  # momentum buffers become non-zero everywhere
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    prune_(model, PruneConfig(rules={"fc2": 0.7}))
    mask, cb = model.fc2.weight_mask, MaskCallback()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    assert (model.fc2.weight.grad[~mask] == 0).all()
    opt.step()
    assert (model.fc2.weight.detach()[~mask] != 0).any()  # the stale momentum moved them ...
    cb.after_step(model, 1)
    assert (model.fc2.weight.detach()[~mask] == 0).all()  # ... and the callback put them back


def test_masks_survive_deepcopy_to_and_state_dict() -> None:
    model = _model()
    prune_(model, PruneConfig(rules={"*": 0.6}))
    twin = copy.deepcopy(model).to(torch.float32)
    twin(torch.randn(2, 64)).sum().backward()  # the first forward re-installs the gradient hooks
    assert (twin.fc1.weight.grad[~twin.fc1.weight_mask] == 0).all()
    fresh = _model()
    restore_masks(fresh, model.state_dict())
    fresh.load_state_dict(model.state_dict())
    assert masks_of(fresh).keys() == masks_of(model).keys()
    assert all(torch.equal(fresh.get_parameter(k), model.get_parameter(k)) for k in masks_of(model))


def test_attach_apply_remove() -> None:
    layer = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="does not fit"):
        attach_mask(layer, "weight", torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="no parameter 'wieght'"):
        attach_mask(layer, "wieght", torch.ones(3, 4, dtype=torch.bool))
    mask = torch.rand(3, 4) > 0.5
    attach_mask(layer, "weight", mask)
    assert (layer.weight.detach()[~mask] == 0).all()
    assert mask_sparsity(layer) == {"weight": pytest.approx(1 - mask.float().mean().item())}
    with torch.no_grad():
        layer.weight.fill_(1.0)
    apply_masks_(layer)
    assert torch.equal(layer.weight.detach(), mask.float())
    remove_masks(layer)
    assert masks_of(layer) == {} and "weight_mask" not in layer.state_dict()
    layer(torch.randn(2, 4)).sum().backward()
    assert (layer.weight.grad != 0).all()  # no hook left behind
    assert torch.equal(layer.weight.detach(), mask.float())  # zeros stay
