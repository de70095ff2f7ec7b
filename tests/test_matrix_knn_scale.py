"""KNN imputation as ``matrix`` runs it at atlas scale (the blockwise imputer, in blocks sized by
the memory budget) gives scikit-learn's KNNImputer's numbers, on matrices shaped like the
atlas's: a few hundred genes over a slab of the coronal mask, smooth in space, with missing
values in patches (lost sections, measured zeros), voxels as samples as MHTS transposes."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.impute import KNNImputer

from helpers import FIXTURES, read_minc

pytestmark = pytest.mark.e2e  # real runs, servers or clusters: make test-fast leaves these out

CORONAL_MASK = FIXTURES / "coronal_200um_coverage_bin0.8.mnc"


def _slab_matrix(n_genes: int, slices: slice, seed: int = 0, missing: float = 0.03) -> np.ndarray:
    """genes x voxels of a slab of the real coronal mask: log-normal smooth fields per gene,
    NaN in smooth patches (about ``missing`` of the cells) and in a lost section for some genes."""
    from scipy.ndimage import gaussian_filter

    mask, _ = read_minc(CORONAL_MASK)
    mask = mask == 1
    slab = np.zeros_like(mask)
    slab[:, slices, :] = True
    mask &= slab
    rng = np.random.default_rng(seed)
    near = slice(slices.start - 3, slices.stop + 3)  # smooth fields over the slab and a margin only
    box = mask[:, near, :]
    shape = (n_genes, *box.shape)
    fields = gaussian_filter(rng.standard_normal(shape), sigma=(0, 2, 2, 2))
    fields /= fields.std(axis=(1, 2, 3), keepdims=True)
    holes = gaussian_filter(rng.standard_normal(shape), sigma=(0, 1.5, 1.5, 1.5))
    holes /= holes.std(axis=(1, 2, 3), keepdims=True)
    values = np.exp(fields)[:, box]
    cut = np.quantile(holes[:, box], 1 - missing)
    values[holes[:, box] > cut] = np.nan
    lost = rng.choice(n_genes, n_genes // 10, replace=False)  # a lost coronal section
    section = np.zeros(mask.shape, dtype=bool)
    section[:, slices.start, :] = True
    values[np.ix_(lost, np.flatnonzero(section[mask]))] = np.nan
    return values


@pytest.fixture(scope="module")
def slab():
    return _slab_matrix(120, slice(30, 32))


@pytest.fixture(scope="module")
def want(slab):
    return KNNImputer(missing_values=np.nan).fit_transform(slab.T).T


def test_blocked_knn_is_sklearn_knnimputer_on_a_slab(slab, want):
    from ambasync.analysis.matrix.impute import knn_impute_blocked

    assert slab.shape[1] > 2000 and np.isnan(slab).mean() > 0.02
    got = knn_impute_blocked(slab, 5)
    assert got.shape == slab.shape and not np.isnan(got).any()
    known = ~np.isnan(slab)
    np.testing.assert_array_equal(got[known], slab[known])  # known cells untouched
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_small_budgets_cut_the_work_into_more_blocks_with_the_same_numbers(slab, want):
    """The memory budget sets the tile size; a tiny one gives many small tiles, same result."""
    from ambasync.analysis.matrix.impute import knn_impute_blocked

    x = slab[:30, :1200]
    got = knn_impute_blocked(x, 3, memory_bytes=2 * 2**20)
    expected = KNNImputer(n_neighbors=3).fit_transform(x.T).T
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_progress_counts_the_voxels_to_fill(slab):
    from ambasync.analysis.matrix.impute import knn_impute_blocked
    from ambasync.progress import Progress

    bar = Progress("imputing (knn)", None, "voxels", enabled=True, interval=0.0)
    knn_impute_blocked(slab[:40], 5, progress=bar)
    receivers = int(np.isnan(slab[:40]).any(axis=0).sum())
    assert bar.total == receivers and bar.done == receivers
    assert bar.line().startswith(f"imputing (knn): {receivers:,}/{receivers:,} voxels (100%)")


@pytest.mark.e2e
def test_blocked_knn_on_a_local_cluster_is_identical(slab):
    """The tiles as tasks on a real dask.distributed cluster: the same numbers, bit for bit."""
    from cubes import local_cluster

    from ambasync.analysis.cluster import compute_on
    from ambasync.analysis.matrix.impute import knn_impute_blocked

    x = slab[:30, :1200]
    local = knn_impute_blocked(x, 5, memory_bytes=8 * 2**20)
    with local_cluster() as cluster, compute_on(cluster.scheduler_address) as client:
        assert client is not None
        remote = knn_impute_blocked(x, 5, memory_bytes=8 * 2**20)
    np.testing.assert_array_equal(remote, local)
    np.testing.assert_allclose(local, KNNImputer().fit_transform(x.T).T, rtol=0, atol=1e-5)
