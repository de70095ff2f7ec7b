"""The gene table's ``reproducibility`` and ``replicated`` columns, from the cube.

For a gene with two or more experiments, the mean over its pairs of experiments of Spearman's rho
between their expression over the voxels of the search's mask both have data in, and whether it
exceeds 0.5 (:func:`ambasync.analysis.search.reproducibility.gene_reproducibility`, the
statistic on arrays). This module reads what it needs: only the experiments of genes that have
more than one, in batches, by dask tasks where the search computes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ambasync.analysis.search.reproducibility import THRESHOLD as REPLICATED_ABOVE
from ambasync.analysis.search.reproducibility import gene_reproducibility

if TYPE_CHECKING:
    import pandas as pd

BATCH_EXPERIMENTS = 512  # experiments read at once (512 x 63,500 voxels x 4 bytes: 130 MB)
ROWS_PER_TASK = 32


def read_rows(location: str, positions: np.ndarray, voxels: np.ndarray) -> np.ndarray:
    """Experiments at storage ``positions`` (sorted), at ``voxels`` (flat indices), float32 with
    NaN for no data; runs of consecutive positions are read in one call."""
    from ambasync.cube.read import read_experiments

    out = np.empty((len(positions), len(voxels)), dtype=np.float32)
    i = 0
    while i < len(positions):
        j = i + 1
        while j < len(positions) and positions[j] == positions[j - 1] + 1:
            j += 1
        block = read_experiments(location, int(positions[i]), int(positions[j - 1]) + 1)
        part = np.take(block.reshape(block.shape[0], -1), voxels, axis=1)
        out[i:j] = np.where((part == -1) | ~np.isfinite(part), np.nan, part)
        i = j
    return out


def cache_path(location: str, cube: Any, genes: np.ndarray, mask: np.ndarray) -> Path | None:
    """Where the table for this cube and mask is kept: ``.ambasync/search/`` beside a local cube
    (the mirror's own metadata folder), named by a hash of what it depends on: the cube's path,
    its ``updated`` stamp, its experiments and genes, and the mask. None for a remote cube."""
    import hashlib

    if "://" in str(location):
        return None
    digest = hashlib.sha256()
    expression = cube  # the cube's Dataset (its attrs, sizes and experiment ids)
    attrs = getattr(expression, "attrs", {}) or {}
    for part in (str(Path(location).resolve()), str(attrs.get("updated", "")),
                 str(dict(getattr(expression, "sizes", {})))):
        digest.update(part.encode() + b"\0")
    experiments = getattr(expression, "coords", {}).get("experiment") if hasattr(expression, "coords") else None
    if experiments is not None:
        digest.update(np.asarray(experiments.values, dtype=np.int64).tobytes())
    digest.update("\0".join(np.asarray(genes).astype(str).tolist()).encode())
    digest.update(np.packbits(np.asarray(mask, dtype=bool).ravel()).tobytes())
    return Path(location).resolve().parent / ".ambasync" / "search" / f"reproducibility-{digest.hexdigest()[:24]}.csv"


def _read_cached(path: Path | None) -> pd.DataFrame | None:
    import pandas as pd

    if path is None or not path.is_file():
        return None
    try:
        table = pd.read_csv(path, index_col="gene", keep_default_na=False, na_values=[""],
                            float_precision="round_trip")  # the same floats as computed, to the last bit
        table["replicated"] = table["replicated"].map({True: True, False: False, "True": True,
                                                       "False": False}).astype("boolean")
        return table
    except Exception:  # a damaged cache is recomputed, never trusted
        return None


def _write_cached(path: Path | None, table: pd.DataFrame) -> None:
    if path is None:
        return
    try:
        from ambasync.files import atomic_path

        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            table.to_csv(tmp)
    except OSError:  # a read-only mirror: no cache, same result
        pass


def cube_gene_reproducibility(location: str, cube: Any, genes: np.ndarray, mask: np.ndarray,
                              scheduler: str | None = None, progress: bool = False,
                              cache: bool = True) -> pd.DataFrame:
    """:func:`gene_reproducibility` of every gene of the cube over ``mask``'s voxels, reading only
    the experiments of genes with two or more (in batches of about ``BATCH_EXPERIMENTS``, each
    read by dask tasks where ``scheduler`` says).

    It depends on the cube and the mask, not on the map, and costs about as much as a search
    with 1,000 nulls on the replica's atlas (every experiment read and sorted, every pair
    ranked), so with ``cache`` it is kept beside a local cube (:func:`cache_path`) and read back
    by later searches of the same cube and mask."""
    where = cache_path(location, cube, genes, mask) if cache else None
    cached = _read_cached(where)
    if cached is not None:
        return cached
    import dask
    import pandas as pd

    from ambasync.analysis.search.tasks import compute_tasks

    genes = np.asarray(genes).astype(str)
    names, index, counts = np.unique(genes, return_inverse=True, return_counts=True)
    voxels = np.flatnonzero(np.asarray(mask).ravel())
    parts = []
    multi = np.flatnonzero(counts >= 2)
    batch: list[int] = []
    size = 0

    def flush(batch: list[int]) -> None:
        positions = np.sort(np.flatnonzero(np.isin(index, batch)))
        chunks = [positions[i:i + ROWS_PER_TASK] for i in range(0, len(positions), ROWS_PER_TASK)]
        where = dask.delayed(voxels)
        read = compute_tasks(lambda _: [dask.delayed(read_rows, pure=True)(location, c, where) for c in chunks],
                             scheduler, f"reading {len(positions)} experiments of {len(batch)} genes", progress)
        parts.append(gene_reproducibility(np.concatenate(read), genes[positions]))

    for g in multi:
        batch.append(int(g))
        size += int(counts[g])
        if size >= BATCH_EXPERIMENTS:
            flush(batch)
            batch, size = [], 0
    if batch:
        flush(batch)
    if not parts:
        parts.append(gene_reproducibility(np.empty((0, 0), dtype=np.float32), np.array([], dtype=str)))
    table = pd.concat(parts)
    table = table[~table.index.duplicated()]  # each batch lists only its genes; kept for safety
    table = table.reindex(names)
    table["n_experiments"] = counts
    _write_cached(where, table)
    return table


__all__ = ["REPLICATED_ABOVE", "cube_gene_reproducibility", "gene_reproducibility"]
