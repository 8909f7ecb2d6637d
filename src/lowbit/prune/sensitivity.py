"""Per-layer pruning sensitivity: prune one layer alone at several ratios and measure the model.

Deep Compression chooses each layer's pruning threshold from such a scan: layers whose accuracy falls
early (usually the first conv and the classifier) get less pruning. :meth:`SensitivityTable.max_sparsity`
turns the scan into ``PruneConfig.rules``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.prune.criteria import get_criterion, keep_by_sparsity
from lowbit.prune.prune import match_layers

__all__ = ["SensitivityRow", "SensitivityTable", "plot_sensitivity", "sensitivity"]


@dataclass(frozen=True)
class SensitivityRow:
    layer: str
    sparsity: float
    score: float  # what eval_fn returned (e.g. test accuracy in %)


@dataclass
class SensitivityTable:
    """The scan: ``baseline`` (unpruned score) and one row per (layer, ratio)."""

    baseline: float
    rows: list[SensitivityRow]

    def layers(self) -> list[str]:
        return list(dict.fromkeys(r.layer for r in self.rows))

    def as_dict(self) -> dict[str, dict[float, float]]:
        """``{layer: {sparsity: score}}``."""
        out: dict[str, dict[float, float]] = {}
        for r in self.rows:
            out.setdefault(r.layer, {})[r.sparsity] = r.score
        return out

    def max_sparsity(self, tolerance: float) -> dict[str, float]:
        """Per layer, the highest scanned sparsity whose score is within ``tolerance`` of the baseline
        (0.0 if none is): usable as ``PruneConfig(rules=...)``. Assumes higher scores are better."""
        out = {}
        for layer, scores in self.as_dict().items():
            ok = [s for s, v in scores.items() if v >= self.baseline - tolerance]
            out[layer] = max(ok, default=0.0)
        return out


@torch.no_grad()
def sensitivity(
    model: nn.Module,
    eval_fn: Callable[[nn.Module], float],
    ratios: Sequence[float] = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95),
    layers: str | Sequence[str] = "*",
    criterion: str = "magnitude",
    layer_types: tuple[str, ...] = ("Linear", "Conv2d"),
) -> SensitivityTable:
    """Prune each matched layer alone at each ratio, evaluate, and restore its weights.

    Rule: for every layer ``l`` and ratio ``r``, the ``r`` fraction of ``W_l`` with the lowest criterion
    scores is set to 0 (:func:`~lowbit.prune.criteria.keep_by_sparsity`), all other layers untouched; the
    row records ``eval_fn(model)``. No fine-tuning happens, the model is unchanged afterwards, and no
    masks are attached.

    Args:
        model: the trained network.
        eval_fn: ``model -> score`` (higher is better, e.g. accuracy in %); called ``1 + layers * ratios`` times.
        ratios: sparsities to try, each in [0, 1].
        layers: module-name glob(s) choosing the layers.
        criterion: registered criterion name (``magnitude``, ``l1_filter``, ``group_norm``).
        layer_types: which layer types are eligible.

    Example:
        >>> from lowbit.models import create_model
        >>> m = create_model("lenet300_100", in_features=4)
        >>> t = sensitivity(m, lambda model: float(model(torch.ones(1, 4)).abs().sum()), ratios=(0.5, 0.9))
        >>> len(t.rows)
        6

    References:
        Han et al., "Learning both Weights and Connections for Efficient Neural Networks", arXiv:1506.02626
        (Figure 5: per-layer sensitivity).
        Li et al., "Pruning Filters for Efficient ConvNets", arXiv:1608.08710 (Section 4.4).
    """
    globs = [layers] if isinstance(layers, str) else list(layers)
    chosen = match_layers(model, dict.fromkeys(globs, 0.0), layer_types)
    crit = get_criterion(criterion)
    baseline = float(eval_fn(model))
    rows = []
    for name, (module, _) in chosen.items():
        original = module.weight.detach().clone()
        units = crit(original)
        for r in ratios:
            module.weight.mul_(units.expand(keep_by_sparsity(units, r)).to(original.dtype))
            rows.append(SensitivityRow(name, float(r), float(eval_fn(model))))
            module.weight.copy_(original)
    return SensitivityTable(baseline, rows)


def plot_sensitivity(table: SensitivityTable, path: str | Path, ylabel: str = "accuracy (%)") -> Path:
    """Line plot of score against sparsity, one line per layer, baseline dashed; written as PNG (Agg).

    Example:
        >>> t = SensitivityTable(98.0, [SensitivityRow("fc1", 0.5, 97.9), SensitivityRow("fc1", 0.9, 91.0)])
        >>> # plot_sensitivity(t, "sensitivity.png")
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend switch
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for layer, scores in table.as_dict().items():
            xs = sorted(scores)
            ax.plot([100 * x for x in xs], [scores[x] for x in xs], marker="o", label=layer)
    ax.axhline(table.baseline, color="grey", linestyle="--", linewidth=1, label="unpruned")
    ax.set_xlabel("sparsity of the layer (%)")
    ax.set_ylabel(ylabel)
    ax.set_title("pruning sensitivity (one layer at a time, no fine-tuning)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
