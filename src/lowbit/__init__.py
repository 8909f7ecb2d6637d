"""lowbit: quantization and compression of neural networks, end to end, in PyTorch.

The top-level names are imported lazily, so that ``lowbit --help`` does not pay for importing torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "quantize_", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("create_model", "list_models"):
        from lowbit import models

        return getattr(models, name)
    if name == "quantize_":
        from lowbit.quant import quantize_

        return quantize_
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
