"""Does a gene's expression replicate across its ISH experiments?

For every gene with two or more experiments (typically a coronal and a sagittal series), the
mean over all pairs of its experiments of Spearman's rho between the two experiments, each pair
taken over the voxels where both have data; ``replicated`` when that mean exceeds 0.5
(``threshold``): the kind of rule Allen Mouse Brain Atlas pipelines apply to keep only genes
whose experiments (coronal and sagittal series, replicates) agree. Where published pipelines
differ (structure-level rather than voxel data, Pearson rather than Spearman, another cut-off)
the threshold is a parameter; the voxel-level Spearman is what is computed here.

Exact Spearman with ties (average ranks, as scipy.stats.spearmanr) over each pair's *shared*
voxels: ranks within the shared set differ from ranks over either experiment's own voxels, so
they are recomputed per pair, but without sorting per pair. Each experiment is sorted once
(into dense codes: equal values, equal code); a pair's ranks within any subset then follow from
a histogram of the codes in the subset (``bincount``, its cumulative sum, and the average rank
of each code), which is linear in the voxels. Plain numpy; see :func:`gene_reproducibility`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from ambasync.geometry import NO_DATA

THRESHOLD = 0.5  # replicated: mean pairwise Spearman rho above this
MIN_SHARED = 10  # fewer shared voxels than this: no correlation for the pair (NaN), not noise
COLUMNS = ("n_experiments", "n_pairs", "reproducibility", "replicated")


def _orderable(x: np.ndarray) -> np.ndarray:
    """float32 bit patterns as uint32 in the floats' order (-0.0 must already be +0.0)."""
    bits = x.view(np.uint32)
    return np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000))


_SIGN = np.uint64(0x80000000)  # orderable key of +0.0: keys below it are negative values


def _sorted_codes(x: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Dense codes of float32 values (no -0.0) by one sort of (value, position) packed into
    uint64 keys: numpy's vectorised sort of 64-bit integers is several times faster than
    ``argsort`` of the floats. Returns the codes, their number, and how many are negative."""
    n = x.size
    keys = (_orderable(x).astype(np.uint64) << np.uint64(32)) | np.arange(n, dtype=np.uint64)
    keys.sort()
    order = (keys & np.uint64(0xFFFFFFFF)).astype(np.intp)
    value = keys >> np.uint64(32)
    new = np.empty(n, dtype=bool)
    new[0] = True
    np.not_equal(value[1:], value[:-1], out=new[1:])
    sorted_codes = np.cumsum(new, dtype=np.intp)
    sorted_codes -= 1
    codes = np.empty(n, dtype=np.intp)
    codes[order] = sorted_codes
    negative = int(np.searchsorted(value, _SIGN))  # sorted positions holding negative values
    below = int(sorted_codes[negative - 1]) + 1 if negative else 0
    return codes, int(sorted_codes[-1]) + 1, below


def _codes(x: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense codes of float32 values ``x`` (no -0.0) where ``ok``, -1 elsewhere, and their
    number. Exact zeros, the bulk of the ties in ISH expression energy, are coded without being
    sorted."""
    nonzero = ok & (x != 0)
    where = np.flatnonzero(nonzero)
    has_zero = where.size < np.count_nonzero(ok)
    codes = np.full(x.size, -1, dtype=np.intp)
    if where.size == 0:
        codes[ok] = 0
        return codes, int(has_zero)
    rest, k, below = _sorted_codes(x[where])
    if has_zero:
        rest[rest >= below] += 1  # room for zero's code, after the negatives
        codes[ok] = below
        k += 1
    codes[where] = rest
    return codes, k


def dense_codes(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Dense ranks 0..K-1 of a 1-D array of finite values (equal values, equal code) and K.
    Values are compared as float32 (the cube's precision); -0.0 ties with 0."""
    x = np.asarray(x, dtype=np.float32).ravel() + np.float32(0.0)  # -0.0 -> +0.0
    return _codes(x, np.ones(x.size, dtype=bool))


def ranks_from_codes(codes: np.ndarray, n_codes: int) -> np.ndarray:
    """Average ranks (1..n, ties share their mean rank) of values given by their dense codes:
    the codes' histogram gives how many values lie below each code and how many tie on it."""
    counts = np.bincount(codes, minlength=n_codes)
    average = np.cumsum(counts) - (counts - 1) * 0.5  # values below the code, + (ties + 1) / 2
    return average[codes]


def _spearman(codes_a: np.ndarray, codes_b: np.ndarray, k_a: int, k_b: int, min_shared: int) -> float:
    """Spearman's rho of two experiments (dense codes over all voxels, -1 = no data) over the
    voxels both have data on."""
    shared = (codes_a >= 0) & (codes_b >= 0)
    n = int(np.count_nonzero(shared))
    if n < max(min_shared, 2):
        return np.nan
    mean = (n + 1) * 0.5
    ra = ranks_from_codes(codes_a[shared], k_a) - mean
    rb = ranks_from_codes(codes_b[shared], k_b) - mean
    # einsum, not @ or np.dot: BLAS threads for a 1-D dot product can cost milliseconds when
    # the machine is busy.
    saa, sbb, sab = np.einsum("i,i->", ra, ra), np.einsum("i,i->", rb, rb), np.einsum("i,i->", ra, rb)
    if saa <= 0 or sbb <= 0:  # constant over the shared voxels
        return np.nan
    return float(np.clip(sab / np.sqrt(saa * sbb), -1.0, 1.0))


def _row_codes(values, valid, row: int, no_data: float | None) -> tuple[np.ndarray, int]:
    """Dense codes of one experiment over all voxels, -1 where it has no data."""
    x = np.asarray(values[row], dtype=np.float32).ravel() + np.float32(0.0)  # -0.0 -> +0.0
    ok = np.isfinite(x)
    if no_data is not None:
        ok &= x != np.float32(no_data)
    if valid is not None:
        ok &= np.asarray(valid[row], dtype=bool).ravel()
    return _codes(x, ok)


def gene_reproducibility(values, genes: Sequence[str] | np.ndarray, *, valid=None,
                         no_data: float | None = NO_DATA, threshold: float = THRESHOLD,
                         min_shared: int = MIN_SHARED, workers: int | None = None) -> pd.DataFrame:
    """Mean pairwise Spearman correlation between the experiments of each gene.

    Parameters
    ----------
    values : array_like, shape (n_experiments, n_voxels)
        Expression of each experiment on a common grid (e.g. the cube's mask voxels). Rows are
        read one at a time (``values[i]``), so a numpy array, a memmap or a zarr array all do,
        and only the rows of genes with two or more experiments are read. Values are ranked as
        float32.
    genes : sequence of str, length n_experiments
        The gene of each experiment (row).
    valid : array_like of bool, shape (n_experiments, n_voxels), optional
        Where each experiment has data. Without it, and in any case, a voxel has no data where
        its value is NaN (or infinite) or equals ``no_data``.
    no_data : float or None
        The "no data" value (the Allen grids' -1); None if every finite value is data.
    threshold : float
        ``replicated`` is ``reproducibility > threshold`` (0.5).
    min_shared : int
        A pair sharing fewer voxels than this (or constant on them) has no correlation and is
        left out of the mean.
    workers : int, optional
        Threads working on genes at once (numpy's sort, the bulk of the work, releases the
        GIL); default ``min(4, os.cpu_count())``. The result does not depend on it.

    Returns
    -------
    pandas.DataFrame
        One row per gene (all genes, sorted; index named ``gene``) with columns
        ``n_experiments`` (int), ``n_pairs`` (pairs with a correlation), ``reproducibility``
        (mean Spearman rho over those pairs; NaN with fewer than two experiments or no such
        pair) and ``replicated`` (pandas nullable boolean: ``reproducibility > threshold``,
        <NA> where reproducibility is NaN, i.e. where it cannot be told).

    Notes
    -----
    Spearman's rho over a pair's shared voxels ranks each experiment within that shared set
    (average ranks for ties), exactly as ``scipy.stats.spearmanr(a[both], b[both])``. Each
    experiment is sorted once; each pair then costs a few linear passes over the voxels.
    """
    genes = np.asarray(genes).astype(str)
    shape = getattr(values, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != genes.size:
        raise ValueError(f"values must be experiments x voxels with {genes.size} rows, not shape {shape}")
    if valid is not None and tuple(getattr(valid, "shape", ())) != tuple(shape):
        raise ValueError(f"valid must have the shape of values {tuple(shape)}, not {getattr(valid, 'shape', None)}")
    names, index, counts = np.unique(genes, return_inverse=True, return_counts=True)
    reproducibility = np.full(names.size, np.nan)
    n_pairs = np.zeros(names.size, dtype=np.int64)
    order = np.argsort(index, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])

    def score(g: int) -> None:
        rows = order[starts[g]:starts[g] + counts[g]]
        coded = [_row_codes(values, valid, int(r), no_data) for r in rows]
        rhos = np.array([_spearman(coded[i][0], coded[j][0], coded[i][1], coded[j][1], min_shared)
                         for i in range(len(coded)) for j in range(i + 1, len(coded))])
        rhos = rhos[np.isfinite(rhos)]
        n_pairs[g] = rhos.size
        if rhos.size:
            reproducibility[g] = rhos.mean()

    several = np.flatnonzero(counts >= 2)
    workers = min(4, os.cpu_count() or 1) if workers is None else max(int(workers), 1)
    if workers == 1 or several.size < 2:
        for g in several:
            score(int(g))
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(score, several.tolist()))
    replicated = pd.array(reproducibility > threshold, dtype="boolean")
    replicated[np.isnan(reproducibility)] = pd.NA
    table = pd.DataFrame({"n_experiments": counts.astype(np.int64), "n_pairs": n_pairs,
                          "reproducibility": reproducibility, "replicated": replicated},
                         index=pd.Index(names, name="gene"))
    return table[list(COLUMNS)]


__all__ = ["COLUMNS", "MIN_SHARED", "NO_DATA", "THRESHOLD", "dense_codes", "gene_reproducibility",
           "ranks_from_codes"]
