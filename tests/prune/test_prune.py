import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from lowbit.models import create_model
from lowbit.prune import (
    GroupNorm,
    L1Filter,
    Magnitude,
    PruneConfig,
    compute_masks,
    criteria,
    get_criterion,
    iterative_prune,
    keep_by_sparsity,
    masks_of,
    match_layers,
    prune_,
)


def _lenet() -> nn.Module:
    torch.manual_seed(0)
    return create_model("lenet300_100", in_features=64)


def _zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


def test_quality_threshold_is_q_times_std_of_the_layer() -> None:
    model = _lenet()
    q = 0.7
    expected = {}
    for name in ("fc1", "fc2", "fc3"):
        w = getattr(model, name).weight.detach().clone()
        mean = w.mean()
        std = math.sqrt(((w - mean) ** 2).sum().item() / (w.numel() - 1))  # sample std, computed by hand
        expected[name] = (w.abs() >= q * std, q * std)
    prune_(model, PruneConfig(threshold="quality", rules={"*": q}))
    for name, (keep, thr) in expected.items():
        w = getattr(model, name).weight.detach()
        assert torch.equal(getattr(model, name).weight_mask, keep), name
        assert (w[w != 0].abs() >= thr - 1e-7).all()
        assert 0.3 < 1 - keep.float().mean() < 0.7  # q = 0.7 of a uniform init prunes roughly 40%


@pytest.mark.parametrize("sparsity", [0.0, 0.33, 0.5, 0.9, 0.951, 1.0])
def test_per_layer_sparsity_hits_the_target_within_one_weight(sparsity: float) -> None:
    model = _lenet()
    prune_(model, PruneConfig(rules={"*": sparsity}))
    for name in ("fc1", "fc2", "fc3"):
        w = getattr(model, name).weight
        assert abs(_zeros(w) - sparsity * w.numel()) <= 1, name


def test_global_sparsity_hits_the_target_over_all_layers_within_one_weight() -> None:
    model = _lenet()
    weights = [m.weight.detach().clone() for m in (model.fc1, model.fc2, model.fc3)]
    sparsity = prune_(model, PruneConfig(threshold="global", rules={"*": 0.85}))
    total = sum(w.numel() for w in weights)
    zeros = sum(_zeros(m.weight) for m in (model.fc1, model.fc2, model.fc3))
    assert abs(zeros - 0.85 * total) <= 1
    # one threshold: every kept |w| is >= every pruned |w|, across layers
    kept = torch.cat([w[m].abs() for w, m in zip(weights, masks_of(model).values(), strict=True)])
    dropped = torch.cat([w[~m].abs() for w, m in zip(weights, masks_of(model).values(), strict=True)])
    assert kept.min() >= dropped.max()
    assert len(set(round(s, 3) for s in sparsity.values())) > 1  # layers end at different sparsities


def test_glob_rules_exact_name_wins_then_first_glob() -> None:
    model = _lenet()
    s = prune_(model, PruneConfig(rules={"*": 0.5, "fc1": 0.9, "fc[23]": 0.7}))
    assert s["fc1.weight"] == pytest.approx(0.9, abs=1e-4)
    assert s["fc2.weight"] == pytest.approx(0.5, abs=1e-4)  # "*" is written first
    assert s["fc3.weight"] == pytest.approx(0.5, abs=1e-4)
    only = prune_(_lenet(), PruneConfig(rules={"fc2": 0.5}))
    assert list(only) == ["fc2.weight"]


def test_rule_matching_no_layer_is_an_error_listing_the_layers() -> None:
    with pytest.raises(ValueError, match=r"\['features\.\*'\] match no Linear/Conv2d layer.*fc1, fc2, fc3"):
        prune_(_lenet(), PruneConfig(rules={"features.*": 0.5, "*": 0.9}))
    with pytest.raises(ValueError, match="conv1, conv2"):
        match_layers(create_model("lenet5"), {"fc9": 0.5}, ("Conv2d",))


def test_layer_types_restrict_the_match() -> None:
    s = prune_(create_model("lenet5"), PruneConfig(rules={"*": 0.5}, layer_types=("Conv2d",)))
    assert list(s) == ["conv1.weight", "conv2.weight"]


def test_config_is_typed_and_strict() -> None:
    with pytest.raises(ValidationError, match="sparsty"):
        PruneConfig(sparsty=0.5)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="valid names: group_norm, l1_filter, magnitude"):
        PruneConfig(criterion="magnitud")
    with pytest.raises(ValidationError, match="in \\[0, 1\\]"):
        PruneConfig(rules={"*": 1.5})
    with pytest.raises(ValidationError, match="needs criterion 'magnitude'"):
        PruneConfig(threshold="quality", criterion="l1_filter")
    with pytest.raises(ValidationError, match="several"):
        PruneConfig(threshold="global", rules={"fc1": 0.9, "*": 0.8})
    assert PruneConfig(rules={"*": 2.5}, threshold="quality").rules == {"*": 2.5}


def test_registry_and_criteria_shapes() -> None:
    assert criteria.list() == ["group_norm", "l1_filter", "magnitude"]
    w = torch.randn(6, 3, 2, 2)
    for crit, n in ((Magnitude(), w.numel()), (L1Filter(), 6), (GroupNorm(4), 6 * 3)):
        u = crit(w)
        assert u.scores.shape == (n,) and int(u.sizes.sum()) == w.numel()
        assert u.expand(torch.ones(n, dtype=torch.bool)).shape == w.shape
    assert get_criterion("group_norm", group_size=8) == GroupNorm(8)
    u = L1Filter()(w)
    assert torch.allclose(u.scores, w.abs().sum((1, 2, 3)))
    keep = keep_by_sparsity(u, 0.5)
    assert int(keep.sum()) == 3 and set(u.scores[keep].tolist()) == set(u.scores.sort().values[3:].tolist())


def test_structured_l1_filter_prunes_whole_rows() -> None:
    model = _lenet()
    prune_(model, PruneConfig(criterion="l1_filter", rules={"fc2": 0.3}))
    mask = model.fc2.weight_mask
    rows = mask.all(1) | ~mask.any(1)
    assert rows.all() and int((~mask.any(1)).sum()) == 30


def test_pruning_again_only_grows_sparsity_and_compute_masks_is_pure() -> None:
    model = _lenet()
    prune_(model, PruneConfig(rules={"*": 0.5}))
    first = model.fc1.weight_mask.clone()
    masks = compute_masks(model, PruneConfig(rules={"fc1": 0.8}))
    assert torch.equal(model.fc1.weight_mask, first)  # unchanged by compute_masks
    prune_(model, PruneConfig(rules={"fc1": 0.8}))
    assert torch.equal(model.fc1.weight_mask, masks["fc1.weight"] & first)
    assert not (model.fc1.weight_mask & ~first).any()


def test_iterative_prune_raises_sparsity_every_cycle() -> None:
    model = _lenet()

    def train_fn(m: nn.Module) -> float:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01)  # a stand-in for careless training that bypasses the gradient hooks
        return 1.0

    cycles = iterative_prune(model, PruneConfig(rules={"*": 0.9}), train_fn, cycles=4, ramp="linear")
    s = [c.sparsity["fc1.weight"] for c in cycles]
    assert s == sorted(s) and s[-1] == pytest.approx(0.9, abs=1e-4) and s[0] == pytest.approx(0.225, abs=1e-4)
    assert all(c.result == 1.0 for c in cycles)
    assert (model.fc1.weight.detach()[~model.fc1.weight_mask] == 0).all()  # re-applied after train_fn
