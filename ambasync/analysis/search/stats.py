"""The statistics of gene search: correlations, spatial p-values, BH q-values, gene-level
combination and fold changes. Pure numpy on arrays; :mod:`ambasync.analysis.search.correlate` feeds them
blocks of the cube.

Every experiment is scored over its own voxels: those of the mask where it has data
(``-1`` is never data). So the sums a correlation needs are taken with the experiment's
validity as weights (``valid @ Y``, ``valid @ Y²``, ``centred @ Y``): three matrix
products score one block of experiments against the map and all its nulls at once.
From the cube's voxel-major copy the same correlation is summed voxel block by voxel block
(:func:`voxel_block_sums`, :func:`correlations_from_sums`): the experiments' means are not
known until every block is read, so the sums are raw (uncentred) and taken in float64.
"""

from __future__ import annotations

import numpy as np

from ambasync.analysis.search.options import METHODS
from ambasync.geometry import NO_DATA

# Fewer voxels than this shared by map and experiment: no correlation (NaN), not noise.
MIN_VOXELS = 10
# A map (or null) whose variance over an experiment's voxels is below this fraction of its
# sum of squares there is constant on them: the raw sums leave only rounding (NaN, not noise).
CONSTANT_FRACTION = 1e-12


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


def voxel_design(map_values: np.ndarray, nulls: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """The map (float64) and its nulls (float32, mask voxels × nulls), each centred over the
    mask, as :func:`voxel_block_sums` takes them. Centring keeps the raw sums small (less to
    cancel); the map stays float64 so its r matches numpy's to ~1e-12, the nulls stay float32
    (as the volume-major path keeps them: 250 MB at 1,000 nulls, and 4× the products' speed)."""
    y = np.asarray(map_values, dtype=np.float64)
    y = y - y.mean()
    if not nulls:
        return y, None
    yn = np.column_stack([np.asarray(k, dtype=np.float32) for k in nulls])
    yn -= (_column_sums(yn) / len(yn)).astype(np.float32)
    return y, yn


def voxel_block_sums(values: np.ndarray, y: np.ndarray, nulls: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """The sums a correlation needs, over one block of voxels (rows of ``values``: voxels ×
    experiments, ``-1`` = no data) where each experiment has data: n, Σx, Σx² (per experiment)
    and Σy, Σy², Σxy (experiments × maps: the map ``y``, float64, then the ``nulls``' columns,
    float32 products), each y summed over the experiment's own voxels: matrix products of the
    maps with the block's validity and values. Add blocks' sums; :func:`correlations_from_sums`."""
    values = np.asarray(values)
    valid = values != NO_DATA
    finite = np.isfinite(values)
    valid &= finite
    vf = valid.astype(np.float64)
    x = np.multiply(values, vf)  # no data -> 0: it adds nothing to the sums (float64)
    if not finite.all():  # NaN or inf times 0 is NaN; a masked copy is 8x slower, so only then
        np.copyto(x, 0.0, where=~valid)
    y = np.asarray(y, dtype=np.float64)
    ones = np.ones_like(y)
    # Two small float64 products (exact counts, ~1e-16 relative sums): [1, y, y²] @ validity, [1, y] @ values.
    n, sy, syy = np.stack([ones, y, y * y]) @ vf
    sx, sxy = np.stack([ones, y]) @ x
    sxx = np.einsum("ij,ij->j", x, x)
    sy, syy, sxy = sy[:, None], syy[:, None], sxy[:, None]
    if nulls is not None and nulls.shape[1]:
        e = values.shape[1]
        left = np.concatenate([vf, x], axis=1).astype(np.float32)  # voxels × [validity | values]
        both = (nulls.T @ left).T.astype(np.float64)  # 2e × nulls: Σy, Σxy
        squares = (np.square(nulls).T @ left[:, :e]).T.astype(np.float64)
        sy = np.concatenate([sy, both[:e]], axis=1)
        sxy = np.concatenate([sxy, both[e:]], axis=1)
        syy = np.concatenate([syy, squares], axis=1)
    return np.rint(n).astype(np.int64), sx, sxx, sy, syy, sxy


def correlations_from_sums(sums: tuple[np.ndarray, ...], min_voxels: int = MIN_VOXELS,
                           constant_fraction: float = CONSTANT_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r (experiments × maps, float64) and n from :func:`voxel_block_sums` added over all
    the mask's blocks: NaN where fewer than ``min_voxels`` voxels, or where the experiment or a
    map is constant on them (variance below ``constant_fraction`` of the sum of squares: the raw
    sums leave only rounding there)."""
    n, sx, sxx, sy, syy, sxy = sums
    k = np.maximum(n, 1).astype(np.float64)
    vx = sxx - sx * sx / k
    vy = syy - sy * sy / k[:, None]
    cov = sxy - sx[:, None] * sy / k[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        r = cov / np.sqrt(vx[:, None] * vy)
    r[(n < min_voxels) | (vx <= constant_fraction * sxx)] = np.nan
    r[vy <= constant_fraction * syy] = np.nan
    return np.clip(r, -1.0, 1.0), np.asarray(n, dtype=np.int64)


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


def spatial_pvalues(r: np.ndarray, tail: str = "gpd") -> tuple[np.ndarray, np.ndarray]:
    """Two-sided spatial p-value of each row's first column against its other columns (the
    nulls), and how it was made (``p_method``): with ``tail="gpd"``,
    :func:`ambasync.analysis.search.tail.tail_pvalues` (a generalised Pareto tail fitted to the
    row's nulls, ``"gpd"``, where the empirical p is small and the fit holds; else the empirical
    p, ``"empirical"``); with ``"empirical"``, :func:`spatial_p` alone. ``"none"`` where p is NaN
    (r NaN, or no nulls)."""
    r = np.asarray(r, dtype=np.float64)
    if r.shape[1] < 2:
        return np.full(r.shape[0], np.nan), np.full(r.shape[0], "none", dtype=object)
    if tail == "empirical":
        p = spatial_p(r)
        how = np.where(np.isnan(p), "none", "empirical").astype(object)
        return p, how
    if tail != "gpd":
        raise ValueError(f"tail must be 'gpd' or 'empirical', not {tail!r}")
    from ambasync.analysis.search.tail import tail_pvalues

    fitted = tail_pvalues(r[:, 0], r[:, 1:], alternative="two-sided")
    p = np.asarray(fitted.p, dtype=np.float64)
    how = np.asarray(fitted.method).astype(object)
    how[np.isnan(p)] = "none"
    return p, how


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
