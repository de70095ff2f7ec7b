"""``ambasync search``: which experiments (and genes) are expressed like a user's map, with
spatial-null p-values; or, with ``--target``/``--contrast``, which are enriched in a region.

The map is brought onto the cube's grid by world coordinates (:mod:`ambasync.atlas`), its
nulls are made by :mod:`ambasync.nulls`, every block of experiments is scored by
:mod:`ambasync.search_stats`, and the work is one dask graph over the cube's chunks (nulls
made in batches, each block of experiments scored against the map and all nulls), so
``--scheduler`` spreads it over a cluster and the local scheduler over this machine's cores.

numpy is imported inside the functions: ``ambasync.cli`` builds this command's parser in the
run's event-loop process, which never imports numpy.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .errors import ConfigError
from .files import atomic_path

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
BLOCK_BYTES = 32 << 20  # cube grids (float32) read and scored per task: ~50 experiments at 200 µm
TOP_PLOTTED = 4  # experiments whose slices --plot shows beside the map
TOP_BARS = 20  # bars in --plot's ranked chart
EXPERIMENT_COLUMNS = ("experiment_id", "gene", "plane", "r", "p_spatial", "q", "n_voxels", "p_naive", "gene_name")
GENE_COLUMNS = ("gene", "r", "p_spatial", "q", "n_experiments", "experiment_ids")
FOLD_COLUMNS = ("experiment_id", "gene", "plane", "log2_fold_change", "fold_change", "target_mean", "contrast_mean",
                "n_target", "n_contrast", "gene_name")


def _error(message: str) -> ConfigError:
    from .atlas import AnalysisError

    return AnalysisError(message)


# --------------------------------------------------------------------------------------------
# Inputs on the cube's grid
# --------------------------------------------------------------------------------------------

def map_on_cube(path: str, ds: xr.Dataset) -> np.ndarray:
    """The user's map on the cube's grid (trilinear by world coordinates; NaN outside it)."""
    from .atlas import AnalysisError, cube_geometry, on_grid, read_image

    data, geometry = read_image(path)
    try:
        return on_grid(data, geometry, cube_geometry(ds), "linear")
    except AnalysisError as exc:  # on_grid names both grids, not the file
        raise _error(f"{path}: {exc}") from None


def roi_on_cube(path: str, ds: xr.Dataset) -> np.ndarray:
    """A region image's nonzero voxels on the cube's grid (nearest voxel by world coordinates)."""
    import numpy as np

    from .atlas import AnalysisError, cube_geometry, on_grid, read_image

    data, geometry = read_image(path)
    try:
        values = on_grid(data, geometry, cube_geometry(ds), "nearest")
    except AnalysisError as exc:  # on_grid names both grids, not the file
        raise _error(f"{path}: {exc}") from None
    return np.isfinite(values) & (values != 0)


def search_mask(values: np.ndarray, spec: str, ds: xr.Dataset, map_name: str) -> np.ndarray:
    """The voxels scored: ``spec``'s mask where the map has a value. A map with no such
    voxels, or the same value in all of them, is an error (no correlation is defined)."""
    import numpy as np

    from .atlas import resolve_mask

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
# The dask graph
# --------------------------------------------------------------------------------------------

def experiment_blocks(expression: Any, block_bytes: int = BLOCK_BYTES) -> list[tuple[int, int]]:
    """The cube's ``expression`` (an xarray DataArray, experiment × volume) cut into ranges of
    whole experiments of about ``block_bytes``: a whole number of the store's own chunks when
    they are smaller than that (however dask was asked to chunk it: blocks are read by
    :func:`read_block`, not through the dask array)."""
    import math

    per = math.prod(expression.shape[1:]) * expression.dtype.itemsize
    stored = int((expression.encoding.get("chunks") or (1,))[0])
    n = max(1, block_bytes // per)
    if stored <= n:
        n = n // stored * stored
    total = expression.shape[0]
    return [(start, min(start + n, total)) for start in range(0, total, n)]


@functools.lru_cache(maxsize=4)
def _plain_cube(location: str) -> Any:
    """The cube at ``location`` opened without dask, once per process (a worker's too)."""
    import xarray as xr

    return xr.open_zarr(location, chunks=None, consolidated=None)


def read_block(location: str, start: int, stop: int, variable: str = "expression") -> np.ndarray:
    """Experiments ``start:stop`` of the cube as one array, read in one call: zarr then fetches
    all their chunks at once. Reading it through the dask array instead costs a task and a
    synchronous read per stored chunk, which doubled the time of a cube stored one experiment
    per chunk. The cube was opened and checked by :func:`ambasync.atlas.open_cube` first."""
    import numpy as np

    return np.asarray(_plain_cube(location)[variable].isel(experiment=slice(start, stop)).values)


def _design(map_values: np.ndarray, nulls: list[np.ndarray], method: str) -> tuple[np.ndarray, np.ndarray]:
    """Voxels × (map, nulls...) as block_correlations wants them (ranked for spearman), and its
    square, made once for all blocks (each ~250 MB at 1,000 nulls: float32 throughout)."""
    import numpy as np

    from .search_stats import ranks, standardise_columns

    y = np.column_stack([np.asarray(map_values, dtype=np.float32), *nulls])
    if method == "spearman":
        for j in range(y.shape[1]):  # a column at a time: float64 ranks of all would be 500 MB
            y[:, j] = ranks(y[:, j])
    return standardise_columns(y)


def _score_block(location: str, span: tuple[int, int], voxels: np.ndarray, design: tuple[np.ndarray, np.ndarray],
                 method: str) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    from .search_stats import block_correlations

    block = read_block(location, *span)
    y, y2 = design
    # np.take keeps rows contiguous (fancy indexing on the last axis gives a Fortran-ordered
    # array, which made every later pass over the block several times slower).
    return block_correlations(np.take(block.reshape(block.shape[0], -1), voxels, axis=1), y, method, y2=y2)


def _means_block(location: str, span: tuple[int, int], voxels: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, ...]:
    import numpy as np

    from .search_stats import block_means

    block = read_block(location, *span)
    flat = np.take(block.reshape(block.shape[0], -1), voxels, axis=1)
    return (*block_means(flat, target), *block_means(flat, ~target))


def _compute(make_tasks: Callable[[Any], list[Any]], scheduler: str | None, what: str, progress: bool,
             first: Any = None) -> list[Any]:
    """Compute ``make_tasks(first)`` where ``scheduler`` says (atlas.compute_on); a bar on a terminal.

    ``first`` (a delayed) is persisted before the tasks are made: computed once and kept where
    it was computed (this process, or the cluster's workers). Otherwise the scheduler would read
    cube blocks ahead, into memory, while the nulls are still being made."""
    import dask

    from .atlas import compute_on

    start = time.monotonic()
    with compute_on(scheduler) as client:
        if first is not None:
            (first,) = dask.persist(first)
        tasks = make_tasks(first)
        if progress:
            log.info("%s: %d blocks", what, len(tasks))
        if client is None and progress and sys.stderr.isatty():
            from dask.diagnostics import ProgressBar

            with ProgressBar(out=sys.stderr):
                results = dask.compute(*tasks)
        else:
            results = dask.compute(*tasks)
    if progress:
        log.info("%s: done in %.1f s", what, time.monotonic() - start)
    return list(results)


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


def correlate(out: str, map_path: str, mask: str = DEFAULT_MASK, method: str = "pearson",
              nulls: int = DEFAULT_NULLS, seed: int = DEFAULT_SEED, by_gene: bool = False,
              scheduler: str | None = None, progress: bool = True) -> SearchResult:
    """Score every experiment of the cube at ``out`` against the map at ``map_path``.

    ``nulls`` null maps (:func:`ambasync.nulls.phase_randomised`, seeded by ``seed``) give
    each experiment's two-sided ``p_spatial``; ``q`` is Benjamini-Hochberg over experiments
    (over genes in the gene table). ``nulls=0`` skips them (r only; p and q are NaN)."""
    import dask
    import numpy as np

    from .atlas import cube_location, open_cube
    from .nulls import null_spectrum, phase_randomised
    from .search_stats import bh_q, gene_scores, parametric_p, spatial_p

    if method not in METHODS:
        raise _error(f"--method {method!r}: use one of {', '.join(METHODS)}")
    if nulls < 0:
        raise _error(f"--nulls {nulls}: give 0 (no spatial p-values) or more")
    ds = open_cube(out)
    values = map_on_cube(map_path, ds)
    voxels_mask = search_mask(values, mask, ds, map_path)
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
    y = dask.delayed(_design, pure=True)(map_values, batches, method)
    voxels = dask.delayed(np.flatnonzero(voxels_mask.ravel()))
    blocks = experiment_blocks(ds["expression"])
    location = cube_location(out)
    scored = _compute(lambda design: [dask.delayed(_score_block, pure=True)(location, b, voxels, design, method)
                                      for b in blocks], scheduler,
                      f"scoring {ds.sizes['experiment']} experiments against the map and {nulls} nulls", progress,
                      first=y)
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

    from .atlas import cube_location, open_cube, resolve_mask
    from .search_stats import log2_fold

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
    parts = _compute(lambda _: [dask.delayed(_means_block, pure=True)(location, b, voxels, in_target)
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


# --------------------------------------------------------------------------------------------
# Output and command line
# --------------------------------------------------------------------------------------------

def write_table(table: pd.DataFrame, path: str | Path) -> Path:
    """A results table as CSV, atomically (an interrupted write leaves nothing under ``path``)."""
    dest = Path(path)
    if not dest.parent.is_dir():
        raise _error(f"{dest}: the folder {dest.parent} does not exist")
    with atomic_path(dest) as tmp:
        table.to_csv(tmp, index=False)
    return dest


def genes_path(to: str | Path) -> Path:
    """Where ``--by gene`` writes its table: beside RESULTS, ``_genes`` before the suffix."""
    dest = Path(to)
    return dest.with_name(f"{dest.stem}_genes{dest.suffix or '.csv'}")


def plot_result(result: SearchResult, out: str, path: str | Path, map_name: str) -> Path:
    """``--plot``: the map's orthogonal slices beside the top experiments', and the top bars."""
    import numpy as np

    from .atlas import open_cube
    from .search_plot import render

    top = result.experiments.dropna(subset=["r"]).head(TOP_PLOTTED)
    ds = open_cube(out)
    volumes = [np.asarray(ds["expression"].sel(experiment=int(i)).values, dtype=np.float64)
               for i in top["experiment_id"]]
    return render(Path(path), result.map_values, result.mask, volumes,
                  [f"{g} ({i}, {p})" for g, i, p in zip(top["gene"], top["experiment_id"], top["plane"])],
                  result.experiments.dropna(subset=["r"]).head(TOP_BARS), map_name)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``search`` subcommand (for ambasync.cli)."""
    p = subparsers.add_parser(
        "search", help="which experiments and genes are expressed like a map (or enriched in a region)",
        description="Correlate a map (MINC or NIfTI, in the mirror's world space) with every experiment of the "
                    "cube, with spatial-null p-values; or, with --target, rank experiments by fold change. "
                    "See docs/search.md.")
    p.add_argument("map", nargs="?", metavar="MAP", help="the map (.mnc, .nii, .nii.gz); any grid in the same space")
    p.add_argument("--out", metavar="DIR", help="the mirror folder holding cube.zarr (or the .zarr itself)")
    p.add_argument("--to", required=True, metavar="RESULTS.csv", help="the table to write (CSV)")
    p.add_argument("--mask", default=DEFAULT_MASK, metavar="NAME|PATH",
                   help="voxels to use: brain (default), coronal, sagittal (coverage >= 0.8) or an image's nonzero voxels")
    p.add_argument("--method", choices=METHODS, default="pearson", help="correlation (default pearson)")
    p.add_argument("--nulls", type=int, default=DEFAULT_NULLS, metavar="N",
                   help=f"spatial null maps for p_spatial (default {DEFAULT_NULLS}; 0 = none)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed of the null maps (default {DEFAULT_SEED})")
    p.add_argument("--by", choices=BY, default="experiment",
                   help="gene: also write a gene-level table (experiments of a gene combined) beside RESULTS")
    p.add_argument("--target", metavar="ROI", help="differential mode: the region of interest (image, nonzero voxels)")
    p.add_argument("--contrast", metavar="ROI", help="differential mode: the region to compare with "
                                                     "(default: the rest of the mask)")
    p.add_argument("--plot", metavar="PNG", help="also draw the map beside the top experiments, and the top 20")
    p.add_argument("--scheduler", metavar="ADDRESS", help="dask.distributed scheduler to compute on")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more detail")
    return p


def _default_out() -> str:
    from .config import load_config

    return str(load_config(None, {}).output.out)


def cmd_search(args: argparse.Namespace) -> int:
    """``python -m ambasync search``: bad input is one line and exit 2."""
    out = args.out or _default_out()
    progress = not args.quiet
    if progress:
        logging.getLogger("ambasync").setLevel(min(logging.getLogger("ambasync").getEffectiveLevel(), logging.INFO))
    if args.plot and not args.plot.lower().endswith(".png"):
        raise _error(f"--plot {args.plot}: the picture is written as PNG; give a name ending in .png")
    if args.target:
        if args.map:
            raise _error("give either MAP (correlation) or --target (fold change), not both")
        if args.plot or args.by == "gene":
            raise _error("--plot and --by gene go with a MAP (correlation mode), not with --target")
        table = fold_change(out, args.target, args.contrast, args.mask, args.scheduler, progress)
        written = write_table(table, args.to)
        if progress:
            print(f"wrote {written}: {len(table)} experiments by log2 fold change of {args.target} over "
                  f"{args.contrast or 'the rest of the mask'}", file=sys.stderr)
        return 0
    if args.contrast:
        raise _error("--contrast needs --target")
    if not args.map:
        raise _error("give a MAP to correlate with, or --target ROI for fold changes")
    result = correlate(out, args.map, args.mask, args.method, args.nulls, args.seed, args.by == "gene",
                       args.scheduler, progress)
    written = write_table(result.experiments, args.to)
    if result.genes is not None:
        write_table(result.genes, genes_path(args.to))
    if args.plot:
        plot_result(result, out, args.plot, Path(args.map).name)
    if progress:
        hits = int((result.experiments["q"] < 0.05).sum())
        print(f"wrote {written}: {len(result.experiments)} experiments, {hits} with q < 0.05 "
              f"({result.method}, {result.n_nulls} spatial nulls)"
              + (f"; genes in {genes_path(args.to)}" if result.genes is not None else "")
              + (f"; picture {args.plot}" if args.plot else ""), file=sys.stderr)
    return 0


__all__ = ["SearchResult", "add_parser", "cmd_search", "correlate", "experiment_blocks", "fold_change", "read_block",
           "genes_path", "map_on_cube", "plot_result", "roi_on_cube", "search_mask", "write_table"]
