"""``ambasync search``: which experiments (and genes) are expressed like a user's map, with
spatial-null p-values; or, with ``--target``/``--contrast``, which are enriched in a region.

The map is brought onto the cube's grid by world coordinates (:mod:`ambasync.imaging.regrid`), its
nulls are made by :mod:`ambasync.analysis.search.nulls`, every block of experiments is scored by
:mod:`ambasync.analysis.search.stats`, and the work is one dask graph over the cube's chunks
(:mod:`ambasync.analysis.search.tasks`: nulls made in batches, each block of experiments scored against
the map and all nulls), so ``--scheduler`` spreads it over a cluster and the local scheduler
over this machine's cores. :mod:`ambasync.cli.search` is the command line.

numpy is imported inside the functions: ``ambasync.cli`` builds this command's parser
(:mod:`ambasync.cli.search`, with the defaults below) in the run's event-loop process, which
never imports numpy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ambasync.errors import ConfigError
from ambasync.analysis.search.tasks import (BY_VOXEL, compute_tasks, design_matrix, experiment_blocks, means_block, score_block, score_voxel_span, voxel_pieces, voxel_spans)

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import xarray as xr

log = logging.getLogger("ambasync.search")

METHODS = ("pearson", "spearman")  # the same as search_stats.METHODS (kept here: no numpy at import)
BY = ("experiment", "gene")
DEFAULT_MASK = "brain"  # voxels with data in any experiment of the cube
DEFAULT_NULLS = 1000  # p-values down to 1/1001
DEFAULT_SEED = 0  # the nulls' seed: the same map and seed give the same p-values anywhere
NULLS_PER_TASK = 125  # nulls made per dask task: 8 tasks for the default, so every core gets some
EXPERIMENT_COLUMNS = ("experiment_id", "gene", "plane", "r", "p_spatial", "q", "n_voxels", "p_naive", "gene_name")
GENE_COLUMNS = ("gene", "r", "p_spatial", "q", "n_experiments", "experiment_ids")
FOLD_COLUMNS = ("experiment_id", "gene", "plane", "log2_fold_change", "fold_change", "target_mean", "contrast_mean",
                "n_target", "n_contrast", "gene_name")


def _error(message: str) -> ConfigError:
    from ambasync.errors import AnalysisError

    return AnalysisError(message)


# --------------------------------------------------------------------------------------------
# Inputs on the cube's grid
# --------------------------------------------------------------------------------------------

def _on_cube(image: str | np.ndarray, ds: xr.Dataset, method: str) -> np.ndarray:
    """An image file brought onto the cube's grid by world coordinates, or an array already on
    it (shape zspace, yspace, xspace, as :func:`ambasync.open_cube` gives) taken as it is."""
    import numpy as np

    from ambasync.errors import AnalysisError
    from ambasync.cube.read import cube_geometry
    from ambasync.imaging.regrid import on_grid, read_image

    if isinstance(image, np.ndarray):
        shape = tuple(int(ds.sizes[d]) for d in ds["expression"].dims[1:])
        if image.shape != shape:
            raise _error(f"an array map must be on the cube's grid: shape {shape} (zspace, yspace, xspace), "
                         f"not {image.shape}; write it as an image with its world coordinates instead")
        return np.asarray(image, dtype=np.float64)
    data, geometry = read_image(image)
    try:
        return on_grid(data, geometry, cube_geometry(ds), method)
    except AnalysisError as exc:  # on_grid names both grids, not the file
        raise _error(f"{image}: {exc}") from None


def map_on_cube(path: str | np.ndarray, ds: xr.Dataset) -> np.ndarray:
    """The user's map on the cube's grid (trilinear by world coordinates; NaN outside it)."""
    return _on_cube(path, ds, "linear")


def roi_on_cube(path: str | np.ndarray, ds: xr.Dataset) -> np.ndarray:
    """A region image's nonzero voxels on the cube's grid (nearest voxel by world coordinates)."""
    import numpy as np

    values = _on_cube(path, ds, "nearest")
    return np.isfinite(values) & (values != 0)


def search_mask(values: np.ndarray, spec: str, ds: xr.Dataset, map_name: str) -> np.ndarray:
    """The voxels scored: ``spec``'s mask where the map has a value. A map with no such
    voxels, or the same value in all of them, is an error (no correlation is defined)."""
    import numpy as np

    from ambasync.analysis.masks import resolve_mask

    mask = resolve_mask(spec, ds, resample=True) & np.isfinite(values)
    if mask.sum() < 2:
        raise _error(f"{map_name}: the map has no values inside the mask {spec!r} on the cube's grid "
                     "(all NaN there, or outside it); is it in the mirror's world space?")
    inside = values[mask]
    if np.ptp(inside) == 0:
        raise _error(f"{map_name}: the map is constant ({inside[0]:g}) inside the mask {spec!r}; "
                     "a correlation with it is undefined")
    return mask


# --------------------------------------------------------------------------------------------
# Correlation mode
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SearchResult:
    """What a correlative search found: one row per experiment (sorted by r, descending),
    the gene-level table when asked for, and the map and mask it was scored on (for plots)."""

    experiments: pd.DataFrame
    genes: pd.DataFrame | None
    map_values: np.ndarray  # the map on the cube's grid (zspace, yspace, xspace), NaN outside it
    mask: np.ndarray  # the voxels scored
    n_nulls: int
    method: str


def _catalogue(ds: xr.Dataset) -> pd.DataFrame:
    import numpy as np
    import pandas as pd

    def strings(name: str) -> list[str]:  # zarr 3 gives numpy's StringDType, which .astype(str) refuses
        return [str(v) for v in ds[name].values.tolist()] if name in ds.coords else [""] * ds.sizes["experiment"]

    return pd.DataFrame({"experiment_id": np.asarray(ds["experiment"].values, dtype=np.int64),
                         "gene": strings("gene"), "plane": strings("plane"), "gene_name": strings("gene_name")})


def _has_voxel_major(ds: xr.Dataset) -> bool:
    """Whether the cube holds the voxel-major copy of ``expression``, with the same experiments."""
    if BY_VOXEL not in ds:
        return False
    var = ds[BY_VOXEL]
    return tuple(var.dims) == (*ds["expression"].dims[1:], "experiment") and var.shape[-1] == ds.sizes["experiment"]


def correlate(out: str, map_path: str, mask: str = DEFAULT_MASK, method: str = "pearson",
              nulls: int = DEFAULT_NULLS, seed: int = DEFAULT_SEED, by_gene: bool = False,
              scheduler: str | None = None, progress: bool = True, voxel_major: bool = True) -> SearchResult:
    """Score every experiment of the cube at ``out`` against the map at ``map_path``.

    ``nulls`` null maps (:func:`ambasync.analysis.search.nulls.phase_randomised`, seeded by ``seed``) give
    each experiment's two-sided ``p_spatial``; ``q`` is Benjamini-Hochberg over experiments
    (over genes in the gene table). ``nulls=0`` skips them (r only; p and q are NaN).

    ``voxel_major``: Pearson is scored from the cube's voxel-major copy when it has one, reading
    only the chunks that hold mask voxels (a fraction of the bytes, none decoded twice); False,
    or Spearman (each experiment ranked over all its voxels), or a cube without that copy,
    reads it experiment by experiment."""
    import dask
    import numpy as np

    from ambasync.cube.read import cube_location, open_cube
    from ambasync.analysis.search.nulls import null_spectrum, phase_randomised
    from ambasync.analysis.search.stats import bh_q, gene_scores, parametric_p, spatial_p, voxel_design

    if method not in METHODS:
        raise _error(f"--method {method!r}: use one of {', '.join(METHODS)}")
    if nulls < 0:
        raise _error(f"--nulls {nulls}: give 0 (no spatial p-values) or more")
    ds = open_cube(out)
    values = map_on_cube(map_path, ds)
    voxels_mask = search_mask(values, mask, ds, map_path if isinstance(map_path, str) else "the map array")
    filled = np.where(voxels_mask, values, 0.0)
    map_values = filled[voxels_mask]

    batches = []
    if nulls:
        spectrum = dask.delayed(null_spectrum, pure=True)(filled, voxels_mask)
        seeds = np.random.SeedSequence(seed).spawn((nulls + NULLS_PER_TASK - 1) // NULLS_PER_TASK)
        for i, child in enumerate(seeds):
            k = min(NULLS_PER_TASK, nulls - i * NULLS_PER_TASK)
            batches.append(dask.delayed(phase_randomised, pure=True)(filled, voxels_mask, k, child,
                                                                     spectrum=spectrum))
    location = cube_location(out)
    what = f"scoring {ds.sizes['experiment']} experiments against the map and {nulls} nulls"
    if voxel_major and method == "pearson" and _has_voxel_major(ds):
        by_voxel = ds[BY_VOXEL]
        chunks = by_voxel.encoding.get("chunks") or by_voxel.shape
        pieces = dask.delayed(voxel_pieces(voxels_mask, tuple(int(c) for c in chunks[:3])))
        design = dask.delayed(voxel_design, pure=True)(map_values, batches)
        scored = compute_tasks(lambda y: [dask.delayed(score_voxel_span, pure=True)(location, span, pieces, y)
                                          for span in voxel_spans(by_voxel)], scheduler,
                               f"{what} (voxel-major)", progress, first=design)
    else:
        y = dask.delayed(design_matrix, pure=True)(map_values, batches, method)
        voxels = dask.delayed(np.flatnonzero(voxels_mask.ravel()))
        blocks = experiment_blocks(ds["expression"])
        scored = compute_tasks(lambda design: [dask.delayed(score_block, pure=True)(location, b, voxels, design, method)
                                               for b in blocks], scheduler, what, progress, first=y)
    r = np.concatenate([s[0] for s in scored])
    n = np.concatenate([s[1] for s in scored])

    table = _catalogue(ds)
    table["r"] = r[:, 0]
    table["p_spatial"] = spatial_p(r)
    table["q"] = bh_q(table["p_spatial"].to_numpy())
    table["n_voxels"] = n
    table["p_naive"] = parametric_p(r[:, 0], n)
    table = table.sort_values("r", ascending=False, na_position="last", kind="stable")[list(EXPERIMENT_COLUMNS)]

    genes = None
    if by_gene:
        import pandas as pd

        names, combined, counts = gene_scores(r, _catalogue(ds)["gene"].to_numpy())
        ids = _catalogue(ds).groupby("gene")["experiment_id"].apply(lambda s: ";".join(str(i) for i in s))
        genes = pd.DataFrame({"gene": names, "r": combined[:, 0], "p_spatial": spatial_p(combined),
                              "n_experiments": counts, "experiment_ids": ids.reindex(names).to_numpy()})
        genes["q"] = bh_q(genes["p_spatial"].to_numpy())
        genes = genes.sort_values("r", ascending=False, na_position="last", kind="stable")[list(GENE_COLUMNS)]
    return SearchResult(table.reset_index(drop=True), None if genes is None else genes.reset_index(drop=True),
                        np.where(np.isfinite(values), values, np.nan), voxels_mask, nulls, method)


# --------------------------------------------------------------------------------------------
# Differential mode
# --------------------------------------------------------------------------------------------

def fold_change(out: str, target: str, contrast: str | None = None, mask: str = DEFAULT_MASK,
                scheduler: str | None = None, progress: bool = True) -> pd.DataFrame:
    """Per experiment, mean expression in the ``target`` region over the mean in the
    ``contrast`` region (default: the rest of the mask), each over the voxels where the
    experiment has data, as ABIgeneRMINC's ``adult_gene_expression_analysis``. Sorted by
    log2 fold change, descending."""
    import dask
    import numpy as np

    from ambasync.cube.read import cube_location, open_cube
    from ambasync.analysis.masks import resolve_mask
    from ambasync.analysis.search.stats import log2_fold

    ds = open_cube(out)
    within = resolve_mask(mask, ds, resample=True)
    target_mask = roi_on_cube(target, ds) & within
    if not target_mask.any():
        raise _error(f"--target {target}: no voxels inside the mask {mask!r}; is it in the mirror's world space?")
    if contrast is None:
        contrast_mask = within & ~target_mask
        if not contrast_mask.any():
            raise _error(f"--target {target} covers the whole mask {mask!r}: nothing is left to contrast it with; "
                         "give --contrast")
    else:
        contrast_mask = roi_on_cube(contrast, ds) & within
        if not contrast_mask.any():
            raise _error(f"--contrast {contrast}: no voxels inside the mask {mask!r}; "
                         "is it in the mirror's world space?")
    both = target_mask | contrast_mask
    voxels = dask.delayed(np.flatnonzero(both.ravel()))
    in_target = dask.delayed(target_mask[both])
    blocks = experiment_blocks(ds["expression"])
    location = cube_location(out)
    parts = compute_tasks(lambda _: [dask.delayed(means_block, pure=True)(location, b, voxels, in_target)
                                     for b in blocks],
                          scheduler,
                          f"mean expression of {ds.sizes['experiment']} experiments in the two regions", progress)
    t_mean, t_n, c_mean, c_n = (np.concatenate([p[i] for p in parts]) for i in range(4))
    table = _catalogue(ds)
    table["log2_fold_change"] = log2_fold(t_mean, c_mean)
    with np.errstate(invalid="ignore", divide="ignore"):
        table["fold_change"] = t_mean / c_mean
    table["target_mean"], table["contrast_mean"] = t_mean, c_mean
    table["n_target"], table["n_contrast"] = t_n, c_n
    table = table.sort_values("log2_fold_change", ascending=False, na_position="last", kind="stable")
    return table[list(FOLD_COLUMNS)].reset_index(drop=True)


__all__ = ["BY", "DEFAULT_MASK", "DEFAULT_NULLS", "DEFAULT_SEED", "METHODS", "SearchResult", "correlate",
           "fold_change", "map_on_cube", "roi_on_cube", "search_mask"]
