"""XNOR-popcount kernels against PyTorch on +-1 tensors: GEMM, conv (zero padding, stride), thresholds, OR pooling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowbit.runtime.binary.kernels import binary_conv2d, binary_gemm, maxpool2d_bits, popcnt_in_asm
from lowbit.runtime.binary.pack import pack_nchw, pack_signs, unpack_nhwc, unpack_signs


def _pm1(*shape: int) -> torch.Tensor:
    return torch.where(torch.randn(*shape) < 0, -1.0, 1.0)


def _conv_args(xs: torch.Tensor, ws: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    return pack_nchw(xs), pack_signs(ws.permute(0, 2, 3, 1))


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (5, 7, 100), (9, 130, 64), (6, 65, 129), (17, 3, 300)])
def test_gemm_matches_torch(m: int, n: int, k: int) -> None:
    x, w = _pm1(m, k), _pm1(n, k)
    acc = binary_gemm(pack_signs(x), pack_signs(w), k)
    assert acc.dtype == np.int32
    assert torch.equal(torch.from_numpy(acc).float(), x @ w.T)


def test_gemm_thresholds_give_packed_bits() -> None:
    x, w = _pm1(11, 150), _pm1(70, 150)
    t = torch.randint(-40, 40, (70,))
    bits = binary_gemm(pack_signs(x), pack_signs(w), 150, thresholds=t.numpy())
    assert bits.shape == (11, 2)
    assert torch.equal(unpack_signs(bits, 70), torch.where(x @ w.T >= t, 1.0, -1.0))


# (N, C, H, W, O, kernel, stride, padding)
CONVS = [
    (1, 70, 5, 5, 3, 3, 1, 1),
    (2, 64, 8, 8, 130, 3, 2, 1),
    (3, 5, 7, 6, 65, 1, 1, 0),
    (1, 129, 4, 4, 64, 3, 1, 1),
    (2, 3, 9, 9, 5, 3, 2, 2),
    (1, 1, 1, 1, 1, 1, 1, 0),
    (2, 200, 3, 5, 7, 3, 1, 3),  # padding wider than the kernel's reach: some outputs see no input at all
    (1, 16, 6, 7, 9, 1, 2, 1),
    (1, 8, 2, 3, 4, 3, 2, 5),  # padding wider than the kernel itself: whole rows and columns of outputs see nothing
    (2, 66, 4, 9, 70, 5, 3, 2),  # 5x5, stride 3: every border case of a larger window
    # at most 32 channels: two taps per word (an odd tap count leaves a zero half-word); 33 does not qualify
    (2, 32, 6, 6, 40, 3, 1, 1),
    (1, 32, 7, 7, 5, 5, 2, 2),
    (2, 17, 5, 4, 66, 3, 1, 1),
    (1, 33, 5, 5, 3, 3, 1, 1),
]


@pytest.mark.parametrize("n,c,h,w,o,k,s,p", CONVS)
def test_conv_matches_torch_zero_padding(n: int, c: int, h: int, w: int, o: int, k: int, s: int, p: int) -> None:
    """lowbit pads the quantized (+-1) input with zeros: a padded tap adds 0, exactly as F.conv2d."""
    xs, ws = _pm1(n, c, h, w), _pm1(o, c, k, k)
    acc = binary_conv2d(*_conv_args(xs, ws), c, s, p)
    ref = F.conv2d(xs, ws, stride=s, padding=p)
    assert torch.equal(torch.from_numpy(acc).permute(0, 3, 1, 2).float(), ref)
    t = torch.randint(-k * k * c, k * k * c + 1, (o,))
    bits = binary_conv2d(*_conv_args(xs, ws), c, s, p, thresholds=t.numpy())
    assert torch.equal(unpack_nhwc(bits, o), torch.where(ref >= t.view(1, -1, 1, 1), 1.0, -1.0))


@pytest.mark.parametrize("k,s,p,size", [(2, 2, 0, (6, 6)), (2, 2, 0, (7, 5)), (3, 2, 1, (7, 8)), (3, 1, 1, (4, 4))])
def test_maxpool_is_or_of_bits(k: int, s: int, p: int, size: tuple[int, int]) -> None:
    xs = _pm1(2, 130, *size)
    out = maxpool2d_bits(pack_nchw(xs), k, s, p)
    assert torch.equal(unpack_nhwc(out, 130), F.max_pool2d(xs, k, s, p))


def test_popcount_instruction_in_the_assembly() -> None:
    """llvm.ctpop became a popcount instruction (scalar popcnt; LLVM may also vectorize it with vpshufb)."""
    asm = popcnt_in_asm()
    assert asm["popcnt"] + asm["vpshufb"] > 0
    assert asm["popcnt"] > 0


def test_errors_before_compiled_code() -> None:
    x, w = pack_signs(_pm1(3, 70)), pack_signs(_pm1(4, 70))
    with pytest.raises(TypeError, match="uint64"):
        binary_gemm(x.astype(np.int64), w, 70)
    with pytest.raises(TypeError, match="numpy uint64 array"):
        binary_gemm(torch.zeros(3, 2), w, 70)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs 1 words"):
        binary_gemm(x, w, 64)
    with pytest.raises(ValueError, match="padding bits"):
        bad = x.copy()
        bad[0, -1] |= np.uint64(1) << np.uint64(63)
        binary_gemm(bad, w, 70)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        binary_gemm(x, w, 70, thresholds=np.zeros(5, np.int64))
    with pytest.raises(ValueError, match="integer array"):
        binary_gemm(x, w, 70, thresholds=np.zeros(4, np.float32))
    xc, wc = _conv_args(_pm1(1, 8, 2, 2), _pm1(4, 8, 3, 3))
    with pytest.raises(ValueError, match="does not fit"):
        binary_conv2d(xc, wc, 8)
    with pytest.raises(ValueError, match="stride must be an integer >= 1"):
        binary_conv2d(xc, wc, 8, stride=0, padding=1)
    with pytest.raises(ValueError, match="c_in=70 needs 2 words"):
        binary_conv2d(xc, wc, 70, padding=1)
    with pytest.raises(ValueError, match="4 dims"):
        binary_conv2d(xc[0], wc, 8, padding=1)
    with pytest.raises(ValueError, match="does not fit"):
        maxpool2d_bits(xc, 3)
    with pytest.raises(ValueError, match="half the kernel"):
        maxpool2d_bits(xc, 2, padding=2)


@pytest.mark.parametrize("shape", [(3, 130, 1), (2, 70, 67), (1, 64, 200)])
def test_threshold_pack_matches_the_comparisons_with_ties_flips_and_non_finite(shape: tuple[int, int, int]) -> None:
    from lowbit.runtime.binary.kernels import threshold_pack

    rng = np.random.default_rng(1)
    n, c, p = shape
    t = rng.standard_normal(c).astype(np.float32)
    flip = rng.random(c) < 0.4
    x = rng.standard_normal(shape).astype(np.float32)
    x[:, ::3, :] = t[::3, None]  # ties: x == t is on for both directions (>= and <=)
    x[0, 1, 0], x[-1, -1, -1] = np.nan, -np.inf
    bits, bad = threshold_pack(x, t, flip)
    on = np.where(flip[None, :, None], x <= t[None, :, None], x >= t[None, :, None])  # N, C, P
    want = np.packbits(on.transpose(0, 2, 1), axis=-1, bitorder="little")  # N, P, bytes
    got = bits.view(np.uint8)[..., : want.shape[-1]]
    assert np.array_equal(got, want)
    assert not bits.view(np.uint8)[..., want.shape[-1]:].any()  # the padding bits stay zero
    assert bad == 2
