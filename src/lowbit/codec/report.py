"""What a ``.lbz`` file costs, tensor by tensor: the table of Deep Compression's Tables 2-5.

Columns, as in the paper: weights, % kept, weight bits after pruning + quantization (P+Q, the fixed width)
and after Huffman coding (+H), index bits P+Q -> +H, and the bytes. Huffman averages are per *entry* of a
stream (kept weights plus filler entries), the same unit as the fixed widths, so the two columns compare
directly; fillers are counted in their own column. ``pq_bytes`` is the size the record would have with
fixed-width codes and indices (plus its codebook), ``total_bytes`` the size it has in the file (codebook,
Huffman code-length tables and both coded streams). The file also holds a JSON header and a checksum; the
totals count them (``file_bytes``), so the compression ratio is the file's real size.

References:
    Han, Mao, Dally, "Deep Compression: Compressing Deep Neural Networks with Pruning, Trained
    Quantization and Huffman Coding", arXiv:1510.00149 (Tables 2-5).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["TensorReport", "CodecReport"]


@dataclass(frozen=True)
class TensorReport:
    """One tensor's row. ``kind`` is ``"sparse"`` (pruned + shared weights) or ``"raw"`` (stored as is)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    numel: int
    kept: int  # stored weights (sparse: positions; raw: every element)
    entries: int  # kept + filler entries (raw: numel)
    weight_bits: int  # fixed-width bits per weight, P+Q (raw: bits of the dtype)
    index_bits: int  # fixed-width bits per relative index, P+Q (raw: 0)
    weight_bits_huffman: float | None  # mean Huffman bits per entry of the cluster-index stream (raw: None)
    index_bits_huffman: float | None  # mean Huffman bits per entry of the relative-index stream (raw: None)
    codebook_bytes: int  # the shared float32 values
    table_bytes: int  # the two Huffman code-length tables
    pq_bytes: int  # with fixed-width codes and indices, codebook included
    total_bytes: int  # this tensor's record as written in the file
    dense_bytes: int  # the tensor stored densely (sparse: float32)

    @property
    def fillers(self) -> int:
        return self.entries - self.kept

    @property
    def kept_pct(self) -> float:
        return 100.0 * self.kept / self.numel if self.numel else 0.0


def _count(n: float) -> str:
    for unit, scale in (("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


@dataclass(frozen=True)
class CodecReport:
    """Per-tensor rows and totals of one ``.lbz`` file; ``str(report)`` prints the paper-style table."""

    tensors: tuple[TensorReport, ...]
    file_bytes: int  # the whole file: preamble, JSON header, records, checksum

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def kept(self) -> int:
        return sum(t.kept for t in self.tensors)

    @property
    def dense_bytes(self) -> int:
        return sum(t.dense_bytes for t in self.tensors)

    @property
    def pq_bytes(self) -> int:
        return sum(t.pq_bytes for t in self.tensors)

    @property
    def records_bytes(self) -> int:
        return sum(t.total_bytes for t in self.tensors)

    @property
    def overhead_bytes(self) -> int:
        """Preamble, JSON header and checksum."""
        return self.file_bytes - self.records_bytes

    @property
    def ratio(self) -> float:
        """Dense size over the file's size (the paper's compression rate)."""
        return self.dense_bytes / self.file_bytes if self.file_bytes else 0.0

    @property
    def ratio_pq(self) -> float:
        """Dense size over the fixed-width (P+Q) size of the records, before Huffman coding."""
        return self.dense_bytes / self.pq_bytes if self.pq_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        rows = [{**asdict(t), "shape": list(t.shape), "fillers": t.fillers} for t in self.tensors]
        totals = {
            "numel": self.numel, "kept": self.kept, "dense_bytes": self.dense_bytes, "pq_bytes": self.pq_bytes,
            "records_bytes": self.records_bytes, "file_bytes": self.file_bytes, "ratio": self.ratio,
            "ratio_pq": self.ratio_pq,
        }
        return {"tensors": rows, "totals": totals}

    def table(self) -> str:
        """The paper-style table: one row per pruned + shared tensor, one row for all tensors stored raw."""
        head = ("tensor", "weights", "kept", "fillers", "weight bits P+Q -> +H", "index bits P+Q -> +H",
                "bytes P+Q", "bytes +H")
        rows = []
        for t in self.tensors:
            if t.kind != "sparse":
                continue
            wb = f"{t.weight_bits} -> {t.weight_bits_huffman:.2f}" if t.entries else f"{t.weight_bits} -> -"
            ib = f"{t.index_bits} -> {t.index_bits_huffman:.2f}" if t.entries else f"{t.index_bits} -> -"
            rows.append((t.name, _count(t.numel), f"{t.kept_pct:.1f}%", str(t.fillers), wb, ib, str(t.pq_bytes),
                         str(t.total_bytes)))
        raw = [t for t in self.tensors if t.kind != "sparse"]
        if raw:  # biases, batch-norm parameters and statistics, ...: one row (each is in to_dict())
            bits = "/".join(str(b) for b in sorted({t.weight_bits for t in raw}))
            nbytes = str(sum(t.total_bytes for t in raw))
            rows.append((f"other tensors ({len(raw)}, raw)", _count(sum(t.numel for t in raw)), "100.0%", "-",
                         f"{bits} (raw)", "-", nbytes, nbytes))
        kept = f"{100.0 * self.kept / self.numel:.1f}%" if self.numel else "-"
        rows.append(("total", _count(self.numel), kept, "", "", "", str(self.pq_bytes), str(self.records_bytes)))
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                 for r in [head, *rows]]
        if self.dense_bytes and self.pq_bytes:
            lines.append(
                f"file: {self.file_bytes} bytes ({self.overhead_bytes} of header and checksum) = "
                f"{100.0 / self.ratio:.2f}% of the dense {self.dense_bytes} bytes ({self.ratio:.1f}x); "
                f"P+Q records alone: {100.0 / self.ratio_pq:.2f}% ({self.ratio_pq:.1f}x)"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
