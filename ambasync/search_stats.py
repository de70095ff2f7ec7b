"""The statistics of gene search: correlations, spatial p-values, BH q-values, gene-level
combination and fold changes. Pure numpy on arrays; :mod:`ambasync.search` feeds them
blocks of the cube.

Every experiment is scored over its own voxels: those of the mask where it has data
(``-1`` is never data). So the sums a correlation needs are taken with the experiment's
validity as weights (``valid @ Y``, ``valid @ Y²``, ``centred @ Y``): three matrix
products score one block of experiments against the map and all its nulls at once.
"""

from __future__ import annotations

import numpy as np

NO_DATA = -1.0  # the Allen grids' "no data" value, kept as is in the cube
METHODS = ("pearson", "spearman")
# Fewer voxels than this shared by map and experiment: no correlation (NaN), not noise.
MIN_VOXELS = 10


def ranks(values: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Average ranks (1..n, ties share their mean rank) along the last axis, over ``valid``
    entries only; invalid entries get 0. float64."""
    values = np.asarray(values, dtype=np.float64)
    if valid is None:
        valid = np.ones(values.shape, dtype=bool)
    from scipy.stats import rankdata

    masked = np.where(valid, values, np.nan)
    out = rankdata(masked, axis=-1, nan_policy="omit") if masked.ndim else masked
    return np.where(valid, out, 0.0)


def _column_sums(y: np.ndarray, rows: int = 4096) -> np.ndarray:
    """Column sums in float64, ``rows`` at a time (numpy casts a whole float32 array to sum it
    in float64 along axis 0: 500 MB at 1,001 maps)."""
    total = np.zeros(y.shape[1])
    for i in range(0, len(y), rows):
        total += y[i:i + rows].sum(axis=0, dtype=np.float64)
    return total


def standardise_columns(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Columns centred and scaled to unit norm, and their squares: what
    :func:`block_correlations` takes. float32, in place when ``y`` is float32 (it can be
    1,001 maps × 60,000 voxels, 250 MB); the means and norms are summed in float64, and
    centring keeps the float32 products accurate (no large means to cancel)."""
    y = np.asarray(y, dtype=np.float32)
    y -= (_column_sums(y) / len(y)).astype(np.float32)
    y2 = y * y
    squares = _column_sums(y2)
    squares[squares == 0] = 1.0
    y /= np.sqrt(squares).astype(np.float32)
    y2 /= squares.astype(np.float32)
    return y, y2


def block_correlations(block: np.ndarray, y: np.ndarray, method: str = "pearson",
                       min_voxels: int = MIN_VOXELS, y2: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Correlation of each experiment (rows of ``block``, the mask's voxels, ``-1`` = no
    data) with each column of ``y`` (voxels × maps: the user's map, then its nulls),
    each over the voxels where the experiment has data.

    For ``spearman`` the experiment is ranked over its own voxels and ``y`` must hold
    ranks over the mask (:func:`ranks`): Pearson's r of ranks, which is Spearman's rho
    exactly where the experiment covers the mask. Returns (r: experiments × maps, float64,
    NaN where fewer than ``min_voxels`` voxels or a constant experiment; n: voxels used).
    ``y2`` is ``y * y`` when the caller keeps it for many blocks.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    e = len(block)
    # float32 and in place throughout (a block is ~50 experiments × 60,000 voxels): sums that
    # need the precision are taken in float64.
    left = np.empty((2 * e, np.shape(block)[1]), dtype=np.float32)  # [validity; centred expression]
    valid = np.isfinite(block)
    valid &= np.asarray(block) != NO_DATA
    n = np.count_nonzero(valid, axis=1)
    centred = left[e:]
    if method == "spearman":
        centred[...] = ranks(block, valid)
    else:
        np.copyto(centred, block, casting="same_kind")
        centred[~valid] = 0
    mean = centred.sum(axis=1, dtype=np.float64) / np.maximum(n, 1)
    centred -= mean.astype(np.float32)[:, None]
    left[:e] = valid
    centred *= left[:e]
    sxx = np.square(centred).sum(axis=1, dtype=np.float64)
    y = np.asarray(y, dtype=np.float32)
    # The products as (voxels × maps)ᵀ @ (experiments × voxels)ᵀ: OpenBLAS runs this layout
    # several times faster than block @ y for a few dozen rows against 60,000 voxels.
    both = (y.T @ left.T).T.astype(np.float64)
    sy, sxy = both[:e], both[e:]
    syy = ((y * y if y2 is None else y2).T @ left[:e].T).T.astype(np.float64)
    vy = syy - sy ** 2 / np.maximum(n, 1)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        r = sxy / np.sqrt(sxx[:, None] * vy)
    bad = (n < min_voxels) | (sxx <= 0)
    r[bad] = np.nan
    r[vy <= 0] = np.nan
    return np.clip(r, -1.0, 1.0), n


def spatial_p(r: np.ndarray) -> np.ndarray:
    """Two-sided p-value of each row's first column against its other columns (the nulls):
    (1 + #|r_null| ≥ |r|) / (1 + nulls), the permutation-test estimate that is never 0.
    NaN where r is NaN or there are no nulls."""
    r = np.asarray(r, dtype=np.float64)
    if r.shape[1] < 2:
        return np.full(r.shape[0], np.nan)
    observed, nulls = np.abs(r[:, :1]), np.abs(r[:, 1:])
    exceed = (np.nan_to_num(nulls, nan=-np.inf) >= observed).sum(axis=1)
    p = (1.0 + exceed) / (1.0 + nulls.shape[1])
    p[np.isnan(r[:, 0])] = np.nan
    return p


def parametric_p(r: np.ndarray, n: np.ndarray) -> np.ndarray:
    """The textbook two-sided p-value of a correlation (t with n-2 degrees of freedom),
    which assumes independent voxels: reported only to show how far off it is."""
    from scipy.stats import t as student

    r = np.asarray(r, dtype=np.float64)
    df = np.asarray(n, dtype=np.float64) - 2
    with np.errstate(invalid="ignore", divide="ignore"):
        t = r * np.sqrt(df / np.clip(1 - r ** 2, 1e-300, None))
    return 2 * student.sf(np.abs(t), df)


def bh_q(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values (step-up, monotone, capped at 1) over the non-NaN p."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    if ok.size == 0:
        return q
    order = ok[np.argsort(p[ok], kind="stable")]
    m = order.size
    scaled = p[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return q


def gene_scores(r: np.ndarray, genes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Combine the experiments of each gene: the mean of Fisher's z (atanh r) over the
    gene's experiments with a correlation, for the map (column 0) and every null alike.

    Because all experiments are scored against the same nulls, the combined null keeps
    whatever correlation the gene's experiments have with each other, so the gene's
    ``spatial_p`` on these rows is exact without assuming them independent.
    Returns (gene names, sorted; rows × maps of combined r = tanh(mean z); experiments used).
    """
    genes = np.asarray(genes).astype(str)
    names, index = np.unique(genes, return_inverse=True)
    z = np.arctanh(np.clip(np.asarray(r, dtype=np.float64), -0.999999, 0.999999))
    has = ~np.isnan(z)
    sums = np.zeros((names.size, z.shape[1]))
    counts = np.zeros((names.size, z.shape[1]))
    np.add.at(sums, index, np.where(has, z, 0.0))
    np.add.at(counts, index, has)
    with np.errstate(invalid="ignore", divide="ignore"):
        combined = np.tanh(sums / counts)
    return names, combined, counts[:, 0].astype(np.int64)


def block_means(block: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean expression of each experiment (rows, voxels as columns) over the voxels of
    ``region`` (bool over the columns) where it has data; and how many voxels that was.
    NaN mean where none."""
    block = np.asarray(block)
    valid = np.isfinite(block) & (block != NO_DATA) & np.asarray(region, dtype=bool)[None, :]
    n = valid.sum(axis=1)
    total = np.where(valid, block, 0.0).astype(np.float64).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / np.maximum(n, 1), np.nan), n


def log2_fold(target_mean: np.ndarray, contrast_mean: np.ndarray) -> np.ndarray:
    """log2(target / contrast): +inf where only the target expresses, NaN where neither
    does or a mean is missing (as ABIgeneRMINC's quotient of mean energies, on a log scale)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.log2(np.asarray(target_mean, dtype=np.float64) / np.asarray(contrast_mean, dtype=np.float64))
