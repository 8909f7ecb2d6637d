"""Progress bars (rich) with throughput and ETA for every long-running loop."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["progress"]


@contextmanager
def progress(total: int, description: str, unit: str = "it") -> Iterator[Callable[..., None]]:
    """Show a bar; yields ``advance(n=1, **fields)`` where fields update the status text.

    Writes to stderr, so stdout stays clean for tables and JSON.
    """
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TaskProgressColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
        transient=False, console=Console(stderr=True),
    )
    with bar:
        task = bar.add_task(description, total=total, rate="", status="")

        def advance(n: int = 1, status: str | None = None) -> None:
            bar.advance(task, n)
            speed = bar.tasks[task].speed
            fields = {"rate": f"{speed:,.0f} {unit}/s" if speed else ""}
            if status is not None:
                fields["status"] = status
            bar.update(task, **fields)

        yield advance
