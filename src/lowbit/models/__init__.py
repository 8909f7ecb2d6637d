"""The model zoo: ``create_model(name, **kwargs)``, ``list_models(glob)``.

One file per family, each registering small constructors with ``@register_model``.
"""

from lowbit.models import (  # noqa: F401  (importing registers the models)
    efficientnet,
    lenet,
    mlp,
    mobilenet,
    resnet,
    rnn,
    squeezenet,
    squeezenext,
    vgg,
)
from lowbit.models._registry import ModelEntry, create_model, list_models, model_entry, models, register_model

__all__ = ["ModelEntry", "create_model", "list_models", "model_entry", "models", "register_model"]
