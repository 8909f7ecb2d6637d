"""The pruning verb: ``prune_(model, PruneConfig(...))`` masks the least important weights of chosen layers.

Which layers: every module of ``layer_types`` whose name matches a key of ``rules`` (an exact name wins,
otherwise the first matching glob in the order written); the rule's value is the layer's target sparsity
(``threshold="sparsity"`` / ``"global"``) or its quality parameter (``threshold="quality"``). A rule that
matches none of the eligible layers is an error naming them, so a typo never silently prunes nothing.

Pruned weights get a mask (:mod:`lowbit.prune.masks`) and stay exactly zero while the model is fine-tuned;
pruning an already-masked layer again combines the masks (``old & new``), so sparsity only grows.

Example:
    >>> from lowbit.models import create_model
    >>> model = create_model("lenet300_100")
    >>> prune_(model, PruneConfig(rules={"fc1": 0.92, "*": 0.9}))["fc1.weight"]  # doctest: +ELLIPSIS
    0.92...

References:
    Han et al., "Learning both Weights and Connections for Efficient Neural Networks", arXiv:1506.02626.
    Han et al., "Deep Compression", arXiv:1510.00149.
"""

from __future__ import annotations

import fnmatch
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from lowbit.prune.criteria import Criterion, criteria, get_criterion, keep_by_quality, keep_by_sparsity, keep_global
from lowbit.prune.masks import MASK_SUFFIX, attach_mask

__all__ = ["LAYER_TYPES", "PruneConfig", "compute_masks", "match_layers", "prune_"]

LAYER_TYPES: dict[str, type[nn.Module]] = {"Linear": nn.Linear, "Conv2d": nn.Conv2d}


class PruneConfig(BaseModel):
    """How to prune: the criterion, the threshold rule, and per-layer amounts by module-name glob.

    ``extra='forbid'``: a misspelled key is an error naming it. The same fields are the YAML keys.

    Example:
        >>> cfg = PruneConfig(threshold="quality", rules={"fc3": 0.5, "*": 1.0})  # Deep Compression-style
        >>> cfg.criterion, cfg.layer_types
        ('magnitude', ('Linear', 'Conv2d'))
        >>> PruneConfig(criterion="group_norm", group_size=8, rules={"fc*": 0.9}).build_criterion()
        GroupNorm(group_size=8)

    References:
        Han et al., "Deep Compression", arXiv:1510.00149 (quality threshold, per-layer sensitivity).
        Zhu & Gupta, "To prune, or not to prune", arXiv:1710.01878 (per-layer target sparsity).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    version: Literal[1] = 1
    criterion: str = Field("magnitude", description="registered importance criterion (lowbit.prune.criteria)")
    group_size: int = Field(4, ge=1, description="weights per group for criterion 'group_norm' (the SIMD width)")
    threshold: Literal["sparsity", "quality", "global"] = Field(
        "sparsity", description="sparsity: per-layer target fraction; quality: prune |w| < q*std(W) per layer; "
                                "global: one threshold across the matched layers")
    rules: dict[str, float] = Field(
        default_factory=lambda: {"*": 0.9},
        description="module-name glob -> sparsity in [0, 1] (or quality q >= 0); exact names win, then the "
                    "first matching glob")
    layer_types: tuple[Literal["Linear", "Conv2d"], ...] = ("Linear", "Conv2d")

    @field_validator("criterion")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in criteria:
            raise ValueError(f"unknown pruning criterion {v!r}; valid names: {', '.join(criteria)}")
        return v

    @model_validator(mode="after")
    def _check(self) -> PruneConfig:
        if not self.rules:
            raise ValueError("rules is empty: give at least one {module-name glob: amount}, e.g. {'*': 0.9}")
        if not self.layer_types:
            raise ValueError("layer_types is empty")
        for key, value in self.rules.items():
            if self.threshold == "quality" and value < 0:
                raise ValueError(f"rule {key!r}: quality must be >= 0, got {value}")
            if self.threshold != "quality" and not 0.0 <= value <= 1.0:
                raise ValueError(f"rule {key!r}: sparsity must be in [0, 1], got {value}")
        if self.threshold == "quality" and self.criterion != "magnitude":
            raise ValueError("threshold 'quality' (q * std of the layer's weights) needs criterion 'magnitude'")
        if self.threshold == "global" and len(set(self.rules.values())) > 1:
            raise ValueError(f"threshold 'global' prunes the matched layers to one sparsity together; the rules "
                             f"give several: {self.rules}")
        return self

    def build_criterion(self) -> Criterion:
        """The criterion object this config names."""
        return get_criterion(self.criterion, group_size=self.group_size) if self.criterion == "group_norm" \
            else get_criterion(self.criterion)


def match_layers(
    model: nn.Module, rules: dict[str, float], layer_types: tuple[str, ...] = ("Linear", "Conv2d")
) -> dict[str, tuple[nn.Module, float]]:
    """Resolve module-name rules: ``{name: (module, value)}`` for every eligible layer a rule matches.

    Rule: among modules of ``layer_types``, an exact name key wins; otherwise the first glob (fnmatch) that
    matches, in the order written. A key matching no eligible layer raises ``ValueError`` listing the layers.

    Example:
        >>> from lowbit.models import create_model
        >>> sorted(match_layers(create_model("lenet300_100"), {"fc[12]": 0.9}))
        ['fc1', 'fc2']
    """
    unknown = sorted(set(layer_types) - set(LAYER_TYPES))
    if unknown:
        raise ValueError(f"unknown layer types {unknown}; supported: {', '.join(LAYER_TYPES)}")
    types = tuple(LAYER_TYPES[t] for t in layer_types)
    eligible = {n: m for n, m in model.named_modules() if isinstance(m, types)}  # "" = the model itself
    unused = [k for k in rules if not any(n == k or fnmatch.fnmatchcase(n, k) for n in eligible)]
    if unused:
        names = ", ".join(n or repr(n) for n in eligible) or "none"
        raise ValueError(f"pruning rule(s) {unused} match no {'/'.join(layer_types)} layer of "
                         f"{type(model).__name__}; its layers are: {names}")
    out = {}
    for name, module in eligible.items():
        if name in rules:
            out[name] = (module, rules[name])
            continue
        for key, value in rules.items():
            if fnmatch.fnmatchcase(name, key):
                out[name] = (module, value)
                break
    return out


@torch.no_grad()
def compute_masks(model: nn.Module, config: PruneConfig | None = None) -> dict[str, torch.Tensor]:
    """The weight masks ``config`` asks for, without changing the model: ``{"fc1.weight": bool mask}``.

    Rule: as :func:`prune_` (which attaches these masks, combined with existing ones).

    Example:
        >>> from lowbit.models import create_model
        >>> masks = compute_masks(create_model("lenet300_100"), PruneConfig(rules={"fc3": 0.5}))
        >>> {k: int((~v).sum()) for k, v in masks.items()}
        {'fc3.weight': 500}
    """
    config = config or PruneConfig()
    layers = match_layers(model, config.rules, config.layer_types)
    criterion = config.build_criterion()
    units = {name: criterion(module.weight) for name, (module, _) in layers.items()}
    if config.threshold == "global":
        value = next(iter(config.rules.values()))
        keeps = dict(zip(units, keep_global(list(units.values()), value), strict=True))
    elif config.threshold == "quality":
        keeps = {n: keep_by_quality(layers[n][0].weight, u, layers[n][1]) for n, u in units.items()}
    else:
        keeps = {n: keep_by_sparsity(u, layers[n][1]) for n, u in units.items()}
    return {f"{n}.weight" if n else "weight": units[n].expand(keeps[n]).to(layers[n][0].weight.device) for n in layers}


@torch.no_grad()
def prune_(model: nn.Module, config: PruneConfig | None = None) -> dict[str, float]:
    """Prune ``model`` in place, one shot, per ``config``; returns the sparsity of each pruned weight.

    Formula (per layer ``l`` with weight ``W_l`` and criterion units ``u`` with scores ``s_u``):

        sparsity:  drop the units with the lowest s_u until a fraction s_l of W_l is pruned
        quality:   drop w with |w| < q_l * std(W_l)                  (Deep Compression)
        global:    drop the lowest-scoring units of all matched layers together until s of their weights go

    The kept weights are unchanged; pruned weights are set to 0 and masked (they stay 0 under training).
    An existing mask is combined with the new one (``old & new``).

    Args:
        model: the network; modified in place.
        config: a :class:`PruneConfig` (default: magnitude, 90% of every Linear and Conv2d weight).

    Returns:
        ``{"fc1.weight": sparsity, ...}`` after pruning (including sparsity from earlier masks).

    Example:
        >>> from lowbit.models import create_model
        >>> m = create_model("lenet300_100")
        >>> s = prune_(m, PruneConfig(threshold="global", rules={"*": 0.9}))
        >>> round(sum(s[k] * getattr(m, k[:3]).weight.numel() for k in s) / 266200, 3)
        0.9

    References:
        Han et al., "Learning both Weights and Connections for Efficient Neural Networks", arXiv:1506.02626.
        Han et al., "Deep Compression", arXiv:1510.00149.
    """
    modules = dict(model.named_modules())
    out = {}
    for key, mask in compute_masks(model, config).items():
        module = modules[key.rpartition(".")[0]]
        old = getattr(module, "weight" + MASK_SUFFIX, None)
        mask = mask if old is None else mask & old
        attach_mask(module, "weight", mask)
        out[key] = 1.0 - mask.float().mean().item()
    return out
