"""Learning-rate schedules as pure functions of training progress (so they need no saved state)."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["lr_at"]


def lr_at(
    kind: str, base_lr: float, step: int, total_steps: int, steps_per_epoch: int,
    warmup_epochs: float = 0.0, milestones: Sequence[int] = (), gamma: float = 0.1,
) -> float:
    """Learning rate at optimizer step ``step`` (0-based) of ``total_steps``.

    cosine: base * (1 + cos(pi t)) / 2.  step: base * gamma^(number of epoch milestones passed).
    onecycle: linear warm-up from base/25 to base over the first 25%, then cosine to base/1e4.
    constant: base. A linear warm-up of ``warmup_epochs`` applies on top of cosine/step/constant.
    """
    t = min(step / max(1, total_steps), 1.0)
    warm = warmup_epochs * steps_per_epoch
    if kind == "onecycle":
        peak = 0.25
        if t < peak:
            return base_lr / 25 + (base_lr - base_lr / 25) * t / peak
        u = (t - peak) / (1 - peak)
        low = base_lr / 1e4
        return low + (base_lr - low) * (1 + math.cos(math.pi * u)) / 2
    if warm and step < warm:
        return base_lr * (step + 1) / warm
    if kind == "cosine":
        return base_lr * (1 + math.cos(math.pi * t)) / 2
    if kind == "step":
        epoch = step // max(1, steps_per_epoch)
        return base_lr * gamma ** sum(epoch >= m for m in milestones)
    if kind == "constant":
        return base_lr
    raise ValueError(f"unknown schedule {kind!r}; allowed: cosine, step, onecycle, constant")
