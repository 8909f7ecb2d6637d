"""Weight sharing (Deep Compression, section 3): cluster_, centroid fine-tuning, shared_weights, strip_sharing_."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from lowbit.cluster import ClusterConfig, SharedWeight, cluster_, is_shared, shared_weights, strip_sharing_
from lowbit.data import Dataset, load_dataset
from lowbit.models import create_model
from lowbit.train import TrainConfig, evaluate, fit, load_model, save_model

BASE = TrainConfig(epochs=3, batch_size=32, lr=0.05, checkpoint_every=0, seed=1, channels_last=False)
# Centroid fine-tuning: each centroid gets the *sum* of its cluster's gradients (hundreds of weights
# in fc1), so the learning rate is far below the float training's.
FINETUNE = TrainConfig(epochs=1, batch_size=32, lr=1e-3, momentum=0.9, weight_decay=5e-4, schedule="constant",
                       checkpoint_every=0, seed=2, channels_last=False)
LAYERS = ("fc1", "fc2", "fc3")
State = dict[str, torch.Tensor]



@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits: Dataset) -> dict[str, torch.Tensor]:
    """LeNet-300-100 on the 8x8 digits (about 98% test accuracy), trained once for this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # runs before the per-test one-thread fixture of the conftest
    torch.manual_seed(0)
    model = create_model("lenet300_100", in_features=64)
    fit(model, digits, BASE, show_progress=False)
    torch.set_num_threads(before)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _model(state: dict[str, torch.Tensor]) -> nn.Module:
    model = create_model("lenet300_100", in_features=64)
    model.load_state_dict(state)
    return model


def _prune(model: nn.Module, frac: float) -> dict[str, torch.Tensor]:
    """Zero the smallest ``frac`` of each layer's weights; returns the kept masks."""
    kept = {}
    with torch.no_grad():
        for name in LAYERS:
            w = getattr(model, name).weight
            thr = w.abs().flatten().kthvalue(int(frac * w.numel())).values
            kept[name] = w.abs() > thr
            w.mul_(kept[name])
    return kept


def _acc(model: nn.Module, data: Dataset) -> float:
    return evaluate(model, data.loader("test", 512))["acc"]


def test_default_config_is_the_papers_and_weights_become_shared(trained: State) -> None:
    model = _model(trained)
    assert cluster_(model) == {"fc1": 5, "fc2": 5, "fc3": 5}  # Linear: 5 bits (32 shared values)
    for name in LAYERS:
        layer = getattr(model, name)
        assert is_shared(layer)
        w = layer.weight
        assert w.shape == trained[f"{name}.weight"].shape and w.unique().numel() <= 32
        codes = layer.parametrizations.weight[0].codes
        assert int(codes.min()) >= 0 and int(codes.max()) < 32
    # the trainable tensors are the centroids and the biases; the dense weight is no parameter any more
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert params == {"fc1.bias": (300,), "fc1.parametrizations.weight.original": (32,),
                      "fc2.bias": (100,), "fc2.parametrizations.weight.original": (32,),
                      "fc3.bias": (10,), "fc3.parametrizations.weight.original": (32,)}
    assert ClusterConfig().types == {"Conv2d": 8, "Linear": 5} and ClusterConfig().init == "linear"


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_at_most_2_to_the_bits_values_per_layer(trained: State, bits: int) -> None:
    model = _model(trained)
    cluster_(model, ClusterConfig(types={"Linear": bits}))
    for name in LAYERS:
        assert getattr(model, name).weight.unique().numel() <= 2**bits


def test_pruned_zeros_stay_zero_through_clustering_and_finetuning(trained: State, digits: Dataset) -> None:
    model = _model(trained)
    kept = _prune(model, 0.7)
    # fc2 carries a pruning mask buffer, which wins over "weight != 0": one kept weight is exactly 0
    fc2_kept = kept["fc2"].clone()
    fc2_kept[0, 0] = True
    with torch.no_grad():
        model.fc2.weight[0, 0] = 0.0
    model.fc2.register_buffer("weight_mask", fc2_kept)
    kept["fc2"] = fc2_kept
    cluster_(model, ClusterConfig(types={"Linear": 4}))
    before = {n: getattr(model, n).parametrizations.weight.original.detach().clone() for n in LAYERS}
    table = shared_weights(model)
    assert table["fc2"].positions.numel() == int(fc2_kept.sum())  # the masked-in zero got a code

    def check() -> None:
        for name in LAYERS:
            w = getattr(model, name).weight.detach()
            assert torch.all(w[~kept[name]] == 0), name
            assert w[kept[name]].unique().numel() <= 16, name

    check()
    fit(model, digits, FINETUNE.model_copy(update={"epochs": 0.5}), show_progress=False)
    check()
    for name in LAYERS:  # fine-tuning moved the centroids
        assert not torch.equal(getattr(model, name).parametrizations.weight.original, before[name])


def test_centroid_gradient_is_the_per_cluster_sum_of_the_weight_gradient(trained: State, digits: Dataset) -> None:
    model = _model(trained)
    kept = _prune(model, 0.5)
    cluster_(model, ClusterConfig(types={"Linear": 4}))
    x, y = next(iter(digits.loader("train", 64, shuffle=True, seed=0)))
    F.cross_entropy(model(x), y).backward()
    got = {n: getattr(model, n).parametrizations.weight.original.grad.clone() for n in LAYERS}
    table = shared_weights(model)

    strip_sharing_(model)  # the same weights as plain parameters: the dense gradient dL/dW
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for name in LAYERS:
        dense = getattr(model, name).weight.grad
        entry = table[name]
        # dL/dC_k = sum_ij dL/dW_ij 1(I_ij = k), over the kept weights only
        expected = torch.zeros(16).index_add_(0, entry.codes, dense.flatten()[entry.positions])
        assert torch.allclose(got[name], expected, rtol=1e-5, atol=1e-7), name
        assert not torch.allclose(dense[~kept[name]], torch.zeros(())), "pruned weights do have a dense gradient"


@pytest.mark.parametrize(("bits", "margin"), [(2, 0.0), (4, 1.0)])
def test_finetuning_improves_or_keeps_accuracy(trained: State, digits: Dataset, bits: int, margin: float) -> None:
    float_acc = _acc(_model(trained), digits)
    model = _model(trained)
    cluster_(model, ClusterConfig(types={"Linear": bits}))
    clustered = _acc(model, digits)
    res = fit(model, digits, FINETUNE, show_progress=False)
    tuned = res.final["test_acc"]
    assert tuned >= clustered - margin  # digits: 300 test images, 1 image = 0.33%
    assert tuned >= float_acc - 3.0
    for name in LAYERS:
        assert getattr(model, name).weight.unique().numel() <= 2**bits


def test_shared_weights_describe_the_layer_exactly(trained: State) -> None:
    model = _model(trained)
    kept = _prune(model, 0.8)
    cluster_(model, ClusterConfig(layers={"fc3": 6}, types={"Linear": 3}))
    table = shared_weights(model)
    assert list(table) == list(LAYERS)
    for name, entry in table.items():
        w = getattr(model, name).weight.detach()
        assert entry.shape == tuple(w.shape)
        assert entry.centroids.dtype == torch.float32 and entry.centroids.numel() == (64 if name == "fc3" else 8)
        assert entry.positions.dtype == torch.int64 and entry.codes.dtype == torch.int64
        assert torch.all(entry.positions.diff() > 0)
        assert torch.equal(entry.positions, kept[name].flatten().nonzero().squeeze(1))
        dense = torch.zeros(w.numel())
        dense[entry.positions] = entry.centroids[entry.codes]
        assert torch.equal(dense.view_as(w), w)


def test_strip_round_trip_loads_into_a_fresh_model(trained: State, digits: Dataset, tmp_path: Path) -> None:
    model = _model(trained)
    _prune(model, 0.6)
    keys = list(model.state_dict())
    cluster_(model, ClusterConfig(types={"Linear": 4}))
    fit(model, digits, FINETUNE.model_copy(update={"epochs": 0.25}), show_progress=False)
    table = shared_weights(model)
    x = torch.randn(5, 64)
    with torch.no_grad():
        out_shared = model(x)
    assert strip_sharing_(model) == list(LAYERS)
    assert not any(is_shared(m) for m in model.modules())
    assert list(model.state_dict()) == keys  # same keys, same order
    assert {n for n, _ in model.named_parameters()} == {f"{n}.{p}" for n in LAYERS for p in ("weight", "bias")}
    for name, entry in table.items():
        w = getattr(model, name).weight.detach().flatten()
        assert isinstance(getattr(model, name).weight, nn.Parameter)
        assert torch.equal(w[entry.positions], entry.centroids[entry.codes])  # bit-exact
        rest = torch.ones_like(w, dtype=torch.bool)
        rest[entry.positions] = False
        assert torch.all(w[rest] == 0)
    with torch.no_grad():
        assert torch.equal(model(x), out_shared)
    fresh = create_model("lenet300_100", in_features=64)
    fresh.load_state_dict(model.state_dict())  # strict
    save_model(tmp_path / "m.safetensors", model)
    loaded, _ = load_model(tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(x), out_shared)


def test_conv_layers_default_to_8_bits_and_survive_channels_last() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10))
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    assert cluster_(model) == {"0": 8, "3": 5}
    assert model[0].parametrizations.weight.original.shape == (256,)
    assert model[0].weight.unique().numel() <= 256 and model[3].weight.unique().numel() <= 32
    with torch.no_grad():
        ref = model(x)
        model.to(memory_format=torch.channels_last)
        assert torch.allclose(model(x.contiguous(memory_format=torch.channels_last)), ref, atol=1e-6)
    strip_sharing_(model)
    assert list(model.state_dict()) == keys


def test_rules_by_name_type_exclude_and_filter(trained: State) -> None:
    plan = cluster_(_model(trained), ClusterConfig(layers={"fc3": 6}, types={"Linear": 4}))
    assert plan == {"fc1": 4, "fc2": 4, "fc3": 6}
    plan = cluster_(_model(trained), ClusterConfig(layers={"fc[12]": 3, "*": 7}))
    assert plan == {"fc1": 3, "fc2": 3, "fc3": 7}
    assert cluster_(_model(trained), ClusterConfig(types={}, layers={"fc2": 3})) == {"fc2": 3}
    model = _model(trained)
    assert cluster_(model, ClusterConfig(exclude=("fc1",))) == {"fc2": 5, "fc3": 5}
    assert not is_shared(model.fc1) and isinstance(model.fc1.weight, nn.Parameter)
    plan = cluster_(_model(trained), filter_fn=lambda module, name: module.out_features > 10)
    assert plan == {"fc1": 5, "fc2": 5}


@pytest.mark.parametrize("init", ["linear", "density", "random"])
def test_every_init_clusters_and_keeps_accuracy_at_5_bits(trained: State, digits: Dataset, init: str) -> None:
    float_acc = _acc(_model(trained), digits)
    model = _model(trained)
    cluster_(model, ClusterConfig(init=init))  # type: ignore[arg-type]
    assert _acc(model, digits) >= float_acc - 1.5


def test_right_inverse_projects_onto_the_codes() -> None:
    codes = torch.tensor([[0, 1, 1], [1, 0, 3]])
    mask = torch.tensor([[True, True, True], [True, False, True]])
    p = SharedWeight(codes, mask, bits=2)
    w = torch.tensor([[1.0, 2.0, 4.0], [6.0, 100.0, -1.0]])
    assert torch.equal(p.right_inverse(w), torch.tensor([1.0, 4.0, 0.0, -1.0]))  # means; empty cluster 2 -> 0
    assert torch.equal(p(p.right_inverse(w)), torch.tensor([[1.0, 4.0, 4.0], [4.0, 0.0, -1.0]]))


def test_bad_configs_fail_clearly(trained: State) -> None:
    for bad in ({"bits": 4}, {"types": {"Linear": 0}}, {"types": {"Linear": 17}}, {"layers": {"fc1": 17}},
                {"types": {"Dense": 4}}, {"init": "kmeans++"}, {"max_iter": 0}):
        with pytest.raises(ValidationError):
            ClusterConfig.model_validate(bad)
    with pytest.raises(ValueError, match=r"rule 'fc9' matches no layer.*Layers: fc1 \(Linear\), fc2 \(Linear\)"):
        cluster_(_model(trained), ClusterConfig(layers={"fc9": 4}))
    with pytest.raises(ValueError, match="rule 'conv\\*' matches no layer"):
        cluster_(_model(trained), ClusterConfig(exclude=("conv*",)))
    with pytest.raises(ValueError, match="selects no layer"):
        cluster_(_model(trained), ClusterConfig(types={"Conv2d": 8}))
    model = _model(trained)
    cluster_(model)
    with pytest.raises(ValueError, match="fc1 already shares weights"):
        cluster_(model)
    untouched = _model(trained)
    with pytest.raises(ValueError):
        cluster_(untouched, ClusterConfig(layers={"fc1": 4, "nope": 4}))
    assert not any(is_shared(m) for m in untouched.modules())  # validated before any layer changed


def test_hooks_and_gradients_of_the_old_weight_do_not_reach_the_centroids() -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    old = model[0].weight
    old.register_hook(lambda g: g * torch.ones(4, 8))  # shaped like the weight: fails on a (k,) gradient
    cluster_(model, ClusterConfig(types={"Linear": 2}))
    assert model[0].parametrizations.weight.original is not old
    model(torch.randn(3, 8)).sum().backward()  # centroid gradients, shape (4,)
    strip_sharing_(model)
    assert model[0].weight.grad is None  # the stale centroid gradient is dropped
    model(torch.randn(3, 8)).sum().backward()  # dense gradients again
    assert model[0].weight.grad.shape == (4, 8)


def test_works_with_lowbit_prune_masks(trained: State, digits: Dataset) -> None:
    masks = pytest.importorskip("lowbit.prune.masks")
    model = _model(trained)
    keys_before = list(model.state_dict())
    kept = {}
    for name in LAYERS:
        w = getattr(model, name).weight
        kept[name] = w.abs() > w.abs().flatten().kthvalue(int(0.75 * w.numel())).values
        masks.attach_mask(getattr(model, name), "weight", kept[name])
    keys = list(model.state_dict())
    cluster_(model, ClusterConfig(types={"Linear": 3}))
    fit(model, digits, FINETUNE.model_copy(update={"epochs": 0.25}), callbacks=[masks.MaskCallback()],
        show_progress=False)
    for name in LAYERS:
        w = getattr(model, name).weight.detach()
        assert torch.all(w[~kept[name]] == 0) and w.unique().numel() <= 8 + 1
    strip_sharing_(model)
    assert list(model.state_dict()) == keys and set(keys) - set(keys_before) == {f"{n}.weight_mask" for n in LAYERS}
    fit(model, digits, FINETUNE.model_copy(update={"epochs": 0.1}), callbacks=[masks.MaskCallback()],
        show_progress=False)  # plain masked training again after stripping
    for name in LAYERS:
        assert torch.all(getattr(model, name).weight.detach()[~kept[name]] == 0)


def test_shared_weights_feed_the_codec(trained: State) -> None:
    container = pytest.importorskip("lowbit.codec.container")
    model = _model(trained)
    _prune(model, 0.9)
    cluster_(model, ClusterConfig(types={"Linear": 5}))
    for name, e in shared_weights(model).items():
        ct = container.CompressedTensor(e.shape, e.positions, e.codes, e.centroids, 5, 5)
        assert torch.equal(ct.to_dense(), getattr(model, name).weight.detach())
