"""``ambasync matrix``: gene-by-voxel and gene-by-region matrices from the cube, recipe by recipe.

:func:`build_matrix` applies the recipe's steps (:mod:`ambasync.analysis.matrix.steps`, pure numpy;
:mod:`ambasync.analysis.matrix.impute`) in order to the cube, read only through :mod:`ambasync.cube.read`
in blocks of whole genes (:mod:`ambasync.analysis.matrix.read`), so memory stays near the size of the
result whatever the cube holds. :mod:`ambasync.analysis.matrix.write` writes the result;
:mod:`ambasync.cli.matrix` is the command line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ambasync import __version__
from ambasync.analysis.matrix.budget import check_knn, plan_matrix, resolve_budget
from ambasync.analysis.matrix.impute import knn_impute_blocked, spatial_impute
from ambasync.analysis.matrix.read import (
    hemisphere_axis,
    labels_on_grid,
    read_blocks,
    read_catalogue,
    read_table,
)
from ambasync.analysis.matrix.recipe import Recipe
from ambasync.analysis.matrix.steps import (
    ExperimentSelection,
    check_mask_for_plane,
    combine_block,
    keep_rows,
    log2_transform,
    mark_missing,
    missing_fraction,
    normalise,
    region_means,
    select_experiments,
)
from ambasync.errors import AnalysisError

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("ambasync.matrix")

ROW_LABEL = {"gene": "Gene", "experiment": "Experiment"}


@dataclass(frozen=True)
class Matrix:
    """A built matrix: ``values`` rows × columns, with what each row and column is."""

    values: np.ndarray  # float64 (rows, columns)
    rows: np.ndarray  # gene acronyms, or experiment ids as str
    row_label: str  # "Gene" or "Experiment"
    obs: Any  # pandas DataFrame indexed like rows: catalogue columns
    var: Any  # pandas DataFrame indexed like columns: i/j/k, x/y/z (voxels) or n_voxels (regions)
    columns: np.ndarray  # "0".."V-1" for voxels, structure names for regions
    mask: np.ndarray  # bool (zspace, yspace, xspace)
    geometry: Any  # ambasync.geometry.Geometry of the cube
    recipe: Recipe
    facts: dict[str, Any] = field(default_factory=dict)  # counts, hash, cube location: for the methods text



def build_matrix(location: str, recipe: Recipe, scheduler: str | None = None, progress: bool = True,
                 memory: str | int | None = None) -> Matrix:
    """Every step of ``recipe`` on the cube at ``location`` (:func:`ambasync.cube.read.resolve_cube`): the gene (or experiment) × voxel matrix,
    or × region when the recipe names labels.

    ``memory`` is the budget (bytes or text such as ``"4GB"``; default ``[analysis] memory``,
    else half of RAM): every step is sized to fit in it, and a request whose estimate does not
    fit raises :class:`AnalysisError` before anything is read."""
    import numpy as np
    import pandas as pd

    from ambasync.analysis.cluster import compute_on
    from ambasync.analysis.masks import resolve_mask
    from ambasync.cube.read import cube_geometry, cube_version, open_cube
    from ambasync.geometry import affine
    from ambasync.progress import Progress

    budget, budget_source = resolve_budget(memory)
    check_mask_for_plane(recipe)
    ds = open_cube(cube=location)
    if recipe.variable not in ds:
        raise AnalysisError(f"the cube at {location} has no {recipe.variable} variable (mirror it with "
                            f"`run --volumes`), or use --variable expression")
    catalogue = read_catalogue(ds)
    sel = select_experiments(catalogue["experiment_id"].to_numpy(), catalogue["gene"].to_numpy(),
                             catalogue["plane"].to_numpy(), recipe)
    geometry = cube_geometry(ds)
    homologs = None
    if recipe.homologs:
        homologs = set(read_table(recipe.homologs, ("Mouse", "Human"), "homolog table")["Mouse"].astype(str))
    labels = table = None
    if recipe.labels:
        table_df = read_table(recipe.label_table, ("Structure", "Label"), "label table")
        try:
            table = {int(lab): str(s) for s, lab in zip(table_df["Structure"], table_df["Label"]) if int(lab) != 0}
        except (TypeError, ValueError):
            raise AnalysisError(f"label table {recipe.label_table}: column Label must hold whole numbers") from None
        labels = labels_on_grid(recipe, ds)

    t0 = time.monotonic()
    with compute_on(scheduler) as client:
        mask = resolve_mask(recipe.mask, ds, resample=recipe.resample_images)
        mask_flat = mask.ravel()
        n_vox = int(mask_flat.sum())
        n_rows = sel.ids.size if recipe.group_by == "experiment" else np.unique(sel.genes).size
        plan = plan_matrix(recipe, n_rows, n_vox, int(mask_flat.size), budget, budget_source,
                           labels.ravel()[mask_flat] if labels is not None else None)
        plan.check(f"this matrix ({n_rows} rows x {n_vox} voxels at most, {sel.ids.size} experiments)")
        digest = hashlib.sha256()
        digest.update(f"{recipe.variable}\n".encode())
        digest.update(sel.ids.astype("<i8").tobytes())
        digest.update(np.packbits(mask_flat).tobytes())
        mirror_axis = hemisphere_axis(ds) if recipe.mirror_hemisphere else None
        # only rows that pass the missing-value filter are kept, as each block is read: pages of
        # this array that no kept row reaches are never touched, so never resident
        values = np.empty((n_rows, n_vox), dtype=np.float64)
        keys: list[np.ndarray] = []
        grouped = filled = 0
        least_missing = 1.0
        def transform(masked: np.ndarray) -> np.ndarray:  # in the reading threads
            x = mark_missing(masked, recipe.zero_is_missing)
            if recipe.log2:
                log2_transform(x, recipe.log2_offset)
            return x

        for rows, x in read_blocks(ds[recipe.variable].data, sel, mask_flat, mirror_axis, digest, progress,
                                   plan.read_block, location=location if client is None else None,
                                   variable=recipe.variable, transform=transform):
            block, block_keys = combine_block(x, sel.genes[rows], sel.planes[rows], recipe)
            del x
            if recipe.group_by == "experiment":
                block_keys = sel.ids[rows].astype(str)
            frac = missing_fraction(block)
            grouped += len(block)
            if len(frac):
                least_missing = min(least_missing, float(frac.min()))
            keep = np.flatnonzero(frac < recipe.max_missing)
            values[filled:filled + keep.size] = block[keep]
            keys.append(block_keys[keep])
            filled += keep.size
            del block
        if filled == 0:
            raise AnalysisError(f"--max-missing {recipe.max_missing} leaves no rows: the least missing of "
                                f"{grouped} rows has {least_missing:.1%} of the {n_vox} masked voxels missing; "
                                "raise it, or choose a mask the experiments cover")
        values = values[:filled]
        row_keys = np.concatenate(keys)
        read_seconds = time.monotonic() - t0

        t1 = time.monotonic()
        coords = (affine(geometry) @ np.vstack([np.argwhere(mask).T, np.ones(n_vox)]))[:3].T
        if recipe.impute != "none":
            log.info("imputing %d NaN cells of %d rows x %d voxels (%s)", int(np.isnan(values).sum()),
                     values.shape[0], n_vox, recipe.impute)
        if recipe.impute == "knn":
            check_knn(plan, values, recipe.knn_neighbors)
            bar = Progress("imputing (knn)", None, "voxels", progress)
            values = knn_impute_blocked(values, recipe.knn_neighbors, memory_bytes=plan.knn_tiles, progress=bar)
            bar.close()
        elif recipe.impute == "spatial":
            bar = Progress("imputing (spatial)", values.shape[0], "rows", progress)
            values = spatial_impute(values, coords, inplace=True, progress=bar)
            bar.close()
        impute_seconds = time.monotonic() - t1

    if homologs is not None:
        genes_of_rows = row_keys if recipe.group_by == "gene" else _genes_of_ids(row_keys, sel)
        has = np.isin(genes_of_rows, list(homologs))
        if not has.any():
            raise AnalysisError(f"homolog table {recipe.homologs}: none of the {len(row_keys)} rows' genes is in its "
                                "Mouse column; check that it lists mouse gene acronyms")
        values, row_keys = keep_rows(values, has), row_keys[has]
    values = normalise(values, recipe.normalise, column_block=plan.column_block)

    obs = _obs(row_keys, sel, catalogue, recipe)
    ijk = np.argwhere(mask)
    var = pd.DataFrame({"i": ijk[:, 0], "j": ijk[:, 1], "k": ijk[:, 2],
                        "x": coords[:, 0], "y": coords[:, 1], "z": coords[:, 2]},
                       index=pd.Index([str(v) for v in range(n_vox)], name="voxel"))
    columns = np.array(var.index, dtype=object)
    n_region_voxels = 0
    if labels is not None:
        voxel_labels = labels.ravel()[mask_flat]
        var["label"] = voxel_labels
        var["region"] = [table.get(int(v), "") for v in voxel_labels]
    if labels is not None and recipe.region_means:
        values, regions = region_means(values, voxel_labels, table)
        counts = var[var["region"] != ""].groupby("region").size()
        n_region_voxels = int(counts.sum())
        var = pd.DataFrame({"n_voxels": counts.reindex(regions).to_numpy()},
                           index=pd.Index(list(regions), name="region"))
        columns = regions
    facts = {
        "cube": location, "cube_version": cube_version(ds), "cube_hash": digest.hexdigest(), "ambasync_version": __version__,
        "n_experiments": int(sel.ids.size), "n_rows_grouped": int(grouped), "n_rows": int(values.shape[0]),
        "n_voxels": n_vox, "n_columns": int(values.shape[1]),
        "columns": "regions" if var.index.name == "region" else "voxels", "n_region_voxels": n_region_voxels,
        "planes": sorted(set(sel.planes.tolist())), "read_seconds": read_seconds,
        "impute_seconds": impute_seconds, "memory_budget": int(budget), "memory_estimate": int(plan.peak),
        "scheduler": scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or "",
    }
    return Matrix(values, row_keys, ROW_LABEL[recipe.group_by], obs, var, columns, mask, geometry, recipe, facts)


def _genes_of_ids(row_keys: np.ndarray, sel: ExperimentSelection) -> np.ndarray:
    import numpy as np
    gene_of = dict(zip(sel.ids.astype(str).tolist(), sel.genes.tolist()))
    return np.array([gene_of[k] for k in row_keys])


def _obs(row_keys: np.ndarray, sel: ExperimentSelection, catalogue: Any, recipe: Recipe) -> Any:
    """Catalogue columns per row: an experiment's own, or per gene its experiments (ids ';'-joined)."""
    import pandas as pd

    cat = catalogue.set_index("experiment_id").loc[sel.ids]
    if recipe.group_by == "experiment":
        obs = cat.loc[[int(k) for k in row_keys]].reset_index()
        obs.index = pd.Index(list(row_keys), name="experiment")
        return obs.astype({c: str for c in obs.columns if obs[c].dtype == object})
    by_gene = cat.reset_index().groupby("gene", sort=True)
    obs = pd.DataFrame({
        "gene_name": by_gene["gene_name"].first() if "gene_name" in cat else by_gene["plane"].first(),
        "n_experiments": by_gene.size(),
        "experiment_ids": by_gene["experiment_id"].agg(lambda s: ";".join(map(str, s))),
        "planes": by_gene["plane"].agg(lambda s: ";".join(sorted(set(s)))),
    })
    for name in ("entrez_id", "homologene_id", "chromosome_id"):
        if name in cat:
            obs[name] = by_gene[name].first()
    obs = obs.loc[list(row_keys)]
    obs.index = pd.Index(list(row_keys), name="gene")
    return obs.astype({c: str for c in obs.columns if obs[c].dtype == object})


__all__ = ["Matrix", "build_matrix"]
