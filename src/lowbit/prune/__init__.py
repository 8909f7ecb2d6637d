"""Pruning: Deep Compression's magnitude pruning, Scalpel's SIMD-aware and node pruning, AGP and DeepTwist.

A pruner is (graph of coupled channels) x (importance criterion) x (schedule), as in Torch-Pruning:

    masks.py        masks that survive training (bool buffers + gradient hooks + MaskCallback)
    criteria.py     importance criteria (magnitude, l1_filter, group_norm) and threshold rules
    prune.py        the verb ``prune_(model, PruneConfig(...))``, one shot, per-layer rules by name glob
    schedule.py     iterative prune-retrain cycles; gradual pruning (AGP) as an engine callback
    sensitivity.py  per-layer sensitivity scan and plot
    scalpel.py      SIMD-aware group pruning; node pruning with physical shrinking (coupled channels)
    simd.py         packed SIMD-group format and a numba kernel to run it
    deeptwist.py    DeepTwist: occasional weight distortion as an engine callback

Example:
    >>> from lowbit.models import create_model
    >>> from lowbit.prune import PruneConfig, prune_
    >>> model = create_model("lenet300_100")
    >>> sparsity = prune_(model, PruneConfig(threshold="quality", rules={"*": 1.0}))
"""

from lowbit.prune.criteria import (
    Criterion,
    GroupNorm,
    L1Filter,
    Magnitude,
    Units,
    criteria,
    get_criterion,
    keep_by_quality,
    keep_by_sparsity,
    keep_global,
)
from lowbit.prune.deeptwist import DeepTwist, distort_
from lowbit.prune.masks import (
    MaskCallback,
    apply_masks_,
    attach_mask,
    mask_sparsity,
    masks_of,
    remove_masks,
    restore_masks,
)
from lowbit.prune.prune import PruneConfig, compute_masks, match_layers, prune_
from lowbit.prune.scalpel import (
    Coupling,
    UnsupportedStructureError,
    node_couplings,
    prune_nodes_,
    shrink_nodes_,
    simd_prune_,
)
from lowbit.prune.schedule import Cycle, GradualPruning, agp_sparsity, iterative_prune
from lowbit.prune.sensitivity import SensitivityRow, SensitivityTable, plot_sensitivity, sensitivity

__all__ = [
    "Coupling", "Criterion", "Cycle", "DeepTwist", "GradualPruning", "GroupNorm", "L1Filter", "Magnitude",
    "MaskCallback", "PruneConfig", "SensitivityRow", "SensitivityTable", "Units", "UnsupportedStructureError",
    "agp_sparsity", "apply_masks_", "attach_mask", "compute_masks", "criteria", "distort_", "get_criterion",
    "iterative_prune", "keep_by_quality", "keep_by_sparsity", "keep_global", "mask_sparsity", "masks_of",
    "match_layers", "node_couplings", "plot_sensitivity", "prune_", "prune_nodes_", "remove_masks", "restore_masks",
    "sensitivity", "shrink_nodes_", "simd_prune_",
]
