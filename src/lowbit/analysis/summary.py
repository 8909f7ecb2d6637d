"""The model summary behind ``lowbit summary MODEL_OR_CHECKPOINT``: a rich table per layer, or JSON.

Columns: layer, type, output shape, params, MACs, weight and activation bits, BOPs, storage at those bit
widths and sparsity, then a totals row; the caption compares the storage with float32. Counts come from
:func:`lowbit.hw.profile`; numbers are shown with decimal units (1.2M = 1.2e6, 4.3 KB = 4300 bytes).

Example:
    >>> from lowbit.hw import profile
    >>> from lowbit.models import create_model
    >>> print_summary(profile(create_model("lenet5")), title="lenet5")  # doctest: +SKIP
"""

from __future__ import annotations

import json
from typing import IO

from rich.console import Console
from rich.table import Table

from lowbit.hw.counts import ModelStats

__all__ = ["format_count", "format_bytes", "summary_table", "print_summary", "summary_json"]

_MIN_FILE_WIDTH = 160  # a table written to a file or pipe is not squeezed into rich's default 80 columns


def format_count(n: float) -> str:
    """``431080 -> "431.1K"``, ``40551040 -> "40.6M"``; below 1000 the number itself."""
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def format_bytes(n: float) -> str:
    """``1724320 -> "1.7 MB"``, ``2080 -> "2.1 KB"``, ``65 -> "65 B"`` (decimal: 1 KB = 1000 bytes)."""
    for div, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:g} B"


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape) if shape else "-"


def summary_table(stats: ModelStats, title: str = "") -> Table:
    """A rich table of ``stats``: one row per layer, a totals row, float32 size and ratio in the caption."""
    table = Table(title=title or None, show_footer=False)
    table.add_column("layer")
    table.add_column("type")
    table.add_column("output shape")
    for name in ("params", "MACs", "W bits", "A bits", "BOPs", "storage", "sparsity"):
        table.add_column(name, justify="right")
    for layer in stats.layers:
        table.add_row(
            layer.name or "(root)",
            layer.type,
            _shape(layer.output_shape),
            format_count(layer.params),
            format_count(layer.macs),
            str(layer.weight_bits),
            str(layer.act_bits),
            format_count(layer.bops),
            format_bytes(layer.storage_bytes),
            f"{100 * layer.sparsity:.1f}%" if layer.weight_params else "-",
        )
    table.add_section()
    table.add_row(
        "total", "", "", format_count(stats.total_params), format_count(stats.total_macs), "", "",
        format_count(stats.total_bops), format_bytes(stats.total_storage_bytes), f"{100 * stats.sparsity:.1f}%",
        style="bold",
    )
    ratio = stats.float32_bytes / stats.total_storage_bytes if stats.total_storage_bytes else 1.0
    table.caption = (
        f"input {_shape((1, *stats.input_shape))}; float32 {format_bytes(stats.float32_bytes)}, "
        f"at these bit widths {format_bytes(stats.total_storage_bytes)} ({ratio:.1f}x smaller); "
        "biases and norm parameters stay 32-bit"
    )
    return table


def print_summary(stats: ModelStats, title: str = "", file: IO[str] | None = None) -> None:
    """Print :func:`summary_table` to ``file`` (standard output by default)."""
    console = Console(file=file)
    if not console.is_terminal:
        console.width = max(console.width, _MIN_FILE_WIDTH)
    console.print(summary_table(stats, title))


def summary_json(stats: ModelStats) -> str:
    """``stats.to_dict()`` as indented JSON: ``{"input_shape", "layers": [...], "totals": {...}}``."""
    return json.dumps(stats.to_dict(), indent=2)
