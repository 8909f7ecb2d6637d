import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.models import create_model
from lowbit.prune import (
    Coupling,
    MaskCallback,
    UnsupportedStructureError,
    masks_of,
    node_couplings,
    prune_nodes_,
    shrink_nodes_,
    simd_prune_,
)
from lowbit.prune.simd import group_sparse_linear, pack_groups


def _seeded(name: str, **kw: object) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, **kw).eval()


@pytest.mark.parametrize("width", [4, 8])
def test_simd_groups_are_aligned_and_all_or_nothing(width: int) -> None:
    model = _seeded("lenet300_100", in_features=64)
    s = simd_prune_(model, {"*": 0.75}, simd_width=width)
    for name in ("fc1", "fc2"):  # in_features 64 and 300: multiples of 4; 300 is not one of 8
        mask = getattr(model, name).weight_mask
        cols = mask.shape[1]
        full = -(-cols // width) * width
        groups = F.pad(mask, (0, full - cols), value=False).view(mask.shape[0], -1, width)  # (out, groups, k)
        last = cols - (full // width - 1) * width  # the true size of the last group
        body, tail = groups[:, :-1], groups[:, -1, :last]
        assert (body.all(-1) | ~body.any(-1)).all(), f"{name}: a group is partly kept"
        assert (tail.all(-1) | ~tail.any(-1)).all()
        assert abs(s[f"{name}.weight"] - 0.75) <= width / mask.numel()
    # groups are scored by L2 norm: every kept group outweighs every dropped group (fc2: 300 inputs)
    fresh = F.pad(_seeded("lenet300_100", in_features=64).fc2.weight.detach(), (0, -300 % width))
    norms = fresh.view(100, -1, width).norm(dim=-1)  # (out, groups)
    kept = F.pad(model.fc2.weight_mask, (0, -300 % width)).view(100, -1, width)[..., 0]
    assert norms[kept].min() >= norms[~kept].max()


@pytest.mark.parametrize("width,batches", [(8, (1, 3, 16)), (4, (2,)), (3, (2,))])  # 3: the generic kernel
def test_simd_kernel_matches_torch_linear(width: int, batches: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(36, 20))  # 36 = 4 groups of 8 + 4: exercises the padded last group
    lin = net[0]
    simd_prune_(net, {"*": 0.7}, simd_width=width)
    packed = pack_groups(lin.weight, width, lin.bias)
    assert packed.values.shape[1] == width and (packed.col % width == 0).all()
    w = F.pad(lin.weight.detach(), (0, -36 % width)).view(20, -1, width)
    assert packed.values.shape[0] == int((w != 0).any(-1).sum())  # one packed group per kept group
    for batch in batches:  # batch >= 8 runs the batch-inner kernel
        x = torch.randn(batch, 36)
        torch.testing.assert_close(group_sparse_linear(x, packed), net(x), rtol=1e-5, atol=1e-5)


def _masked_then_shrunk(
    model: nn.Module, rules: dict[str, float], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, tuple[int, int]], nn.Module]:
    """(dense output, node-masked output, shrunk output, what shrink changed, the shrunk model)."""
    masked = copy.deepcopy(model)
    prune_nodes_(masked, rules, shrink=False)
    shrunk = copy.deepcopy(masked)
    changed = shrink_nodes_(shrunk)
    with torch.no_grad():
        return model(x), masked(x), shrunk(x), changed, shrunk


def test_node_pruning_linear_chain_shrinks_and_preserves_outputs() -> None:
    model = _seeded("lenet300_100", in_features=64)
    x = torch.randn(5, 64)
    dense, masked, shrunk, changed, small = _masked_then_shrunk(model, {"fc1": 0.6, "fc2": 0.25}, x)
    assert changed == {"fc1": (300, 120), "fc2": (100, 75)}
    assert small.fc1.weight.shape == (120, 64) and small.fc1.bias.shape == (120,)
    assert small.fc2.weight.shape == (75, 120) and small.fc3.weight.shape == (10, 75)
    assert (small.fc1.out_features, small.fc2.in_features, small.fc3.in_features) == (120, 120, 75)
    torch.testing.assert_close(shrunk, masked, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(dense, masked)
    # the kept nodes are the ones with the largest L1 norm
    l1 = model.fc1.weight.detach().abs().sum(1)
    assert torch.equal(small.fc1.bias.detach(), model.fc1.bias.detach()[l1.argsort(descending=True)[:120].sort()[0]])


def test_node_pruning_lenet5_conv_conv_and_conv_flatten_linear() -> None:
    model = _seeded("lenet5")
    x = torch.randn(2, 1, 28, 28)
    _, masked, shrunk, changed, small = _masked_then_shrunk(model, {"conv1": 0.5, "conv2": 0.4, "fc1": 0.5}, x)
    assert changed == {"conv1": (20, 10), "conv2": (50, 30), "fc1": (500, 250)}
    assert small.conv1.weight.shape == (10, 1, 5, 5) and small.conv2.weight.shape == (30, 10, 5, 5)
    assert small.fc1.weight.shape == (250, 30 * 16) and small.fc2.weight.shape == (10, 250)
    torch.testing.assert_close(shrunk, masked, rtol=1e-5, atol=1e-5)
    assert node_couplings(model, ["conv2"]) == {"conv2": Coupling("conv2", (), "fc1", 16)}


class _ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.bn2 = nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.c1(x)))
        x = self.pool(torch.relu(self.bn2(self.c2(x))))
        return self.fc(torch.flatten(x, 1))


def test_node_pruning_through_batch_norm_and_training_keeps_the_nodes_dead() -> None:
    torch.manual_seed(0)
    model = _ConvBN()
    with torch.no_grad():  # non-trivial running statistics
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    model.eval()
    prune_nodes_(model, {"c1": 0.5, "c2": 0.5}, shrink=False)
    assert "bn1.weight" in masks_of(model) and "bn2.bias" in masks_of(model)
    # a few training steps on the masked model: the removed nodes stay removed (all masked params stay 0)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for step in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3, 8, 8)).pow(2).mean().backward()
        opt.step()
        MaskCallback().after_step(model, step)
    model.eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        masked = model(x)
        changed = shrink_nodes_(model)
        shrunk = model(x)
    assert changed == {"c1": (8, 4), "c2": (6, 3)}
    assert model.bn1.running_mean.shape == (4,) and model.bn2.num_features == 3 and model.fc.in_features == 12
    torch.testing.assert_close(shrunk, masked, rtol=1e-5, atol=1e-6)


def test_shrink_keeps_unstructured_masks_sliced() -> None:
    model = _seeded("lenet300_100", in_features=64)
    simd_prune_(model, {"fc2": 0.5}, simd_width=4)  # Scalpel on CPUs: SIMD groups + node pruning together
    before = model.fc2.weight_mask.clone()
    prune_nodes_(model, {"fc1": 0.5})
    assert model.fc2.weight_mask.shape == (100, 150)
    kept_cols = model.fc1.bias.shape[0]
    assert kept_cols == 150 and model.fc2.weight_mask.sum() <= before.sum()
    assert (model.fc2.weight.detach()[~model.fc2.weight_mask] == 0).all()
    model(torch.randn(2, 64)).sum().backward()  # the new parameters got their gradient hooks
    assert (model.fc2.weight.grad[~model.fc2.weight_mask] == 0).all()


def test_node_pruning_inside_residual_blocks() -> None:
    """conv1 -> bn1 -> relu -> conv2 inside a basic block is a chain; the block's output (into the add) is not."""
    model = _seeded("resnet20")
    x = torch.randn(2, 3, 32, 32)
    _, masked, shrunk, changed, small = _masked_then_shrunk(model, {"layer*.conv1": 0.5}, x)
    assert len(changed) == 9 and changed["layer1.0.conv1"] == (16, 8) and changed["layer3.2.conv1"] == (64, 32)
    assert small.get_submodule("layer2.1.conv2").weight.shape == (32, 16, 3, 3)
    assert small.get_submodule("layer2.1.bn1").running_var.shape == (16,)
    torch.testing.assert_close(shrunk, masked, rtol=1e-4, atol=1e-5)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.head(h + self.b(h))


class _Sigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.sigmoid(self.a(x)))


def test_unsupported_structures_raise_clear_errors() -> None:
    with pytest.raises(UnsupportedStructureError, match=r"'a'.*feeds 2 nodes.*residual adds are not supported"):
        prune_nodes_(_Residual(), {"a": 0.5})
    with pytest.raises(UnsupportedStructureError, match=r"'b'.*add.*residual add"):
        prune_nodes_(_Residual(), {"b": 0.5})
    with pytest.raises(UnsupportedStructureError, match="output layer"):
        prune_nodes_(_seeded("lenet300_100"), {"fc3": 0.5})
    with pytest.raises(UnsupportedStructureError, match="sigmoid"):
        prune_nodes_(_Sigmoid(), {"a": 0.5})
    with pytest.raises(UnsupportedStructureError, match="residual"):
        prune_nodes_(create_model("resnet20"), {"layer1.0.conv1": 0.5, "layer1.0.conv2": 0.5})
    with pytest.raises(ValueError, match="every node"):
        prune_nodes_(_seeded("lenet300_100"), {"fc1": 1.0})
    model = _seeded("lenet300_100")
    with pytest.raises(UnsupportedStructureError):
        prune_nodes_(model, {"*": 0.5})  # fc3 is the output layer: nothing is changed
    assert model.fc1.weight.shape == (300, 784) and masks_of(model) == {}
