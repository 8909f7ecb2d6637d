"""Mutated .lbz files: ``load`` either succeeds or raises CodecError; never anything else, never MemoryError.

Plain mutations (bit flips, truncations, extensions, huge length fields) are caught by the magic, version
and checksum checks. To reach the parser and the decoders behind the checksum, most mutations are also
"re-sealed": the edit is made to the header's JSON or to the record bytes and a correct checksum is written,
as a forger would.
"""

import copy
import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from _lbz import seal, small_model, split, with_digest

from lowbit.codec import CodecError, load

_VALUES = [-1, 0, 1, 2, 7, 255, 2**16, 2**31 - 1, 2**31, 2**32, 2**63, 10**30, 1.5, "7", None, [], {}, True]
_HUGE = [2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1, 0xFFFFFFFF, 0x7FFFFFFF]


def _flip(blob: bytes, rng: random.Random, lo: int = 0) -> bytes:
    b = bytearray(blob)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(lo, len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def _huge_field(blob: bytes, rng: random.Random) -> bytes:
    b = bytearray(blob)
    at = 6 if rng.random() < 0.5 else rng.randrange(0, len(b) - 8)  # the header length, or anywhere
    width = rng.choice([4, 8])
    b[at: at + width] = (rng.choice(_HUGE) & ((1 << 8 * width) - 1)).to_bytes(width, "little")
    return bytes(b)


def _edit_spec(header: dict, rng: random.Random) -> None:
    spec = rng.choice(header["tensors"])
    key = rng.choice(sorted(spec))
    r = rng.random()
    if r < 0.1:
        del spec[key]
    elif key == "shape" and r < 0.6 and isinstance(spec["shape"], list) and spec["shape"]:
        i = rng.randrange(len(spec["shape"]))
        spec["shape"][i] = rng.choice([0, 1, 2, 3, 7, 2**31, 2**40, -5])
    elif isinstance(spec[key], int) and r < 0.6:
        spec[key] = max(0, spec[key] + rng.choice([-8, -2, -1, 1, 2, 8]))
    else:
        spec[key] = rng.choice(_VALUES)


def _resealed_header(blob: bytes, rng: random.Random) -> bytes:
    version, header, body = split(blob)
    header = copy.deepcopy(header)
    for _ in range(rng.randint(1, 3)):
        _edit_spec(header, rng)
    if rng.random() < 0.2:
        rng.shuffle(header["tensors"])
    return seal(header, body, version)


def _resealed_header_bytes(blob: bytes, rng: random.Random) -> bytes:
    _, header, body = split(blob)
    raw = bytearray(json.dumps(header).encode())
    for _ in range(rng.randint(1, 4)):
        raw[rng.randrange(len(raw))] = rng.choice(b'0123456789[]{},:"-.e ')
    return seal(bytes(raw), body)


def _resealed_body(blob: bytes, rng: random.Random) -> bytes:
    _, header, body = split(blob)
    r = rng.random()
    if r < 0.6:
        body = _flip(body, rng)
    elif r < 0.8:  # swap two slices of the records
        i, j = sorted(rng.sample(range(len(body)), 2))
        n = rng.randint(1, min(64, len(body) - j))
        body = body[:i] + body[j: j + n] + body[i + n: j] + body[i: i + n] + body[j + n:]
    else:  # change the size and keep the header: the record sizes no longer add up
        body = body[: rng.randrange(len(body))] if rng.random() < 0.5 else body + bytes(rng.randint(1, 40))
    return seal(header, body)


MUTATIONS: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "bit flips": _flip,
    "truncation": lambda b, rng: b[: rng.randrange(len(b))],
    "extension": lambda b, rng: b + rng.randbytes(rng.randint(1, 100)),
    "huge length field": _huge_field,
    "resealed header edit": _resealed_header,
    "resealed header bytes": _resealed_header_bytes,
    "resealed record bytes": _resealed_body,
    "resealed bit flips after the version": lambda b, rng: with_digest(_flip(b[:-32], rng, lo=6)),
}


def test_mutated_files_raise_only_codec_errors(tmp_path: Path) -> None:
    path = tmp_path / "m.lbz"
    small_model(path)
    blob = path.read_bytes()
    rng = random.Random(20160201)
    outcomes: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    names = list(MUTATIONS)
    for i in range(1200):
        kind = names[i % len(names)]
        path.write_bytes(MUTATIONS[kind](blob, rng))
        try:
            load(path)
            outcomes[f"{kind}: loaded"] += 1
        except CodecError as e:
            outcomes[f"{kind}: CodecError"] += 1
            messages[str(e).split(":")[1].strip().split(" ")[0]] += 1
        except MemoryError:  # pragma: no cover - the failure this test exists for
            pytest.fail(f"mutation #{i} ({kind}) made load run out of memory")
        except Exception as e:  # pragma: no cover
            pytest.fail(f"mutation #{i} ({kind}) raised {type(e).__name__}: {e}")
    for kind in names:
        assert outcomes[f"{kind}: CodecError"] > 0, outcomes
    # the re-sealed mutations got past the checksum, into the header checks and the stream decoders
    text = " ".join(messages)
    assert outcomes["resealed record bytes: loaded"] > 0, outcomes
    assert "tensor" in text, messages
