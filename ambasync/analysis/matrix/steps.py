"""The pure steps of a ``matrix`` recipe, on numpy arrays, in the order
:func:`ambasync.analysis.matrix.build.build_matrix` applies them.

The steps are the ones labs write by hand (MouseHumanTranscriptomicSimilarity's
``build_voxel_matrix.py`` and ``build_region_matrix.py``; abagen's normalisations; Fulcher's
plane combinations). Imputation, which needs scikit-learn, scipy and dask, is in
:mod:`ambasync.analysis.matrix.impute`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ambasync.analysis.matrix.recipe import NORMALISE, Recipe
from ambasync.errors import AnalysisError

if TYPE_CHECKING:
    import numpy as np

IQR_NORMAL = 1.3489795003921634  # IQR of the standard normal: scipy.stats.iqr(scale="normal"), as abagen


# --------------------------------------------------------------------------------------------
# 1. Experiments
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExperimentSelection:
    """The experiments a recipe uses, as positions in the cube and their catalogue values,
    ordered by (gene, experiment id) so a gene's experiments are adjacent."""

    positions: np.ndarray  # int64 index along the cube's experiment dimension
    ids: np.ndarray  # int64 experiment ids
    genes: np.ndarray  # str gene acronyms (the catalogue's, not file names)
    planes: np.ndarray  # str


def _asked(column: np.ndarray, asked, unknown, what_to_do: str) -> np.ndarray:
    """Rows whose value is one of ``asked``; a value the column lacks is an error naming it."""
    import numpy as np

    missing = sorted(set(asked) - set(column.tolist()))
    if missing:
        raise AnalysisError(f"{unknown(missing[0])} ({len(missing)} unknown of {len(asked)} asked); {what_to_do}")
    return np.isin(column, list(asked))


def select_experiments(ids: np.ndarray, genes: np.ndarray, planes: np.ndarray, recipe: Recipe) -> ExperimentSelection:
    """The cube's experiments a recipe keeps; an unknown gene or id is an error naming it."""
    import numpy as np
    ids = np.asarray(ids, dtype=np.int64)
    genes = np.asarray(genes).astype(str)
    planes = np.asarray(planes).astype(str)
    keep = ids >= 0  # an empty slot of the cube has a negative id and only -1 values: not an experiment
    if recipe.plane != "both":
        keep &= planes == recipe.plane
    if recipe.plane == "sagittal" and recipe.genes_in_coronal:
        keep &= np.isin(genes, genes[planes == "coronal"])
    if recipe.genes:
        keep &= _asked(genes, recipe.genes, lambda first: f"unknown gene {first!r}: the cube has no experiment of it",
                       "check the acronym's case")
    if recipe.ids:
        keep &= _asked(ids, recipe.ids, lambda first: f"unknown experiment id {first}: not in the cube",
                       "run `ambasync run` for it first")
    chosen = np.flatnonzero(keep)
    if chosen.size == 0:
        raise AnalysisError(f"no experiment of the cube matches plane {recipe.plane}"
                            + (" with a coronal experiment of the same gene" if recipe.plane == "sagittal"
                               and recipe.genes_in_coronal else "")
                            + (f", genes {', '.join(recipe.genes)}" if recipe.genes else "")
                            + (f", ids {', '.join(map(str, recipe.ids))}" if recipe.ids else ""))
    order = chosen[np.lexsort((ids[chosen], genes[chosen]))]
    return ExperimentSelection(order.astype(np.int64), ids[order], genes[order], planes[order])


def check_mask_for_plane(recipe: Recipe) -> None:
    """Sagittal experiments cover one hemisphere: the bilateral coronal mask would be half empty
    (MHTS warns; here it is refused unless the hemisphere is mirrored first)."""
    if recipe.plane == "sagittal" and recipe.mask == "coronal" and not recipe.mirror_hemisphere:
        raise AnalysisError("sagittal experiments with the coronal mask: the coronal mask covers both hemispheres "
                            "and sagittal data one; use --mask sagittal, or --mirror-hemisphere to fill the other side")


# --------------------------------------------------------------------------------------------
# 2-5. Per-experiment steps and grouping (pure)
# --------------------------------------------------------------------------------------------

def mirror_hemisphere(volumes: np.ndarray, axis: int) -> np.ndarray:
    """Fill each volume's no-data voxels (-1) from the voxel reflected across the midline,
    along ``axis`` (the left-right axis; the Allen grid is symmetric about its centre plane)."""
    import numpy as np
    reflected = np.flip(volumes, axis=axis)
    return np.where(volumes == -1, reflected, volumes)


def mark_missing(values: np.ndarray, zero_is_missing: bool) -> np.ndarray:
    """float64 copy with -1 (no data) as NaN, and measured 0 too when ``zero_is_missing``."""
    import numpy as np
    out = np.array(values, dtype=np.float64)
    out[out == -1] = np.nan
    if zero_is_missing:
        out[out == 0] = np.nan
    return out


def log2_transform(values: np.ndarray, offset: float = 0.0) -> np.ndarray:
    """log2(x + offset) in place; -inf (a zero with offset 0) becomes NaN: no mean survives it."""
    import numpy as np
    with np.errstate(divide="ignore", invalid="ignore"):
        np.log2(values + offset if offset else values, out=values)
    values[np.isinf(values)] = np.nan
    return values


def zscore_rows(values: np.ndarray) -> np.ndarray:
    """Each row minus its mean over its non-NaN entries, divided by their standard deviation (ddof 1)."""
    import numpy as np
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(values, axis=1, keepdims=True)
        std = np.nanstd(values, axis=1, ddof=1, keepdims=True)
        return (values - mean) / std


def group_means(values: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean skipping NaN of the rows of each key (rows of a key adjacent), and the keys in order.
    A voxel with no value in any of a key's rows stays NaN (as pandas' groupby mean). A loop over
    the (mostly one- or two-experiment) genes: 8x faster than ``np.add.reduceat`` along rows."""
    import numpy as np

    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], len(keys)]
    out = np.empty((starts.size, values.shape[1]), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        for g, (a, b) in enumerate(zip(starts, ends)):
            if b - a == 1:
                out[g] = values[a]
            else:
                finite = ~np.isnan(values[a:b])
                out[g] = np.where(finite, values[a:b], 0.0).sum(axis=0) / finite.sum(axis=0)
    return out, keys[starts]


def combine_block(values: np.ndarray, genes: np.ndarray, planes: np.ndarray, recipe: Recipe
                  ) -> tuple[np.ndarray, np.ndarray]:
    """One row per gene (``group_by gene``) or per experiment, from transformed experiment rows.

    With ``plane both`` (after Fulcher & Fornito 2016): ``mean`` pools a gene's experiments of
    both planes; ``prefer-coronal`` uses its coronal experiments when it has any, else its
    sagittal ones; ``zscore-mean`` z-scores each experiment across the masked voxels first.
    """
    import numpy as np
    if recipe.group_by == "experiment":
        return values, genes
    if recipe.plane == "both" and recipe.combine == "zscore-mean":
        values = zscore_rows(values)
    elif recipe.plane == "both" and recipe.combine == "prefer-coronal":
        has_coronal = set(genes[planes == "coronal"].tolist())
        keep = np.array([p == "coronal" or g not in has_coronal for g, p in zip(genes, planes)])
        values, genes = values[keep], genes[keep]
    return group_means(values, genes)


# --------------------------------------------------------------------------------------------
# 6-8. Filter, impute, normalise (pure)
# --------------------------------------------------------------------------------------------

def keep_rows(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``values[keep]`` without a second copy of the matrix: the kept rows move up in place
    (at atlas scale the matrix is ~1 GB, and peak memory is the point)."""
    import numpy as np

    rows = np.flatnonzero(keep)
    for dst, src in enumerate(rows):
        if dst != src:
            values[dst] = values[src]
    return values[:rows.size]


def missing_fraction(values: np.ndarray) -> np.ndarray:
    import numpy as np
    return np.isnan(values).sum(axis=1) / values.shape[1]


def normalise(values: np.ndarray, method: str, column_block: int | None = None) -> np.ndarray:
    """``mhts``: z-score each voxel across rows, then centre each row across voxels.
    ``zscore``, ``srs``: abagen's, for each row (gene) across voxels: z-score with ddof 1; the
    scaled robust sigmoid 1/(1+exp(-(x-median)/(IQR/1.349))), then rescaled to [0, 1].
    NaN entries are skipped by every statistic and stay NaN.

    With ``column_block`` (voxels; the memory budget sets it) a float64 ``values`` is normalised
    in place, a block of voxels (or the same number of cells in whole rows) at a time, with the
    same numbers: each statistic is still taken over the same whole row or column."""
    import numpy as np
    if method == "none":
        return values
    if method not in NORMALISE:
        raise ValueError(f"normalise must be one of {NORMALISE}, not {method!r}")
    if column_block is None or values.dtype != np.float64 or values.ndim != 2:
        return _normalise(values, method)
    n_rows, n_cols = values.shape
    rows_per = max(1, column_block * n_rows // max(1, n_cols))
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        if method == "mhts":
            for c in range(0, n_cols, column_block):
                block = values[:, c:c + column_block]
                block[...] = zscore_rows(block.T).T
            for r in range(0, n_rows, rows_per):
                rows = values[r:r + rows_per]
                rows -= np.nanmean(rows, axis=1, keepdims=True)
            return values
        for r in range(0, n_rows, rows_per):
            values[r:r + rows_per] = _normalise(values[r:r + rows_per], method)
    return values


def _normalise(values: np.ndarray, method: str) -> np.ndarray:
    import numpy as np
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        if method == "mhts":
            z = zscore_rows(values.T).T
            return z - np.nanmean(z, axis=1, keepdims=True)
        if method == "zscore":
            return zscore_rows(values)
        if method == "srs":
            med = np.nanmedian(values, axis=1, keepdims=True)
            q75, q25 = np.nanpercentile(values, [75, 25], axis=1, keepdims=True)
            rs = 1.0 / (1.0 + np.exp(-(values - med) / ((q75 - q25) / IQR_NORMAL)))
            lo = np.nanmin(rs, axis=1, keepdims=True)
            hi = np.nanmax(rs, axis=1, keepdims=True)
            return (rs - lo) / (hi - lo)
    raise ValueError(f"normalise must be one of {NORMALISE}, not {method!r}")


# --------------------------------------------------------------------------------------------
# 10. Regions (pure)
# --------------------------------------------------------------------------------------------

def region_means(values: np.ndarray, voxel_labels: np.ndarray, table: dict[int, str]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Mean skipping NaN of each region's voxels (columns), regions sorted by name, as MHTS's
    ``build_region_matrix.py`` (pandas groupby on the structure name). Voxels labelled 0 or with
    a label the table does not name belong to no region."""
    import numpy as np
    names = np.array([table.get(int(v), "") for v in voxel_labels], dtype=object)
    regions = np.array(sorted(set(names.tolist()) - {""}), dtype=object)
    out = np.empty((values.shape[0], regions.size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for j, name in enumerate(regions):
            out[:, j] = np.nanmean(values[:, names == name], axis=1)
    return out, regions


__all__ = ["ExperimentSelection", "check_mask_for_plane", "combine_block", "group_means", "keep_rows", "log2_transform",
           "mark_missing", "mirror_hemisphere", "missing_fraction", "normalise", "region_means",
           "select_experiments", "zscore_rows"]
