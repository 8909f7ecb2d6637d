"""One-dimensional k-means for weight sharing (Deep Compression, section 3.1).

The weights of one layer that survive pruning are split into ``k = 2**bits`` clusters minimizing the
within-cluster sum of squares; every weight is then replaced by its cluster's centroid, so the layer
stores ``k`` float values plus a ``bits``-bit code per weight.

In one dimension Lloyd's algorithm needs no distance matrix: with sorted centroids, the nearest
centroid of ``x`` is found by binary search among the midpoints of neighbouring centroids, and with
the weights sorted once, every cluster is a contiguous run whose sum comes from a prefix sum. One
iteration therefore costs O(k log n) after an O(n log n) sort.

References:
    Han, Mao, Dally, "Deep Compression: Compressing Deep Neural Networks with Pruning, Trained
    Quantization and Huffman Coding", ICLR 2016, arXiv:1510.00149.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

__all__ = ["Init", "INITS", "KMeansResult", "init_centroids", "kmeans_1d", "cluster_weight"]

Init = Literal["linear", "density", "random"]
INITS: tuple[str, ...] = ("linear", "density", "random")


class KMeansResult(NamedTuple):
    """Outcome of :func:`kmeans_1d`: ``centroids`` (k,) float32 in ascending order, ``codes`` (n,) int64
    in ``[0, k)`` aligned with the input values, the number of centroid updates (``iterations``), and
    whether the assignment reached a fixed point (``converged``) within ``max_iter`` updates."""

    centroids: torch.Tensor
    codes: torch.Tensor
    iterations: int
    converged: bool


def init_centroids(sorted_values: torch.Tensor, k: int, method: Init = "linear", seed: int = 0) -> torch.Tensor:
    """The ``k`` starting centroids of Deep Compression's three initializations, in ascending order.

    With ``x_(1) <= ... <= x_(n)`` the sorted values:

    - ``linear``:  ``c_j = x_(1) + j (x_(n) - x_(1)) / (k - 1)``, evenly spaced over ``[min, max]``
      (the paper's best: it keeps centroids on the rare large weights, which matter most).
    - ``density``: ``c_j = F^-1(j / (k - 1))``, evenly spaced on the empirical CDF ``F``, i.e. the
      quantiles at probabilities ``0, 1/(k-1), ..., 1``, linearly interpolated between order statistics
      (``numpy.quantile``'s default); centroids crowd where the weights are dense.
    - ``random``:  ``k`` of the values drawn without replacement (with replacement when ``n < k``) by a
      generator seeded with ``seed``, then sorted (Forgy initialization).

    No gradient: this is a pure function of the values.

    Args:
        sorted_values: (n,) values in ascending order, n >= 1.
        k: number of centroids, >= 1.
        method: ``"linear"``, ``"density"`` or ``"random"``.
        seed: seed of the ``random`` draw (ignored by the other two).

    Returns:
        (k,) tensor, same dtype and device as ``sorted_values``, ascending.

    Example:
        >>> init_centroids(torch.tensor([-1.0, 0.0, 0.5, 3.0]), 3, "linear")
        tensor([-1.,  1.,  3.])

    References:
        Han et al., "Deep Compression", arXiv:1510.00149, section 3.2 and Figure 4.
    """
    n = sorted_values.numel()
    if n == 0 or k < 1:
        raise ValueError(f"need at least one value and one centroid, got n={n}, k={k}")
    xs = sorted_values.flatten()
    if method == "linear":
        return torch.linspace(0.0, 1.0, k, dtype=xs.dtype, device=xs.device) * (xs[-1] - xs[0]) + xs[0]
    if method == "density":
        pos = torch.linspace(0.0, 1.0, k, dtype=torch.float64, device=xs.device) * (n - 1)  # fractional ranks
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=n - 1)
        frac = (pos - lo).to(xs.dtype)
        return xs[lo] + frac * (xs[hi] - xs[lo])
    if method == "random":
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(n, generator=g)[:k] if n >= k else torch.randint(n, (k,), generator=g)
        return xs[idx.to(xs.device)].sort().values
    raise ValueError(f"unknown k-means initialization {method!r}; valid: {', '.join(INITS)}")


def kmeans_1d(values: torch.Tensor, k: int, init: Init = "linear", max_iter: int = 300,
              seed: int = 0) -> KMeansResult:
    """Lloyd's k-means on scalars: minimize ``sum_i (x_i - c_{I_i})^2`` over centroids ``c`` and codes ``I``.

    Each iteration assigns every value to its nearest centroid, ``I_i = #{j : b_j < x_i}`` with the
    midpoints ``b_j = (c_j + c_{j+1}) / 2`` (ties go to the lower centroid), then moves every centroid
    to the mean of its values, ``c_j = mean{x_i : I_i = j}``. A cluster that receives no value keeps
    its old centroid (deterministic; the centroids stay sorted). The loop stops when the assignment
    repeats (a fixed point: the centroids would not move) or after ``max_iter`` iterations; the codes
    returned are the nearest centroids of the final ``c``. Sums are accumulated in float64.

    No gradient flows through the clustering; fine-tuning the centroids is :mod:`lowbit.cluster.sharing`'s.

    Args:
        values: the values to cluster, any shape (flattened); an empty tensor gives zero centroids.
        k: number of clusters, >= 1 (``2**bits``).
        init: ``"linear"`` (paper's default), ``"density"`` or ``"random"``; see :func:`init_centroids`.
        max_iter: most Lloyd iterations, >= 1.
        seed: seed of the ``random`` initialization.

    Returns:
        :class:`KMeansResult` ``(centroids (k,) float32 ascending, codes (n,) int64, iterations, converged)``.

    Example:
        >>> x = torch.tensor([0.0, 0.1, 0.2, 5.0, 5.1, 5.2])
        >>> res = kmeans_1d(x, 2)
        >>> res.centroids, res.codes
        (tensor([0.1000, 5.1000]), tensor([0, 0, 0, 1, 1, 1]))

    References:
        Han et al., "Deep Compression", arXiv:1510.00149, section 3.1, eq. (1).
        Lloyd, "Least squares quantization in PCM", IEEE Trans. Inf. Theory 1982.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    x = values.detach().flatten().to(torch.float64)
    n = x.numel()
    if n == 0:
        return KMeansResult(torch.zeros(k, dtype=torch.float32, device=x.device),
                            torch.zeros(0, dtype=torch.int64, device=x.device), 0, True)
    xs = x.sort().values
    prefix = torch.cat([xs.new_zeros(1), xs.cumsum(0)])  # (n+1,): prefix[i] = sum of the i smallest
    c = init_centroids(xs, k, init, seed)
    cuts_prev, converged, iterations = None, False, 0
    while True:
        mid = (c[:-1] + c[1:]) / 2  # (k-1,) decision boundaries
        # cluster j holds the sorted values xs[cuts[j]:cuts[j+1]]
        inner = torch.searchsorted(xs, mid, right=True)
        cuts = torch.cat([inner.new_zeros(1), inner, inner.new_full((1,), n)])  # (k+1,)
        if cuts_prev is not None and torch.equal(cuts, cuts_prev):
            converged = True  # same assignment: the centroids would not move
            break
        if iterations == max_iter:
            break
        counts = cuts[1:] - cuts[:-1]
        sums = prefix[cuts[1:]] - prefix[cuts[:-1]]
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)  # empty cluster: keep the old centroid
        cuts_prev, iterations = cuts, iterations + 1
    codes = torch.searchsorted((c[:-1] + c[1:]) / 2, x, right=False)  # nearest centroid of the final c
    return KMeansResult(c.to(torch.float32), codes, iterations, converged)


def cluster_weight(weight: torch.Tensor, bits: int, kept: torch.Tensor | None = None, init: Init = "linear",
                   max_iter: int = 300, seed: int = 0) -> KMeansResult:
    """k-means with ``k = 2**bits`` over the surviving weights of one layer.

    The kept weights are ``weight.flatten()[positions]`` with ``positions = kept.flatten().nonzero()``
    (ascending); pruned weights take no part and get no code. Without ``kept``, zeros count as pruned
    (``kept = weight != 0``), the convention of magnitude pruning.

    Args:
        weight: the layer's weight, any shape.
        bits: bits per shared weight, 1..16.
        kept: bool tensor of ``weight``'s shape, True where the weight survives pruning.
        init, max_iter, seed: as in :func:`kmeans_1d`.

    Returns:
        :class:`KMeansResult` whose ``codes`` align with the kept positions in flat (row-major) order.

    Example:
        >>> w = torch.tensor([[0.0, 0.5], [-0.5, 0.49]])
        >>> cluster_weight(w, 1).codes  # three kept weights, two clusters
        tensor([1, 0, 1])

    References:
        Han et al., "Deep Compression", arXiv:1510.00149, section 3.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    if kept is None:
        kept = weight != 0
    elif kept.shape != weight.shape:
        raise ValueError(f"kept mask shape {tuple(kept.shape)} differs from weight shape {tuple(weight.shape)}")
    values = weight.detach().flatten()[kept.flatten().bool()]  # boolean indexing keeps flat order
    return kmeans_1d(values, 2**bits, init, max_iter, seed)
