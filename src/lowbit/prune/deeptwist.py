"""DeepTwist: compression by occasional weight distortion during otherwise ordinary full-precision training.

Every ``S_D`` steps (the distortion step) the weights are overwritten by their compressed version; in
between, training runs in full precision with no masks, so a pruned weight may grow back if the loss
wants it, and the next distortion decides again. The optimizer and the loss are unchanged. A final
distortion at the end of training leaves the model compressed.

Example:
    >>> from lowbit.prune import PruneConfig
    >>> twist = DeepTwist(PruneConfig(rules={"*": 0.9}), distortion_steps=50, total_steps=470)
    >>> # fit(model, data, TrainConfig(epochs=10, ...), callbacks=[twist])  -> 90% sparse at the end

References:
    Lee, Kapoor, Kim, "DeepTwist: Learning Model Compression via Occasional Weight Distortion",
    arXiv:1810.09760.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lowbit.prune.prune import PruneConfig, compute_masks

__all__ = ["DeepTwist", "distort_"]


@torch.no_grad()
def distort_(
    model: nn.Module, config: PruneConfig, quantize: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> dict[str, float]:
    """One distortion: ``W <- M * Q(M * W)`` for every matched layer (``Q`` = identity without ``quantize``).

    Formula: ``M`` is the keep-mask of :func:`~lowbit.prune.prune.compute_masks` (magnitude pruning to the
    target sparsity by default); ``Q`` is applied to the pruned weight tensor and the result is masked
    again, so a quantizer that maps 0 elsewhere cannot revive pruned weights. No mask is attached.

    Args:
        model: modified in place.
        config: which layers and how much to prune (``rules={"*": 0.0}`` for quantization only).
        quantize: optional ``weight -> fake-quantized weight`` (same shape), e.g. a lowbit quantizer module.

    Returns:
        ``{"fc1.weight": sparsity}`` after the distortion.

    Example:
        >>> from lowbit.models import create_model
        >>> m = create_model("lenet300_100")
        >>> round(distort_(m, PruneConfig(rules={"fc1": 0.5}), quantize=torch.sign)["fc1.weight"], 2)
        0.5

    References:
        Lee, Kapoor, Kim, "DeepTwist: Learning Model Compression via Occasional Weight Distortion",
        arXiv:1810.09760.
    """
    modules = dict(model.named_modules())
    out = {}
    for key, mask in compute_masks(model, config).items():
        module_name, _, pname = key.rpartition(".")
        weight = getattr(modules[module_name], pname)
        new = weight * mask
        if quantize is not None:
            q = quantize(new)
            if q.shape != weight.shape:
                raise ValueError(f"quantize changed the shape of {key}: {tuple(weight.shape)} -> {tuple(q.shape)}")
            new = q.to(weight.dtype) * mask
        weight.copy_(new)
        out[key] = (weight == 0).float().mean().item()
    return out


class DeepTwist:
    """Engine callback: every ``distortion_steps`` steps, and once at the end, distort the weights.

    Rule: after optimizer step ``t`` (the engine counts from 1), if ``t % S_D == 0`` or ``t == total_steps``,
    apply :func:`distort_`; otherwise do nothing (full-precision training). Call :meth:`finish` yourself
    after training when ``total_steps`` is not given.

    Args:
        config: the compression target (criterion, threshold, per-layer rules); magnitude pruning by default.
        distortion_steps: ``S_D``, steps between distortions (the paper uses a few hundred to a few thousand).
        total_steps: the training length in steps, for the final distortion; ``None`` = call :meth:`finish`.
        quantize: optional quantization applied in each distortion (after pruning).

    Example:
        >>> twist = DeepTwist(PruneConfig(rules={"*": 0.9}), distortion_steps=20, total_steps=47)
        >>> # fit(model, load_dataset("digits"), TrainConfig(epochs=1, batch_size=32), callbacks=[twist])

    References:
        Lee, Kapoor, Kim, "DeepTwist: Learning Model Compression via Occasional Weight Distortion",
        arXiv:1810.09760.
    """

    def __init__(
        self,
        config: PruneConfig | None = None,
        distortion_steps: int = 100,
        total_steps: int | None = None,
        quantize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if distortion_steps < 1:
            raise ValueError(f"distortion_steps must be >= 1, got {distortion_steps}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.config = config or PruneConfig()
        self.distortion_steps, self.total_steps, self.quantize = distortion_steps, total_steps, quantize
        self.distortions: list[int] = []  # steps at which a distortion happened

    def after_step(self, model: nn.Module, step: int) -> None:
        if step % self.distortion_steps == 0 or step == self.total_steps:
            distort_(model, self.config, self.quantize)
            self.distortions.append(step)

    def finish(self, model: nn.Module) -> dict[str, float]:
        """The final distortion, for when ``total_steps`` was not given."""
        return distort_(model, self.config, self.quantize)
