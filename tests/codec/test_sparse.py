import numpy as np
import pytest

from lowbit.codec import CodecError, decode_positions, encode_positions
from lowbit.codec.sparse import count_fillers


def _reference(positions: list[int], index_bits: int) -> tuple[list[int], list[bool]]:
    """The paper's Figure 3, one entry at a time: a filler (zero) whenever the jump does not fit."""
    max_gap = (1 << index_bits) - 1
    gaps, fill, prev = [], [], -1
    for p in positions:
        while p - prev - 1 > max_gap:
            gaps.append(max_gap)
            fill.append(True)
            prev += max_gap + 1  # the filler's own position
        gaps.append(p - prev - 1)
        fill.append(False)
        prev = p
    return gaps, fill


def test_figure_3_example_puts_the_filler_where_the_paper_does() -> None:
    gaps, is_filler = encode_positions(np.array([1, 4, 15]), index_bits=3)
    assert gaps.tolist() == [1, 2, 7, 2] and is_filler.tolist() == [False, False, True, False]
    all_positions = np.cumsum(gaps.astype(np.int64) + 1) - 1
    assert all_positions.tolist() == [1, 4, 12, 15]  # the filler zero stands at index 12, as in Figure 3
    assert decode_positions(gaps, is_filler, 3).tolist() == [1, 4, 15]


@pytest.mark.parametrize("index_bits", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("density", [0.003, 0.05, 0.5])
def test_round_trip_matches_the_one_entry_at_a_time_reference(index_bits: int, density: float) -> None:
    rng = np.random.default_rng(index_bits)
    positions = np.flatnonzero(rng.random(5000) < density)
    gaps, is_filler = encode_positions(positions, index_bits)
    ref_gaps, ref_fill = _reference(positions.tolist(), index_bits)
    assert gaps.tolist() == ref_gaps and is_filler.tolist() == ref_fill
    assert gaps.dtype == np.uint16 and int(gaps.max(initial=0)) < 1 << index_bits
    assert count_fillers(positions, index_bits) == int(is_filler.sum())
    np.testing.assert_array_equal(decode_positions(gaps, is_filler, index_bits), positions)


@pytest.mark.parametrize(
    ("gap", "fillers", "rest"),
    [(6, 0, 6), (7, 0, 7), (8, 1, 0), (15, 1, 7), (16, 2, 0), (100, 12, 4)],
)
def test_gaps_around_the_overflow(gap: int, fillers: int, rest: int) -> None:
    positions = np.array([0, 1 + gap])  # `gap` zeros between the two kept weights; 3-bit indices hold 0..7
    gaps, is_filler = encode_positions(positions, 3)
    assert is_filler.tolist() == [False] + [True] * fillers + [False]
    assert gaps.tolist() == [0] + [7] * fillers + [rest]
    assert decode_positions(gaps, is_filler, 3).tolist() == positions.tolist()


def test_first_position_is_a_gap_from_minus_one() -> None:
    gaps, is_filler = encode_positions(np.array([20]), 4)  # 20 zeros in front: one filler (16) + gap 4
    assert gaps.tolist() == [15, 4] and is_filler.tolist() == [True, False]


def test_empty_and_fully_dense() -> None:
    gaps, is_filler = encode_positions(np.array([], dtype=np.int64), 5)
    assert gaps.size == 0 and is_filler.size == 0
    assert decode_positions(gaps, is_filler, 5).size == 0
    gaps, is_filler = encode_positions(np.arange(1000), 1)
    assert (gaps == 0).all() and not is_filler.any()
    assert decode_positions(gaps, is_filler, 1).tolist() == list(range(1000))


@pytest.mark.parametrize(
    ("positions", "index_bits", "match"),
    [
        ([3, 2], 4, "strictly increasing"),
        ([1, 1], 4, "strictly increasing"),
        ([-1, 2], 4, ">= 0"),
        ([1.5], 4, "integer"),
        ([[1, 2]], 4, "1-D"),
        ([1], 0, "1..16"),
        ([1], 17, "1..16"),
        ([1], 4.0, "int"),
    ],
)
def test_invalid_positions_are_codec_errors(positions: list, index_bits: int, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        encode_positions(np.array(positions), index_bits)


def test_decode_refuses_non_canonical_streams() -> None:
    with pytest.raises(CodecError, match="largest gap"):
        decode_positions(np.array([3, 1]), np.array([True, False]), 3)
    with pytest.raises(CodecError, match="last entry is a filler"):
        decode_positions(np.array([1, 7]), np.array([False, True]), 3)
    with pytest.raises(CodecError, match="0..7"):
        decode_positions(np.array([8]), np.array([False]), 3)
    with pytest.raises(CodecError, match="equal length"):
        decode_positions(np.array([1, 2]), np.array([False]), 3)
