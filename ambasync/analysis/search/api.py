"""``ambasync.search``: the search command as a Python function, for notebooks and scripts.

The command line (:mod:`ambasync.cli.search`) calls :func:`run_search`, the same function
:func:`search` is built on, so a table from Python and one from ``python -m ambasync
search`` are the same table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ambasync.analysis.search.correlate import (
    ALIGN,
    BY,
    DEFAULT_MASK,
    DEFAULT_NULLS,
    DEFAULT_SEED,
    DEFAULT_TAIL,
    METHODS,
    TAILS,
)

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from ambasync.analysis.search.correlate import SearchResult


@dataclass(frozen=True)
class Searched:
    """What one search made: the experiment table (correlation or fold change), the gene table
    (``by="gene"``), the correlation result behind them (for the picture), and the files written."""

    experiments: pd.DataFrame
    genes: pd.DataFrame | None
    result: SearchResult | None  # None in differential mode
    written: tuple[str, ...]
    report: tuple[str, ...] = ()  # each image's overlap with the mask (voxels, %), as the command prints it


def _cube_version(location: str) -> str:
    """The version of the cube a search read, for its methods paragraph (a paper's table names it)."""
    from ambasync.cube.read import cube_version, open_cube

    return cube_version(open_cube(cube=location))


def run_search(out: str | os.PathLike | None = None, map: str | os.PathLike | np.ndarray | None = None, *,
               to: str | os.PathLike | None = None, mask: str = DEFAULT_MASK, method: str = "pearson",
               nulls: int = DEFAULT_NULLS, seed: int = DEFAULT_SEED, by: str = "experiment",
               target: str | os.PathLike | np.ndarray | None = None,
               contrast: str | os.PathLike | np.ndarray | None = None,
               plot: str | os.PathLike | None = None, scheduler: str | None = None, cube: str | None = None,
               quiet: bool = True, tail: str = DEFAULT_TAIL, align: str | None = None,
               target_above: float | None = None, contrast_at_most: float | None = None,
               at: str | None = None) -> Searched:
    """Every table and file of one search; see :func:`search` for the parameters."""
    from ambasync.analysis.search.correlate import correlate, fold_change
    from ambasync.analysis.search.plot import plot_result
    from ambasync.analysis.search.tables import genes_path, write_table
    from ambasync.cube.read import resolve_cube
    from ambasync.errors import AnalysisError

    if method not in METHODS:
        raise AnalysisError(f"method={method!r}: choose one of {', '.join(METHODS)}")
    if by not in BY:
        raise AnalysisError(f"by={by!r}: choose one of {', '.join(BY)}")
    if tail not in TAILS:
        raise AnalysisError(f"tail={tail!r}: choose one of {', '.join(TAILS)}")
    if align is not None and align not in ALIGN:
        raise AnalysisError(f"align={align!r}: choose one of {', '.join(ALIGN)}")
    if plot is not None and not str(plot).lower().endswith(".png"):
        raise AnalysisError(f"--plot {plot}: the picture is written as PNG; give a name ending in .png")
    if to is not None and not Path(to).parent.is_dir():  # before the work, which can take long
        raise AnalysisError(f"{to}: the folder {Path(to).parent} does not exist")
    location = resolve_cube(out, cube, at)  # another version: one line, before any work
    progress = not quiet
    if target is not None:
        if map is not None:
            raise AnalysisError("give either MAP (correlation) or --target (fold change), not both")
        if plot is not None or by == "gene":
            raise AnalysisError("--plot and --by gene go with a MAP (correlation mode), not with --target")
        report: list[str] = []
        table = fold_change(location, target, contrast, mask, scheduler, progress, target_above=target_above,
                            contrast_at_most=contrast_at_most, align=align, report=report)
        written: tuple[str, ...] = ()
        if to is not None:
            from ambasync.analysis.search.correlate import region_name
            from ambasync.analysis.search.methods import fold_methods

            first = table.iloc[0] if len(table) else {}
            facts = {"n_experiments": len(table), "mask": mask, "align": align, "version": _version(),
                     "cube_version": _cube_version(location),
                     "target": first.get("target", region_name(target, above=target_above)),
                     "contrast": first.get("contrast", "?")}
            written = (str(write_table(table, to)), str(_write_methods(fold_methods(facts), to)))
        return Searched(table, None, None, written, tuple(report))
    if contrast is not None or target_above is not None or contrast_at_most is not None:
        raise AnalysisError("--contrast, --target-above and --contrast-at-most need --target")
    if map is None:
        raise AnalysisError("give a MAP to correlate with, or --target ROI for fold changes")
    the_map = map if not isinstance(map, os.PathLike) else str(map)
    result = correlate(location, the_map, mask, method, nulls, seed, by == "gene", scheduler, progress, tail=tail,
                       align=align)
    written: list[str] = []
    if to is not None:
        from ambasync.analysis.search.methods import correlation_methods

        written.append(str(write_table(result.experiments, to)))
        if result.genes is not None:
            written.append(str(write_table(result.genes, genes_path(to))))
        facts = {"n_experiments": len(result.experiments), "map": Path(the_map).name if isinstance(the_map, str)
                 else "given as an array", "mask": mask, "method": method, "nulls": nulls, "seed": seed,
                 "tail": tail, "align": align, "by_gene": by == "gene", "version": _version(),
                 "cube_version": _cube_version(location),
                 "n_gpd": int((result.experiments["p_method"] == "gpd").sum())}
        written.append(str(_write_methods(correlation_methods(facts), to)))
    if plot is not None:
        name = Path(the_map).name if isinstance(the_map, str) else "map"
        written.append(str(plot_result(result, location, plot, name)))
    return Searched(result.experiments, result.genes, result, tuple(written), result.report)


def _version() -> str:
    from ambasync import __version__

    return __version__


def _write_methods(text: str, to: str | os.PathLike) -> Path:
    """``{to}.methods.md`` beside the table, atomically (as ``matrix`` writes its own)."""
    from ambasync.files import atomic_path

    dest = Path(f"{to}.methods.md")
    with atomic_path(dest) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return dest


def search(out: str | os.PathLike | None = None, map: str | os.PathLike | np.ndarray | None = None, *,
           to: str | os.PathLike | None = None, mask: str = DEFAULT_MASK, method: str = "pearson",
           nulls: int = DEFAULT_NULLS, seed: int = DEFAULT_SEED, by: str = "experiment",
           target: str | os.PathLike | np.ndarray | None = None,
           contrast: str | os.PathLike | np.ndarray | None = None,
           plot: str | os.PathLike | None = None, scheduler: str | None = None, cube: str | None = None,
           quiet: bool = True, tail: str = DEFAULT_TAIL, align: str | None = None,
           target_above: float | None = None, contrast_at_most: float | None = None,
           at: str | None = None) -> pd.DataFrame:
    """Which experiments (or genes) of the cube are expressed like a map, or enriched in a region.

    Every keyword is the command line flag of the same name, with the same default.

    Parameters
    ----------
    out : str or path-like, optional
        The mirror folder holding ``cube.zarr``, or the ``.zarr`` itself. Default: the
        folder ``run`` would use.
    map : str, path-like or numpy.ndarray, optional
        The map to correlate with: a MINC or NIfTI file in the mirror's world space (any grid;
        resampled by world coordinates), or an array on the cube's grid (shape zspace, yspace,
        xspace, as ``ambasync.open_cube(out).expression`` has; NaN = no value).
    to : str or path-like, optional
        Also write the table there as CSV (with ``by="gene"``, the gene table beside it as
        ``{stem}_genes.csv``), atomically, and a methods paragraph as ``{to}.methods.md`` (which
        map, mask, nulls, p-values; in differential mode which target and contrast).
    mask : str, default "brain"
        Voxels to use: ``brain`` (data in any experiment), ``coronal`` or ``sagittal``
        (coverage ≥ 0.8), or an image whose nonzero voxels are used.
    method : {"pearson", "spearman"}, default "pearson"
    nulls : int, default 1000
        Spatial null maps for ``p_spatial`` (0: none; p and q are then NaN).
    tail : {"gpd", "empirical"}, default "gpd"
        ``"gpd"``: where an experiment's empirical p is small, a generalised Pareto tail fitted
        to its nulls gives p below 1/(nulls + 1) when the fit holds (Winkler et al. 2016);
        ``p_method`` says, per row, ``gpd`` or ``empirical``. ``"empirical"``: the count alone,
        never below 1/(nulls + 1).
    seed : int, default 0
        Seed of the null maps: the same map and seed give the same p-values anywhere.
    by : {"experiment", "gene"}, default "experiment"
        ``"gene"`` returns the gene table (experiments of a gene combined) instead.
    target, contrast : str, path-like or numpy.ndarray, optional
        Differential mode: rank experiments by the fold change of their mean expression in
        ``target`` (nonzero voxels) over ``contrast`` (its nonzero voxels, used as given, voxels
        shared with the target included; default: the rest of the mask, mask minus target).
    target_above : float, optional
        The target is the voxels where the ``target`` image is > this (a statistic map's
        threshold, e.g. 2) instead of its nonzero voxels.
    contrast_at_most : float, optional
        The contrast is the voxels where the ``contrast`` image (without one, the ``target``
        image) is <= this (e.g. 0.5) instead of its nonzero voxels.
    align : {"world", "voxel"}, optional
        How ``map``, ``mask``, ``target`` and ``contrast`` images meet the cube's grid: by world
        coordinates (``"world"``), or index for index (``"voxel"``: the image must have the
        cube's shape). Default (None): by world coordinates, but an image with the cube's shape
        and step whose origin is more than half a voxel off stops with an error naming both
        origins: choose one.
    plot : str or path-like, optional
        Also draw the map beside the top experiments, and the top 20, as a PNG.
    scheduler : str, optional
        Address of a ``dask.distributed`` scheduler (default: this machine, or
        ``DASK_SCHEDULER_ADDRESS``).
    cube : str, optional
        Where the cube lives when not ``{out}/cube.zarr``: a folder or an fsspec URL.
    quiet : bool, default True
        No progress bars.
    at : str, optional
        The cube version to read (``--at``; ``cube_version`` in every output's methods and in
        ``ambasync status``): a cube at another version raises
        :class:`ambasync.errors.AnalysisError` before any work (this storage keeps no snapshots,
        so an older matrix is rebuilt from a copy of the cube kept at that version).

    Returns
    -------
    pandas.DataFrame
        One row per experiment, best first: ``experiment_id, gene, plane, r, p_spatial, q,
        n_voxels, p_naive, gene_name, p_method`` (correlation); one per gene with ``by="gene"``
        (``gene, r, p_spatial, q, n_experiments, experiment_ids, p_method, reproducibility,
        replicated``); or ``log2_fold_change, fold_change, …, target, contrast`` in differential
        mode.

    Raises
    ------
    ambasync.errors.AnalysisError
        Bad input (a map off the cube's space, an unknown mask…): one line saying what to do.

    Examples
    --------
    >>> import ambasync
    >>> hits = ambasync.search("data", "my_tmap.mnc", nulls=1000)      # doctest: +SKIP
    >>> hits[hits.q < 0.05].head()                                     # doctest: +SKIP
    """
    done = run_search(out, map, to=to, mask=mask, method=method, nulls=nulls, seed=seed, by=by, target=target,
                      contrast=contrast, plot=plot, scheduler=scheduler, cube=cube, quiet=quiet, tail=tail,
                      align=align, target_above=target_above, contrast_at_most=contrast_at_most, at=at)
    return done.genes if by == "gene" and done.genes is not None else done.experiments


def fold_change(out: str | os.PathLike | None = None, target: Any = None, contrast: Any = None, *,
                mask: str = DEFAULT_MASK, to: str | os.PathLike | None = None, scheduler: str | None = None,
                cube: str | None = None, quiet: bool = True, target_above: float | None = None,
                contrast_at_most: float | None = None, align: str | None = None,
                at: str | None = None) -> pd.DataFrame:
    """Differential mode of :func:`search` (``search --target``): experiments ranked by the log2
    fold change of their mean expression in ``target`` over ``contrast``.

    Parameters
    ----------
    out : str or path-like, optional
        The mirror folder holding ``cube.zarr``, or the ``.zarr`` itself.
    target : str, path-like or numpy.ndarray
        The region of interest: an image whose nonzero voxels are used (or those > ``target_above``),
        or an array on the cube's grid.
    contrast : str, path-like or numpy.ndarray, optional
        The region to compare with, used as given (voxels shared with the target included): its
        nonzero voxels, or those <= ``contrast_at_most``. Default: the rest of ``mask`` (mask
        minus target), or with ``contrast_at_most`` alone the target image's voxels <= it.
    target_above, contrast_at_most : float, optional
        Thresholds of a statistic map, as MICe labs use (e.g. target t > 2, contrast t <= 0.5).
    mask, to, scheduler, cube, quiet, align, at
        As for :func:`search`.

    Returns
    -------
    pandas.DataFrame
        ``experiment_id, gene, plane, log2_fold_change, fold_change, target_mean,
        contrast_mean, n_target, n_contrast, gene_name, target, contrast``, largest fold change
        first; ``target`` and ``contrast`` name the regions used (e.g. ``t.mnc > 2``, ``rest of
        the mask brain (mask minus target)``); NaN means where a region has no voxels with data.
    """
    from ambasync.errors import AnalysisError

    if target is None:
        raise AnalysisError("fold_change needs target= (an image or an array on the cube's grid)")
    return run_search(out, None, to=to, mask=mask, target=target, contrast=contrast, scheduler=scheduler,
                      cube=cube, quiet=quiet, target_above=target_above, contrast_at_most=contrast_at_most,
                      align=align, at=at).experiments


__all__ = ["Searched", "fold_change", "run_search", "search"]
