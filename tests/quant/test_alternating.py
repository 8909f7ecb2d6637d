"""Alternating multi-bit quantization (Xu et al. 2018): each step against a plain numpy / brute-force reference,
the error ordering alternating <= greedy <= 1-bit, and convergence to the Lloyd-Max quantizer of a Gaussian."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lowbit.quant import get_quantizer
from lowbit.quant.alternating import (
    AlternatingQuant,
    alternating_fit,
    alternating_quantize,
    assign_codes,
    greedy_fit,
    least_squares_alpha,
    reconstruct,
    sign_table,
)


def _err(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Squared error per row."""
    return ((w - q) ** 2).sum(dim=1)


def _one_bit(w: torch.Tensor) -> torch.Tensor:
    """XNOR-Net / BWN: mean|w| * sign(w), per row."""
    return w.abs().mean(dim=1, keepdim=True) * torch.where(w >= 0, 1.0, -1.0).to(w.dtype)


def _signs(codes: torch.Tensor, bits: int) -> np.ndarray:
    """(rows, n, k) numpy array of b_i = +-1 from integer codes, bit by bit."""
    c = codes.numpy()
    return np.stack([np.where((c >> i) & 1, 1.0, -1.0) for i in range(bits)], axis=-1)


def test_sign_table_lists_every_code_once_with_bit_i_as_b_i() -> None:
    for bits in (1, 2, 3, 4):
        s = sign_table(bits)
        assert s.shape == (2**bits, bits)
        assert len({tuple(r) for r in s.tolist()}) == 2**bits  # all 2^k sign patterns
        for c in range(2**bits):
            assert s[c].tolist() == [1.0 if (c >> i) & 1 else -1.0 for i in range(bits)]


def test_greedy_fit_matches_a_plain_residual_loop() -> None:
    w = torch.randn(7, 33, dtype=torch.float64)
    for bits in (1, 2, 3):
        alpha, codes = greedy_fit(w, bits)
        b = _signs(codes, bits)
        for row in range(7):
            r = w[row].numpy().copy()
            for i in range(bits):
                a = np.abs(r).mean()
                sign = np.where(r >= 0, 1.0, -1.0)
                assert alpha[row, i].item() == pytest.approx(a, rel=1e-12)
                np.testing.assert_array_equal(b[row, :, i], sign)
                r = r - a * sign
            np.testing.assert_allclose(reconstruct(alpha, codes)[row].numpy(), w[row].numpy() - r, atol=1e-12)


def test_least_squares_alpha_matches_numpy_lstsq_also_for_rank_deficient_codes() -> None:
    bits = 3
    w = torch.randn(6, 40, dtype=torch.float64)
    codes = torch.randint(0, 2**bits, (6, 40))
    codes[1] = 5  # every element the same code: B has rank 1
    codes[2, :20], codes[2, 20:] = 0, 7  # b_1 = b_2 = b_3: rank 1
    codes[3] = torch.where(torch.arange(40) % 2 == 0, 1, 6)  # b_2 = b_3 = -b_1: rank 1
    alpha = least_squares_alpha(w, codes, bits).numpy()
    b = _signs(codes, bits)
    for row in range(6):
        ref, *_ = np.linalg.lstsq(b[row], w[row].numpy(), rcond=None)  # the minimum-norm minimizer
        np.testing.assert_allclose(alpha[row], ref, atol=1e-9)
    w32 = w.float()  # float32 rows: the same fit (solved in float64), returned in float32
    torch.testing.assert_close(least_squares_alpha(w32, codes, bits), torch.from_numpy(alpha).float(),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_binary_search_tree_assignment_equals_brute_force_nearest_code(bits: int) -> None:
    w = 2 * torch.randn(9, 300)
    alpha = torch.randn(9, bits)  # any coefficients: unsorted, negative, the candidates in any order
    codes = assign_codes(w, alpha)
    values = alpha @ sign_table(bits).T  # (rows, 2^k)
    dist = (w.unsqueeze(-1) - values.unsqueeze(1)).abs()  # (rows, n, 2^k): every code, every element
    torch.testing.assert_close(dist.gather(2, codes.unsqueeze(-1)).squeeze(-1), dist.min(dim=2).values)
    assert torch.equal(codes, dist.argmin(dim=2))  # random values: no ties, so the very same codes


def test_assignment_of_exact_levels_and_points_beyond_the_ends() -> None:
    alpha = torch.tensor([[2.0, 1.0]])  # values -3, -1, 1, 3 (codes 0, 2, 1, 3)
    w = torch.tensor([[-3.0, -1.0, 1.0, 3.0, -100.0, 100.0, -2.1, 1.9, 2.1]])
    assert assign_codes(w, alpha).tolist() == [[0, 2, 1, 3, 0, 3, 0, 1, 3]]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_alternating_error_le_greedy_le_one_bit_per_row(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    rows = torch.cat([torch.randn(20, 257, generator=g),  # Gaussian
                      torch.rand(20, 257, generator=g) - 0.3,  # skewed uniform
                      torch.randn(20, 257, generator=g) ** 3])  # heavy tailed
    one = _err(rows, _one_bit(rows))
    greedy = _err(rows, reconstruct(*greedy_fit(rows, bits)))
    alt = _err(rows, alternating_quantize(rows, bits))
    slack = 1e-5 * one  # float32 rounding
    assert (greedy <= one + slack).all()
    assert (alt <= greedy + slack).all()
    assert (alt < greedy).float().mean() > 0.9  # and it does improve on almost every row
    errs = [_err(rows, reconstruct(*alternating_fit(rows, bits, it))) for it in range(5)]
    for before, after in itertools.pairwise(errs):  # every cycle: error never increases
        assert (after <= before + slack).all()


def test_one_bit_is_the_same_for_all_three_methods() -> None:
    w = torch.randn(5, 64, dtype=torch.float64)
    ref = _one_bit(w)
    torch.testing.assert_close(reconstruct(*greedy_fit(w, 1)), ref)
    torch.testing.assert_close(alternating_quantize(w, 1), ref)  # alpha = mean|w| is already least squares


def test_exactly_representable_rows_are_recovered_where_greedy_is_not() -> None:
    g = torch.Generator().manual_seed(0)
    b = torch.where(torch.rand(4, 50, 2, generator=g) < 0.3, -1.0, 1.0).double()  # unbalanced codes
    alpha = torch.tensor([[1.5, 0.4], [2.0, 1.0], [0.7, 0.6], [3.0, 0.1]], dtype=torch.float64)
    w = (b * alpha.unsqueeze(1)).sum(-1)  # (4, 50): each row takes the values +-a1 +-a2
    assert (_err(w, reconstruct(*greedy_fit(w, 2))) > 1e-3).all()  # mean|w| != a1 on unbalanced rows
    assert (_err(w, alternating_quantize(w, 2)) < 1e-20).all()
    zero_and_constant = torch.tensor([[0.0] * 6, [0.25] * 6, [-0.5] * 6])
    assert torch.equal(alternating_quantize(zero_and_constant, 3), zero_and_constant)


def test_converges_to_the_lloyd_max_four_level_quantizer_of_a_gaussian() -> None:
    """Max (1960): the MSE-optimal 4-level quantizer of N(0, 1) has levels +-0.4528, +-1.510 and MSE 0.1175;
    +-a1 +-a2 can express it (a1 = 0.981, a2 = 0.529), so many alternating cycles must approach it."""
    w = torch.randn(1, 200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    alpha, codes = alternating_fit(w, 2, iters=30)
    a1, a2 = sorted(alpha.abs().flatten().tolist(), reverse=True)
    assert (a1 - a2, a1 + a2) == (pytest.approx(0.4528, abs=0.01), pytest.approx(1.510, abs=0.02))
    assert ((w - reconstruct(alpha, codes)) ** 2).mean().item() == pytest.approx(0.1175, rel=0.01)
    greedy = ((w - reconstruct(*greedy_fit(w, 2))) ** 2).mean().item()
    assert greedy > 0.125  # greedy stops well short of it; the paper's 2 cycles close most of the gap
    two = ((w - alternating_quantize(w, 2)) ** 2).mean().item()
    assert 0.1175 < two < greedy - 0.5 * (greedy - 0.1175)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_at_most_two_to_the_k_values_per_row_or_per_tensor(bits: int) -> None:
    x = torch.randn(8, 3, 5, 5)  # a conv weight: a row is one output channel
    out = AlternatingQuant(bits)(x)
    for row in out.reshape(8, -1):
        assert torch.unique(row).numel() <= 2**bits
    whole = AlternatingQuant(bits, per_row=False)(x)
    assert torch.unique(whole).numel() <= 2**bits
    assert _err(x.reshape(1, -1), whole.reshape(1, -1)) >= _err(x.reshape(8, -1), out.reshape(8, -1)).sum() - 1e-4


def test_rows_are_quantized_independently_and_fit_gives_the_forward_values() -> None:
    x = torch.randn(6, 20)
    q = AlternatingQuant(3)
    out = q(x)
    # equal up to float rounding: a batched matmul may round differently from a single row's (1 ulp seen on a
    # Xeon, none on an EPYC); a row that depended on the others would differ by a whole quantization step
    torch.testing.assert_close(out, torch.cat([q(x[i : i + 1]) for i in range(6)]), rtol=1e-6, atol=1e-6)
    alpha, codes = q.fit(x)
    assert alpha.shape == (6, 3) and codes.shape == (6, 20)
    assert torch.equal(reconstruct(alpha, codes), out)
    torch.testing.assert_close(q(x.unsqueeze(0).expand(2, 6, 20)[0]), out)  # views and strides do not matter


def test_straight_through_gradient_and_dtypes() -> None:
    x = torch.randn(4, 16, requires_grad=True)
    g = torch.randn(4, 16)
    (AlternatingQuant(2)(x) * g).sum().backward()
    assert torch.equal(x.grad, g)
    x64 = x.detach().double()
    out64 = alternating_quantize(x64, 2)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(alternating_quantize(x.detach(), 2), out64.float(), atol=1e-5, rtol=1e-5)
    bf = alternating_quantize(x.detach().bfloat16(), 2)
    assert bf.dtype == torch.bfloat16


def test_contract_attributes_and_registry() -> None:
    q = get_quantizer({"name": "alternating", "bits": 3, "iters": 1})
    assert isinstance(q, AlternatingQuant) and q.bit_width == 3 and q.iters == 1
    assert q.levels() is None and q.scale is None  # data dependent: fitted to every row anew
    assert q.state_dict() == {}
    assert "bit_width=3" in repr(q)


@pytest.mark.parametrize("kwargs", [{"bits": 0}, {"bits": 9}, {"bits": 2.0}, {"bits": True}, {"iters": -1},
                                    {"iters": 1.5}, {"per_row": "yes"}])
def test_bad_arguments_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="bits must be|iters|per_row"):
        AlternatingQuant(**kwargs)  # type: ignore[arg-type]


def test_bad_inputs_are_refused() -> None:
    for bad, word in ((float("nan"), "NaN"), (float("inf"), "infinite"), (float("-inf"), "infinite")):
        x = torch.randn(3, 4)
        x[1, 2] = bad
        with pytest.raises(ValueError, match=word):
            AlternatingQuant()(x)
    with pytest.raises(ValueError, match="floating-point"):
        alternating_quantize(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="2-D"):
        greedy_fit(torch.randn(3), 2)
    with pytest.raises(ValueError, match="must match"):
        least_squares_alpha(torch.randn(3, 4), torch.zeros(3, 5, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="rows = 3"):
        assign_codes(torch.randn(3, 4), torch.randn(2, 2))
    assert alternating_quantize(torch.empty(0, 5)).shape == (0, 5)
