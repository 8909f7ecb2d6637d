"""Inference with SIMD-group-sparse weights: a packed format and a numba kernel for ``y = x W^T + b``.

After :func:`~lowbit.prune.scalpel.simd_prune_`, every row of ``W (out, in)`` is a list of kept aligned
groups of ``k`` weights. :func:`pack_groups` stores them group-CSR style:

    row_ptr  (out + 1,)  int64    groups of row o are row_ptr[o] : row_ptr[o + 1]
    col      (n_groups,) int32    first input column of each group (a multiple of k)
    values   (n_groups, k) float32  the group's weights, dense

Index overhead is one int32 per k weights (unstructured CSR: one per weight), and the inner loop is a
dense k-wide multiply-add with no gather of single elements, which is the point of Scalpel's SIMD-aware
pruning. The numba kernels are compiled per group size (``k`` is a compile-time constant, so the inner
loop is unrolled and vectorised), parallel over output rows when numba has more than one thread.

Example:
    >>> import torch
    >>> w = torch.zeros(2, 8); w[0, 4:8] = 1.0; w[1, 0:4] = 2.0
    >>> p = pack_groups(w, group_size=4)
    >>> p.col.tolist(), group_sparse_linear(torch.ones(1, 8), p).tolist()
    ([4, 0], [[4.0, 8.0]])

References:
    Yu et al., "Scalpel: Customizing DNN Pruning to the Underlying Hardware Parallelism", ISCA 2017.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import numba
import numpy as np
import torch

__all__ = ["GroupPacked", "group_sparse_linear", "pack_groups"]


@dataclass(frozen=True)
class GroupPacked:
    """A weight matrix as kept aligned groups (see the module docstring)."""

    row_ptr: np.ndarray
    col: np.ndarray
    values: np.ndarray
    in_features: int
    out_features: int
    group_size: int
    bias: np.ndarray  # (out,) float32; zeros for a layer without bias
    flat_values: np.ndarray  # ``values`` as one (n_groups * k,) vector (a view), as the kernels read it

    @property
    def nbytes(self) -> int:
        """Bytes of values + column indices + row pointers (bias not counted)."""
        return self.row_ptr.nbytes + self.col.nbytes + self.values.nbytes


def pack_groups(weight: torch.Tensor, group_size: int, bias: torch.Tensor | None = None) -> GroupPacked:
    """Pack a ``(out, in)`` weight into kept aligned groups; a group is kept if any of its weights is nonzero.

    Args:
        weight: 2-D weight (a Conv2d weight: flatten it to ``(out, in*kh*kw)`` first).
        group_size: ``k``; ``in`` need not be a multiple (the last group is zero-padded).
        bias: optional ``(out,)`` bias.

    Example:
        >>> pack_groups(torch.eye(4), 2).row_ptr.tolist()
        [0, 1, 2, 3, 4]
    """
    if weight.dim() != 2:
        raise ValueError(f"pack_groups takes a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    out, cols = weight.shape
    k = group_size
    groups = -(-cols // k)
    w = torch.nn.functional.pad(weight.detach().float().cpu(), (0, groups * k - cols)).view(out, groups, k)
    kept = (w != 0).any(-1)  # (out, groups)
    row_ptr = np.zeros(out + 1, dtype=np.int64)
    row_ptr[1:] = np.cumsum(kept.sum(1).numpy())
    rows, gidx = kept.nonzero(as_tuple=True)  # row-major order, so each row's groups are contiguous
    values = np.ascontiguousarray(w[rows, gidx].numpy(), dtype=np.float32)  # (n_groups, k)
    col = (gidx * k).numpy().astype(np.int32)
    b = np.zeros(out, np.float32) if bias is None else bias.detach().float().cpu().numpy().astype(np.float32)
    return GroupPacked(row_ptr, col, values, cols, out, k, b, values.reshape(-1))


# Kernel notes. Indices are cast to unsigned (np.uint64) because numba adds a negative-index wraparound
# branch to every signed index it cannot prove non-negative, which blocks vectorisation (5x slower here).
# The small-batch kernels for k = 4 and 8 keep k independent accumulators, which LLVM's SLP vectoriser
# packs into one SIMD register: one vector load of weights, one of x, one FMA per group. Each kernel is
# compiled on first use, parallel over output rows only when numba has more than one thread (the
# parallel launch costs ~8 us, as much as a whole 784 x 300 layer at 90% sparsity).
_U1 = np.uint64(1)


def _rows_k8(x, row_ptr, col, values, bias, out):  # x (B, in_padded), values (n_groups * 8,) -> out (B, O)
    for o in numba.prange(row_ptr.shape[0] - 1):
        stop = np.uint64(row_ptr[o + 1])
        for b in range(x.shape[0]):
            xb = x[b]
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
            g = np.uint64(row_ptr[o])
            while g < stop:
                c, v = np.uint64(col[g]), g * np.uint64(8)
                a0 += values[v] * xb[c]
                a1 += values[v + _U1] * xb[c + _U1]
                a2 += values[v + np.uint64(2)] * xb[c + np.uint64(2)]
                a3 += values[v + np.uint64(3)] * xb[c + np.uint64(3)]
                a4 += values[v + np.uint64(4)] * xb[c + np.uint64(4)]
                a5 += values[v + np.uint64(5)] * xb[c + np.uint64(5)]
                a6 += values[v + np.uint64(6)] * xb[c + np.uint64(6)]
                a7 += values[v + np.uint64(7)] * xb[c + np.uint64(7)]
                g += _U1
            out[b, o] = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) + bias[o]


def _rows_k4(x, row_ptr, col, values, bias, out):  # as _rows_k8 with groups of 4
    for o in numba.prange(row_ptr.shape[0] - 1):
        stop = np.uint64(row_ptr[o + 1])
        for b in range(x.shape[0]):
            xb = x[b]
            a0 = a1 = a2 = a3 = np.float32(0.0)
            g = np.uint64(row_ptr[o])
            while g < stop:
                c, v = np.uint64(col[g]), g * np.uint64(4)
                a0 += values[v] * xb[c]
                a1 += values[v + _U1] * xb[c + _U1]
                a2 += values[v + np.uint64(2)] * xb[c + np.uint64(2)]
                a3 += values[v + np.uint64(3)] * xb[c + np.uint64(3)]
                g += _U1
            out[b, o] = (a0 + a1) + (a2 + a3) + bias[o]


def _rows_any(k: int) -> Any:
    uk = np.uint64(k)  # a closure constant: numba unrolls the j loop

    def rows_kernel(x, row_ptr, col, values, bias, out):  # any k (k = 1 is plain CSR)
        for o in numba.prange(row_ptr.shape[0] - 1):
            stop = np.uint64(row_ptr[o + 1])
            for b in range(x.shape[0]):
                xb = x[b]
                acc = np.float32(0.0)
                g = np.uint64(row_ptr[o])
                while g < stop:
                    c, v = np.uint64(col[g]), g * uk
                    for j in range(uk):
                        acc += values[v + j] * xb[c + j]
                    g += _U1
                out[b, o] = acc + bias[o]

    return rows_kernel


def _batch_any(k: int) -> Any:
    uk = np.uint64(k)

    def batch_kernel(xt, row_ptr, col, values, bias, out):  # xt (in_padded, B) -> out (O, B)
        for o in numba.prange(row_ptr.shape[0] - 1):
            row = out[o]
            row[:] = bias[o]
            stop = np.uint64(row_ptr[o + 1])
            g = np.uint64(row_ptr[o])
            while g < stop:
                c, v = np.uint64(col[g]), g * uk
                for j in range(uk):
                    w, xr = values[v + j], xt[c + j]
                    for b in range(row.shape[0]):  # contiguous over the batch: vectorised
                        row[b] += w * xr[b]
                g += _U1

    return batch_kernel


@cache
def _kernel(kind: str, k: int, parallel: bool) -> Any:
    """The compiled ``kind`` ("rows" or "batch") kernel for group size ``k``."""
    if kind == "rows":
        fn = {8: _rows_k8, 4: _rows_k4}.get(k) or _rows_any(k)
    else:
        fn = _batch_any(k)
    return numba.njit(parallel=parallel, fastmath=True, cache=False)(fn)


def group_sparse_linear(x: torch.Tensor, packed: GroupPacked, batch_threshold: int = 8) -> torch.Tensor:
    """``y = x W^T + b`` over the kept groups (float32, CPU), checked against ``F.linear`` in the tests.

    Rule: batches smaller than ``batch_threshold`` use a per-row dot product over ``x (B, in)``; larger
    ones use ``x^T (in, B)`` so the innermost loop runs over the batch.

    Args:
        x: ``(B, in)`` input.
        packed: from :func:`pack_groups`.
        batch_threshold: batch size from which the batch-inner kernel is used.

    Example:
        >>> p = pack_groups(torch.eye(4), 4)
        >>> group_sparse_linear(torch.arange(4.0).view(1, 4), p).tolist()
        [[0.0, 1.0, 2.0, 3.0]]
    """
    if x.dim() != 2 or x.shape[1] != packed.in_features:
        raise ValueError(f"expected x of shape (B, {packed.in_features}), got {tuple(x.shape)}")
    k = packed.group_size
    pad = -packed.in_features % k
    xn = (x if x.dtype == torch.float32 and x.device.type == "cpu" else x.float().cpu()).detach().numpy()
    if pad:
        xn = np.pad(xn, ((0, 0), (0, pad)))
    parallel = numba.get_num_threads() > 1
    if xn.shape[0] < batch_threshold:
        y = np.empty((xn.shape[0], packed.out_features), dtype=np.float32)
        _kernel("rows", k, parallel)(np.ascontiguousarray(xn), packed.row_ptr, packed.col, packed.flat_values,
                                     packed.bias, y)
        return torch.from_numpy(y)
    yt = np.empty((packed.out_features, xn.shape[0]), dtype=np.float32)
    _kernel("batch", k, parallel)(np.ascontiguousarray(xn.T), packed.row_ptr, packed.col, packed.flat_values,
                                  packed.bias, yt)
    return torch.from_numpy(np.ascontiguousarray(yt.T))
