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

from ambasync.analysis.search.options import (
    METHODS,  # re-exported for the CLI and the API
)
from ambasync.analysis.search.tasks import (
    BY_VOXEL,
    compute_tasks,
    design_matrix,
    experiment_blocks,
    means_block,
    score_block,
    score_voxel_span,
    voxel_pieces,
    voxel_spans,
)
from ambasync.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import xarray as xr

log = logging.getLogger("ambasync.search")

BY = ("experiment", "gene")
DEFAULT_MASK = "brain"  # voxels with data in any experiment of the cube
DEFAULT_NULLS = 1000  # p-values down to 1/1001
DEFAULT_SEED = 0  # the nulls' seed: the same map and seed give the same p-values anywhere
NULLS_PER_TASK = 125  # nulls made per dask task: 8 tasks for the default, so every core gets some
TAILS = ("gpd", "empirical")  # p_spatial: a fitted tail below 1/(nulls + 1) where it fits, or the count alone
DEFAULT_TAIL = "gpd"
ALIGN = ("world", "voxel")  # the same as regrid.ALIGN (kept here: no numpy at import)
# New columns go at the end: tables written before them keep their meaning column by column.
EXPERIMENT_COLUMNS = ("experiment_id", "gene", "plane", "r", "p_spatial", "q", "n_voxels", "p_naive", "gene_name",
                      "p_method")
GENE_COLUMNS = ("gene", "r", "p_spatial", "q", "n_experiments", "experiment_ids", "p_method", "reproducibility",
                "replicated")
FOLD_COLUMNS = ("experiment_id", "gene", "plane", "log2_fold_change", "fold_change", "target_mean", "contrast_mean",
                "n_target", "n_contrast", "gene_name", "target", "contrast")


def _error(message: str) -> ConfigError:
    from ambasync.errors import AnalysisError

    return AnalysisError(message)


# --------------------------------------------------------------------------------------------
# Inputs on the cube's grid
# --------------------------------------------------------------------------------------------

def _on_cube(image: str | np.ndarray, ds: xr.Dataset, method: str, align: str | None = None,
             flag: str = "MAP") -> np.ndarray:
    """An image file brought onto the cube's grid as ``align`` says
    (:func:`ambasync.imaging.regrid.align_image`: by world coordinates, or index for index), or
    an array already on it (shape zspace, yspace, xspace, as :func:`ambasync.open_cube` gives)
    taken as it is."""
    import numpy as np

    from ambasync.cube.read import cube_geometry
    from ambasync.errors import AnalysisError
    from ambasync.imaging.regrid import align_image, read_image

    if isinstance(image, np.ndarray):
        shape = tuple(int(ds.sizes[d]) for d in ds["expression"].dims[1:])
        if image.shape != shape:
            raise _error(f"an array map must be on the cube's grid: shape {shape} (zspace, yspace, xspace), "
                         f"not {image.shape}; write it as an image with its world coordinates instead")
        return np.asarray(image, dtype=np.float64)
    data, geometry = read_image(image)
    try:
        return align_image(data, geometry, cube_geometry(ds), method, align, name=f"{flag} {image}")
    except AnalysisError as exc:  # on_grid names both grids, not the file
        text = str(exc)
        raise _error(text if str(image) in text else f"{image}: {text}") from None


def map_on_cube(path: str | np.ndarray, ds: xr.Dataset, align: str | None = None) -> np.ndarray:
    """The user's map on the cube's grid (trilinear by world coordinates, or index for index with
    ``align="voxel"``; NaN outside it)."""
    return _on_cube(path, ds, "linear", align)


def roi_on_cube(path: str | np.ndarray, ds: xr.Dataset, align: str | None = None, *, above: float | None = None,
                at_most: float | None = None, flag: str = "--target") -> np.ndarray:
    """A region on the cube's grid (nearest voxel by world coordinates, or index for index with
    ``align="voxel"``): the image's nonzero voxels; with ``above``, those where it is > above;
    with ``at_most``, those where it is <= at_most (thresholds of a statistic map)."""
    import numpy as np

    values = _on_cube(path, ds, "nearest", align, flag)
    finite = np.isfinite(values)
    if above is not None:
        return finite & (np.where(finite, values, -np.inf) > above)
    if at_most is not None:
        return finite & (np.where(finite, values, np.inf) <= at_most)
    return finite & (values != 0)


def region_name(image: str | np.ndarray | None, above: float | None = None, at_most: float | None = None) -> str:
    """How the tables and messages name a region: ``t.mnc > 2``, ``brain.mnc <= 0.5``, ``roi.mnc``
    (its nonzero voxels), or ``array`` for an array given in Python."""
    import os

    name = "array" if image is None or not isinstance(image, (str, os.PathLike)) else os.path.basename(str(image))
    if above is not None:
        return f"{name} > {above:g}"
    if at_most is not None:
        return f"{name} <= {at_most:g}"
    return f"{name} != 0"


def overlap_line(flag: str, image: str | np.ndarray, inside: int, total: int, of: str) -> str:
    """One line saying how much of an image lies where it is used: ``MAP m.mnc: 61,204 of 63,545
    mask voxels (96.3 %)``. A partial overlap is then seen, not guessed from a weak result."""
    name = image if isinstance(image, str) else "array"
    share = 100.0 * inside / total if total else 0.0
    return f"{flag} {name}: {inside:,} of {total:,} {of} ({share:.1f} %)"


def search_mask(values: np.ndarray, spec: str, ds: xr.Dataset, map_name: str, align: str | None = None,
                report: list[str] | None = None) -> np.ndarray:
    """The voxels scored: ``spec``'s mask where the map has a value. A map with no such
    voxels, or the same value in all of them, is an error (no correlation is defined).
    ``report`` gets a line with the map's overlap with the mask."""
    import numpy as np

    from ambasync.analysis.masks import resolve_mask

    within = resolve_mask(spec, ds, resample=True, align=align)
    mask = within & np.isfinite(values)
    if report is not None:
        report.append(overlap_line("MAP", map_name, int(mask.sum()), int(within.sum()), f"voxels of the mask {spec}"))
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
    tail: str = DEFAULT_TAIL
    report: tuple[str, ...] = ()  # each image's overlap with the mask, for the command to print


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


def correlate(location: str, map_path: str, mask: str = DEFAULT_MASK, method: str = "pearson",
              nulls: int = DEFAULT_NULLS, seed: int = DEFAULT_SEED, by_gene: bool = False,
              scheduler: str | None = None, progress: bool = True, voxel_major: bool = True, *,
              tail: str = DEFAULT_TAIL, align: str | None = None) -> SearchResult:
    """Score every experiment of the cube at ``location`` against the map at ``map_path``.

    ``nulls`` null maps (:func:`ambasync.analysis.search.nulls.phase_randomised`, seeded by ``seed``) give
    each experiment's two-sided ``p_spatial``; ``q`` is Benjamini-Hochberg over experiments
    (over genes in the gene table). ``nulls=0`` skips them (r only; p and q are NaN).
    ``tail="gpd"`` refines p below 1/(nulls + 1) by a generalised Pareto fit to the tail of each
    row's nulls where the fit holds (:mod:`ambasync.analysis.search.tail`; ``p_method`` says
    which); ``"empirical"`` keeps the count alone. ``align``: how the map and ``mask`` image meet
    the cube's grid (:func:`ambasync.imaging.regrid.align_image`).

    ``voxel_major``: Pearson is scored from the cube's voxel-major copy when it has one, reading
    only the chunks that hold mask voxels (a fraction of the bytes, none decoded twice); False,
    or Spearman (each experiment ranked over all its voxels), or a cube without that copy,
    reads it experiment by experiment."""
    import dask
    import numpy as np

    from ambasync.analysis.search.nulls import null_spectrum, phase_randomised
    from ambasync.analysis.search.stats import (
        bh_q,
        gene_scores,
        parametric_p,
        spatial_pvalues,
        voxel_design,
    )
    from ambasync.cube.read import open_cube

    if method not in METHODS:
        raise _error(f"--method {method!r}: use one of {', '.join(METHODS)}")
    if nulls < 0:
        raise _error(f"--nulls {nulls}: give 0 (no spatial p-values) or more")
    if tail not in TAILS:
        raise _error(f"--tail {tail!r}: use one of {', '.join(TAILS)}")
    if align not in (None, *ALIGN):
        raise _error(f"--align {align!r}: use one of {', '.join(ALIGN)}")
    ds = open_cube(cube=location)
    values = map_on_cube(map_path, ds, align)
    report: list[str] = []
    voxels_mask = search_mask(values, mask, ds, map_path if isinstance(map_path, str) else "the map array", align,
                              report)
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
    table["p_spatial"], table["p_method"] = spatial_pvalues(r, tail)
    table["q"] = bh_q(table["p_spatial"].to_numpy())
    table["n_voxels"] = n
    table["p_naive"] = parametric_p(r[:, 0], n)
    table = table.sort_values("r", ascending=False, na_position="last", kind="stable")[list(EXPERIMENT_COLUMNS)]

    genes = None
    if by_gene:
        import pandas as pd

        from ambasync.analysis.search.replication import cube_gene_reproducibility

        catalogue = _catalogue(ds)
        names, combined, counts = gene_scores(r, catalogue["gene"].to_numpy())
        ids = catalogue.groupby("gene")["experiment_id"].apply(lambda s: ";".join(str(i) for i in s))
        p, how = spatial_pvalues(combined, tail)
        genes = pd.DataFrame({"gene": names, "r": combined[:, 0], "p_spatial": p,
                              "n_experiments": counts, "experiment_ids": ids.reindex(names).to_numpy(),
                              "p_method": how})
        genes["q"] = bh_q(genes["p_spatial"].to_numpy())
        reproducible = cube_gene_reproducibility(location, ds, catalogue["gene"].to_numpy(),
                                                 voxels_mask, scheduler, progress)
        genes["reproducibility"] = reproducible["reproducibility"].reindex(names).to_numpy()
        genes["replicated"] = reproducible["replicated"].reindex(names).to_numpy()
        genes = genes.sort_values("r", ascending=False, na_position="last", kind="stable")[list(GENE_COLUMNS)]
    return SearchResult(table.reset_index(drop=True), None if genes is None else genes.reset_index(drop=True),
                        np.where(np.isfinite(values), values, np.nan), voxels_mask, nulls, method, tail,
                        tuple(report))


# --------------------------------------------------------------------------------------------
# Differential mode
# --------------------------------------------------------------------------------------------

def fold_change(location: str, target: str | np.ndarray, contrast: str | np.ndarray | None = None,
                mask: str = DEFAULT_MASK, scheduler: str | None = None, progress: bool = True, *,
                target_above: float | None = None, contrast_at_most: float | None = None, align: str | None = None,
                report: list[str] | None = None) -> pd.DataFrame:
    """Per experiment, mean expression in the ``target`` region over the mean in the
    ``contrast`` region, each over the voxels where the experiment has data, as ABIgeneRMINC's
    ``geneFoldChange`` / ``adult_gene_expression_analysis``. Sorted by log2 fold change,
    descending.

    The target is the image's nonzero voxels, or its voxels > ``target_above``. The contrast is,
    as given, ``contrast``'s nonzero voxels (or its voxels <= ``contrast_at_most``; without
    ``contrast``, the target image's voxels <= ``contrast_at_most``), voxels it shares with the
    target included; without either, the rest of the mask (mask minus target). Both are
    restricted to ``mask``. The ``target`` and ``contrast`` columns name the regions used;
    ``report`` gets each region's overlap with the mask."""
    import dask
    import numpy as np

    from ambasync.analysis.masks import resolve_mask
    from ambasync.analysis.search.stats import log2_fold
    from ambasync.cube.read import open_cube

    if align not in (None, *ALIGN):
        raise _error(f"--align {align!r}: use one of {', '.join(ALIGN)}")
    ds = open_cube(cube=location)
    within = resolve_mask(mask, ds, resample=True, align=align)
    region = roi_on_cube(target, ds, align, above=target_above, flag="--target")
    target_mask = region & within
    target_text = region_name(target, above=target_above)
    if report is not None:
        report.append(overlap_line("--target", target, int(target_mask.sum()), int(region.sum()),
                                   f"its voxels ({target_text}) inside the mask {mask}"))
    if not target_mask.any():
        raise _error(f"--target {target_text}: no voxels inside the mask {mask!r}; is it in the mirror's world space?")
    if contrast is None and contrast_at_most is None:
        contrast_mask = within & ~target_mask
        contrast_text = f"rest of the mask {mask} (mask minus target)"
        if not contrast_mask.any():
            raise _error(f"--target {target_text} covers the whole mask {mask!r}: nothing is left to contrast it "
                         "with; give --contrast")
    else:
        image = target if contrast is None else contrast
        if contrast is None:
            region = roi_on_cube(image, ds, align, at_most=contrast_at_most, flag="--target")
        else:
            region = roi_on_cube(image, ds, align, at_most=contrast_at_most, flag="--contrast")
        contrast_mask = region & within
        contrast_text = region_name(image, at_most=contrast_at_most)
        if report is not None:
            report.append(overlap_line("--contrast", image, int(contrast_mask.sum()), int(region.sum()),
                                       f"its voxels ({contrast_text}) inside the mask {mask}"))
        if not contrast_mask.any():
            raise _error(f"--contrast {contrast_text}: no voxels inside the mask {mask!r}; "
                         "is it in the mirror's world space?")
    both = target_mask | contrast_mask
    voxels = dask.delayed(np.flatnonzero(both.ravel()))
    regions = dask.delayed((target_mask[both], contrast_mask[both]))
    blocks = experiment_blocks(ds["expression"])
    parts = compute_tasks(lambda _: [dask.delayed(means_block, pure=True)(location, b, voxels, regions)
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
    table["target"], table["contrast"] = target_text, contrast_text
    table = table.sort_values("log2_fold_change", ascending=False, na_position="last", kind="stable")
    return table[list(FOLD_COLUMNS)].reset_index(drop=True)


__all__ = ["ALIGN", "BY", "DEFAULT_MASK", "DEFAULT_NULLS", "DEFAULT_SEED", "DEFAULT_TAIL", "METHODS", "TAILS",
           "SearchResult", "correlate", "fold_change", "map_on_cube", "overlap_line", "region_name", "roi_on_cube",
           "search_mask"]
