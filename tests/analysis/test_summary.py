"""lowbit.analysis.summary: the rich table (totals row, units) and the JSON form."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console
from torch import nn

from lowbit.analysis import format_bytes, format_count, print_summary, summary_json, summary_table
from lowbit.hw import ModelStats, profile
from lowbit.models import create_model


@pytest.fixture(scope="module")
def lenet5_stats() -> ModelStats:
    return profile(create_model("lenet5"))


def _render(stats: ModelStats, title: str = "") -> str:
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(summary_table(stats, title))
    return console.export_text()


@pytest.mark.parametrize(
    "n, text", [(0, "0"), (520, "520"), (5_000, "5.0K"), (431_080, "431.1K"), (1_200_000, "1.2M"),
                (569_600_000, "569.6M"), (2_348_810_240, "2.3G")],
)
def test_format_count(n: int, text: str) -> None:
    assert format_count(n) == text


@pytest.mark.parametrize("n, text", [(65, "65 B"), (128.0, "128 B"), (4_300, "4.3 KB"), (1_724_320, "1.7 MB")])
def test_format_bytes(n: float, text: str) -> None:
    assert format_bytes(n) == text


def test_table_rows_and_totals(lenet5_stats: ModelStats) -> None:
    text = _render(lenet5_stats, "lenet5")
    lines = text.splitlines()
    assert "lenet5" in lines[0]
    for name in ("conv1", "conv2", "fc1", "fc2"):
        assert any(line.split("│")[1].strip() == name for line in lines if "│" in line)
    conv1 = next(line for line in lines if "conv1" in line)
    assert "1x20x24x24" in conv1 and "288.0K" in conv1 and "520" in conv1
    total = [cell.strip() for cell in next(line for line in lines if "total" in line).split("│")[1:-1]]
    # layer, type, shape, params, MACs, W, A, BOPs, storage, sparsity
    assert total == ["total", "", "", "431.1K", "2.3M", "", "", "2.3G", "1.7 MB", "0.0%"]
    assert "float32 1.7 MB" in text


def test_table_of_quantized_and_sparse_model() -> None:
    class Q(nn.Module):
        bit_width = 2

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    fc = nn.Linear(1000, 1000)
    fc.weight_quantizer, fc.input_quantizer = Q(), Q()
    fc.weight.data[:250] = 0
    stats = profile(nn.Sequential(fc), example=torch.randn(1, 1000))
    text = _render(stats)
    total = [cell.strip() for cell in next(line for line in text.splitlines() if "total" in line).split("│")[1:-1]]
    # 1e6 weights at 2 bits = 250 KB, plus 1000 32-bit biases = 4 KB; BOPs = 1e6 MACs * 2 * 2
    assert total == ["total", "", "", "1.0M", "1.0M", "", "", "4.0M", "254.0 KB", "25.0%"]
    row = next(line for line in text.splitlines() if line.startswith("│ 0 "))
    assert "│      2 │      2 │" in row


def test_print_summary_to_file_is_not_squeezed(lenet5_stats: ModelStats) -> None:
    buf = io.StringIO()
    print_summary(lenet5_stats, title="lenet5", file=buf)
    out = buf.getvalue()
    assert "1x20x24x24" in out and "431.1K" in out
    assert max(len(line) for line in out.splitlines()) <= 160
    total_line = next(line for line in out.splitlines() if "total" in line)
    assert "1.7 MB" in total_line  # one row, not wrapped over several lines


def test_print_summary_defaults_to_stdout(lenet5_stats: ModelStats, capsys: pytest.CaptureFixture[str]) -> None:
    print_summary(lenet5_stats)
    assert "431.1K" in capsys.readouterr().out


def test_json_round_trip(lenet5_stats: ModelStats) -> None:
    data = json.loads(summary_json(lenet5_stats))
    assert data["input_shape"] == [1, 28, 28]
    assert data["totals"]["params"] == 431_080
    assert data["totals"]["macs"] == 2_293_000
    assert data["totals"]["bops"] == 2_293_000 * 32 * 32
    assert data["totals"]["storage_bytes"] == data["totals"]["float32_bytes"] == 4 * 431_080
    assert [layer["name"] for layer in data["layers"]] == ["conv1", "conv2", "fc1", "fc2"]
    assert data["layers"][0]["output_shape"] == [1, 20, 24, 24] and data["layers"][0]["macs"] == 288_000
    assert sum(layer["params"] for layer in data["layers"]) == data["totals"]["params"]
