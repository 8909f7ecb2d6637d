"""Graph passes that lower a trained model towards deployment.

- :mod:`lowbit.graph.thresholds`: batch norm + sign as one (exact) threshold per channel, for binary networks;
- :mod:`lowbit.graph.prepare`, :mod:`lowbit.graph.lower`, :mod:`lowbit.graph.qops`: int8 preparation and lowering
  (their public names are re-exported here lazily, so this package imports without them).
"""

from __future__ import annotations

import importlib
from typing import Any

from lowbit.graph.thresholds import (
    Thresholds,
    apply_thresholds,
    bn_sign_thresholds,
    float_thresholds,
    integer_thresholds,
)

__all__ = ["Thresholds", "apply_thresholds", "bn_sign_thresholds", "float_thresholds", "integer_thresholds"]

_LAZY_MODULES = ("lowbit.graph.prepare", "lowbit.graph.lower")


def __getattr__(name: str) -> Any:
    """``from lowbit.graph import convert`` etc.: the int8 lowering names, imported on first use."""
    for mod_name in _LAZY_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name != mod_name:
                raise
            continue
        if name in getattr(mod, "__all__", ()):
            return getattr(mod, name)
    raise AttributeError(f"module 'lowbit.graph' has no attribute {name!r}")
