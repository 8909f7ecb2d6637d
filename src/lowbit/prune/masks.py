"""Pruning masks that survive training, checkpoints, ``.to(device)`` and ``copy.deepcopy``.

A mask is a bool buffer registered on the module next to the parameter it masks, named
``<param>_mask`` (``fc1.weight_mask`` masks ``fc1.weight``); ``True`` = kept. The pruned entries of the
parameter are set to exactly zero, and they stay zero through training because of two guards:

1. a gradient hook on the parameter replaces the gradient of masked entries by 0, so plain SGD, SGD with
   momentum and weight decay, Adam and AdamW all leave them at 0 (a zero weight with a zero gradient and
   zero optimizer state gets a zero update: ``wd * 0 = 0``, ``m = v = 0``);
2. :class:`MaskCallback` (an engine callback) multiplies the weights by their masks after every step,
   which also covers optimizer state that was not zero when the mask was attached.

The mask is a real (persistent) buffer, so it is saved in checkpoints with the weights; a fresh model
needs :func:`restore_masks` before such a state dict can be loaded into it. Torch does not copy tensor
hooks in ``copy.deepcopy``, so a forward pre-hook on the module re-installs the gradient hook on the
first forward pass of a copy.

Example:
    >>> from torch import nn
    >>> layer = nn.Linear(4, 2)
    >>> attach_mask(layer, "weight", layer.weight.abs() > 0.2)
    >>> sorted(masks_of(layer))
    ['weight']

References:
    Han et al., "Learning both Weights and Connections for Efficient Neural Networks", arXiv:1506.02626.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

__all__ = [
    "MASK_SUFFIX", "MaskCallback", "apply_masks_", "attach_mask", "mask_sparsity", "masks_of", "remove_masks",
    "restore_masks",
]

MASK_SUFFIX = "_mask"


class _MaskGrad:
    """Gradient hook: ``grad * mask`` (via ``masked_fill``, so a NaN gradient of a pruned weight is also 0).

    It holds the module weakly and looks the mask up by name at every call, because ``module.to(...)``
    replaces buffers by new tensors while it keeps the parameter objects (and their hooks).
    """

    __slots__ = ("module", "name")

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module = weakref.ref(module)
        self.name = name

    def __call__(self, grad: torch.Tensor) -> torch.Tensor | None:
        module = self.module()
        mask = None if module is None else getattr(module, self.name + MASK_SUFFIX, None)
        if mask is None:  # the mask was removed; the stale hook is a no-op
            return None
        return grad.masked_fill(~mask, 0.0)


def _hooked(param: torch.Tensor) -> bool:
    hooks = param._backward_hooks or {}
    return any(isinstance(h, _MaskGrad) for h in hooks.values())


def _ensure_grad_hooks(module: nn.Module, *args: object) -> None:
    """Forward pre-hook (and helper): give every masked parameter of ``module`` its gradient hook."""
    for buf_name in list(module._buffers):
        if not buf_name.endswith(MASK_SUFFIX):
            continue
        param = module._parameters.get(buf_name[: -len(MASK_SUFFIX)])
        if param is not None and param.requires_grad and not _hooked(param):
            param.register_hook(_MaskGrad(module, buf_name[: -len(MASK_SUFFIX)]))


def _has_pre_hook(module: nn.Module) -> bool:
    return any(h is _ensure_grad_hooks for h in module._forward_pre_hooks.values())


def attach_mask(module: nn.Module, name: str, mask: torch.Tensor) -> None:
    """Mask parameter ``name`` of ``module``: ``param = param * mask``, kept zero through training.

    Rule: attaching to a parameter that already has a mask replaces the mask (combine them yourself with
    ``old & new`` to keep earlier pruning). The parameter is zeroed where ``mask`` is False at once.

    Args:
        module: the layer holding the parameter (e.g. an ``nn.Linear``).
        name: the parameter's attribute name (``"weight"``, ``"bias"``).
        mask: bool (or 0/1) tensor of the parameter's shape; ``True`` keeps the entry.

    Example:
        >>> layer = nn.Linear(3, 2)
        >>> attach_mask(layer, "weight", torch.tensor([[True, False, True], [False, False, True]]))
        >>> int((layer.weight == 0).sum())
        3

    References:
        Han et al., "Learning both Weights and Connections for Efficient Neural Networks", arXiv:1506.02626.
    """
    param = module._parameters.get(name)
    if param is None:
        raise ValueError(f"{type(module).__name__} has no parameter {name!r}; parameters: "
                         f"{', '.join(n for n, p in module._parameters.items() if p is not None) or 'none'}")
    if tuple(mask.shape) != tuple(param.shape):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit {name} of shape {tuple(param.shape)}")
    mask = mask.to(device=param.device, dtype=torch.bool)
    buf = name + MASK_SUFFIX
    if buf in module._buffers:
        module._buffers[buf] = mask.clone()
    else:
        module.register_buffer(buf, mask.clone())
    with torch.no_grad():
        param.masked_fill_(~mask, 0.0)
    _ensure_grad_hooks(module)
    if not _has_pre_hook(module):
        module.register_forward_pre_hook(_ensure_grad_hooks)


def _masked(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(module name, module, parameter name) of every masked parameter, in ``named_modules`` order."""
    out = []
    for mod_name, module in model.named_modules():
        for buf_name, buf in module._buffers.items():
            param = buf_name[: -len(MASK_SUFFIX)]
            if buf is not None and buf_name.endswith(MASK_SUFFIX) and param in module._parameters:
                out.append((mod_name, module, param))
    return out


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every mask in ``model``, keyed by the qualified name of the parameter it masks (``"fc1.weight"``).

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 2))
        >>> attach_mask(model[0], "weight", torch.ones(2, 3, dtype=torch.bool))
        >>> list(masks_of(model))
        ['0.weight']
    """
    return {f"{m}.{p}" if m else p: getattr(mod, p + MASK_SUFFIX) for m, mod, p in _masked(model)}


@torch.no_grad()
def apply_masks_(model: nn.Module) -> None:
    """``param.mul_(mask)`` for every masked parameter (exactly: masked entries are set to 0.0).

    Also re-installs missing gradient hooks (e.g. on a ``copy.deepcopy`` that has not run forward yet).

    Example:
        >>> layer = nn.Linear(2, 1)
        >>> attach_mask(layer, "weight", torch.tensor([[True, False]]))
        >>> with torch.no_grad():
        ...     _ = layer.weight.fill_(1.0)
        >>> apply_masks_(layer); layer.weight.tolist()
        [[1.0, 0.0]]
    """
    for _, module, name in _masked(model):
        getattr(module, name).masked_fill_(~getattr(module, name + MASK_SUFFIX), 0.0)
        _ensure_grad_hooks(module)


def remove_masks(model: nn.Module) -> None:
    """Drop every mask buffer and gradient hook; the pruned weights stay zero but may now be trained.

    Example:
        >>> layer = nn.Linear(2, 1)
        >>> attach_mask(layer, "weight", torch.tensor([[True, False]]))
        >>> remove_masks(layer); masks_of(layer), layer.weight.detach()[0, 1].item()
        ({}, 0.0)
    """
    for _, module, name in _masked(model):
        del module._buffers[name + MASK_SUFFIX]
        param = module._parameters[name]
        hooks = param._backward_hooks or {}
        for key in [k for k, h in hooks.items() if isinstance(h, _MaskGrad)]:
            del hooks[key]
    for module in model.modules():
        for key in [k for k, h in module._forward_pre_hooks.items() if h is _ensure_grad_hooks]:
            del module._forward_pre_hooks[key]


def restore_masks(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Attach the masks found in ``state_dict`` (keys ending in ``_mask``), so that it loads into ``model``.

    Example:
        >>> src = nn.Linear(2, 1); attach_mask(src, "weight", torch.tensor([[True, False]]))
        >>> dst = nn.Linear(2, 1); restore_masks(dst, src.state_dict()); _ = dst.load_state_dict(src.state_dict())
        >>> masks_of(dst)["weight"].tolist()
        [[True, False]]
    """
    modules = dict(model.named_modules())
    for key, value in state_dict.items():
        if not key.endswith(MASK_SUFFIX):
            continue
        mod_name, _, buf = key.rpartition(".")
        if mod_name not in modules:
            raise ValueError(f"state dict key {key!r}: the model has no module {mod_name!r}")
        attach_mask(modules[mod_name], buf[: -len(MASK_SUFFIX)], value)


def mask_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of entries that are masked (pruned) per masked parameter, keyed like :func:`masks_of`."""
    return {k: 1.0 - m.float().mean().item() for k, m in masks_of(model).items()}


class MaskCallback:
    """Engine callback that keeps pruned weights at exactly zero: ``after_step`` re-applies every mask.

    Rule: the gradient hooks already give masked entries a zero gradient; this guard also undoes any
    update from optimizer state (momentum, Adam moments) collected before the mask was attached.

    Example:
        >>> from lowbit.train import TrainConfig, fit
        >>> # fit(model, data, TrainConfig(...), callbacks=[MaskCallback()])

    References:
        Han et al., "Deep Compression", arXiv:1510.00149 (retraining with the pruned connections fixed at 0).
    """

    def after_step(self, model: nn.Module, step: int) -> None:
        apply_masks_(model)
