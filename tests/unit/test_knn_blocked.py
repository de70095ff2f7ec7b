"""``knn_impute`` (blocked, symmetric, sparse-corrected) gives scikit-learn's KNNImputer numbers.

Every expected value is scikit-learn's ``KNNImputer(...).fit_transform(values.T).T`` (voxels as
samples, genes as features) or plain numpy, computed here.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.impute import KNNImputer

from ambasync.analysis.matrix.knn import knn_impute, knn_memory_estimate

TOL = 1e-5


def sklearn_knn(values: np.ndarray, k: int) -> np.ndarray:
    return KNNImputer(n_neighbors=k, missing_values=np.nan, weights="uniform").fit_transform(values.T).T


def assert_matches_sklearn(values: np.ndarray, k: int, **kwargs) -> np.ndarray:
    got = knn_impute(values, k, **kwargs)
    want = sklearn_knn(values, k)
    assert got.shape == values.shape and got.dtype == np.float64
    assert not np.isnan(got).any()
    known = ~np.isnan(values)
    np.testing.assert_array_equal(got[known], values[known])  # present cells untouched, bit for bit
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    return got


def smooth_slab(n_genes: int, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """log2(1 + smooth expression) on a small 3-D grid (voxels in C order), with clustered NaN
    gaps per gene (a patch of one plane, or a blob), like ISH coverage gaps."""
    rng = np.random.default_rng(seed)
    coords = np.stack(np.unravel_index(np.arange(np.prod(shape)), shape), axis=1).astype(float)
    bumps = coords[rng.integers(0, len(coords), 24)]
    widths = rng.uniform(2.0, 6.0, 24)
    fields = np.exp(-((coords[None] - bumps[:, None]) ** 2).sum(-1) / (2 * widths[:, None] ** 2))
    load = rng.gamma(0.6, 1.0, (n_genes, 24)) * (rng.random((n_genes, 24)) < 0.3)
    values = np.log2(1 + (load @ fields) * rng.uniform(0.5, 20, (n_genes, 1)) + rng.gamma(1, 0.05, (n_genes, len(coords))))
    for g in rng.choice(n_genes, n_genes // 2, replace=False):
        centre = coords[rng.integers(len(coords))]
        size = int(rng.integers(5, 400))
        if rng.random() < 0.6:
            d2 = ((coords[:, 1:] - centre[1:]) ** 2).sum(1) + np.where(coords[:, 0] == centre[0], 0, np.inf)
        else:
            d2 = ((coords - centre) ** 2).sum(1)
        near = np.argsort(d2)[:size]
        values[g, near[np.isfinite(d2[near])]] = np.nan
    return values


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.3])
def test_random_matrices_equal_sklearn(k, fraction):
    """Continuous random data (no ties), NaN scattered at 1 %, 10 % and 30 % of the cells."""
    rng = np.random.default_rng(int(fraction * 100) + k)
    values = rng.normal(3.0, 2.0, (25, 300))
    values[rng.random(values.shape) < fraction] = np.nan
    assert_matches_sklearn(values, k)


def test_hard_patterns_equal_sklearn():
    """A gene missing in 95 % of the voxels, a long gap, voxels missing most genes, and a voxel
    with a single gene: all as scikit-learn, at several tile sizes."""
    rng = np.random.default_rng(7)
    values = rng.normal(size=(30, 900)) + np.linspace(0, 3, 900)
    values[rng.random(values.shape) < 0.05] = np.nan
    values[0, rng.random(900) < 0.95] = np.nan  # a gene missing in most voxels
    values[1, 200:700] = np.nan  # a long clustered gap
    values[:25, 5] = np.nan  # voxels missing most genes
    values[2:29, 11] = np.nan
    values[:, 7] = np.nan  # a voxel with one gene
    values[29, 7] = 0.5
    for memory in (None, 200_000, 2_000_000):
        assert_matches_sklearn(values, 5, memory_bytes=memory)


def test_cell_whose_donors_all_have_nan_distance_gets_the_gene_mean():
    """Voxel 9 has only gene 3, and no voxel with gene 4 has gene 3: every donor of (4, 9) is at
    NaN distance, so the cell gets gene 4's mean (scikit-learn's rule)."""
    rng = np.random.default_rng(3)
    values = rng.normal(size=(6, 300))
    values[:, 9] = np.nan
    values[3, :] = np.nan
    values[3, :60] = rng.normal(size=60)
    values[4, :60] = np.nan  # gene 4 only where gene 3 is missing
    values[3, 9] = 0.25
    got = assert_matches_sklearn(values, 3)
    assert got[4, 9] == pytest.approx(np.nanmean(values[4]), abs=1e-12)


def test_ties_are_settled_as_sklearn():
    """Small integers (many exactly equal distances) and duplicated voxels: scikit-learn's
    argpartition decides which tied donors count; so does knn_impute."""
    rng = np.random.default_rng(11)
    ints = rng.integers(0, 4, size=(10, 500)).astype(float)
    ints[rng.random(ints.shape) < 0.05] = np.nan
    assert_matches_sklearn(ints, 5)
    dup = rng.normal(size=(12, 200))
    dup = np.concatenate([dup, dup, dup], axis=1)
    dup[rng.random(dup.shape) < 0.05] = np.nan
    assert_matches_sklearn(dup, 4, memory_bytes=60_000)


@pytest.mark.e2e  # sklearn on a slab: several seconds
def test_smooth_slab_equals_sklearn_at_any_block_size():
    """A 200-gene x 2,304-voxel slab of smooth data with clustered gaps (every voxel misses a
    gene or more): the same numbers as scikit-learn with the default blocks (three) and with
    memory budgets so small that the distances come in 153 and 465 tiles."""
    values = smooth_slab(200, (12, 12, 16), seed=5)
    want = sklearn_knn(values, 5)
    for memory in (None, 4_000_000, 1_500_000):
        got = knn_impute(values, 5, memory_bytes=memory)
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_progress_adds_up_to_the_receivers():
    """A progress bar given to knn_impute ends at the number of voxels with a NaN."""
    rng = np.random.default_rng(2)
    values = rng.normal(size=(8, 400))
    values[rng.random(values.shape) < 0.02] = np.nan

    class Bar:
        total = None
        n = 0

        def update(self, n):
            assert n > 0
            self.n += n

    bar = Bar()
    knn_impute(values, 3, memory_bytes=20_000, progress=bar)
    receivers = int(np.isnan(values).any(axis=0).sum())
    assert bar.total == receivers and bar.n == receivers


def test_nothing_missing_and_all_nan_row():
    rng = np.random.default_rng(4)
    values = rng.normal(size=(5, 50))
    out = knn_impute(values, 5)
    np.testing.assert_array_equal(out, values)
    assert out is not values
    values[2] = np.nan
    with pytest.raises(ValueError, match="NaN in every voxel"):
        knn_impute(values, 5)


def test_memory_estimate_covers_what_the_call_allocates():
    """What knn_memory_estimate adds to the input and the interpreter (its estimate with no
    receivers) covers everything the call allocates, result included (numpy's allocations,
    traced): a caller can refuse a request from it before starting."""
    import tracemalloc

    values = smooth_slab(120, (8, 16, 16), seed=9)
    n_genes, n_voxels = values.shape
    n_missing = int(np.isnan(values).sum())
    receivers = int(np.isnan(values).any(axis=0).sum())
    budget = 6_000_000
    estimate = knn_memory_estimate(n_genes, n_voxels, receivers, budget, n_missing=n_missing)
    fixed = knn_memory_estimate(n_genes, n_voxels, 0, budget)  # input + result + interpreter
    tracemalloc.start()
    knn_impute(values, 5, memory_bytes=budget)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak <= estimate - fixed + values.nbytes
    assert estimate - fixed < 4 * budget + 64 * 2**20  # the budget, not a multiple of the matrix


@pytest.mark.e2e  # starts worker processes
def test_distributed_cluster_gives_identical_numbers():
    """Two worker processes of a real LocalCluster compute the same array as the local threads."""
    distributed = pytest.importorskip("distributed")
    values = smooth_slab(60, (6, 12, 12), seed=1)
    local = knn_impute(values, 5, memory_bytes=300_000)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as cluster, distributed.Client(cluster) as client:
        with distributed.get_task_stream(client) as stream:
            remote = knn_impute(values, 5, memory_bytes=300_000)
    tiles = [t for t in stream.data if "_tile_task" in str(t["key"])]
    assert len(tiles) > 10 and len({t["worker"] for t in tiles}) == 2  # the tiles ran on both workers
    np.testing.assert_array_equal(remote, local)
    np.testing.assert_allclose(remote, sklearn_knn(values, 5), rtol=0, atol=TOL)
