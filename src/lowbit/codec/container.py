"""The ``.lbz`` container: pruned, weight-shared tensors in Deep Compression's sparse + Huffman format.

A :class:`CompressedTensor` is the output of pruning and trained quantization: the flat positions of the
kept weights, each weight's cluster index (code) and the shared float32 values (codebook). Its dense value is

    dense = zeros(shape); dense.flat[positions] = codebook[codes]

``save`` stores it as two canonical-Huffman-coded streams: the cluster indices (with the reserved code
``k = len(codebook)`` for the sparse format's filler entries) and the relative indices (``lowbit.codec.sparse``).
Other tensors (biases, norms) are stored raw. ``load`` rebuilds every tensor bit-exactly.

Byte layout (integers little-endian):

    offset   size  field
    0        4     magic b"LBZ\\x00"
    4        2     format version, uint16 (this lowbit writes and reads 1)
    6        4     header length H, uint32, at most 16 MiB
    10       H     header: UTF-8 JSON {"format": "lowbit-lbz", "meta": {...}, "tensors": [record spec, ...]}
    10+H     ...   records, back to back in the order of "tensors"; sizes follow from the specs
    end-32   32    SHA-256 of every byte before it

    sparse record spec: {"name", "kind": "sparse", "shape", "weight_bits", "index_bits", "codebook_size": k,
                         "kept", "entries", "code_symbols", "code_bits", "gap_symbols", "gap_bits"}
    sparse record:      codebook         k float32
                        code lengths     code_symbols uint8  (canonical Huffman code of the cluster indices)
                        code stream      ceil(code_bits / 8) bytes, ``entries`` symbols, fillers = code k
                        gap lengths      gap_symbols uint8   (canonical Huffman code of the relative indices)
                        gap stream       ceil(gap_bits / 8) bytes, ``entries`` symbols
    raw record spec:    {"name", "kind": "raw", "shape", "dtype"}   dtype from ``RAW_DTYPES``
    raw record:         numel * itemsize bytes, C order (bfloat16 as its 16 bits, bool as bytes 0/1)

Reading is defensive: the version is checked first (a newer file says so), then the checksum, then every
field of the header (types, ranges, limits below) and the sum of the record sizes against the bytes really
present, all before any array is allocated; a stream may not decode to more symbols than it has bits, a
position must fall inside its tensor, and the total dense size is capped (``max_numel``). No pickle, no eval.
Every failure raises :class:`CodecError` with what was wrong and what is allowed.

Example:
    >>> ct = CompressedTensor((2, 3), positions=np.array([0, 5]), codes=np.array([1, 0]),
    ...                       codebook=np.array([-0.5, 0.25], dtype=np.float32), index_bits=2, weight_bits=1)
    >>> report = save(tmp / "m.lbz", {"w": ct, "b": torch.ones(2)}, meta={"model": "toy"})
    >>> tensors, meta = load(tmp / "m.lbz")
    >>> tensors["w"].tolist(), meta
    ([[0.25, 0.0, 0.0], [0.0, 0.0, -0.5]], {'model': 'toy'})

References:
    Han, Mao, Dally, "Deep Compression: Compressing Deep Neural Networks with Pruning, Trained
    Quantization and Huffman Coding", arXiv:1510.00149 (Sections 2 and 4, Figure 3).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.codec._errors import CodecError
from lowbit.codec.huffman import HuffmanCode
from lowbit.codec.report import CodecReport, TensorReport
from lowbit.codec.sparse import MAX_INDEX_BITS, decode_positions, encode_positions

__all__ = [
    "MAGIC", "VERSION", "RAW_DTYPES", "MAX_NUMEL", "CompressedTensor", "save", "load", "read_report",
]

MAGIC = b"LBZ\x00"
VERSION = 1
FORMAT = "lowbit-lbz"
MAX_HEADER_BYTES = 16 << 20
MAX_FILE_BYTES = 8 << 30  # as for checkpoints
MAX_NUMEL = 1 << 31  # per tensor, and the default cap on all dense tensors of one file together
MAX_NDIM = 32
MAX_WEIGHT_BITS = 16  # codebooks of at most 2**16 values
MAX_NAME_CHARS = 1024
_PREAMBLE = struct.Struct("<4sHI")  # magic, version, header length
_DIGEST_BYTES = 32

# name in the file -> (torch dtype, dtype of the bytes on disk)
RAW_DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float32": (torch.float32, "<f4"), "float64": (torch.float64, "<f8"), "float16": (torch.float16, "<f2"),
    "bfloat16": (torch.bfloat16, "<i2"), "int8": (torch.int8, "i1"), "uint8": (torch.uint8, "u1"),
    "int16": (torch.int16, "<i2"), "int32": (torch.int32, "<i4"), "int64": (torch.int64, "<i8"),
    "bool": (torch.bool, "u1"),
}
_TORCH_NAMES = {dt: name for name, (dt, _) in RAW_DTYPES.items()}
_SPARSE_KEYS = {"name", "kind", "shape", "weight_bits", "index_bits", "codebook_size", "kept", "entries",
                "code_symbols", "code_bits", "gap_symbols", "gap_bits"}
_RAW_KEYS = {"name", "kind", "shape", "dtype"}


def _numpy(x: Any, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:
        raise CodecError(f"{what} must be an array, got {type(x).__name__}") from e


def _check_shape(shape: Any, where: str) -> tuple[tuple[int, ...], int]:
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM:
        raise CodecError(f"{where}: shape must be a list of at most {MAX_NDIM} ints, got {shape!r:.80}")
    numel = 1
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s <= MAX_NUMEL:
            raise CodecError(f"{where}: shape entries must be ints in 0..{MAX_NUMEL}, got {s!r:.40}")
        numel *= int(s)
    if numel > MAX_NUMEL:
        raise CodecError(f"{where}: shape {list(shape)} has {numel} elements; at most {MAX_NUMEL} are allowed")
    return tuple(int(s) for s in shape), numel


def _check_bits(value: Any, what: str, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= hi:
        raise CodecError(f"{what} must be an int in 1..{hi}, got {value!r:.40}")
    return int(value)


@dataclass
class CompressedTensor:
    """A pruned tensor with shared weights: ``dense.flat[positions] = codebook[codes]``, zero elsewhere.

    Args:
        shape: the dense shape (at most ``2**31`` elements).
        positions: sorted, unique flat indices of the kept weights (stored as int64).
        codes: per kept weight, its cluster index in ``[0, len(codebook))`` (stored as uint32).
        codebook: the ``k`` shared values, float32, ``1 <= k <= 2**weight_bits``.
        index_bits: bits per relative index in the sparse format, 1..16 (the paper: 8 conv, 5 fc).
        weight_bits: bits per cluster index before Huffman coding, 1..16 (the paper: 8 conv, 5 fc).

    Example:
        >>> ct = CompressedTensor.from_dense(torch.tensor([0.0, 0.5, 0.0, -0.5]), [-0.5, 0.5], index_bits=2)
        >>> ct.positions.tolist(), ct.codes.tolist(), ct.weight_bits
        ([1, 3], [1, 0], 1)
    """

    shape: tuple[int, ...]
    positions: np.ndarray
    codes: np.ndarray
    codebook: np.ndarray
    index_bits: int
    weight_bits: int

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Normalize the fields' types and check every invariant; :class:`CodecError` says what is wrong."""
        self.shape, numel = _check_shape(self.shape, "CompressedTensor")
        self.index_bits = _check_bits(self.index_bits, "index_bits", MAX_INDEX_BITS)
        self.weight_bits = _check_bits(self.weight_bits, "weight_bits", MAX_WEIGHT_BITS)
        cb = _numpy(self.codebook, "codebook")
        if cb.ndim != 1 or not 1 <= cb.size <= 1 << self.weight_bits:
            raise CodecError(f"codebook must be 1-D with 1..2**weight_bits = {1 << self.weight_bits} values, "
                             f"got shape {cb.shape}")
        if not (np.issubdtype(cb.dtype, np.floating) or np.issubdtype(cb.dtype, np.integer)):
            raise CodecError(f"codebook must hold numbers, got dtype {cb.dtype}")
        self.codebook = np.ascontiguousarray(cb, dtype=np.float32)
        pos = _numpy(self.positions, "positions")
        codes = _numpy(self.codes, "codes")
        for what, a in (("positions", pos), ("codes", codes)):
            if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
                raise CodecError(f"{what} must be a 1-D integer array, got shape {a.shape} dtype {a.dtype}")
        if pos.size != codes.size:
            raise CodecError(f"{pos.size} positions but {codes.size} codes; one code per kept weight")
        pos = pos.astype(np.int64, copy=False)
        codes = codes.astype(np.int64, copy=False)
        if pos.size:
            if pos[0] < 0 or pos[-1] >= numel or (pos.size > 1 and np.diff(pos).min() <= 0):
                raise CodecError(f"positions must be strictly increasing flat indices in 0..{numel - 1} "
                                 f"(shape {list(self.shape)})")
            if codes.min() < 0 or codes.max() >= cb.size:
                raise CodecError(f"codes must be in 0..{cb.size - 1} (codebook of {cb.size}), "
                                 f"got {codes.min()}..{codes.max()}")
        self.positions = np.ascontiguousarray(pos)
        self.codes = codes.astype(np.uint32)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def kept(self) -> int:
        return int(self.positions.size)

    def to_dense(self) -> torch.Tensor:
        """The float32 dense tensor (the reference that :func:`load` must reproduce bit-exactly)."""
        flat = np.zeros(self.numel, dtype=np.float32)
        flat[self.positions] = self.codebook[self.codes]
        return torch.from_numpy(flat).reshape(self.shape)

    @classmethod
    def from_dense(
        cls, weight: torch.Tensor | np.ndarray, codebook: Any, index_bits: int, weight_bits: int | None = None
    ) -> CompressedTensor:
        """Keep the nonzero elements of ``weight``, each coded by its nearest codebook value.

        Exact (``to_dense()`` equals ``weight``) when every nonzero weight is a codebook value, as after
        weight sharing. ``weight_bits`` defaults to ``ceil(log2(len(codebook)))`` (at least 1).
        """
        w = _numpy(weight, "weight")
        cb = np.asarray(_numpy(codebook, "codebook"), dtype=np.float32).reshape(-1)
        if cb.size == 0:
            raise CodecError("codebook must not be empty")
        flat = w.reshape(-1)
        positions = np.flatnonzero(flat)
        if cb.size == 1:
            codes = np.zeros(positions.size, dtype=np.int64)
        else:  # nearest value: compare the neighbours on both sides in the sorted codebook
            order = np.argsort(cb, kind="stable")
            sorted_cb = cb[order].astype(np.float64)
            values = flat[positions].astype(np.float64)
            hi = np.clip(np.searchsorted(sorted_cb, values), 1, cb.size - 1)
            lo = hi - 1
            codes = order[np.where(np.abs(sorted_cb[hi] - values) < np.abs(sorted_cb[lo] - values), hi, lo)]
        bits = weight_bits if weight_bits is not None else max(1, (cb.size - 1).bit_length())
        return cls(tuple(w.shape), positions, codes, cb, index_bits, bits)


# ----------------------------------------------------------------------------------------------- writing


def _encode_sparse(name: str, ct: CompressedTensor) -> tuple[dict[str, Any], list[bytes]]:
    ct.validate()  # the fields may have been changed since construction
    gaps, is_filler = encode_positions(ct.positions, ct.index_bits)
    k = ct.codebook.size
    codes = np.full(gaps.size, k, dtype=np.uint32)  # fillers carry the reserved code k (value 0)
    codes[~is_filler] = ct.codes
    code_huff = HuffmanCode.from_symbols(codes)
    gap_huff = HuffmanCode.from_symbols(gaps)
    code_data, code_bits = code_huff.encode(codes)
    gap_data, gap_bits = gap_huff.encode(gaps)
    spec = {
        "name": name, "kind": "sparse", "shape": list(ct.shape), "weight_bits": ct.weight_bits,
        "index_bits": ct.index_bits, "codebook_size": k, "kept": ct.kept, "entries": int(gaps.size),
        "code_symbols": code_huff.alphabet_size, "code_bits": code_bits,
        "gap_symbols": gap_huff.alphabet_size, "gap_bits": gap_bits,
    }
    sections = [ct.codebook.astype("<f4").tobytes(), code_huff.lengths.tobytes(), code_data,
                gap_huff.lengths.tobytes(), gap_data]
    return spec, sections


def _encode_raw(name: str, value: torch.Tensor | np.ndarray) -> tuple[dict[str, Any], list[bytes]]:
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise CodecError(f"{name}: only dense (strided) tensors can be stored raw, got {value.layout}")
        dtype = _TORCH_NAMES.get(value.dtype)
        t = value.detach().cpu().contiguous()
        if dtype == "bfloat16":
            t = t.view(torch.int16)
        arr = t.numpy() if dtype else None
    else:
        dtype = value.dtype.name if value.dtype.name in RAW_DTYPES and value.dtype.name != "bfloat16" else None
        arr = value
    if dtype is None:
        raise CodecError(f"{name}: dtype {value.dtype} cannot be stored; allowed: {', '.join(RAW_DTYPES)}")
    _, numel = _check_shape(list(arr.shape), name)
    data = np.ascontiguousarray(arr).astype(RAW_DTYPES[dtype][1], copy=False).tobytes()
    return {"name": name, "kind": "raw", "shape": list(arr.shape), "dtype": dtype}, [data]


def save(
    path: str | os.PathLike[str],
    tensors: Mapping[str, CompressedTensor | torch.Tensor | np.ndarray],
    meta: dict[str, Any] | None = None,
) -> CodecReport:
    """Write ``tensors`` and the JSON-serializable ``meta`` to a ``.lbz`` file, atomically.

    The file is written under a temporary name in the same directory, flushed to disk and renamed, so a
    crash leaves the old file or the new one, never half of one. Returns the per-tensor size report.
    """
    path = Path(path)
    if not isinstance(tensors, Mapping):
        raise CodecError(f"tensors must be a mapping of name -> tensor, got {type(tensors).__name__}")
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise CodecError(f"meta must be a dict, got {type(meta).__name__}")
    specs, sections = [], []
    for name, value in tensors.items():
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_CHARS:
            raise CodecError(f"tensor names must be strings of 1..{MAX_NAME_CHARS} characters, got {name!r:.80}")
        if isinstance(value, CompressedTensor):
            spec, secs = _encode_sparse(name, value)
        elif isinstance(value, (torch.Tensor, np.ndarray)):
            spec, secs = _encode_raw(name, value)
        else:
            raise CodecError(f"{name}: expected a CompressedTensor, torch.Tensor or numpy array, "
                             f"got {type(value).__name__}")
        specs.append(spec)
        sections.extend(secs)
    try:
        header = json.dumps({"format": FORMAT, "meta": meta, "tensors": specs}, allow_nan=False,
                            ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise CodecError(f"meta must be JSON-serializable (dicts, lists, str, finite numbers, bool, None): {e}") from e
    if len(header) > MAX_HEADER_BYTES:
        raise CodecError(f"header of {len(header)} bytes is larger than the {MAX_HEADER_BYTES} allowed (meta too big?)")
    parts = [_PREAMBLE.pack(MAGIC, VERSION, len(header)), header, *sections]
    file_bytes = sum(len(p) for p in parts) + _DIGEST_BYTES
    if file_bytes > MAX_FILE_BYTES:
        raise CodecError(f"{file_bytes} bytes is larger than the {MAX_FILE_BYTES} a .lbz file may have")
    digest = hashlib.sha256()
    for p in parts:
        digest.update(p)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for p in parts:
                f.write(p)
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return _report([_Spec.parse(i, s, file_bytes) for i, s in enumerate(specs)], file_bytes)


# ----------------------------------------------------------------------------------------------- reading


def _int(d: dict[str, Any], key: str, lo: int, hi: int, where: str) -> int:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise CodecError(f"{where}: {key!r} must be an int in {lo}..{hi}, got {v!r:.40}")
    return v


@dataclass(frozen=True)
class _Spec:
    """A record spec from the header, every field checked; ``nbytes`` is the record's size in the file."""

    name: str
    kind: str
    shape: tuple[int, ...]
    numel: int
    nbytes: int
    dtype: str = "float32"
    weight_bits: int = 0
    index_bits: int = 0
    k: int = 0
    kept: int = 0
    entries: int = 0
    code_symbols: int = 0
    code_bits: int = 0
    gap_symbols: int = 0
    gap_bits: int = 0

    @property
    def sections(self) -> list[int]:
        if self.kind == "raw":
            return [self.nbytes]
        return [4 * self.k, self.code_symbols, (self.code_bits + 7) >> 3, self.gap_symbols, (self.gap_bits + 7) >> 3]

    @staticmethod
    def parse(i: int, d: Any, file_bytes: int) -> _Spec:
        where = f"tensor #{i}"
        if not isinstance(d, dict):
            raise CodecError(f"{where}: record spec must be a JSON object, got {type(d).__name__}")
        name = d.get("name")
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_CHARS:
            raise CodecError(f"{where}: 'name' must be a string of 1..{MAX_NAME_CHARS} characters")
        where = f"tensor #{i} {name!r:.80}"
        kind = d.get("kind")
        keys = {"sparse": _SPARSE_KEYS, "raw": _RAW_KEYS}.get(kind) if isinstance(kind, str) else None
        if keys is None:
            raise CodecError(f"{where}: 'kind' must be 'sparse' or 'raw', got {kind!r:.40}")
        if set(d) != keys:
            missing, extra = sorted(keys - set(d)), sorted(set(d) - keys)
            raise CodecError(f"{where}: {kind} record spec has missing keys {missing} / unknown keys {extra}")
        shape, numel = _check_shape(d["shape"], where)
        if kind == "raw":
            dtype = d["dtype"]
            if not isinstance(dtype, str) or dtype not in RAW_DTYPES:
                raise CodecError(f"{where}: dtype {dtype!r:.40} is not one of {', '.join(RAW_DTYPES)}")
            itemsize = np.dtype(RAW_DTYPES[dtype][1]).itemsize
            return _Spec(name, kind, shape, numel, numel * itemsize, dtype=dtype)
        max_bits = 8 * file_bytes  # no stream can hold more bits than the file has
        wb = _int(d, "weight_bits", 1, MAX_WEIGHT_BITS, where)
        ib = _int(d, "index_bits", 1, MAX_INDEX_BITS, where)
        k = _int(d, "codebook_size", 1, 1 << wb, where)
        kept = _int(d, "kept", 0, numel, where)
        code_bits = _int(d, "code_bits", 0, max_bits, where)
        gap_bits = _int(d, "gap_bits", 0, max_bits, where)
        # every symbol takes at least one bit, so ``entries`` is bounded by the bits present
        entries = _int(d, "entries", kept, min(code_bits, gap_bits), where)
        code_symbols = _int(d, "code_symbols", 0, k + 1, where)
        gap_symbols = _int(d, "gap_symbols", 0, 1 << ib, where)
        if (entries == 0) != (kept == 0) or (entries == 0 and code_bits + gap_bits + code_symbols + gap_symbols):
            raise CodecError(f"{where}: inconsistent counts (kept {kept}, entries {entries}, bits "
                             f"{code_bits}/{gap_bits}, symbols {code_symbols}/{gap_symbols})")
        spec = _Spec(name, kind, shape, numel, 0, weight_bits=wb, index_bits=ib, k=k, kept=kept, entries=entries,
                     code_symbols=code_symbols, code_bits=code_bits, gap_symbols=gap_symbols, gap_bits=gap_bits)
        return replace(spec, nbytes=sum(spec.sections))


def _read(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[_Spec], memoryview, int]:
    """Verify the file and parse its header; returns (meta, specs, body, file size). Allocates no arrays."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise CodecError(f"{path}: {size} bytes is larger than the {MAX_FILE_BYTES} a .lbz file may have")
            blob = f.read(size + 1)
    except OSError as e:
        raise CodecError(f"{path}: cannot read the file ({e.strerror or e})") from e
    size = len(blob)
    if size < 4 or blob[:4] != MAGIC:
        raise CodecError(f"{path}: not an .lbz file (starts with {bytes(blob[:4])!r}, expected {MAGIC!r})")
    if size < _PREAMBLE.size + _DIGEST_BYTES:
        raise CodecError(f"{path}: truncated ({size} bytes; an .lbz file has at least "
                         f"{_PREAMBLE.size + _DIGEST_BYTES})")
    _, version, header_len = _PREAMBLE.unpack_from(blob)
    if version > VERSION:
        raise CodecError(f"{path}: written by a newer lowbit (.lbz format version {version}); this lowbit reads "
                         f"versions 1..{VERSION}. Upgrade lowbit to read it.")
    if version < 1:
        raise CodecError(f"{path}: invalid .lbz format version {version} (versions start at 1)")
    if hashlib.sha256(memoryview(blob)[:-_DIGEST_BYTES]).digest() != blob[-_DIGEST_BYTES:]:
        raise CodecError(f"{path}: SHA-256 checksum mismatch; the file is corrupt or truncated")
    available = size - _PREAMBLE.size - _DIGEST_BYTES
    if header_len > min(MAX_HEADER_BYTES, available):
        raise CodecError(f"{path}: header length {header_len} exceeds the {min(MAX_HEADER_BYTES, available)} "
                         f"bytes allowed here")
    view = memoryview(blob)
    header = _parse_json(bytes(view[_PREAMBLE.size: _PREAMBLE.size + header_len]), path)
    if not isinstance(header, dict) or set(header) != {"format", "meta", "tensors"}:
        raise CodecError(f"{path}: header must be a JSON object with keys 'format', 'meta', 'tensors'")
    if header["format"] != FORMAT:
        raise CodecError(f"{path}: header format {header['format']!r:.40}, expected {FORMAT!r}")
    if not isinstance(header["meta"], dict) or not isinstance(header["tensors"], list):
        raise CodecError(f"{path}: header 'meta' must be an object and 'tensors' a list")
    specs = [_Spec.parse(i, d, size) for i, d in enumerate(header["tensors"])]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise CodecError(f"{path}: duplicate tensor names in the header")
    body = view[_PREAMBLE.size + header_len: size - _DIGEST_BYTES]
    need = sum(s.nbytes for s in specs)
    if need != len(body):
        raise CodecError(f"{path}: the header describes {need} bytes of records but the file holds {len(body)}")
    return header["meta"], specs, body, size


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON here")


def _parse_json(raw: bytes, path: Path) -> Any:
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CodecError(f"{path}: header is not valid UTF-8 JSON ({type(e).__name__}: {str(e):.200})") from e


def _decode_sparse(spec: _Spec, record: memoryview, path: Path) -> torch.Tensor:
    where = f"{path}: tensor {spec.name!r:.80}"
    sizes = spec.sections
    cuts = np.cumsum([0, *sizes]).tolist()
    sec = [record[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    codebook = np.frombuffer(sec[0], dtype="<f4").astype(np.float32)
    try:
        code_huff = HuffmanCode(np.frombuffer(sec[1], dtype=np.uint8))
        gap_huff = HuffmanCode(np.frombuffer(sec[3], dtype=np.uint8))
        codes = code_huff.decode(sec[2], spec.entries, spec.code_bits)
        gaps = gap_huff.decode(sec[4], spec.entries, spec.gap_bits)
        # symbols are < code_symbols <= k + 1 and < gap_symbols <= 2**index_bits by the spec checks
        is_filler = codes == spec.k
        if spec.entries - int(is_filler.sum()) != spec.kept:
            raise CodecError(f"{spec.entries - int(is_filler.sum())} kept weights decoded, header says {spec.kept}")
        positions = decode_positions(gaps, is_filler, spec.index_bits)
    except CodecError as e:
        raise CodecError(f"{where}: {e}") from e
    if positions.size and positions[-1] >= spec.numel:
        raise CodecError(f"{where}: position {int(positions[-1])} is outside the tensor of {spec.numel} elements")
    flat = _zeros(spec.numel, np.float32, where)
    flat[positions] = codebook[codes[~is_filler]]
    return torch.from_numpy(flat).reshape(spec.shape)


def _zeros(n: int, dtype: Any, where: str) -> np.ndarray:
    try:
        return np.zeros(n, dtype=dtype)
    except MemoryError as e:
        raise CodecError(f"{where}: not enough memory for {n} elements") from e


def _decode_raw(spec: _Spec, record: memoryview, path: Path) -> torch.Tensor:
    torch_dtype, disk = RAW_DTYPES[spec.dtype]
    arr = np.frombuffer(record, dtype=disk).astype(np.dtype(disk).newbyteorder("="))
    if spec.dtype == "bool":
        if arr.size and arr.max() > 1:
            raise CodecError(f"{path}: tensor {spec.name!r:.80}: bool data must be bytes 0 or 1")
        arr = arr.astype(bool)
    t = torch.from_numpy(arr)
    if spec.dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.reshape(spec.shape)


def load(path: str | os.PathLike[str], *, max_numel: int = MAX_NUMEL) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a ``.lbz`` file: every tensor dense (sparse ones as float32) and the ``meta`` dict.

    Args:
        path: the file.
        max_numel: refuse files whose tensors have more elements than this in total (the dense output of
            a sparse tensor is not bounded by the file's size; this bounds the memory ``load`` allocates).
    """
    path = Path(path)
    meta, specs, body, _ = _read(path)
    total = sum(s.numel for s in specs)
    if total > max_numel:
        raise CodecError(f"{path}: the tensors have {total} elements in total; this load allows {max_numel} "
                         f"(raise max_numel if the file is trusted)")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for spec in specs:
        record = body[offset: offset + spec.nbytes]
        offset += spec.nbytes
        decode = _decode_sparse if spec.kind == "sparse" else _decode_raw
        out[spec.name] = decode(spec, record, path)
    return out, meta


def read_report(path: str | os.PathLike[str]) -> CodecReport:
    """The size report of a ``.lbz`` file, from its verified header alone (nothing is decoded)."""
    _, specs, _, size = _read(path)
    return _report(specs, size)


def _report(specs: list[_Spec], file_bytes: int) -> CodecReport:
    rows = []
    for s in specs:
        if s.kind == "raw":
            bits = 8 * np.dtype(RAW_DTYPES[s.dtype][1]).itemsize
            rows.append(TensorReport(
                s.name, s.kind, s.shape, s.numel, s.numel, s.numel, bits, 0, None, None, 0, 0, s.nbytes, s.nbytes,
                s.nbytes))
            continue
        fillers = s.entries - s.kept
        code_width = max(s.weight_bits, (s.k - 1 + (fillers > 0)).bit_length())  # the filler code may need one more
        pq = 4 * s.k + (s.entries * (code_width + s.index_bits) + 7) // 8
        n = max(s.entries, 1)
        rows.append(TensorReport(
            s.name, s.kind, s.shape, s.numel, s.kept, s.entries, s.weight_bits, s.index_bits, s.code_bits / n,
            s.gap_bits / n, 4 * s.k, s.code_symbols + s.gap_symbols, pq, s.nbytes, 4 * s.numel))
    return CodecReport(tuple(rows), file_bytes)
