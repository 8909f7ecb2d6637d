"""Pruning schedules: iterative prune-retrain cycles (Deep Compression) and gradual pruning (AGP).

    iterative_prune(model, cfg, train_fn, cycles)   prune -> train_fn(model) -> prune more -> ...
    GradualPruning(cfg, every=..., n_updates=...)    engine callback raising sparsity every ``every`` steps
    agp_sparsity(t, s_i, s_f, t0, n, dt)              Zhu & Gupta's cubic curve

Both take a :class:`~lowbit.prune.prune.PruneConfig` whose rule values are the *final* amounts; the
schedule scales them over time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from lowbit.prune.masks import apply_masks_
from lowbit.prune.prune import PruneConfig, prune_

__all__ = ["Cycle", "GradualPruning", "agp_sparsity", "iterative_prune"]


def agp_sparsity(step: int, initial: float, final: float, start: int, n_updates: int, every: int) -> float:
    """Automated gradual pruning: the target sparsity at ``step``.

    Formula (Zhu & Gupta, eq. 1), with ``t0 = start``, ``n = n_updates``, ``dt = every``:

        s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3      for t0 <= t <= t0 + n * dt

    ``s_t = s_i`` before ``t0`` and ``s_f`` after ``t0 + n * dt``. Sparsity is raised only at the update
    steps ``t0, t0 + dt, ...``, so ``t`` is rounded down to the last of them: fast pruning early, when
    many redundant weights remain, and slow near the end.

    Args:
        step: the training step ``t`` (the engine counts from 1 after the first optimizer step).
        initial: ``s_i``. final: ``s_f``.
        start: ``t0``, the first pruning step.
        n_updates: ``n``, the number of pruning updates after ``t0``.
        every: ``dt``, steps between updates.

    Example:
        >>> round(agp_sparsity(50, 0.0, 0.8, 0, 10, 10), 6)  # 0.8 - 0.8 * (1 - 0.5)^3
        0.7
        >>> agp_sparsity(55, 0.0, 0.8, 0, 10, 10) == agp_sparsity(50, 0.0, 0.8, 0, 10, 10)
        True

    References:
        Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model compression",
        arXiv:1710.01878.
    """
    if n_updates < 1 or every < 1:
        raise ValueError(f"n_updates and every must be >= 1, got {n_updates} and {every}")
    if step < start:
        return initial
    t = min(start + (step - start) // every * every, start + n_updates * every)
    return final + (initial - final) * (1.0 - (t - start) / (n_updates * every)) ** 3


def _scaled(config: PruneConfig, fraction: Callable[[float], float]) -> PruneConfig:
    return config.model_copy(update={"rules": {k: fraction(v) for k, v in config.rules.items()}})


class GradualPruning:
    """Engine callback for automated gradual pruning (AGP): sparsity rises along a cubic curve during training.

    Rule: after step ``t`` with ``t = t0 + j * dt`` (``0 <= j <= n``), every matched layer is pruned to
    ``agp_sparsity(t, s_i, s_l, t0, n, dt)``, where ``s_l`` is the layer's rule value in ``config`` (its
    final sparsity); after every step the masks are re-applied, so pruned weights stay exactly zero.
    Pruning is monotone (masks are combined), and the final sparsity is reached at ``t0 + n * dt``.

    Args:
        config: threshold ``"sparsity"`` or ``"global"``; rule values are final sparsities.
        every: ``dt`` in steps. n_updates: ``n``. start: ``t0`` in steps.
        initial: ``s_i``, the same for every layer.

    Example:
        >>> from lowbit.train import TrainConfig, fit
        >>> agp = GradualPruning(PruneConfig(rules={"*": 0.9}), every=10, n_updates=20)
        >>> # fit(model, data, TrainConfig(...), callbacks=[agp])   # 90% sparse after step 200

    References:
        Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model compression",
        arXiv:1710.01878.
    """

    def __init__(self, config: PruneConfig, every: int, n_updates: int, start: int = 0, initial: float = 0.0) -> None:
        if config.threshold == "quality":
            raise ValueError("GradualPruning schedules sparsity; use threshold 'sparsity' or 'global'")
        if not 0.0 <= initial <= 1.0:
            raise ValueError(f"initial sparsity must be in [0, 1], got {initial}")
        agp_sparsity(start, initial, initial, start, n_updates, every)  # validates n_updates, every
        self.config, self.every, self.n_updates, self.start, self.initial = config, every, n_updates, start, initial
        self.history: list[tuple[int, dict[str, float]]] = []  # (step, sparsity per layer) at each update

    def target(self, step: int) -> PruneConfig:
        """The config with every rule value replaced by its scheduled sparsity at ``step``."""
        return _scaled(self.config, lambda s_f: agp_sparsity(step, self.initial, s_f, self.start, self.n_updates,
                                                              self.every))

    def after_step(self, model: nn.Module, step: int) -> None:
        apply_masks_(model)
        end = self.start + self.n_updates * self.every
        if self.start <= step <= end and (step - self.start) % self.every == 0:
            self.history.append((step, prune_(model, self.target(step))))


@dataclass
class Cycle:
    """One prune-retrain cycle: the sparsity after pruning and what ``train_fn`` returned."""

    cycle: int
    sparsity: dict[str, float]
    result: Any = field(default=None)


def iterative_prune(
    model: nn.Module,
    config: PruneConfig,
    train_fn: Callable[[nn.Module], Any],
    cycles: int,
    ramp: Literal["cubic", "linear"] = "cubic",
) -> list[Cycle]:
    """Iterative pruning: ``cycles`` rounds of (prune to a higher amount, retrain with the masks fixed).

    Rule: in cycle ``c = 1..C`` every rule value ``v`` becomes ``v * r(c)`` with ``r(c) = 1 - (1 - c/C)^3``
    (``ramp="cubic"``, AGP's curve over cycles) or ``r(c) = c / C`` (``"linear"``); for the quality
    threshold the quality parameter is ramped the same way. The last cycle reaches the configured amount.
    Masks are combined, so sparsity never falls.

    ``train_fn(model)`` retrains in place and may return anything (e.g. the test accuracy). The masks'
    gradient hooks keep pruned weights at 0 with a fresh optimizer (``lowbit.train.fit`` builds one); pass
    ``MaskCallback()`` to ``fit`` as well for optimizer state created before the masks.

    Args:
        model: modified in place.
        config: the final amounts.
        train_fn: retrains ``model``; its result is stored in :class:`Cycle`.
        cycles: number of prune-retrain rounds ``C >= 1``.
        ramp: how the amount rises over cycles.

    Example:
        >>> from lowbit.models import create_model
        >>> m = create_model("lenet300_100")
        >>> out = iterative_prune(m, PruneConfig(rules={"*": 0.9}), lambda model: None, cycles=3)
        >>> [round(c.sparsity["fc1.weight"], 3) for c in out]
        [0.633, 0.867, 0.9]

    References:
        Han et al., "Learning both Weights and Connections for Efficient Neural Networks", arXiv:1506.02626.
        Han et al., "Deep Compression", arXiv:1510.00149.
    """
    if cycles < 1:
        raise ValueError(f"cycles must be >= 1, got {cycles}")
    if ramp not in ("cubic", "linear"):
        raise ValueError(f"ramp must be 'cubic' or 'linear', got {ramp!r}")
    out = []
    for c in range(1, cycles + 1):
        r = 1.0 - (1.0 - c / cycles) ** 3 if ramp == "cubic" else c / cycles
        sparsity = prune_(model, _scaled(config, lambda v, r=r: v * r))
        result = train_fn(model)
        apply_masks_(model)
        out.append(Cycle(c, sparsity, result))
    return out
