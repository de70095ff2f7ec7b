"""Filling a matrix's NaN cells: scikit-learn's KNNImputer as MHTS runs it, or the nearest voxels
with data in space.

``matrix`` imputes with :func:`knn_impute_blocked` (:mod:`ambasync.analysis.matrix.knn`: the same
numbers as KNNImputer, computed only for the voxels that miss a value, in blocks sized by the
memory budget, as dask tasks). :func:`knn_impute` is scikit-learn's own KNNImputer with its
chunks as dask tasks, bit for bit its result; it holds a voxels x voxels share of distances per
chunk and a copy of the matrix per task, so it is kept for small matrices and as the reference."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

SPATIAL_K = 64  # candidates per query in spatial imputation before falling back to a ball query


def knn_impute(values: np.ndarray, n_neighbors: int = 5) -> np.ndarray:
    """scikit-learn's KNNImputer on the transposed matrix (voxels as samples, rows as features),
    exactly as MHTS; identical to ``KNNImputer(n_neighbors).fit_transform(values.T).T``.

    The voxels to impute are split into the same row chunks scikit-learn's own
    ``pairwise_distances_chunked`` uses, and the chunks run as dask tasks (threads or a
    ``--scheduler`` cluster): every distance is then computed on the same shapes as in one call.
    """
    import dask
    import numpy as np
    import sklearn
    from sklearn.impute import KNNImputer

    samples = np.ascontiguousarray(values.T, dtype=np.float64)
    need = np.flatnonzero(np.isnan(samples).any(axis=1))
    if need.size == 0:
        return samples.T.copy()
    imputer = KNNImputer(n_neighbors=n_neighbors).fit(samples)  # rows kept by the filter all have data
    # scikit-learn's get_chunk_n_rows: rows of distances that fit its working_memory (MiB)
    chunk = max(1, min(need.size, int(sklearn.get_config()["working_memory"] * 2 ** 20 // (8 * samples.shape[0]))))
    blocks = [need[i:i + chunk] for i in range(0, need.size, chunk)]
    if len(blocks) == 1:
        results = [imputer.transform(samples[need])]
    else:
        shared = dask.delayed(imputer, pure=True, traverse=False)  # one key: a cluster gets the fit once
        results = dask.compute(*[dask.delayed(_knn_transform)(shared, samples[b]) for b in blocks])
    out = samples.copy()
    for b, r in zip(blocks, results):
        out[b] = r
    return out.T.copy()


def knn_impute_blocked(values: np.ndarray, n_neighbors: int = 5, memory_bytes: int | None = None,
                       progress: Any = None) -> np.ndarray:
    """KNNImputer's result (voxels as samples, rows as features; within rounding) at atlas scale:
    :func:`ambasync.analysis.matrix.knn.knn_impute`, the blockwise exact nan-euclidean KNN. Rows
    NaN in every voxel are never passed (the missing-value filter removes them). Falls back to
    :func:`knn_impute` where that module is absent."""
    try:
        from ambasync.analysis.matrix.knn import knn_impute as blocked
    except ImportError:
        return knn_impute(values, n_neighbors)
    return blocked(values, n_neighbors, memory_bytes=memory_bytes, progress=progress)


def _knn_transform(imputer: Any, rows: np.ndarray) -> np.ndarray:
    return imputer.transform(rows)


def spatial_impute(values: np.ndarray, coords: np.ndarray, inplace: bool = False, progress: Any = None
                   ) -> np.ndarray:
    """Each row's NaN voxels get the mean of that row's nearest voxels with data, in space:
    all data voxels at the smallest Euclidean distance (world mm) from the missing one (ties all
    count; on the 200 µm grid usually its 6 face neighbours). Rows without data stay NaN.
    ``inplace`` fills a float64 ``values`` itself (no second matrix); ``progress.update(1)``
    after each row. Rows missing the same voxels share one tree."""
    import numpy as np
    from scipy.spatial import cKDTree

    if inplace and values.dtype == np.float64:
        out = values
    else:
        out = np.array(values, dtype=np.float64)
    cached: tuple[bytes, Any] | None = None
    for r in range(out.shape[0]):
        if progress is not None:
            progress.update(1)
        row = out[r]
        missing = np.isnan(row)
        if not missing.any() or missing.all():
            continue
        have = np.flatnonzero(~missing)
        signature = np.packbits(missing).tobytes()
        if cached is not None and cached[0] == signature:
            tree = cached[1]
        else:
            tree = cKDTree(coords[have])
            cached = (signature, tree)
        targets = coords[missing]
        k = min(SPATIAL_K, have.size)
        dist, idx = tree.query(targets, k=k)
        dist, idx = dist.reshape(len(targets), k), idx.reshape(len(targets), k)
        tol = 1e-6 * (1.0 + dist[:, :1])
        tied = dist <= dist[:, :1] + tol
        filled = np.where(tied, row[have][idx], 0.0).sum(axis=1) / tied.sum(axis=1)
        full = tied.all(axis=1) & (k < have.size)  # more ties than candidates: ask the tree for all
        for t in np.flatnonzero(full):
            near = tree.query_ball_point(targets[t], dist[t, 0] + tol[t, 0])
            filled[t] = row[have][near].mean()
        row[missing] = filled
    return out


__all__ = ["knn_impute", "knn_impute_blocked", "spatial_impute"]
