"""``ambasync matrix``: gene-by-voxel and gene-by-region matrices from the cube, recipe by recipe.

The steps are the ones labs write by hand (MouseHumanTranscriptomicSimilarity's
``build_voxel_matrix.py`` and ``build_region_matrix.py``; abagen's normalisations; Fulcher's
plane combinations), each a pure function of numpy arrays below, in the order
:func:`build_matrix` applies them. The cube is read only through :mod:`ambasync.atlas`, in
blocks of whole genes, so memory stays near the size of the result whatever the cube holds.
Outputs (CSV in MHTS's layout, Parquet, AnnData, Zarr, or one gene back to an image) are
written atomically with their recipe and methods text beside them.

numpy is imported inside the functions: ``ambasync.cli`` builds this command's parser in the
run's event-loop process, which never imports numpy.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from . import __version__
from .errors import ConfigError
from .files import tmp_name
from .recipe import COMBINE, GROUP_BY, IMPUTE, NORMALISE, PLANES, VARIABLES, Recipe, dumps, load_recipe, make_recipe

log = logging.getLogger("ambasync.matrix")

FORMATS = (".csv", ".parquet", ".h5ad", ".zarr")
IMAGE_FORMATS = (".mnc", ".nii", ".nii.gz")
ROW_LABEL = {"gene": "Gene", "experiment": "Experiment"}
BLOCK_EXPERIMENTS = 128  # experiments read per block: ~80 MB of float32 grids on the 200 µm grid
IQR_NORMAL = 1.3489795003921634  # IQR of the standard normal: scipy.stats.iqr(scale="normal"), as abagen
SPATIAL_K = 64  # candidates per query in spatial imputation before falling back to a ball query
CSV_BATCH_ROWS = 32  # rows formatted at once: ~40 MB of text (x3 while joined) at 61,000 voxels


def _error(message: str) -> ConfigError:
    from .atlas import AnalysisError

    return AnalysisError(message)


# --------------------------------------------------------------------------------------------
# 1. Experiments
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Selection:
    """The experiments a recipe uses, as positions in the cube and their catalogue values,
    ordered by (gene, experiment id) so a gene's experiments are adjacent."""

    positions: np.ndarray  # int64 index along the cube's experiment dimension
    ids: np.ndarray  # int64 experiment ids
    genes: np.ndarray  # str gene acronyms (the catalogue's, not file names)
    planes: np.ndarray  # str


def select_experiments(ids: np.ndarray, genes: np.ndarray, planes: np.ndarray, recipe: Recipe) -> Selection:
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
        missing = sorted(set(recipe.genes) - set(genes.tolist()))
        if missing:
            raise _error(f"unknown gene {missing[0]!r}: the cube has no experiment of it "
                         f"({len(missing)} unknown of {len(recipe.genes)} asked); check the acronym's case")
        keep &= np.isin(genes, list(recipe.genes))
    if recipe.ids:
        missing = sorted(set(recipe.ids) - set(ids.tolist()))
        if missing:
            raise _error(f"unknown experiment id {missing[0]}: not in the cube ({len(missing)} unknown of "
                         f"{len(recipe.ids)} asked); run `ambasync run` for it first")
        keep &= np.isin(ids, list(recipe.ids))
    chosen = np.flatnonzero(keep)
    if chosen.size == 0:
        raise _error(f"no experiment of the cube matches plane {recipe.plane}"
                     + (" with a coronal experiment of the same gene" if recipe.plane == "sagittal"
                        and recipe.genes_in_coronal else "")
                     + (f", genes {', '.join(recipe.genes)}" if recipe.genes else "")
                     + (f", ids {', '.join(map(str, recipe.ids))}" if recipe.ids else ""))
    order = chosen[np.lexsort((ids[chosen], genes[chosen]))]
    return Selection(order.astype(np.int64), ids[order], genes[order], planes[order])


def check_mask_for_plane(recipe: Recipe) -> None:
    """Sagittal experiments cover one hemisphere: the bilateral coronal mask would be half empty
    (MHTS warns; here it is refused unless the hemisphere is mirrored first)."""
    if recipe.plane == "sagittal" and recipe.mask == "coronal" and not recipe.mirror_hemisphere:
        raise _error("sagittal experiments with the coronal mask: the coronal mask covers both hemispheres "
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


def knn_impute(values: np.ndarray, n_neighbors: int = 5) -> np.ndarray:
    """scikit-learn's KNNImputer on the transposed matrix (voxels as samples, rows as features),
    exactly as MHTS; identical to ``KNNImputer(n_neighbors).fit_transform(values.T).T``.

    The voxels to impute are split into the same row chunks scikit-learn's own
    ``pairwise_distances_chunked`` uses, and the chunks run as dask tasks (threads or a
    ``--scheduler`` cluster): every distance is then computed on the same shapes as in one call.
    """
    import numpy as np
    import dask
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


def _knn_transform(imputer: Any, rows: np.ndarray) -> np.ndarray:
    return imputer.transform(rows)


def spatial_impute(values: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Each row's NaN voxels get the mean of that row's nearest voxels with data, in space:
    all data voxels at the smallest Euclidean distance (world mm) from the missing one (ties all
    count; on the 200 µm grid usually its 6 face neighbours). Rows without data stay NaN."""
    import numpy as np
    from scipy.spatial import cKDTree

    out = np.array(values, dtype=np.float64)
    for r in range(out.shape[0]):
        row = out[r]
        missing = np.isnan(row)
        if not missing.any() or missing.all():
            continue
        have = np.flatnonzero(~missing)
        tree = cKDTree(coords[have])
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


def normalise(values: np.ndarray, method: str) -> np.ndarray:
    """``mhts``: z-score each voxel across rows, then centre each row across voxels.
    ``zscore``, ``srs``: abagen's, for each row (gene) across voxels: z-score with ddof 1; the
    scaled robust sigmoid 1/(1+exp(-(x-median)/(IQR/1.349))), then rescaled to [0, 1].
    NaN entries are skipped by every statistic and stay NaN."""
    import numpy as np
    if method == "none":
        return values
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


# --------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------

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


def _catalogue(ds: Any) -> Any:
    """The catalogue columns along ``experiment``, read in one go (they are lazy coordinates)."""
    import dask
    import numpy as np
    import pandas as pd

    names = [n for n in ds["experiment"].coords if n != "experiment" and ds[n].dims == ("experiment",)]
    values = dask.compute(ds["experiment"].data, *[ds[n].data for n in names])
    data = {"experiment_id": np.asarray(values[0], dtype=np.int64)}
    data.update({n: np.asarray(v) for n, v in zip(names, values[1:])})
    return pd.DataFrame(data)


def _read_blocks(data: Any, sel: Selection, mask_flat: np.ndarray, mirror_axis: int | None,
                 digest: Any, progress: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows of this block in ``sel`` order, masked float32 voxels), whole genes per block.
    The next block is read (dask: decompression on every core) while the caller works on this one."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    n = sel.ids.size
    bounds, start = [], 0
    while start < n:
        stop = min(n, start + BLOCK_EXPERIMENTS)
        while stop < n and sel.genes[stop] == sel.genes[stop - 1]:
            stop += 1
        bounds.append((start, stop))
        start = stop

    def load(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.arange(start, stop)
        pos = sel.positions[rows]
        order = np.argsort(pos, kind="stable")  # read the cube in storage order, then put back
        raw = np.asarray(data[pos[order]].compute())
        if mirror_axis is not None:
            sag = sel.planes[rows][order] == "sagittal"
            if sag.any():
                raw[sag] = mirror_hemisphere(raw[sag], mirror_axis + 1)
        masked = np.empty((len(rows), int(mask_flat.sum())), dtype=raw.dtype)
        masked[order] = raw.reshape(len(rows), -1)[:, mask_flat]
        return rows, masked

    bar = _progress(len(bounds), "reading the cube", progress)
    with ThreadPoolExecutor(1) as reader:
        ahead = reader.submit(load, *bounds[0]) if bounds else None
        for i in range(len(bounds)):
            rows, masked = ahead.result()
            ahead = reader.submit(load, *bounds[i + 1]) if i + 1 < len(bounds) else None
            digest.update(np.ascontiguousarray(masked, dtype="<f4").tobytes())
            bar(1)
            yield rows, masked
    bar(None)


def _progress(total: int, what: str, enabled: bool):
    """A tqdm bar on a terminal, else a log line every tenth; call with 1 per step, None to close."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=what, unit="block", leave=False)
        return lambda step: bar.close() if step is None else bar.update(step)
    state = {"done": 0, "t": time.monotonic()}

    def tick(step: int | None) -> None:
        if step is None:
            return
        state["done"] += step
        if enabled and (state["done"] == total or state["done"] % max(1, total // 10) == 0):
            log.info("%s: %d/%d blocks (%.0f s)", what, state["done"], total, time.monotonic() - state["t"])

    return tick


def _mirror_axis(ds: Any) -> int:
    """Index (0..2, of zspace/yspace/xspace) of the left-right axis: the Allen grid's stored z
    axis, which the notebook's RAS reorientation puts last (xspace) and PIR keeps first."""
    return 2 if ds.attrs.get("orientation", "RAS") == "RAS" else 0


def _read_table(path: str, columns: tuple[str, str], what: str) -> Any:
    import pandas as pd

    try:
        table = pd.read_csv(path)
    except FileNotFoundError:
        raise _error(f"{what} {path}: no such file") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise _error(f"{what} {path}: not a readable CSV ({exc})") from None
    absent = [c for c in columns if c not in table.columns]
    if absent:
        raise _error(f"{what} {path}: no column {absent[0]!r} (needs columns {', '.join(columns)})")
    return table


def _labels_on_grid(recipe: Recipe, ds: Any) -> np.ndarray:
    import numpy as np
    from .atlas import cube_geometry, describe, on_grid, read_image, same_grid

    data, geometry = read_image(recipe.labels)
    grid = cube_geometry(ds)
    if not same_grid(geometry, grid):
        if not recipe.resample_images:
            raise _error(f"labels {recipe.labels} are on another grid ({describe(geometry)}) than the cube "
                         f"({describe(grid)}); resample them onto the cube's grid first, or --resample-images")
        data = on_grid(data, geometry, grid, "nearest")
    return np.nan_to_num(np.rint(data), nan=0).astype(np.int64)


def build_matrix(out: str, recipe: Recipe, scheduler: str | None = None, progress: bool = True) -> Matrix:
    """Every step of ``recipe`` on the cube in ``out``: the gene (or experiment) × voxel matrix,
    or × region when the recipe names labels."""
    import numpy as np
    import pandas as pd

    from .atlas import compute_on, cube_geometry, cube_location, open_cube, resolve_mask
    from .geometry import affine

    check_mask_for_plane(recipe)
    ds = open_cube(out)
    if recipe.variable not in ds:
        raise _error(f"the cube at {cube_location(out)} has no {recipe.variable} variable (mirror it with "
                     f"`run --volumes`), or use --variable expression")
    catalogue = _catalogue(ds)
    sel = select_experiments(catalogue["experiment_id"].to_numpy(), catalogue["gene"].to_numpy(),
                             catalogue["plane"].to_numpy(), recipe)
    geometry = cube_geometry(ds)
    homologs = None
    if recipe.homologs:
        homologs = set(_read_table(recipe.homologs, ("Mouse", "Human"), "homolog table")["Mouse"].astype(str))
    labels = table = None
    if recipe.labels:
        table_df = _read_table(recipe.label_table, ("Structure", "Label"), "label table")
        try:
            table = {int(lab): str(s) for s, lab in zip(table_df["Structure"], table_df["Label"]) if int(lab) != 0}
        except (TypeError, ValueError):
            raise _error(f"label table {recipe.label_table}: column Label must hold whole numbers") from None
        labels = _labels_on_grid(recipe, ds)

    t0 = time.monotonic()
    with compute_on(scheduler):
        mask = resolve_mask(recipe.mask, ds, resample=recipe.resample_images)
        mask_flat = mask.ravel()
        n_vox = int(mask_flat.sum())
        digest = hashlib.sha256()
        digest.update(f"{recipe.variable}\n".encode())
        digest.update(sel.ids.astype("<i8").tobytes())
        digest.update(np.packbits(mask_flat).tobytes())
        mirror_axis = _mirror_axis(ds) if recipe.mirror_hemisphere else None
        n_rows = sel.ids.size if recipe.group_by == "experiment" else np.unique(sel.genes).size
        values = np.empty((n_rows, n_vox), dtype=np.float64)
        keys: list[np.ndarray] = []
        filled = 0
        for rows, masked in _read_blocks(ds[recipe.variable].data, sel, mask_flat, mirror_axis, digest, progress):
            x = mark_missing(masked, recipe.zero_is_missing)
            del masked
            if recipe.log2:
                log2_transform(x, recipe.log2_offset)
            block, block_keys = combine_block(x, sel.genes[rows], sel.planes[rows], recipe)
            values[filled:filled + len(block)] = block
            keys.append(block_keys if recipe.group_by == "gene" else sel.ids[rows].astype(str))
            filled += len(block)
        values = values[:filled]
        row_keys = np.concatenate(keys)
        read_seconds = time.monotonic() - t0

        frac = missing_fraction(values)
        keep = frac < recipe.max_missing
        if not keep.any():
            raise _error(f"--max-missing {recipe.max_missing} leaves no rows: the least missing of "
                         f"{len(frac)} rows has {frac.min():.1%} of the {n_vox} masked voxels missing; "
                         "raise it, or choose a mask the experiments cover")
        values, row_keys = keep_rows(values, keep), row_keys[keep]

        t1 = time.monotonic()
        coords = (affine(geometry) @ np.vstack([np.argwhere(mask).T, np.ones(n_vox)]))[:3].T
        if recipe.impute != "none":
            log.info("imputing %d NaN cells of %d rows x %d voxels (%s)", int(np.isnan(values).sum()),
                     values.shape[0], n_vox, recipe.impute)
        if recipe.impute == "knn":
            values = knn_impute(values, recipe.knn_neighbors)
        elif recipe.impute == "spatial":
            values = spatial_impute(values, coords)
        impute_seconds = time.monotonic() - t1

    if homologs is not None:
        genes_of_rows = row_keys if recipe.group_by == "gene" else _genes_of_ids(row_keys, sel)
        has = np.isin(genes_of_rows, list(homologs))
        if not has.any():
            raise _error(f"homolog table {recipe.homologs}: none of the {len(row_keys)} rows' genes is in its "
                         "Mouse column; check that it lists mouse gene acronyms")
        values, row_keys = keep_rows(values, has), row_keys[has]
    values = normalise(values, recipe.normalise)

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
        "cube": cube_location(out), "cube_hash": digest.hexdigest(), "ambasync_version": __version__,
        "n_experiments": int(sel.ids.size), "n_rows_grouped": int(filled), "n_rows": int(values.shape[0]),
        "n_voxels": n_vox, "n_columns": int(values.shape[1]), "n_region_voxels": n_region_voxels,
        "planes": sorted(set(sel.planes.tolist())), "read_seconds": read_seconds,
        "impute_seconds": impute_seconds, "scheduler": scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or "",
    }
    return Matrix(values, row_keys, ROW_LABEL[recipe.group_by], obs, var, columns, mask, geometry, recipe, facts)


def _genes_of_ids(row_keys: np.ndarray, sel: Selection) -> np.ndarray:
    import numpy as np
    gene_of = dict(zip(sel.ids.astype(str).tolist(), sel.genes.tolist()))
    return np.array([gene_of[k] for k in row_keys])


def _obs(row_keys: np.ndarray, sel: Selection, catalogue: Any, recipe: Recipe) -> Any:
    """Catalogue columns per row: an experiment's own, or per gene its experiments (ids ';'-joined)."""
    import numpy as np
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


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------

def output_kind(to: str, volume: str | None) -> str:
    """The output format from ``--to``'s extension; anything else is an error naming the choices."""
    name = str(to).lower()
    allowed = IMAGE_FORMATS if volume else FORMATS
    for ext in allowed:
        if name.endswith(ext):
            return ext
    what = "--volume writes an image" if volume else "a matrix is written"
    raise _error(f"--to {to}: unknown extension; {what} as {', '.join(allowed)}")


@dataclass(frozen=True)
class Written:
    path: str
    recipe_path: str
    methods_path: str


@contextlib.contextmanager
def _side_files(to: str, recipe: Recipe, methods: str) -> Iterator[tuple[Path, Path]]:
    """``{to}.recipe.toml`` and ``{to}.methods.md`` written under temporary names, renamed into
    place only when the block (which writes the output itself) succeeds: an interrupted
    ``matrix`` leaves neither a partial output nor side files describing a missing one."""
    final = (Path(f"{to}.recipe.toml"), Path(f"{to}.methods.md"))
    tmps = [tmp_name(p) for p in final]
    try:
        tmps[0].write_text(dumps(recipe, __version__), encoding="utf-8")
        tmps[1].write_text(methods, encoding="utf-8")
        yield final
        for tmp, path in zip(tmps, final):
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def _csv_field(text: str) -> str:
    """A CSV field as pandas writes it: quoted only when it holds a comma, quote or newline."""
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n\r') else text


def _csv_rows(block: Any, labels: list[str]) -> bytes | memoryview:
    """``label,v0,v1,...\\n`` for each row of ``block``: each float in the shortest form that reads
    back to the same double (as Python's repr), NaN as an empty field. orjson (Ryu) formats ~7x
    faster than Arrow's cast, which is the fallback when orjson is not installed."""
    import numpy as np

    try:
        import orjson
    except ImportError:
        orjson = None
    if orjson is not None:
        out = []
        for label, row in zip(labels, np.ascontiguousarray(block, dtype=np.float64)):
            text = orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY)  # b"[1.5,null,...]"; NaN -> null
            out += [label.encode(), b",", text[1:-1].replace(b"null", b""), b"\n"]
        return b"".join(out)
    import pyarrow as pa
    import pyarrow.compute as pc

    cells = pa.array(np.ascontiguousarray(block).ravel(), from_pandas=True).cast(pa.string()).fill_null("")
    offsets = pa.array(np.arange(0, len(cells) + 1, block.shape[1], dtype=np.int32))
    rows = pc.binary_join(pa.ListArray.from_arrays(offsets, cells), ",")
    rows = pc.binary_join_element_wise(pa.array(labels, pa.string()), rows, ",")
    rows = pc.binary_join_element_wise(rows, "", "\n")
    bounds = np.frombuffer(rows.buffers()[1], dtype=np.int32, count=len(rows) + 1, offset=rows.offset * 4)
    return memoryview(rows.buffers()[2])[bounds[0]:bounds[-1]]


def _write_csv(m: Matrix, tmp: Path) -> None:
    """MHTS's layout (pandas ``to_csv``: a ``Gene`` index column, then one column per voxel, NaN
    empty), formatted in row batches on every core: pandas' to_csv takes minutes at atlas scale."""
    from concurrent.futures import ThreadPoolExecutor

    header = ",".join(_csv_field(str(n)) for n in [m.row_label, *m.columns]) + "\n"
    labels = [_csv_field(str(r)) for r in m.rows]
    batches = range(0, len(labels), CSV_BATCH_ROWS)
    workers = max(1, os.cpu_count() or 1)
    with open(tmp, "wb") as fh, ThreadPoolExecutor(workers) as pool:
        fh.write(header.encode())
        pending: list[Any] = []
        for start in batches:  # at most `workers` batches formatted ahead: memory stays bounded
            stop = start + CSV_BATCH_ROWS
            pending.append(pool.submit(_csv_rows, m.values[start:stop], labels[start:stop]))
            if len(pending) > workers:
                fh.write(pending.pop(0).result())
        for future in pending:
            fh.write(future.result())


def _frame(m: Matrix) -> Any:
    import pandas as pd

    return pd.DataFrame(m.values, index=pd.Index([str(r) for r in m.rows], name=m.row_label),
                        columns=[str(c) for c in m.columns])


def _write_h5ad(m: Matrix, tmp: Path) -> None:
    import numpy as np
    import anndata

    adata = anndata.AnnData(X=m.values, obs=m.obs.copy(), var=m.var.copy())
    adata.obs.index = adata.obs.index.astype(str)
    adata.var.index = adata.var.index.astype(str)
    adata.uns["recipe"] = {k: (np.array(v, dtype=str) if isinstance(v, list) else v)
                           for k, v in m.recipe.to_dict().items()}
    adata.uns["recipe_toml"] = dumps(m.recipe, __version__)  # exact: `--recipe` reads it back
    adata.uns["ambasync"] = {k: v for k, v in m.facts.items() if isinstance(v, (str, int, float))}
    adata.write_h5ad(tmp)


def _write_zarr(m: Matrix, tmp: Path) -> None:
    import numpy as np
    import xarray as xr

    row_dim = m.row_label.lower()
    col_dim = m.var.index.name or "column"
    as_text = lambda values: np.array([str(v) for v in values], dtype=object)  # noqa: E731  (vlen strings)
    ds = xr.Dataset({"matrix": ((row_dim, col_dim), m.values)},
                    coords={row_dim: as_text(m.rows), col_dim: as_text(m.columns)},
                    attrs={"recipe": dumps(m.recipe, __version__), "ambasync_version": __version__})
    for name in m.obs.columns:
        values = m.obs[name].to_numpy()
        ds = ds.assign_coords({name: (row_dim, as_text(values) if values.dtype.kind in "OUT" else values)})
    for name in m.var.columns:
        values = m.var[name].to_numpy()
        ds = ds.assign_coords({name: (col_dim, as_text(values) if values.dtype.kind in "OUT" else values)})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata")
        ds.to_zarr(tmp, mode="w", zarr_format=3, consolidated=True)


def _replace_dir(tmp: Path, path: Path) -> None:
    """Move a finished folder into place; an older one under the final name goes only after."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.{os.getpid()}.old")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_matrix(m: Matrix, to: str) -> Written:
    """The matrix at ``to`` (format by extension) with ``{to}.recipe.toml`` and ``{to}.methods.md``,
    all atomically: each is written under a temporary name, then renamed, the matrix last."""
    from .methods import methods_text

    kind = output_kind(to, None)
    path = Path(to)
    if not path.parent.is_dir():
        raise _error(f"--to {to}: folder {path.parent} does not exist")
    tmp = tmp_name(path)
    try:
        with _side_files(to, m.recipe, methods_text(m.recipe, m.facts, output=path.name)) as (recipe_path,
                                                                                             methods_path):
            if kind == ".zarr":
                _write_zarr(m, tmp)
            elif kind == ".csv":
                _write_csv(m, tmp)
            elif kind == ".parquet":
                _frame(m).to_parquet(tmp, engine="pyarrow")
            else:
                _write_h5ad(m, tmp)
        if kind == ".zarr":
            _replace_dir(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return Written(str(path), str(recipe_path), str(methods_path))


def write_row_image(m: Matrix, row: str, to: str) -> Written:
    """One row's processed map (a gene or experiment) back on the cube's grid as an image;
    voxels outside the mask are NaN."""
    import numpy as np
    from .atlas import write_image
    from .methods import methods_text

    output_kind(to, row)
    if m.var.index.name != "voxel":
        raise _error("--volume writes a voxel map; leave out --labels to get one")
    hits = np.flatnonzero(m.rows.astype(str) == str(row))
    if hits.size == 0:
        raise _error(f"--volume {row}: no such {m.row_label.lower()} in the matrix (unknown, or removed by "
                     f"--max-missing {m.recipe.max_missing}{' or --homologs' if m.recipe.homologs else ''})")
    volume = np.full(m.mask.shape, np.nan, dtype=np.float64)
    volume[m.mask] = m.values[hits[0]]
    path = Path(to)
    methods = methods_text(m.recipe, m.facts, output=f"{path.name} ({m.row_label.lower()} {row})")
    with _side_files(to, m.recipe, methods) as (recipe_path, methods_path):
        write_image(volume, m.geometry, path)  # atomic itself
    return Written(str(path), str(recipe_path), str(methods_path))


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

# flag name -> recipe field; booleans take --x / --no-x
_FLAGS = {
    "plane": ("--plane", dict(choices=PLANES, help="experiments of this plane (both: combine per --combine)")),
    "genes_in_coronal": ("--genes-in-coronal", dict(action=argparse.BooleanOptionalAction,
                                                    help="sagittal: only genes that also have a coronal experiment")),
    "genes": ("--genes", dict(metavar="A,B", help="only these gene acronyms")),
    "ids": ("--ids", dict(metavar="ID,ID", help="only these experiment ids")),
    "variable": ("--variable", dict(choices=VARIABLES, help="cube variable (grid volume) to use")),
    "mask": ("--mask", dict(metavar="coronal|sagittal|brain|PATH",
                            help="coverage >= 0.8 of a plane, voxels with any data, or an image's nonzero voxels")),
    "resample_images": ("--resample-images", dict(action=argparse.BooleanOptionalAction,
                                                  help="resample a mask or label image on another grid (nearest)")),
    "zero_is_missing": ("--zero-is-missing", dict(action=argparse.BooleanOptionalAction,
                                                  help="measured 0 is missing too (-1 always is)")),
    "log2": ("--log2", dict(action=argparse.BooleanOptionalAction, help="log2-transform the values")),
    "log2_offset": ("--log2-offset", dict(type=float, metavar="C", help="log2(x + C)")),
    "group_by": ("--group-by", dict(choices=GROUP_BY, help="one row per gene (mean skipping NaN) or per experiment")),
    "combine": ("--combine", dict(choices=COMBINE, help="--plane both: how a gene's two planes combine")),
    "max_missing": ("--max-missing", dict(type=float, metavar="F",
                                          help="keep rows whose NaN fraction is strictly below F")),
    "impute": ("--impute", dict(choices=IMPUTE, help="fill NaN: none, KNNImputer (as MHTS), or spatial neighbours")),
    "knn_neighbors": ("--knn-neighbors", dict(type=int, metavar="K", help="KNNImputer's n_neighbors")),
    "normalise": ("--normalise", dict(choices=NORMALISE, help="none, mhts, srs or zscore (abagen's)")),
    "mirror_hemisphere": ("--mirror-hemisphere", dict(action=argparse.BooleanOptionalAction,
                                                      help="fill sagittal maps across the midline")),
    "homologs": ("--homologs", dict(metavar="CSV", help="keep genes in its Mouse column")),
    "labels": ("--labels", dict(metavar="PATH", help="label image: gene x region means")),
    "label_table": ("--label-table", dict(metavar="CSV", help="columns Structure, Label (0 = none)")),
    "region_means": ("--region-means", dict(action=argparse.BooleanOptionalAction,
                                            help="with --labels: region means (default), or voxels named by region")),
}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``matrix`` subcommand, added to ``ambasync.cli``'s subparsers."""
    p = subparsers.add_parser(
        "matrix", help="gene-by-voxel or gene-by-region matrix from the cube",
        description="Build a gene-by-voxel (or -region) matrix from the cube, by a recipe (default mhts) "
                    "with any step overridden by its flag. See docs/matrix.md.")
    p.add_argument("--out", metavar="DIR", help="the mirror folder holding cube.zarr (or the .zarr itself)")
    p.add_argument("--to", required=True, metavar="PATH",
                   help="output: .csv (MHTS layout), .parquet, .h5ad, .zarr; with --volume .mnc, .nii, .nii.gz")
    p.add_argument("--recipe", default="mhts", metavar="NAME|TOML", help="mhts (default) or a recipe file")
    for name, (flag, kwargs) in _FLAGS.items():
        p.add_argument(flag, dest=name, default=None, **kwargs)
    p.add_argument("--volume", metavar="GENE", help="write this gene's (or experiment's) processed map as an image")
    p.add_argument("--scheduler", metavar="ADDRESS", help="dask.distributed scheduler to compute on")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more detail")
    return p


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    base = load_recipe(args.recipe)
    overrides = {name: getattr(args, name) for name in _FLAGS if getattr(args, name, None) is not None}
    return make_recipe(overrides, base=base, where="command line") if overrides else base


def _default_out() -> str:
    from .config import load_config

    return str(load_config(None, {}).output.out)


def cmd_matrix(args: argparse.Namespace) -> int:
    """``python -m ambasync matrix``: build, then write; bad input is one line and exit 2."""
    recipe = recipe_from_args(args)
    output_kind(args.to, args.volume)
    if not Path(args.to).parent.is_dir():  # before the build, which can take long
        raise _error(f"--to {args.to}: folder {Path(args.to).parent} does not exist")
    out = args.out or _default_out()
    progress = not getattr(args, "quiet", False)
    m = build_matrix(out, recipe, scheduler=args.scheduler, progress=progress)
    written = write_row_image(m, args.volume, args.to) if args.volume else write_matrix(m, args.to)
    if progress:
        print(f"wrote {written.path}: {m.facts['n_rows']} {m.row_label.lower()}s x {m.facts['n_columns']} "
              f"{'regions' if m.var.index.name == 'region' else 'voxels'} from {m.facts['n_experiments']} "
              f"experiments; recipe {written.recipe_path}, methods {written.methods_path}", file=sys.stderr)
    return 0


__all__ = [
    "Matrix", "Selection", "Written", "add_parser", "build_matrix", "cmd_matrix", "combine_block", "group_means",
    "knn_impute", "log2_transform", "mark_missing", "mirror_hemisphere", "missing_fraction", "normalise",
    "output_kind", "recipe_from_args", "region_means", "select_experiments", "spatial_impute", "write_matrix",
    "write_row_image", "zscore_rows",
]
