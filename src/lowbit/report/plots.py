"""Plots for reports (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_weight_distributions"]


def plot_weight_distributions(
    snapshots: dict[str, dict[str, np.ndarray]], path: str | Path, bins: int = 120, skip_zeros: bool = True
) -> Path:
    """One histogram per (layer, stage): rows are layers, columns the stages in insertion order.

    ``snapshots`` maps a stage label ("before pruning", "after pruning", "after sharing") to
    ``{layer name: flat weights}``. Exact zeros (pruned weights) are left out of the histograms when
    ``skip_zeros``, and their share is written in each panel instead, as in Deep Compression's Figure 5.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(snapshots)
    layers = list(dict.fromkeys(name for snap in snapshots.values() for name in snap))
    if not labels or not layers:
        raise ValueError("no weight snapshots to plot")
    fig, axes = plt.subplots(len(layers), len(labels), figsize=(3.6 * len(labels), 2.2 * len(layers)),
                             squeeze=False)
    for i, layer in enumerate(layers):
        for j, label in enumerate(labels):
            ax = axes[i][j]
            w = snapshots[label].get(layer)
            if w is None:
                ax.set_axis_off()
                continue
            w = np.asarray(w, dtype=np.float32).ravel()
            nz = w[w != 0] if skip_zeros else w
            distinct = np.unique(nz).size
            if distinct and distinct <= 256:  # shared weights: one bar per value
                values, counts = np.unique(nz, return_counts=True)
                ax.vlines(values, 0, counts, lw=1)
            elif nz.size:
                ax.hist(nz, bins=bins)
            ax.set_title(f"{layer}: {label}", fontsize=8)
            ax.tick_params(labelsize=6)
            zero_pct = 100.0 * (1 - nz.size / max(1, w.size))
            note = f"{zero_pct:.1f}% zero" + (f"\n{distinct} values" if distinct <= 256 else "")
            ax.text(0.98, 0.95, note, transform=ax.transAxes, ha="right", va="top", fontsize=6)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
