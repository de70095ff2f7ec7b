"""Whether a gene's experiments agree with each other: the gene table's ``reproducibility`` and
``replicated`` columns.

For a gene with two or more experiments, the mean over its pairs of experiments of Spearman's rho
between their expression over the voxels both have data in (of the search's mask), and whether it
exceeds 0.5: the rule published pipelines use to call a gene's ISH experiments replicated
(issue 17).

:func:`gene_reproducibility` is the statistic on arrays (the interface of the colleague's
``reproducibility`` module, which this stands in for until it lands); :func:`cube_gene_reproducibility`
reads only the experiments of genes that have more than one from the cube, in batches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

REPLICATED_ABOVE = 0.5  # mean pairwise rho above this: the gene's experiments are called replicated
MIN_SHARED = 10  # fewer shared voxels than this: no correlation for the pair (as stats.MIN_VOXELS)
BATCH_EXPERIMENTS = 512  # experiments read at once (512 x 63,500 voxels x 4 bytes: 130 MB)
ROWS_PER_TASK = 32


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import rankdata

    shared = np.isfinite(a) & np.isfinite(b)
    if shared.sum() < MIN_SHARED:
        return np.nan
    x, y = rankdata(a[shared]), rankdata(b[shared])
    x -= x.mean()
    y -= y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else np.nan


def gene_reproducibility(values: np.ndarray, genes: Any) -> pd.DataFrame:
    """Per gene: ``n_experiments`` (rows of ``values``), ``reproducibility`` (mean pairwise
    Spearman rho over the voxels both experiments of a pair have data in; NaN for one experiment
    or no defined pair) and ``replicated`` (reproducibility > 0.5; None where undefined).

    ``values`` is experiments x voxels, NaN (or -1, the cube's "no data") where an experiment has
    no data; ``genes`` names each row. Indexed by gene, sorted."""
    import pandas as pd

    values = np.asarray(values, dtype=np.float64)
    values = np.where(values == -1, np.nan, values)
    genes = np.asarray(genes).astype(str)
    names, index = np.unique(genes, return_inverse=True)
    n = np.bincount(index, minlength=names.size)
    rep = np.full(names.size, np.nan)
    for g in np.flatnonzero(n >= 2):
        rows = values[index == g]
        rhos = [_spearman(rows[i], rows[j]) for i in range(len(rows)) for j in range(i + 1, len(rows))]
        rhos = [x for x in rhos if np.isfinite(x)]
        if rhos:
            rep[g] = float(np.mean(rhos))
    replicated = np.array([None if np.isnan(x) else bool(x > REPLICATED_ABOVE) for x in rep], dtype=object)
    return pd.DataFrame({"n_experiments": n, "reproducibility": rep, "replicated": replicated},
                        index=pd.Index(names, name="gene"))


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


def cube_gene_reproducibility(location: str, expression: Any, genes: np.ndarray, mask: np.ndarray,
                              scheduler: str | None = None, progress: bool = False) -> pd.DataFrame:
    """:func:`gene_reproducibility` of every gene of the cube over ``mask``'s voxels, reading only
    the experiments of genes with two or more (in batches of about ``BATCH_EXPERIMENTS``, each
    read by dask tasks where ``scheduler`` says)."""
    import dask
    import pandas as pd

    from ambasync.analysis.search.tasks import compute_tasks

    genes = np.asarray(genes).astype(str)
    names, index, counts = np.unique(genes, return_inverse=True, return_counts=True)
    voxels = np.flatnonzero(np.asarray(mask).ravel())
    parts = [gene_reproducibility(np.empty((0, 0)), np.array([], dtype=str))]
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
    table = pd.concat(parts)
    return table.reindex(names).assign(n_experiments=counts)


__all__ = ["REPLICATED_ABOVE", "cube_gene_reproducibility", "gene_reproducibility"]
