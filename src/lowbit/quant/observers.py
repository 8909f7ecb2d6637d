"""Range observers: objects that watch tensors and say which real range ``[lo, hi]`` to quantize.

An observer is an ``nn.Module`` called on a tensor (it records statistics and returns nothing) with

    calculate_range(qmin, qmax, symmetric) -> (lo, hi)     the range to quantize, as tensors
    initialized: bool                                       whether it has seen any data
    reset()                                                 forget everything seen

Ranges are per tensor (``axis=None``: 0-dim tensors) or per channel along ``axis`` (1-dim tensors with
one entry per channel). The affine quantizer (:mod:`lowbit.quant.affine`) turns the range into a scale
and a zero point. The methods:

    minmax       lo = min x, hi = max x over everything seen (``running=False``: over the last tensor only,
                 which is how weights are quantized: the range follows the current weights)
    ema          lo <- (1 - c) lo + c min x, hi likewise (c = ``momentum``): smooths the range over the
                 training steps of quantization-aware training (Jacob et al., Section 3.1)
    percentile   lo, hi = the (100 - p)-th and p-th percentiles of a uniform sample of everything seen:
                 ignores rare outliers (for post-training calibration)
    mse          the clipping range, a fraction of [min, max], that minimizes the mean squared quantization
                 error on a uniform sample of everything seen (for post-training calibration)

A NaN or an infinite value is refused with ``ValueError``: a range computed from it would silently
quantize everything to garbage.

References:
    Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
    Inference", arXiv:1712.05877 (min-max and EMA ranges).
    Wu et al., "Integer Quantization for Deep Learning Inference: Principles and Empirical Evaluation",
    arXiv:2004.09602 (percentile and MSE calibration).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from lowbit._registry import Registry

__all__ = [
    "Observer", "MinMaxObserver", "EMAObserver", "PercentileObserver", "MSEObserver", "observers",
    "get_observer", "ObserverSpec", "LazyShapeMixin",
]


class LazyShapeMixin:
    """Buffers whose shape is known only once data is seen (one entry per channel): loading a state
    dict resizes them to the stored shape first, so a fresh instance loads a used one's state."""

    _lazy_buffers: tuple[str, ...] = ()

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in self._lazy_buffers:
            stored = state_dict.get(prefix + name)
            own = self._buffers.get(name)  # type: ignore[attr-defined]
            if isinstance(stored, torch.Tensor) and own is not None and stored.shape != own.shape:
                self._buffers[name] = torch.empty(stored.shape, dtype=own.dtype, device=own.device)  # type: ignore[attr-defined]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]


def _channels(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``x`` as a 2-D ``(channels, values)`` tensor; one channel for a per-tensor observer."""
    if axis is None:
        return x.reshape(1, -1)
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"per-channel axis {axis} does not exist in a tensor of shape {tuple(x.shape)}")
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)  # (C, ...) -> (C, N)


def _check_finite(x: torch.Tensor) -> None:
    if not torch.isfinite(x).all():
        bad = "NaN" if torch.isnan(x).any() else "an infinite value"
        raise ValueError(f"an observer was given a tensor with {bad}: the model (or its input) has diverged; "
                         "a quantization range cannot be computed from it")


class Observer(LazyShapeMixin, nn.Module):
    """Base class: keeps ``min_val``/``max_val`` (0-dim per tensor, ``(C,)`` per channel) of what it saw.

    Subclasses define :meth:`_update` (called with the per-channel min and max of each tensor and the
    tensor as ``(C, N)``) and may override :meth:`calculate_range`.

    Args:
        axis: ``None`` for one range per tensor, or the channel dimension for one range per channel.
    """

    _lazy_buffers = ("min_val", "max_val")

    def __init__(self, axis: int | None = None) -> None:
        super().__init__()
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise ValueError(f"axis must be None (per tensor) or an int (the channel dimension), got {axis!r}")
        self.axis = axis
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    @property
    def initialized(self) -> bool:
        """Whether the observer has seen at least one value."""
        return bool(torch.isfinite(self.min_val).all()) and self.min_val.numel() > 0

    def reset(self) -> None:
        """Forget everything seen."""
        self.min_val = torch.full_like(self.min_val, float("inf"))
        self.max_val = torch.full_like(self.max_val, float("-inf"))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return  # an empty batch carries no range information
        _check_finite(x)
        flat = _channels(x.detach().float(), self.axis)
        lo, hi = flat.amin(1), flat.amax(1)
        if self.axis is None:
            lo, hi = lo[0], hi[0]
        if self.initialized and lo.shape != self.min_val.shape:
            raise ValueError(f"this per-channel observer saw {self.min_val.numel()} channels before and "
                             f"{lo.numel()} now (axis {self.axis}); one observer watches one tensor")
        self._update(lo, hi, flat)

    def _update(self, lo: torch.Tensor, hi: torch.Tensor, flat: torch.Tensor) -> None:
        raise NotImplementedError

    def calculate_range(self, qmin: int, qmax: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The range to quantize ``(lo, hi)``; ``ValueError`` if nothing was observed yet."""
        self._check_initialized()
        return self.min_val.clone(), self.max_val.clone()

    def _check_initialized(self) -> None:
        if not self.initialized:
            raise ValueError(f"{type(self).__name__} has not seen any data: run calibration (or a training step) "
                             "before asking for a quantization range")

    def extra_repr(self) -> str:
        return f"axis={self.axis}"


observers: Registry[type[Observer]] = Registry("observer")


@observers.register("minmax")
class MinMaxObserver(Observer):
    """``lo = min x``, ``hi = max x`` over every tensor seen (``running=True``) or the last one only.

    Args:
        axis: ``None`` (per tensor) or the channel dimension.
        running: keep the extremes of everything seen; ``False`` follows the latest tensor (weights).

    Example:
        >>> obs = MinMaxObserver()
        >>> obs(torch.tensor([-1.0, 2.0])); obs(torch.tensor([0.5, 3.0]))
        >>> obs.calculate_range(0, 255, symmetric=False)
        (tensor(-1.), tensor(3.))

    References:
        Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
        Inference", arXiv:1712.05877.
    """

    def __init__(self, axis: int | None = None, running: bool = True) -> None:
        super().__init__(axis)
        self.running = bool(running)

    def _update(self, lo: torch.Tensor, hi: torch.Tensor, flat: torch.Tensor) -> None:
        if self.running and self.initialized:
            lo, hi = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        self.min_val, self.max_val = lo.clone(), hi.clone()

    def extra_repr(self) -> str:
        return f"axis={self.axis}, running={self.running}"


@observers.register("ema")
class EMAObserver(Observer):
    """Exponential moving average of each tensor's min and max: ``lo <- (1 - c) lo + c min x``.

    The first tensor sets the range; later ones move it by the fraction ``momentum`` (``c``).

    Args:
        axis: ``None`` (per tensor) or the channel dimension.
        momentum: ``c`` in (0, 1]; 1 follows the latest tensor.

    Example:
        >>> obs = EMAObserver(momentum=0.5)
        >>> obs(torch.tensor([0.0, 2.0])); obs(torch.tensor([0.0, 4.0]))
        >>> obs.calculate_range(0, 255, symmetric=False)[1]
        tensor(3.)

    References:
        Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
        Inference", arXiv:1712.05877 (Section 3.1: EMA of the activation ranges during training).
    """

    def __init__(self, axis: int | None = None, momentum: float = 0.01) -> None:
        super().__init__(axis)
        if not 0 < float(momentum) <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
        self.momentum = float(momentum)

    def _update(self, lo: torch.Tensor, hi: torch.Tensor, flat: torch.Tensor) -> None:
        if self.initialized:
            c = self.momentum
            lo, hi = (1 - c) * self.min_val + c * lo, (1 - c) * self.max_val + c * hi
        self.min_val, self.max_val = lo.clone(), hi.clone()

    def extra_repr(self) -> str:
        return f"axis={self.axis}, momentum={self.momentum}"


class _SampleObserver(Observer):
    """Keeps a uniform random sample (at most ``max_samples`` values per channel) of everything seen.

    The sample is working state for calibration, not part of the state dict; the range computed from it
    is (``min_val``/``max_val`` are updated by :meth:`calculate_range`).
    """

    def __init__(self, axis: int | None = None, max_samples: int = 1 << 16, seed: int = 0) -> None:
        super().__init__(axis)
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 16:
            raise ValueError(f"max_samples must be an int >= 16, got {max_samples!r}")
        self.max_samples = max_samples
        self.register_buffer("sample", torch.empty(0), persistent=False)
        self._seen = 0
        self.seed = seed

    def reset(self) -> None:
        super().reset()
        self.sample = torch.empty(0, device=self.min_val.device)
        self._seen = 0

    def _pick(self, values: torch.Tensor, k: int) -> torch.Tensor:
        if values.shape[1] <= k:
            return values
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self._seen)  # reproducible, deep-copyable
        idx = torch.randperm(values.shape[1], generator=gen)[:k].to(values.device)
        return values[:, idx]

    def _update(self, lo: torch.Tensor, hi: torch.Tensor, flat: torch.Tensor) -> None:
        if self.initialized:
            lo, hi = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        self.min_val, self.max_val = lo.clone(), hi.clone()
        n_new = flat.shape[1]
        if self.sample.numel() == 0:
            self.sample = self._pick(flat, self.max_samples).clone()
        else:  # merge so that every value seen so far had the same chance to be kept
            total = self._seen + n_new
            k_new = min(n_new, max(1, round(self.max_samples * n_new / total)))
            k_old = min(self.sample.shape[1], self.max_samples - k_new)
            self.sample = torch.cat([self._pick(self.sample, k_old), self._pick(flat, k_new)], dim=1)
        self._seen += n_new

    def _values(self) -> torch.Tensor:
        self._check_initialized()
        if self.sample.numel() == 0:
            raise ValueError(f"{type(self).__name__} has a range from a checkpoint but no samples in this session; "
                             "it needs calibration data to compute a new range")
        return self.sample

    def extra_repr(self) -> str:
        return f"axis={self.axis}, max_samples={self.max_samples}"


@observers.register("percentile")
class PercentileObserver(_SampleObserver):
    """``lo, hi`` = the ``(100 - p)``-th and ``p``-th percentiles of a uniform sample of the values seen.

    Args:
        axis: ``None`` (per tensor) or the channel dimension.
        percentile: ``p`` in (50, 100]; 100 is the min-max range.
        max_samples: values kept per channel for the estimate.

    Example:
        >>> obs = PercentileObserver(percentile=99.0)
        >>> obs(torch.cat([torch.linspace(0, 1, 999), torch.tensor([1000.0])]))  # one outlier
        >>> float(obs.calculate_range(0, 255, symmetric=False)[1]) < 2
        True

    References:
        Wu et al., "Integer Quantization for Deep Learning Inference: Principles and Empirical
        Evaluation", arXiv:2004.09602 (percentile calibration).
    """

    def __init__(self, axis: int | None = None, percentile: float = 99.99, max_samples: int = 1 << 16) -> None:
        super().__init__(axis, max_samples)
        if not 50 < float(percentile) <= 100:
            raise ValueError(f"percentile must be in (50, 100], got {percentile!r}")
        self.percentile = float(percentile)

    def calculate_range(self, qmin: int, qmax: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        values = self._values().double()
        q = torch.tensor([1 - self.percentile / 100, self.percentile / 100], dtype=torch.float64,
                         device=values.device)
        lo, hi = torch.quantile(values, q, dim=1).float()  # (2, C) -> two (C,)
        if self.axis is None:
            lo, hi = lo[0], hi[0]
        self.min_val, self.max_val = lo.clone(), hi.clone()
        return lo, hi


@observers.register("mse")
class MSEObserver(_SampleObserver):
    """The range ``a * [min, max]``, ``a`` on a grid in ``[1/grid, 1]``, that minimizes the mean squared
    quantization error on a uniform sample of the values seen.

    Args:
        axis: ``None`` (per tensor) or the channel dimension.
        grid: number of candidate fractions ``a``.
        max_samples: values kept per channel for the search.

    Example:
        >>> obs = MSEObserver()
        >>> obs(torch.cat([torch.randn(10000), torch.tensor([100.0])]))
        >>> float(obs.calculate_range(0, 255, symmetric=False)[1]) < 100
        True

    References:
        Wu et al., "Integer Quantization for Deep Learning Inference: Principles and Empirical
        Evaluation", arXiv:2004.09602 (MSE calibration).
    """

    def __init__(self, axis: int | None = None, grid: int = 100, max_samples: int = 1 << 16) -> None:
        super().__init__(axis, max_samples)
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ValueError(f"grid must be an int >= 1, got {grid!r}")
        self.grid = grid

    @torch.no_grad()
    def calculate_range(self, qmin: int, qmax: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from lowbit.quant.affine import choose_qparams  # the affine module imports this one

        values = self._values()
        full_lo = torch.minimum(self.min_val, torch.zeros_like(self.min_val)).reshape(-1, 1)
        full_hi = torch.maximum(self.max_val, torch.zeros_like(self.max_val)).reshape(-1, 1)
        best_err = torch.full((values.shape[0],), float("inf"), device=values.device)
        best_lo, best_hi = full_lo[:, 0].clone(), full_hi[:, 0].clone()
        for i in range(1, self.grid + 1):
            a = i / self.grid
            lo, hi = full_lo[:, 0] * a, full_hi[:, 0] * a
            scale, zp = choose_qparams(lo, hi, qmin, qmax, symmetric)
            s, z = scale.reshape(-1, 1), zp.reshape(-1, 1).float()
            deq = (torch.clamp(torch.round(values / s) + z, qmin, qmax) - z) * s
            err = (deq - values).pow(2).mean(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
        if self.axis is None:
            best_lo, best_hi = best_lo[0], best_hi[0]
        self.min_val, self.max_val = best_lo.clone(), best_hi.clone()
        return best_lo, best_hi

    def extra_repr(self) -> str:
        return f"axis={self.axis}, grid={self.grid}, max_samples={self.max_samples}"


ObserverSpec = str | Mapping[str, Any] | Observer


def get_observer(spec: ObserverSpec, axis: int | None = None) -> Observer:
    """An observer from a registered name (``"minmax"``, ``"ema"``, ``"percentile"``, ``"mse"``), a mapping
    ``{"name": ..., **kwargs}`` or an instance (returned as is); ``axis`` is passed to a new one.

    Example:
        >>> get_observer({"name": "ema", "momentum": 0.1}).momentum
        0.1
    """
    if isinstance(spec, Observer):
        return spec
    if isinstance(spec, str):
        name, kwargs = spec, {}
    elif isinstance(spec, Mapping):
        if "name" not in spec:
            raise ValueError(f"an observer mapping needs a 'name' key; got keys {sorted(spec)}")
        name, kwargs = str(spec["name"]), {k: v for k, v in spec.items() if k != "name"}
    else:
        raise TypeError(f"an observer is a name, a mapping with 'name' or an Observer; got {type(spec).__name__}")
    cls: Callable[..., Observer] = observers.get(name)
    try:
        return cls(axis=axis, **kwargs)
    except TypeError as e:
        raise TypeError(f"observer {name!r}: {e}") from None
