"""lowbit.timing.interleaved_medians, driven by a fake clock so that every timing is known exactly."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from lowbit.timing import interleaved_medians


class FakeMachine:
    """A clock that only moves when a fake function runs; records the order of the calls."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def clock(self) -> float:
        return self.now

    def fn(self, name: str, durations: list[float] | None = None, each: float = 1.0) -> Callable[[], None]:
        it = iter(durations) if durations is not None else None

        def run() -> None:
            self.calls.append(name)
            self.now += next(it) if it is not None else each
        return run


def test_interleaves_the_functions_and_takes_medians_of_the_timed_calls_only() -> None:
    m = FakeMachine()
    med = interleaved_medians({"a": m.fn("a", [9.0, 1.0, 5.0, 3.0]), "b": m.fn("b", [9.0, 2.0, 8.0, 4.0])},
                              rounds=3, warmup=1, clocks={"fake": m.clock, "half": lambda: m.now / 2})
    assert m.calls == ["a", "b"] * 4  # one warm-up round, then a, b, a, b, ...
    assert med == {"fake": {"a": 3.0, "b": 4.0}, "half": {"a": 1.5, "b": 2.0}}


def test_blocks_rotate_and_warm_up_per_block() -> None:
    m = FakeMachine()
    fns = {k: m.fn(k) for k in "abc"}
    interleaved_medians(fns, rounds=3, block=2, warmup=0, block_warmup=1, rotate=True, clocks={"t": m.clock})
    blocks = ["".join(m.calls[i:i + 3]) for i in range(0, len(m.calls), 3)]
    assert blocks == ["aaa", "bbb", "ccc", "bbb", "ccc", "aaa", "ccc", "aaa", "bbb"]


def test_budget_cuts_a_block_short_but_keeps_two_timings() -> None:
    m = FakeMachine()
    med = interleaved_medians({"slow": m.fn("slow", each=1.0)}, rounds=1, block=10, warmup=0, budget_s=2.5,
                              clocks={"t": m.clock})
    assert len(m.calls) == 3  # 0, 1, 2 s into the block: go on; 3 s > 2.5 s: stop
    assert med["t"]["slow"] == 1.0
    m2 = FakeMachine()
    interleaved_medians({"slow": m2.fn("slow", each=10.0)}, rounds=1, block=10, warmup=0, budget_s=1.0,
                        clocks={"t": m2.clock})
    assert len(m2.calls) == 2


def test_short_calls_are_looped_to_the_minimum_timing_and_reported_per_call() -> None:
    m = FakeMachine()
    med = interleaved_medians({"tiny": m.fn("tiny", each=0.001)}, rounds=2, warmup=1, min_timing_s=0.01,
                              clocks={"t": m.clock})
    assert len(m.calls) == 1 + 1 + 2 * 10  # warm-up, calibration, 2 timings of 10 calls
    assert med["t"]["tiny"] == pytest.approx(0.001)


def test_real_clock_default() -> None:
    med = interleaved_medians({"a": lambda: sum(range(100))}, rounds=2)
    assert set(med) == {"wall"} and med["wall"]["a"] > 0


@pytest.mark.parametrize("kwargs, match", [
    ({"rounds": 0}, "rounds"), ({"block": 0}, "block"), ({"rounds": 1.5}, "rounds"), ({"warmup": -1}, "warmup"),
    ({"pause_s": -1.0}, "pause_s"), ({"budget_s": float("nan")}, "budget_s"), ({"min_timing_s": -0.1}, "min_timing"),
])
def test_bad_arguments_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        interleaved_medians({"a": lambda: None}, **kwargs)
    with pytest.raises(ValueError, match="at least one function"):
        interleaved_medians({})
