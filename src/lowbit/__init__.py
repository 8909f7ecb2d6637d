"""lowbit: quantization and compression of neural networks, end to end, in PyTorch."""

from lowbit.models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "__version__"]
