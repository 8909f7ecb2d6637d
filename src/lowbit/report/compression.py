"""The Deep Compression report: the paper's per-layer table (Tables 2-3) with totals and accuracy."""

from __future__ import annotations

from typing import Any

__all__ = ["compression_report"]


def _kb(n: float) -> str:
    return f"{n / 1000:.1f} KB"


def compression_report(
    title: str, model: str, dataset: str, codec: dict[str, Any], acc_before: float | None, acc_after: float,
    plot: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """Markdown text and a summary dict from a codec report (``CodecReport.to_dict()``).

    Sizes are those of the real file (header and checksum included); the dense size is float32.
    Accuracies are percentages on the test set; errors are 100 - accuracy.
    """
    rows = codec["tensors"]
    tot = codec["totals"]
    lines = [
        f"# {title}: {model} on {dataset}",
        "",
        "| layer | weights | kept | weight bits P+Q -> +H | index bits P+Q -> +H | fillers | bytes |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["kind"] != "sparse":
            continue
        kept = f"{100 * r['kept'] / max(1, r['numel']):.1f}%"
        wh = r["weight_bits_huffman"]
        ih = r["index_bits_huffman"]
        wb = f"{r['weight_bits']} -> {wh:.2f}" if wh is not None else f"{r['weight_bits']}"
        ib = f"{r['index_bits']} -> {ih:.2f}" if ih is not None else f"{r['index_bits']}"
        lines.append(f"| {r['name']} | {r['numel']:,} | {kept} | {wb} | {ib} | {r['fillers']} | {r['total_bytes']:,} |")
    raw = [r for r in rows if r["kind"] != "sparse"]
    if raw:  # biases, batch-norm parameters and statistics, ...: one row (each is in the JSON)
        bits = sorted({r["weight_bits"] for r in raw})
        lines.append(f"| other tensors ({len(raw)}, stored raw) | {sum(r['numel'] for r in raw):,} | raw | "
                     f"{'/'.join(map(str, bits))} (raw) | - | - | {sum(r['total_bytes'] for r in raw):,} |")
    kept_pct = 100 * tot["kept"] / max(1, tot["numel"])
    lines.append(f"| **total** | {tot['numel']:,} | {kept_pct:.1f}% | | | | {tot['records_bytes']:,} |")
    summary: dict[str, Any] = {
        "dense_bytes": tot["dense_bytes"], "file_bytes": tot["file_bytes"], "ratio": tot["ratio"],
        "ratio_pq": tot["ratio_pq"], "kept_pct": kept_pct, "test_acc_after": acc_after,
    }
    lines += [
        "",
        f"- size: {_kb(tot['dense_bytes'])} (float32) -> {_kb(tot['file_bytes'])} in the .lbz file "
        f"(header and checksum included): **{tot['ratio']:.1f}x** "
        f"({100 / tot['ratio']:.2f}% of the original); before Huffman coding {tot['ratio_pq']:.1f}x",
    ]
    if acc_before is not None:
        summary.update(test_acc_before=acc_before, error_delta_points=acc_before - acc_after)
        lines.append(f"- test error: {100 - acc_before:.2f}% -> **{100 - acc_after:.2f}%** "
                     f"({acc_after - acc_before:+.2f} points of accuracy)")
    else:
        lines.append(f"- test error after: {100 - acc_after:.2f}%")
    lines.append("- the decoded model equals the compressed model bit-exactly (verified on load)")
    if plot:
        lines += ["", f"![weight distributions]({plot})"]
    return "\n".join(lines) + "\n", summary
