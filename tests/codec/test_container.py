import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from _lbz import seal, small_model, sparse, split, with_digest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.codec import RAW_DTYPES, CodecError, CompressedTensor, load, read_report, save
from lowbit.codec import container as lbz


def _expected(value: object) -> torch.Tensor:
    if isinstance(value, CompressedTensor):
        return value.to_dense()
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))


def test_round_trip_is_bit_exact_and_keeps_meta(tmp_path: Path) -> None:
    path = tmp_path / "m.lbz"
    tensors = small_model(path)
    out, meta = load(path)
    assert meta == {"model": "toy", "acc": 0.5}
    assert list(out) == list(tensors)
    for name, value in tensors.items():
        assert torch.equal(out[name], _expected(value)), name
    assert out["fc1.weight"].dtype == torch.float32 and out["fc1.weight"].shape == (30, 40)
    assert not [p for p in tmp_path.iterdir() if p.name != "m.lbz"]  # the temporary file was renamed away


def test_dense_value_is_codebook_at_positions(tmp_path: Path) -> None:
    ct = CompressedTensor((2, 3), np.array([0, 5]), np.array([1, 0]), np.array([-0.5, 0.25]), 2, 1)
    save(tmp_path / "m.lbz", {"w": ct})
    assert load(tmp_path / "m.lbz")[0]["w"].tolist() == [[0.25, 0.0, 0.0], [0.0, 0.0, -0.5]]


@pytest.mark.parametrize("dtype", list(RAW_DTYPES))
def test_raw_tensors_of_every_allowed_dtype(tmp_path: Path, dtype: str) -> None:
    torch_dtype = RAW_DTYPES[dtype][0]
    t = (torch.randn(3, 5) * 50).to(torch_dtype)
    scalar = torch.tensor(3).to(torch_dtype)
    empty = torch.zeros(0, 4, dtype=torch_dtype)
    save(tmp_path / "r.lbz", {"t": t, "scalar": scalar, "empty": empty, "strided": t.t()})
    out, _ = load(tmp_path / "r.lbz")
    for name, ref in {"t": t, "scalar": scalar, "empty": empty, "strided": t.t()}.items():
        assert out[name].dtype == torch_dtype and torch.equal(out[name], ref), name


def test_numpy_arrays_are_stored_raw(tmp_path: Path) -> None:
    a = np.arange(12, dtype=">i4").reshape(3, 4)  # big-endian input is written little-endian
    save(tmp_path / "n.lbz", {"a": a, "b": np.array([True, False])})
    out, _ = load(tmp_path / "n.lbz")
    assert out["a"].dtype == torch.int32 and out["a"].tolist() == a.tolist()
    assert out["b"].tolist() == [True, False]


@pytest.mark.parametrize(
    ("shape", "positions"),
    [((0,), []), ((4, 0), []), ((10,), []), ((3, 3), list(range(9))), ((5000,), [4999]), ((), [0])],
)
def test_sparse_edge_cases(tmp_path: Path, shape: tuple[int, ...], positions: list[int]) -> None:
    ct = CompressedTensor(shape, np.array(positions, dtype=np.int64), np.zeros(len(positions), dtype=np.int64),
                          np.array([1.5], dtype=np.float32), index_bits=2, weight_bits=1)
    report = save(tmp_path / "e.lbz", {"w": ct})
    assert torch.equal(load(tmp_path / "e.lbz")[0]["w"], ct.to_dense())
    assert report.tensors[0].kept == len(positions)


@settings(max_examples=3, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@pytest.mark.parametrize("weight_bits", range(1, 9))
@pytest.mark.parametrize("index_bits", range(2, 9))
@given(data=st.data())
def test_random_sparse_tensors_round_trip(
    tmp_path: Path, weight_bits: int, index_bits: int, data: st.DataObject
) -> None:
    shape = tuple(data.draw(st.lists(st.integers(0, 40), min_size=1, max_size=3), label="shape"))
    numel = int(np.prod(shape))
    density = data.draw(st.sampled_from([0.0, 0.002, 0.02, 0.2, 0.7, 1.0]), label="density")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    positions = np.flatnonzero(rng.random(numel) < density)
    k = data.draw(st.integers(1, 1 << weight_bits), label="k")
    codebook = rng.standard_normal(k).astype(np.float32)
    skew = data.draw(st.booleans(), label="skewed codes")
    codes = np.minimum(rng.geometric(0.4, positions.size) - 1, k - 1) if skew else rng.integers(0, k, positions.size)
    ct = CompressedTensor(shape, positions, codes, codebook, index_bits, weight_bits)
    path = tmp_path / f"h{weight_bits}_{index_bits}.lbz"
    report = save(path, {"w": ct, "b": torch.randn(3)}, meta={"seed": seed})
    out, meta = load(path)
    assert torch.equal(out["w"], ct.to_dense()) and meta == {"seed": seed}
    row = report.tensors[0]
    assert row.kept == positions.size and row.entries == row.kept + row.fillers
    if row.entries:  # Huffman never does worse than the fixed widths
        assert row.index_bits_huffman <= index_bits
        assert row.weight_bits_huffman <= max(weight_bits, (k - 1 + (row.fillers > 0)).bit_length())


def test_report_matches_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.lbz"
    tensors = {"w": sparse((200, 300), 0.05, weight_bits=6, index_bits=4), "b": torch.zeros(200)}
    report = save(path, tensors)
    assert report == read_report(path)
    assert report.file_bytes == path.stat().st_size
    assert report.records_bytes + report.overhead_bytes == report.file_bytes
    w, b = report.tensors
    assert (w.numel, w.kept, w.weight_bits, w.index_bits) == (60_000, tensors["w"].kept, 6, 4)
    assert w.fillers > 0 and w.kept_pct == pytest.approx(100 * w.kept / 60_000)
    assert w.codebook_bytes == 4 * tensors["w"].codebook.size and w.dense_bytes == 240_000
    assert (b.kind, b.total_bytes, b.weight_bits, b.weight_bits_huffman) == ("raw", 800, 32, None)
    assert report.ratio == pytest.approx(240_800 / report.file_bytes)
    text = str(report)
    assert "weight bits P+Q -> +H" in text and f"6 -> {w.weight_bits_huffman:.2f}" in text
    assert json.dumps(report.to_dict())  # serializable for bench results


def test_tables_fold_the_raw_tensors_into_one_row(tmp_path: Path) -> None:
    from lowbit.report.compression import compression_report

    tensors = {"conv.w": sparse((20, 30), 0.1, weight_bits=4, index_bits=4), "bn.weight": torch.ones(20),
               "bn.bias": torch.zeros(20), "bn.running_mean": torch.zeros(20), "bn.num_batches": torch.tensor(3)}
    report = save(tmp_path / "m.lbz", tensors)
    for text in (str(report), compression_report("t", "m", "d", report.to_dict(), None, 50.0)[0]):
        lines = text.splitlines()
        other = [ln for ln in lines if "other tensors (4" in ln]
        assert len(other) == 1 and not any("bn." in ln for ln in lines), text
        assert "32/64 (raw)" in other[0] and " 248" in other[0]
    assert len(report.to_dict()["tensors"]) == 5  # the JSON keeps every tensor


def test_from_dense_codes_each_weight_by_its_nearest_value() -> None:
    w = torch.tensor([[0.0, 0.9, -0.3], [0.0, 0.0, 0.26]])
    ct = CompressedTensor.from_dense(w, [1.0, -0.25, 0.25], index_bits=3)
    assert ct.positions.tolist() == [1, 2, 5] and ct.codes.tolist() == [0, 1, 2] and ct.weight_bits == 2
    exact = torch.where(w != 0, torch.tensor([0.25]), 0.0)
    assert torch.equal(CompressedTensor.from_dense(exact, [0.25], index_bits=3).to_dense(), exact)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"positions": [3, 1], "codes": [0, 0]}, "strictly increasing"),
        ({"positions": [0, 6], "codes": [0, 0]}, r"0\.\.5"),
        ({"positions": [0], "codes": [2]}, r"codes must be in 0\.\.1"),
        ({"positions": [0], "codes": [0, 1]}, "one code per kept weight"),
        ({"codebook": [1.0, 2.0, 3.0]}, "2\\*\\*weight_bits"),
        ({"index_bits": 17}, "1..16"),
        ({"weight_bits": 0}, "1..16"),
        ({"shape": (2**20, 2**12)}, "at most 2147483648"),
        ({"shape": (-1,)}, "shape entries"),
    ],
)
def test_invalid_compressed_tensors(kwargs: dict, match: str) -> None:
    args = {"shape": (2, 3), "positions": [0], "codes": [0], "codebook": [0.5, 1.0], "index_bits": 2, "weight_bits": 1}
    args.update(kwargs)
    with pytest.raises(CodecError, match=match):
        CompressedTensor(**args)


def test_invalid_save_inputs(tmp_path: Path) -> None:
    with pytest.raises(CodecError, match="cannot be stored"):
        save(tmp_path / "x.lbz", {"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(CodecError, match="cannot be stored"):
        save(tmp_path / "x.lbz", {"u": np.zeros(2, dtype=np.uint32)})
    with pytest.raises(CodecError, match="JSON-serializable"):
        save(tmp_path / "x.lbz", {}, meta={"f": float("nan")})
    with pytest.raises(CodecError, match="JSON-serializable"):
        save(tmp_path / "x.lbz", {}, meta={"o": object()})
    with pytest.raises(CodecError, match="names"):
        save(tmp_path / "x.lbz", {1: torch.zeros(1)})  # type: ignore[dict-item]
    with pytest.raises(CodecError, match="expected a CompressedTensor"):
        save(tmp_path / "x.lbz", {"l": [1.0, 2.0]})  # type: ignore[dict-item]
    assert not list(tmp_path.iterdir())


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.lbz"
    small_model(path)
    before = path.read_bytes()

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save(path, {"w": torch.zeros(3)})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.lbz"]


# ------------------------------------------------------------------------------------- defensive reading


@pytest.fixture
def valid(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "m.lbz"
    small_model(path)
    return path, path.read_bytes()


def _load_bytes(path: Path, blob: bytes, **kw: object) -> None:
    path.write_bytes(blob)
    load(path, **kw)  # type: ignore[arg-type]


def test_wrong_magic_and_foreign_files(valid: tuple[Path, bytes]) -> None:
    path, blob = valid
    with pytest.raises(CodecError, match="not an .lbz file"):
        _load_bytes(path, b"PK\x03\x04" + blob[4:])
    with pytest.raises(CodecError, match="not an .lbz file"):
        _load_bytes(path, b"")
    torch.save({"w": torch.zeros(2)}, path)  # a pickle is never unpickled
    with pytest.raises(CodecError, match="not an .lbz file"):
        load(path)
    with pytest.raises(CodecError, match="cannot read"):
        load(path.parent / "missing.lbz")
    with pytest.raises(CodecError, match="cannot read"):
        load(path.parent)


def test_newer_version_says_so(valid: tuple[Path, bytes]) -> None:
    path, blob = valid
    _, header, body = split(blob)
    header["future_field"] = {"whatever": 1}
    with pytest.raises(CodecError, match=r"written by a newer lowbit \(.lbz format version 2\).*Upgrade"):
        _load_bytes(path, seal(header, body, version=2))
    with pytest.raises(CodecError, match="newer lowbit"):
        _load_bytes(path, blob[:4] + b"\xff\xff" + blob[6:])  # checked before the checksum
    with pytest.raises(CodecError, match="invalid .lbz format version 0"):
        _load_bytes(path, seal(header, body, version=0))


def test_truncation_and_corruption_fail_the_checksum(valid: tuple[Path, bytes]) -> None:
    path, blob = valid
    with pytest.raises(CodecError, match="checksum"):
        _load_bytes(path, blob[:-1])
    with pytest.raises(CodecError, match="checksum"):
        _load_bytes(path, blob[:-40] + bytes([blob[-40] ^ 1]) + blob[-39:])
    with pytest.raises(CodecError, match="truncated"):
        _load_bytes(path, blob[:20])


def _forged(valid: tuple[Path, bytes], edit: Callable[[dict], object], tensor: int = 0) -> None:
    path, blob = valid
    _, header, body = split(blob)
    edit(header["tensors"][tensor])
    _load_bytes(path, seal(header, body))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t.update(shape=[2**31, 2]), "at most 2147483648"),
        (lambda t: t.update(shape=[2**40]), "shape entries"),
        (lambda t: t.update(shape="30x40"), "shape must be a list"),
        (lambda t: t.update(shape=[1] * 40), "at most 32"),
        (lambda t: t.update(codebook_size=2**20), "codebook_size"),
        (lambda t: t.update(index_bits=17), "index_bits"),
        (lambda t: t.update(weight_bits=True), "weight_bits"),
        (lambda t: t.update(entries=10**12), "entries"),
        (lambda t: t.update(code_bits=2**60), "code_bits"),
        (lambda t: t.update(gap_bits=-1), "gap_bits"),
        (lambda t: t.update(kind="pickle"), "'kind' must be"),
        (lambda t: t.update(kind=["sparse"]), "'kind' must be"),
        (lambda t: t.update(extra=1), "unknown keys"),
        (lambda t: t.pop("kept"), "missing keys"),
        (lambda t: t.update(name=""), "'name'"),
        (lambda t: t.update(code_symbols=t["codebook_size"] + 2), "code_symbols"),
        (lambda t: t.update(shape=[3, 3]), "kept"),  # fewer elements than the kept weights
        (lambda t: t.update(shape=[30, 33]), "outside the tensor"),  # decoded positions beyond the end
        (lambda t: t.update(code_bits=t["code_bits"] + 8), "records but the file holds"),
        (lambda t: t.update(kept=t["kept"] - 1), "kept weights decoded"),
    ],
)
def test_forged_headers_with_valid_checksums(
    valid: tuple[Path, bytes], edit: Callable[[dict], object], match: str
) -> None:
    with pytest.raises(CodecError, match=match):
        _forged(valid, edit)


def test_forged_raw_records(valid: tuple[Path, bytes]) -> None:
    with pytest.raises(CodecError, match="dtype"):
        _forged(valid, lambda t: t.update(dtype="object"), tensor=1)
    with pytest.raises(CodecError, match="dtype"):
        _forged(valid, lambda t: t.update(dtype={"a": 1}), tensor=1)
    path, blob = valid
    _, header, body = split(blob)
    mask_at = len(body) - 3
    with pytest.raises(CodecError, match="bool data"):
        _load_bytes(path, seal(header, body[:mask_at] + b"\x02" + body[mask_at + 1:]))


@pytest.mark.parametrize(
    "header",
    [
        b"{not json",
        b"\xff\xfe",
        b"[" * 100_000 + b"]" * 100_000,  # nesting deep enough to overflow a recursive parser
        b'{"format": "lowbit-lbz", "meta": {}, "tensors": [{"name": "w", "kind": "raw", "shape": [NaN]}]}',
        b'{"format": "lowbit-lbz", "meta": {}, "tensors": [], "x": 1}',
        b'{"format": "other", "meta": {}, "tensors": []}',
        b'{"format": "lowbit-lbz", "meta": [], "tensors": []}',
        b'{"format": "lowbit-lbz", "meta": {}, "tensors": [' + b"9" * 5000 + b"]}",
        b'{"format": "lowbit-lbz", "meta": {}, "tensors": [{"name": "a", "kind": "raw", "shape": [], "dtype": '
        b'"int8"}, {"name": "a", "kind": "raw", "shape": [], "dtype": "int8"}]}',
    ],
)
def test_bad_headers(valid: tuple[Path, bytes], header: bytes) -> None:
    path, _ = valid
    with pytest.raises(CodecError):
        _load_bytes(path, seal(header, b"\x00\x00"))


def test_header_length_is_checked_before_reading(valid: tuple[Path, bytes]) -> None:
    path, blob = valid
    _, header, body = split(blob)
    raw = json.dumps(header).encode()
    forged = seal(raw, body)
    for length in (2**32 - 1, len(forged)):  # beyond the file; beyond the 16 MiB limit or the data present
        tampered = forged[:6] + length.to_bytes(4, "little") + forged[10:-32]
        with pytest.raises(CodecError, match="header length"):
            _load_bytes(path, with_digest(tampered))


def test_max_numel_bounds_the_dense_allocation(valid: tuple[Path, bytes]) -> None:
    path, blob = valid
    _, header, body = split(blob)
    header["tensors"].append({"name": "zeros", "kind": "sparse", "shape": [2**31], "weight_bits": 1,
                              "index_bits": 1, "codebook_size": 1, "kept": 0, "entries": 0, "code_symbols": 0,
                              "code_bits": 0, "gap_symbols": 0, "gap_bits": 0})
    extra = np.float32(1.0).tobytes()  # the codebook of the extra tensor
    with pytest.raises(CodecError, match="elements in total"):
        _load_bytes(path, seal(header, body + extra))  # 2**31 + the others > the default cap
    header["tensors"][-1]["shape"] = [10**6]
    path.write_bytes(seal(header, body + extra))
    with pytest.raises(CodecError, match="max_numel"):
        load(path, max_numel=10**6)
    out, _ = load(path)
    assert out["zeros"].shape == (10**6,) and not out["zeros"].any()


def test_module_limits_are_what_the_docs_say() -> None:
    assert lbz.MAX_HEADER_BYTES == 16 << 20 and lbz.MAX_NUMEL == 2**31 and lbz.MAGIC == b"LBZ\x00"
