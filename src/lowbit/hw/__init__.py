"""Hardware cost models: parameter, MAC and BOP counts, storage at the chosen bit widths.

``profile(model)`` runs one forward pass with hooks and returns per-layer :class:`LayerStats`;
``lowbit.analysis.summary`` prints them as a table or JSON.
"""

from lowbit.hw.counts import LayerStats, ModelStats, profile

__all__ = ["LayerStats", "ModelStats", "profile"]
