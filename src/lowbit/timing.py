"""Side-by-side timing: the median time per call of several functions, measured in interleaved rounds.

Timed one after the other, two contenders see different machines: another process's busy phase, a clock change
or a cache left warm by the previous run lands on one of them only (batch-1 latencies with 2 threads swung 1.7x
between runs of the same file that way). :func:`interleaved_medians` times them in rounds, each round one block of
calls of every function in turn, so that such changes hit all of them alike, and reports medians. Every speed
comparison in lowbit (``bench/``, the int8 exporter's speed check) goes through it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping

__all__ = ["interleaved_medians"]

DEFAULT_CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter}


def interleaved_medians(
    fns: Mapping[str, Callable[[], object]],
    rounds: int = 5,
    block: int = 1,
    *,
    warmup: int = 1,
    block_warmup: int = 0,
    pause_s: float = 0.0,
    budget_s: float | None = None,
    min_timing_s: float = 0.0,
    rotate: bool = False,
    clocks: Mapping[str, Callable[[], float]] | None = None,
) -> dict[str, dict[str, float]]:
    """Median seconds per call of each function, timed in ``rounds`` interleaved rounds.

    First every function runs ``warmup`` times untimed (first-call allocations, kernel selection, JIT caches).
    Then each round times a block of ``block`` calls of every function in turn (the order shifted by one per
    round with ``rotate``); before a block it sleeps ``pause_s`` and runs the function ``block_warmup`` times
    untimed. Blocks rather than single calls in turn keep each function's operands in cache, as a layer called
    again and again has them; the pause and the block warm-up let the OpenMP threads of the previous contender
    stop spinning (torch and numba each bring a runtime whose idle threads busy-wait after a parallel region:
    measured here, a batch-1 numba call right after a torch call took 40 ms instead of 0.07 ms on 2 cores).

    Args:
        fns: name -> a function of no arguments.
        rounds: the number of rounds (>= 1).
        block: timed calls per function per round (>= 1).
        warmup: untimed calls of each function before the first round.
        block_warmup: untimed calls before each block.
        pause_s: sleep before each block.
        budget_s: if set, a block stops early (after at least 2 timings) once it has used its share,
            ``budget_s / (rounds * len(fns))``, so that slow functions do not take all of ``block``.
        min_timing_s: each timing repeats the call enough times (calibrated once, after the warm-up) to last at
            least this long, and counts the time per call: for calls much shorter than the clock's resolution.
        rotate: start each round one function later.
        clocks: name -> clock (default ``{"wall": time.perf_counter}``); e.g. add ``"cpu": time.process_time``
            for the CPU time of all this process's threads, which other processes disturb less.

    Returns:
        ``{clock: {function: median seconds per call}}``.

    Raises:
        ValueError: no functions, or ``rounds`` / ``block`` below 1, or a negative count or time.

    Example:
        >>> med = interleaved_medians({"sum": lambda: sum(range(1000)), "max": lambda: max(range(1000))})
        >>> sorted(med["wall"])
        ['max', 'sum']
    """
    if not fns:
        raise ValueError("interleaved_medians needs at least one function to time")
    for name, value in (("rounds", rounds), ("block", block)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    for name, value in (("warmup", warmup), ("block_warmup", block_warmup)):
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    for name, value in (("pause_s", pause_s), ("min_timing_s", min_timing_s), ("budget_s", budget_s or 0.0)):
        if not value >= 0:  # also NaN
            raise ValueError(f"{name} must be a time >= 0 seconds, got {value!r}")
    clocks = dict(clocks or DEFAULT_CLOCKS)
    first = next(iter(clocks.values()))
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    loops = dict.fromkeys(names, 1)
    if min_timing_s > 0:
        for name in names:
            t0 = first()
            fns[name]()
            loops[name] = max(1, math.ceil(min_timing_s / max(first() - t0, 1e-9)))
    share = None if budget_s is None else budget_s / (rounds * len(names))
    times: dict[str, dict[str, list[float]]] = {c: {n: [] for n in names} for c in clocks}
    for r in range(rounds):
        shift = r % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            fn, n_loops = fns[name], loops[name]
            if pause_s:
                time.sleep(pause_s)
            for _ in range(block_warmup):
                fn()
            start = first()
            for i in range(block):
                if share is not None and i >= 2 and first() - start > share:
                    break
                t0 = {c: clock() for c, clock in clocks.items()}
                for _ in range(n_loops):
                    fn()
                for c, clock in clocks.items():
                    times[c][name].append((clock() - t0[c]) / n_loops)
    return {c: {n: statistics.median(v) for n, v in per.items()} for c, per in times.items()}
