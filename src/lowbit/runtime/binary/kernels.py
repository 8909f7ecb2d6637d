"""XNOR-popcount kernels (numba): binary convolution / GEMM, fused with the threshold, and bit max-pooling.

A binary dot product of two +-1 vectors of length K packed into words (:mod:`lowbit.runtime.binary.pack`) is

    dot(a, b) = K - 2 * popcount(a XOR b)          (the XNOR count minus the XOR count)

numba has no popcount function; :func:`popcount64` is a tiny ``numba.extending.intrinsic`` that emits LLVM's
``llvm.ctpop.i64``, which becomes the ``popcnt`` instruction (``popcnt_in_asm`` checks the assembly), or a
vectorized ``vpshufb`` popcount where LLVM vectorizes a loop.

One kernel does every binary layer, as a GEMM of pixel rows by weight rows split over threads (``prange``) in
tiles of 16 pixels x 64 output channels (one output word). A convolution tile first gathers the taps of each of
its pixels into one row of ``KH * KW * Cw`` words in an L1 buffer (im2col on bits, on the fly: the rows never go
to memory); a linear layer, or an unpadded 1x1 convolution, is already a row per pixel. With at most 32 input
channels two taps share a word (otherwise half of every word would be padding). The tile keeps 4 pixels x 2
output channels in registers per inner loop (8 accumulators, 6 loads per 8 popcounts; 1 x 4 for left-over
pixels): its pixel rows stay in L1 while the weight rows stream by.

Padding semantics: lowbit's quantized conv pads the *quantized* input with zeros (``F.conv2d`` after the sign),
so a padded tap contributes 0, not +-1. The gather writes a zero word (bits 0 = -1) for a tap outside the image, which
contributes ``sum_c (-1) w_c = C - 2 popcount(w_tap)``; that term (``wsum``, precomputed per output channel and
tap) is subtracted again for the taps outside the image, so the result equals ``F.conv2d`` on the +-1 tensors
with zero padding exactly. The taps outside the image depend only on the pixel's border pattern (9 for a 3x3
kernel with padding 1: the interior, 4 edges, 4 corners), so the correction is one table row per pattern
(:func:`border_table`), read contiguously over the output channels.

Fused threshold: with ``t`` per output channel the output is the bit ``acc >= t`` (+1 -> 1), packed 64 channels per
word, so a binary layer's output is again packed bits and no float remains between binary layers (a "less or
equal" threshold is folded in beforehand by negating the weight row: ``-acc >= -t``).

Bit max-pooling: under the +1 -> 1 encoding, max of +-1 values is the OR of the bits.

The public wrappers check every shape, dtype and the zero padding bits before entering compiled code.

References:
    Rastegari et al., "XNOR-Net: ImageNet Classification Using Binary Convolutional Neural Networks",
    arXiv:1603.05279 (XNOR + popcount convolution).
    Umuroglu et al., "FINN: A Framework for Fast, Scalable Binarized Neural Network Inference",
    arXiv:1612.07119 (thresholds, OR max-pooling).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from lowbit.runtime.binary.pack import WORD_BITS, words

__all__ = ["popcount64", "binary_gemm", "binary_conv2d", "maxpool2d_bits", "conv_out_size", "popcnt_in_asm",
           "tap_sums", "border_table", "conv_plan", "conv_words", "threshold_pack"]

TILE_PIXELS = 16  # pixels per parallel tile (four 4-pixel register blocks)
TILE_CHANNELS = WORD_BITS  # output channels per tile: one output word
PACK_PIXELS = 64  # pixels per parallel task of the float -> bits step


@intrinsic
def popcount64(typingctx, x):  # pragma: no cover - typed and compiled by numba
    """``popcount(x)`` for a uint64 inside numba code: LLVM's ``llvm.ctpop.i64`` (the ``popcnt`` instruction)."""
    if x != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen


@njit(inline="always")
def _dot1(a, b, n):  # pragma: no cover
    s = np.uint64(0)
    for r in range(n):
        s += popcount64(a[r] ^ b[r])
    return s


@njit(inline="always")
def _dot1x4(a, b0, b1, b2, b3, n):  # pragma: no cover
    s0 = np.uint64(0)
    s1 = np.uint64(0)
    s2 = np.uint64(0)
    s3 = np.uint64(0)
    for r in range(n):
        v = a[r]
        s0 += popcount64(v ^ b0[r])
        s1 += popcount64(v ^ b1[r])
        s2 += popcount64(v ^ b2[r])
        s3 += popcount64(v ^ b3[r])
    return s0, s1, s2, s3


@njit(inline="always")
def _dot4x2(a0, a1, a2, a3, b0, b1, n):  # pragma: no cover
    s00 = np.uint64(0)
    s01 = np.uint64(0)
    s10 = np.uint64(0)
    s11 = np.uint64(0)
    s20 = np.uint64(0)
    s21 = np.uint64(0)
    s30 = np.uint64(0)
    s31 = np.uint64(0)
    for r in range(n):
        c0 = b0[r]
        c1 = b1[r]
        v = a0[r]
        s00 += popcount64(v ^ c0)
        s01 += popcount64(v ^ c1)
        v = a1[r]
        s10 += popcount64(v ^ c0)
        s11 += popcount64(v ^ c1)
        v = a2[r]
        s20 += popcount64(v ^ c0)
        s21 += popcount64(v ^ c1)
        v = a3[r]
        s30 += popcount64(v ^ c0)
        s31 += popcount64(v ^ c1)
    return s00, s01, s10, s11, s20, s21, s30, s31


@njit(inline="always")
def _gather(x, n, y, xx, kh, kw, stride, pad, half, dst):  # pragma: no cover
    """Output pixel (n, y, xx)'s taps of x uint64 [N, H, W, Cw] into ``dst`` in (ky, kx, word) order; a tap outside
    the image is a zero word (all -1, corrected after the popcount). With ``half`` (Cw = 1, at most 32 channels:
    the high half of every word zero) two taps share a word, the odd tap in the high half."""
    h = x.shape[1]
    wd = x.shape[2]
    cw = x.shape[3]
    col = 0
    for ky in range(kh):
        iy = y * stride - pad + ky
        for kx in range(kw):
            ix = xx * stride - pad + kx
            inside = 0 <= iy < h and 0 <= ix < wd
            if half:
                v = x[n, iy, ix, 0] if inside else np.uint64(0)
                if col % 2 == 0:
                    dst[col // 2] = v
                else:
                    dst[col // 2] |= v << np.uint64(32)
                col += 1
            else:
                for c in range(cw):
                    dst[col + c] = x[n, iy, ix, c] if inside else np.uint64(0)
                col += cw


@njit(inline="always")
def _tile_popcounts(a, a0, np_, b, o0, no, row, acc):  # pragma: no cover
    """acc[i, j] = popcount(a[a0 + i] XOR b[o0 + j]) for i < np_, j < no."""
    i_full = np_ - np_ % 4
    j_full = no - no % 2
    # 4 pixels x 2 channels; the tile's pixel rows stay in L1 while two weight rows stream by
    for j in range(0, j_full, 2):
        b0 = b[o0 + j]
        b1 = b[o0 + j + 1]
        for i in range(0, i_full, 4):
            s = _dot4x2(a[a0 + i], a[a0 + i + 1], a[a0 + i + 2], a[a0 + i + 3], b0, b1, row)
            acc[i, j] = np.int64(s[0])
            acc[i, j + 1] = np.int64(s[1])
            acc[i + 1, j] = np.int64(s[2])
            acc[i + 1, j + 1] = np.int64(s[3])
            acc[i + 2, j] = np.int64(s[4])
            acc[i + 2, j + 1] = np.int64(s[5])
            acc[i + 3, j] = np.int64(s[6])
            acc[i + 3, j + 1] = np.int64(s[7])
    for j in range(j_full, no):
        for i in range(i_full):
            acc[i, j] = np.int64(_dot1(a[a0 + i], b[o0 + j], row))
    # left-over pixels: 1 pixel x 4 channels, then 1 x 1
    for i in range(i_full, np_):
        ai = a[a0 + i]
        j = 0
        while j + 4 <= no:
            s4 = _dot1x4(ai, b[o0 + j], b[o0 + j + 1], b[o0 + j + 2], b[o0 + j + 3], row)
            acc[i, j] = np.int64(s4[0])
            acc[i, j + 1] = np.int64(s4[1])
            acc[i, j + 2] = np.int64(s4[2])
            acc[i, j + 3] = np.int64(s4[3])
            j += 4
        while j < no:
            acc[i, j] = np.int64(_dot1(ai, b[o0 + j], row))
            j += 1


@njit(cache=True, parallel=True)
def _conv_kernel(  # pragma: no cover
    x, rows, kh, kw, stride, pad, half, b, k_full, corr, ypat, xpat, oh, ow, out_acc, out_bits
):
    """x: uint64 [N, H, W, Cw], or its pixel rows ``rows`` [P, L] (P = N OH OW) when the layer needs no gather
    (else ``rows`` is empty); b: uint64 [O, L] weight rows (the taps laid out as :func:`_gather` does); corr: int64
    [patterns, O] the padded taps' contribution per border pattern (:func:`border_table`: output pixel (y, x) has
    pattern ``ypat[y] + xpat[x]``).
    acc = k_full - 2 popcount(taps XOR b) - corr. Writes out_acc int32 [P, O] when it has rows, else the bits
    popcount <= corr (corr then holds the popcount limits) into out_bits uint64 [P, words(O)]."""
    n_pix = x.shape[0] * oh * ow
    n_out, row = b.shape
    n_ptile = (n_pix + TILE_PIXELS - 1) // TILE_PIXELS
    n_otile = (n_out + TILE_CHANNELS - 1) // TILE_CHANNELS
    want_acc = out_acc.shape[0] > 0
    for tile in prange(n_ptile * n_otile):
        pt = tile // n_otile
        ot = tile - pt * n_otile
        p0 = pt * TILE_PIXELS
        np_ = min(TILE_PIXELS, n_pix - p0)
        o0 = ot * TILE_CHANNELS
        no = min(TILE_CHANNELS, n_out - o0)
        n = p0 // (oh * ow)
        r = p0 - n * oh * ow
        y = r // ow
        xx = r - y * ow
        acc = np.empty((TILE_PIXELS, TILE_CHANNELS), np.int64)
        if rows.shape[0] > 0:  # a linear layer or an unpadded 1x1 conv: the pixel rows are the input itself
            _tile_popcounts(rows, p0, np_, b, o0, no, row, acc)
        else:
            # im2col on the fly: the tile's pixel rows, gathered into an L1 buffer (the taps never go to memory)
            a = np.empty((TILE_PIXELS, row), np.uint64)
            for i in range(np_):
                _gather(x, n, y, xx, kh, kw, stride, pad, half, a[i])
                xx += 1
                if xx == ow:
                    xx = 0
                    y += 1
                    if y == oh:
                        y = 0
                        n += 1
            _tile_popcounts(a, 0, np_, b, o0, no, row, acc)
        # popcount -> dot product, minus the padded taps' contribution of the pixel's border pattern (one
        # contiguous row of the table), then store or threshold
        r = p0 % (oh * ow)
        y = r // ow
        xx = r - y * ow
        for i in range(np_):
            p = p0 + i
            c = corr[ypat[y] + xpat[xx]]
            xx += 1
            if xx == ow:
                xx = 0
                y = y + 1 if y + 1 < oh else 0
            if want_acc:
                for j in range(no):
                    out_acc[p, o0 + j] = k_full - 2 * acc[i, j] - c[o0 + j]
            else:  # c holds the popcount limits: the bit is popcount <= limit
                word = np.uint64(0)
                for j in range(no):
                    word |= np.uint64(acc[i, j] <= c[o0 + j]) << np.uint64(j)
                out_bits[p, ot] = word


@njit(cache=True)
def _axis_patterns(size, k, stride, pad, out_size, pat):  # pragma: no cover
    """The taps ``[k0, k1)`` of a kernel of size k inside the image along one axis for each output position;
    ``pat[o]`` = the index of its window among the distinct ones, which it returns as (k0s, k1s). Windows are
    clamped to the kernel (empty when the padding is wider than the kernel's reach)."""
    k0s = np.empty(out_size, np.int64)
    k1s = np.empty(out_size, np.int64)
    n = 0
    for o in range(out_size):
        k0 = min(k, max(0, pad - o * stride))
        k1 = max(k0, min(k, size + pad - o * stride))
        found = -1
        for q in range(n):
            if k0s[q] == k0 and k1s[q] == k1:
                found = q
                break
        if found < 0:
            k0s[n] = k0
            k1s[n] = k1
            found = n
            n += 1
        pat[o] = found
    return k0s[:n], k1s[:n]


@njit(cache=True)
def _border_kernel(wsum, h, wd, stride, pad, oh, ow, ypat, xpat):  # pragma: no cover
    n_out, kh, kw = wsum.shape
    y0, y1 = _axis_patterns(h, kh, stride, pad, oh, ypat)
    x0, x1 = _axis_patterns(wd, kw, stride, pad, ow, xpat)
    corr = np.zeros((y0.shape[0] * x0.shape[0], n_out), np.int64)
    for py in range(y0.shape[0]):
        for px in range(x0.shape[0]):
            for o in range(n_out):
                outside = 0
                for ky in range(kh):
                    for kx in range(kw):
                        if not (y0[py] <= ky < y1[py] and x0[px] <= kx < x1[px]):
                            outside += wsum[o, ky, kx]
                corr[py * x0.shape[0] + px, o] = outside
    ypat *= x0.shape[0]
    return corr


def border_table(wsum: np.ndarray, h: int, wd: int, stride: int, pad: int) -> tuple[np.ndarray, np.ndarray,
                                                                                      np.ndarray]:
    """The padding correction of a convolution over an ``h x wd`` input: ``(corr, ypat, xpat)``. Output pixel
    (y, x) has border pattern ``ypat[y] + xpat[x]`` (its window along y, times the number of windows along x,
    plus its window along x), and ``corr[pattern, o]`` is the sum of ``wsum[o]`` over the taps that fall outside
    the image (0 for the interior). A 3x3 kernel with padding 1 has 9 patterns; without padding there is one,
    all zero, and ``wsum`` is not read."""
    o, kh, kw = wsum.shape
    oh, ow = conv_out_size(h, kh, stride, pad), conv_out_size(wd, kw, stride, pad)
    ypat, xpat = np.empty(oh, np.int64), np.empty(ow, np.int64)
    if pad == 0:
        ypat[:], xpat[:] = 0, 0
        return np.zeros((1, o), np.int64), ypat, xpat
    corr = _border_kernel(np.ascontiguousarray(wsum, dtype=np.int64), h, wd, stride, pad, oh, ow, ypat, xpat)
    return corr, ypat, xpat


@njit(cache=True, parallel=True)
def _threshold_pack_kernel(x, t, flip, out):  # pragma: no cover
    """x: float32 [N, C, P] (NCHW with P = H * W), t: float32 [C], flip: bool [C] -> out uint64 [N, P, words(C)], the
    bit ``x >= t`` (``x <= t`` where flipped) of each channel; returns how many values are NaN or +-inf.

    Split over threads in blocks of ``PACK_PIXELS`` pixels of one image; within a block the channels are the
    outer loop, so each channel's pixels are read contiguously (a pixel-outer loop reads one float per cache
    line, H * W floats apart)."""
    n_img, c_in, n_pix = x.shape
    cw = out.shape[2]
    n_blk = (n_pix + PACK_PIXELS - 1) // PACK_PIXELS
    bad = 0
    for task in prange(n_img * n_blk):
        n = task // n_blk
        p0 = (task - n * n_blk) * PACK_PIXELS
        np_ = min(PACK_PIXELS, n_pix - p0)
        acc = np.zeros((cw, PACK_PIXELS), np.uint64)
        for c in range(c_in):
            wi = c // WORD_BITS
            sh = np.uint64(c - wi * WORD_BITS)
            tc = t[c]
            row = x[n, c]
            words_ = acc[wi]
            if flip[c]:  # branch-free inner loops: the bits of real data are unpredictable
                for i in range(np_):
                    words_[i] |= np.uint64(row[p0 + i] <= tc) << sh
            else:
                for i in range(np_):
                    words_[i] |= np.uint64(row[p0 + i] >= tc) << sh
            for i in range(np_):
                bad += np.int64(not np.isfinite(row[p0 + i]))
        for i in range(np_):
            for wi in range(cw):
                out[n, p0 + i, wi] = acc[wi, i]
    return bad


@njit(cache=True, parallel=True)
def _threshold_pack_rows_kernel(x, sign, ts, out):  # pragma: no cover
    """x: float32 [N, C] -> out uint64 [N, words(C)], the bit ``sign x >= sign t`` (given as ``ts``) of each channel:
    with sign -1 (a flipped channel) that is exactly ``x <= t``, negation being exact. Returns the number of NaN
    or +-inf values."""
    n, c_in = x.shape
    cw = out.shape[1]
    bad = 0
    for task in prange(n * cw):
        r = task // cw
        wi = task - r * cw
        c0 = wi * WORD_BITS
        word = np.uint64(0)
        for j in range(min(WORD_BITS, c_in - c0)):
            v = x[r, c0 + j]
            word |= np.uint64(v * sign[c0 + j] >= ts[c0 + j]) << np.uint64(j)
            bad += np.int64(not np.isfinite(v))
        out[r, wi] = word
    return bad


def threshold_pack(x: np.ndarray, t: np.ndarray, flip: np.ndarray) -> tuple[np.ndarray, int]:
    """The unchecked core of the float -> bits step: float32 ``x`` [N, C, P], float32 ``t`` [C], bool ``flip`` [C]
    -> (uint64 [N, P, words(C)], number of non-finite values in ``x``)."""
    n, c, p = x.shape
    out = np.empty((n, p, words(c)), np.uint64)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if p == 1:  # [N, C] (after a linear layer): the channels are contiguous; a block of pixels would hold one
        sign = np.where(flip, np.float32(-1), np.float32(1)).astype(np.float32)
        bad = _threshold_pack_rows_kernel(x.reshape(n, c), sign, (t * sign).astype(np.float32), out.reshape(n, -1))
    else:
        bad = _threshold_pack_kernel(x, t, flip, out)
    return out, int(bad)


_NO_ACC = np.empty((0, 0), np.int32)
_NO_BITS = np.empty((0, 0), np.uint64)
_NO_ROWS = _NO_BITS


def _half_words(c_in: int, kh: int, kw: int) -> bool:
    """Whether the layer packs two taps per word: at most 32 channels (half of every word would be padding) and
    more than one tap."""
    return c_in <= WORD_BITS // 2 and kh * kw > 1


def _weight_rows(w: np.ndarray, half: bool) -> np.ndarray:
    """The GEMM's weight rows: uint64 [O, KH KW Cw], or with ``half`` two taps (low half-words) per word."""
    o, kh, kw, _ = w.shape
    b = np.ascontiguousarray(w).reshape(o, -1)
    if not half:
        return b
    b32 = np.zeros((o, 2 * ((kh * kw + 1) // 2)), np.uint32)
    b32[:, : kh * kw] = (b & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    return b32.view(np.uint64)


def conv_plan(
    w: np.ndarray, wsum: np.ndarray, t: np.ndarray | None, c_in: int, h: int, wd: int, stride: int, pad: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What :func:`conv_words` precomputes for an ``h x wd`` input, to be reused across calls of the same size:
    ``(table, ypat, xpat, rows)``: :func:`border_table`'s, the table holding the padding corrections (``t`` None)
    or, with thresholds, the popcount limits ``floor((K - corr - t) / 2)`` (``K - 2 popcount - corr >= t`` exactly
    when ``popcount <= limit``), and the GEMM's weight rows in the layout this input size uses."""
    corr, ypat, xpat = border_table(wsum, h, wd, stride, pad)
    rows = _weight_rows(w, _half_words(c_in, w.shape[1], w.shape[2]))
    if t is None:
        return corr, ypat, xpat, rows
    k_full = w.shape[1] * w.shape[2] * c_in
    return (k_full - corr - np.asarray(t, np.int64)[None, :]) // 2, ypat, xpat, rows


def conv_words(
    x: np.ndarray, w: np.ndarray, wsum: np.ndarray, t: np.ndarray | None, c_in: int, stride: int, pad: int,
    plan: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """The unchecked core of :func:`binary_conv2d` (shapes must be right, padding bits zero): packed NHWC ``x``
    [N, H, W, Cw], weights ``w`` [O, KH, KW, Cw] with ``wsum = tap_sums(w, c_in)``; returns int32 acc
    [N, OH, OW, O] (``t`` None) or bits [N, OH, OW, words(O)]. ``plan``: :func:`conv_plan` of the same
    arguments and input size, if the caller keeps one."""
    n, h, wd, cw = x.shape
    o, kh, kw, _ = w.shape
    oh, ow = conv_out_size(h, kh, stride, pad), conv_out_size(wd, kw, stride, pad)
    table, ypat, xpat, b = plan if plan is not None else conv_plan(w, wsum, t, c_in, h, wd, stride, pad)
    x = np.ascontiguousarray(x)
    half = _half_words(c_in, kh, kw)
    whole = kh == h and kw == wd or kh == kw == stride == 1
    # a linear layer (the kernel covers the image) or a 1x1 conv, unpadded: each pixel's taps are already one row
    rows = x.reshape(n * oh * ow, -1) if whole and pad == 0 and not half else _NO_ROWS
    k_full = kh * kw * c_in
    if t is None:
        acc = np.empty((n * oh * ow, o), np.int32)
        _conv_kernel(x, rows, kh, kw, stride, pad, half, b, k_full, table, ypat, xpat, oh, ow, acc, _NO_BITS)
        return acc.reshape(n, oh, ow, o)
    bits = np.empty((n * oh * ow, words(o)), np.uint64)
    _conv_kernel(x, rows, kh, kw, stride, pad, half, b, k_full, table, ypat, xpat, oh, ow, _NO_ACC, bits)
    return bits.reshape(n, oh, ow, -1)


@njit(cache=True, parallel=True)
def _maxpool_kernel(x, k, stride, pad, oh, ow, out):  # pragma: no cover
    """OR over each k x k window (taps outside the image skipped: torch pads max-pooling with -inf)."""
    n_img, h, wd, cw = x.shape
    for task in prange(n_img * oh):
        n = task // oh
        y = task - n * oh
        for xx in range(ow):
            for c in range(cw):
                v = np.uint64(0)
                for ky in range(k):
                    iy = y * stride - pad + ky
                    if iy < 0 or iy >= h:
                        continue
                    for kx in range(k):
                        ix = xx * stride - pad + kx
                        if 0 <= ix < wd:
                            v |= x[n, iy, ix, c]
                out[n, y, xx, c] = v


# ----------------------------------------------------------------------------------------------------
# Checked wrappers
# ----------------------------------------------------------------------------------------------------


def conv_out_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """``floor((size + 2 pad - kernel) / stride) + 1`` (PyTorch's, dilation 1)."""
    return (size + 2 * pad - kernel) // stride + 1


def _check_words(name: str, a: np.ndarray, ndim: int) -> None:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy uint64 array, got {type(a).__name__}")
    if a.dtype != np.uint64:
        raise TypeError(f"{name} must hold uint64 words, got dtype {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {a.shape}")


def _check_padding_bits(name: str, a: np.ndarray, c: int) -> None:
    """Bits past ``c`` in the last word must be zero: the kernels rely on it (XOR of two zeros is 0)."""
    rem = c % WORD_BITS
    if rem and a.size:
        mask = np.uint64(~((1 << rem) - 1) & 0xFFFFFFFFFFFFFFFF)
        if (a[..., -1] & mask).any():
            raise ValueError(f"{name}: the padding bits past channel {c} of the last word are not zero; pack with "
                             "lowbit.runtime.binary.pack_signs (it zeroes them)")


def tap_sums(w: np.ndarray, c_in: int) -> np.ndarray:
    """``C - 2 popcount(w[o, ky, kx, :])`` = the dot product of tap (ky, kx) of channel o with an all -1 input, int64
    ``[O, KH, KW]``: what a zero word in the padded input adds and the kernel subtracts again."""
    pc = np.unpackbits(np.ascontiguousarray(w).view(np.uint8), axis=-1).sum(-1, dtype=np.int64)
    return c_in - 2 * pc


def _check_int(name: str, v: int, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return int(v)


def _thresholds_arg(thresholds: np.ndarray | None, n_out: int, k: int) -> np.ndarray:
    if thresholds is None:
        return np.zeros(0, np.int64)
    t = np.asarray(thresholds)
    if t.dtype.kind not in "iu" or t.shape != (n_out,):
        raise ValueError(f"thresholds must be an integer array of shape ({n_out},) (one per output channel), got "
                         f"dtype {t.dtype}, shape {t.shape}")
    return np.clip(t.astype(np.int64), -k, k + 1)  # outside [-K, K] the answer is the same


def binary_conv2d(
    x: np.ndarray,
    w: np.ndarray,
    c_in: int,
    stride: int = 1,
    padding: int = 0,
    thresholds: np.ndarray | None = None,
) -> np.ndarray:
    """Binary 2-D convolution of packed NHWC +-1 activations with packed +-1 weights (zero padding).

    ``acc[n, y, x, o] = sum of x[n, c, y s + ky - p, x s + kx - p] w[o, c, ky, kx]`` over ``c < c_in`` and the taps
    inside the image
    (padded taps contribute 0, as ``F.conv2d`` on the +-1 tensors). Without ``thresholds`` it returns ``acc``;
    with them the packed bits ``acc >= thresholds[o]`` (the next binary layer's input).

    Args:
        x: uint64 ``[N, H, W, words(c_in)]`` (:func:`~lowbit.runtime.binary.pack.pack_nchw`).
        w: uint64 ``[O, KH, KW, words(c_in)]`` (``pack_signs(weight.permute(0, 2, 3, 1))``).
        c_in: the true number of input channels.
        stride, padding: as ``F.conv2d`` (one value for both axes; dilation 1, groups 1).
        thresholds: optional integer ``[O]``.

    Returns:
        int32 ``[N, OH, OW, O]`` (no thresholds) or uint64 ``[N, OH, OW, words(O)]``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from lowbit.runtime.binary.pack import pack_nchw, pack_signs
        >>> xs, ws = torch.randn(1, 70, 5, 5).sign(), torch.randn(3, 70, 3, 3).sign()
        >>> acc = binary_conv2d(pack_nchw(xs), pack_signs(ws.permute(0, 2, 3, 1)), 70, padding=1)
        >>> torch.equal(torch.from_numpy(acc).permute(0, 3, 1, 2).float(), F.conv2d(xs, ws, padding=1))
        True
    """
    _check_words("x", x, 4)
    _check_words("w", w, 4)
    c_in = _check_int("c_in", c_in, 1)
    stride = _check_int("stride", stride, 1)
    padding = _check_int("padding", padding, 0)
    n, h, wd, cw = x.shape
    o, kh, kw, wcw = w.shape
    if cw != words(c_in) or wcw != cw:
        raise ValueError(f"c_in={c_in} needs {words(c_in)} words per pixel; x has {cw}, w has {wcw} (x [N, H, W, Cw], "
                         "w [O, KH, KW, Cw])")
    if min(n, h, wd, o, kh, kw) < 1:
        raise ValueError(f"empty input or weight: x {x.shape}, w {w.shape}")
    oh, ow = conv_out_size(h, kh, stride, padding), conv_out_size(wd, kw, stride, padding)
    if oh < 1 or ow < 1:
        raise ValueError(f"a {kh}x{kw} kernel with padding {padding} does not fit a {h}x{wd} input")
    _check_padding_bits("x", x, c_in)
    _check_padding_bits("w", w, c_in)
    k = kh * kw * c_in
    t = _thresholds_arg(thresholds, o, k)
    w = np.ascontiguousarray(w)
    # the padded taps' correction is read only where a window crosses the border: none without padding, so
    # skip unpacking every weight bit per call (zeros carry the kernel size the kernel reads from its shape)
    wsum = tap_sums(w, c_in) if padding else np.zeros(w.shape[:3], np.int64)
    return conv_words(x, w, wsum, None if thresholds is None else t, c_in, stride, padding)


def binary_gemm(a: np.ndarray, b: np.ndarray, k: int, thresholds: np.ndarray | None = None) -> np.ndarray:
    """Binary matrix product ``a @ b.T`` of packed +-1 rows: ``acc[m, n] = k - 2 popcount(a[m] XOR b[n])``.

    Args:
        a: uint64 ``[M, words(k)]`` (activations, one row per sample).
        b: uint64 ``[N, words(k)]`` (weights, one row per output).
        k: the true (unpadded) length.
        thresholds: optional integer ``[N]``: return the packed bits ``acc >= thresholds`` instead.

    Returns:
        int32 ``[M, N]``, or uint64 ``[M, words(N)]`` with thresholds.

    Example:
        >>> import torch
        >>> from lowbit.runtime.binary.pack import pack_signs
        >>> x, w = torch.randn(5, 100).sign(), torch.randn(7, 100).sign()
        >>> torch.equal(torch.from_numpy(binary_gemm(pack_signs(x), pack_signs(w), 100)).float(), x @ w.T)
        True
    """
    _check_words("a", a, 2)
    _check_words("b", b, 2)
    k = _check_int("k", k, 1)
    if a.shape[1] != words(k) or b.shape[1] != words(k):
        raise ValueError(f"k={k} needs {words(k)} words per row; a has shape {a.shape}, b {b.shape}")
    out = binary_conv2d(a[:, None, None, :], b[:, None, None, :], k, thresholds=thresholds)
    return out.reshape(a.shape[0], -1)


def maxpool2d_bits(x: np.ndarray, kernel: int, stride: int | None = None, padding: int = 0) -> np.ndarray:
    """Max-pooling of packed +-1 NHWC activations: the OR of the bits under each window (+1 -> 1).

    Same output size as ``F.max_pool2d(kernel, stride, padding)`` (floor mode, dilation 1); taps in the padding
    are ignored, as torch's -inf padding never wins.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from lowbit.runtime.binary.pack import pack_nchw, unpack_nhwc
        >>> xs = torch.randn(2, 65, 6, 6).sign()
        >>> torch.equal(unpack_nhwc(maxpool2d_bits(pack_nchw(xs), 2), 65), F.max_pool2d(xs, 2))
        True
    """
    _check_words("x", x, 4)
    kernel = _check_int("kernel", kernel, 1)
    stride = kernel if stride is None else _check_int("stride", stride, 1)
    padding = _check_int("padding", padding, 0)
    if 2 * padding > kernel:
        raise ValueError(f"padding must be at most half the kernel (as in torch), got kernel {kernel}, "
                         f"padding {padding}")
    n, h, wd, cw = x.shape
    oh, ow = conv_out_size(h, kernel, stride, padding), conv_out_size(wd, kernel, stride, padding)
    if oh < 1 or ow < 1:
        raise ValueError(f"a {kernel}x{kernel} pooling window does not fit a {h}x{wd} input")
    out = np.empty((n, oh, ow, cw), np.uint64)
    _maxpool_kernel(np.ascontiguousarray(x), kernel, stride, padding, oh, ow, out)
    return out


def _probe(a, b):  # pragma: no cover - compiled fresh by popcnt_in_asm
    s = np.uint64(0)
    for i in range(a.shape[0]):
        s += popcount64(a[i] ^ b[i])
    return s


def popcnt_in_asm() -> dict[str, int]:
    """Compile a fresh (uncached: numba cannot show the assembly of cached code) XOR-popcount loop, the inner loop
    of every kernel here, and count its ``popcnt`` and ``vpshufb`` (LLVM's vectorized popcount) instructions:
    the check that ``llvm.ctpop`` became a popcount instruction on this CPU.

    Example:
        >>> popcnt_in_asm()["popcnt"] > 0
        True
    """
    fn = njit(cache=False)(_probe)
    a = np.arange(1, 9, dtype=np.uint64)
    if fn(a, np.zeros(8, np.uint64)) != sum(bin(int(v)).count("1") for v in a):
        raise RuntimeError("popcount64 gave a wrong count: the intrinsic is broken on this numba/LLVM")
    asm = "\n".join(fn.inspect_asm().values())
    return {"popcnt": asm.count("popcnt"), "vpshufb": asm.count("vpshufb"), "threads": numba.get_num_threads()}
