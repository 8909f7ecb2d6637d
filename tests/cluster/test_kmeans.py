"""1-D k-means of Deep Compression: initializations, Lloyd iterations against a brute-force reference."""


import numpy as np
import pytest
import torch

from lowbit.cluster import cluster_weight, init_centroids, kmeans_1d


def _mixture(n_per: int = 1000, centers: tuple[float, ...] = (-1.0, 0.25, 2.0), std: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    parts = [c + std * torch.randn(n_per, generator=g) for c in centers]
    return torch.cat(parts)[torch.randperm(n_per * len(centers), generator=g)]


def _lloyd_reference(x: torch.Tensor, c: torch.Tensor, iters: int) -> torch.Tensor:
    """Textbook Lloyd with a dense (n, k) distance matrix, float64; empty clusters keep their centroid."""
    x, c = x.double(), c.double().clone()
    for _ in range(iters):
        codes = (x[:, None] - c[None, :]).abs().argmin(1)  # ties: the lower index, as in kmeans_1d
        for j in range(c.numel()):
            members = x[codes == j]
            if members.numel():
                c[j] = members.mean()
    return c


@pytest.mark.parametrize("init", ["linear", "density"])
def test_recovers_the_centers_of_a_mixture(init: str) -> None:
    x = _mixture()
    res = kmeans_1d(x, 3, init=init)  # type: ignore[arg-type]
    assert res.converged
    assert torch.allclose(res.centroids, torch.tensor([-1.0, 0.25, 2.0]), atol=0.01)
    # each third of the points (one component) gets one code
    truth = torch.bucketize(x, torch.tensor([-0.375, 1.125]))
    assert torch.equal(res.codes, truth)


def test_matches_a_brute_force_lloyd() -> None:
    x = torch.randn(2000, generator=torch.Generator().manual_seed(1)) ** 3  # heavy tails, no ties
    for init in ("linear", "density", "random"):
        start = init_centroids(x.double().sort().values, 8, init, seed=3)  # type: ignore[arg-type]
        ref = _lloyd_reference(x, start, iters=500)
        res = kmeans_1d(x, 8, init=init, max_iter=500, seed=3)  # type: ignore[arg-type]
        assert res.converged, init
        assert torch.allclose(res.centroids.double(), ref, rtol=1e-6, atol=1e-7), init
        nearest = (x[:, None] - res.centroids[None, :]).abs().min(1).values
        assert torch.allclose((x - res.centroids[res.codes]).abs(), nearest, atol=1e-6)


def test_linear_init_spans_min_to_max_evenly() -> None:
    x = torch.randn(500, dtype=torch.float64)
    c = init_centroids(x.sort().values, 16, "linear")
    assert c[0] == x.min() and torch.isclose(c[-1], x.max())
    steps = c.diff()
    assert torch.allclose(steps, steps.mean().expand_as(steps))


def test_density_init_is_the_quantiles() -> None:
    x = torch.randn(777, dtype=torch.float64) * torch.rand(777, dtype=torch.float64)
    for k in (2, 5, 32):
        c = init_centroids(x.sort().values, k, "density")
        expected = np.quantile(x.numpy(), np.linspace(0.0, 1.0, k))  # independent: numpy's linear method
        assert np.allclose(c.numpy(), expected, rtol=0, atol=1e-12)


def test_random_init_draws_seeded_members() -> None:
    x = torch.randn(300, dtype=torch.float64).sort().values
    a, b, other = (init_centroids(x, 8, "random", seed=s) for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, other)
    assert torch.isin(a, x).all() and a.unique().numel() == 8 and torch.equal(a, a.sort().values)
    few = init_centroids(x[:3], 8, "random", seed=0)  # fewer values than clusters: drawn with replacement
    assert few.numel() == 8 and torch.isin(few, x[:3]).all()


@pytest.mark.parametrize("bits", [1, 3, 6])
def test_codes_and_centroids_shape_dtype_range(bits: int) -> None:
    x = torch.randn(1000)
    res = kmeans_1d(x, 2**bits)
    assert res.centroids.dtype == torch.float32 and res.centroids.shape == (2**bits,)
    assert res.codes.dtype == torch.int64 and res.codes.shape == (1000,)
    assert int(res.codes.min()) >= 0 and int(res.codes.max()) < 2**bits
    assert torch.equal(res.centroids, res.centroids.sort().values)
    assert res.centroids[res.codes].unique().numel() <= 2**bits


def test_empty_clusters_keep_their_centroid_deterministically() -> None:
    x = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0])
    a, b = kmeans_1d(x, 8), kmeans_1d(x, 8)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.codes, b.codes)
    # the two occupied clusters sit on the data; the six empty ones stay where linear init put them
    assert torch.allclose(a.centroids, torch.linspace(0, 1, 8)) and a.centroids[[0, -1]].tolist() == [0.0, 1.0]
    assert torch.equal(a.centroids[a.codes], x)


def test_max_iter_and_convergence_flags() -> None:
    x = torch.randn(5000) ** 3
    one = kmeans_1d(x, 16, max_iter=1)
    assert one.iterations == 1 and not one.converged
    full = kmeans_1d(x, 16, max_iter=10_000)
    assert full.converged and full.iterations > 1

    def sse(r: object) -> float:
        return float((x - r.centroids[r.codes]).pow(2).sum())  # type: ignore[attr-defined]

    assert sse(full) <= sse(one)


def test_cluster_weight_uses_only_kept_weights() -> None:
    w = torch.tensor([[0.0, 0.9, 1.0], [0.0, -1.0, 0.0]])
    res = cluster_weight(w, 1)  # zeros are pruned: three values
    assert res.codes.tolist() == [1, 1, 0]
    assert torch.allclose(res.centroids, torch.tensor([-1.0, 0.95]))
    kept = torch.tensor([[True, True, True], [False, True, False]])  # a kept weight may be exactly 0
    assert cluster_weight(w, 1, kept).codes.numel() == 4
    empty = cluster_weight(torch.zeros(3, 3), 2)
    assert empty.codes.numel() == 0 and torch.equal(empty.centroids, torch.zeros(4))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="1..16"):
        cluster_weight(torch.randn(4), 0)
    with pytest.raises(ValueError, match="1..16"):
        cluster_weight(torch.randn(4), 17)
    with pytest.raises(ValueError, match="valid: linear, density, random"):
        kmeans_1d(torch.randn(4), 2, init="kmeans++")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        cluster_weight(torch.randn(2, 3), 2, kept=torch.ones(3, 2, dtype=torch.bool))
