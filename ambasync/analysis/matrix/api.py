"""``ambasync.matrix``: the matrix command as a Python function, for notebooks and scripts.

The command line (:mod:`ambasync.cli.matrix`) calls this same function, so a table from
Python and one from ``python -m ambasync matrix`` are the same table.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

DEFAULT_RECIPE = "mhts"


def _listed(value: Any) -> Any:
    """``["Nrp1", "Pdyn"]`` and ``"Nrp1,Pdyn"`` mean the same: the recipe takes the text."""
    if value is None or isinstance(value, str):
        return value
    return ",".join(str(v) for v in value)


def matrix(out: str | os.PathLike | None = None, recipe: str = DEFAULT_RECIPE, *,
           plane: str | None = None, genes_in_coronal: bool | None = None,
           genes: str | Sequence[str] | None = None, ids: str | Sequence[int] | None = None,
           variable: str | None = None, mask: str | None = None, resample_images: bool | None = None,
           zero_is_missing: bool | None = None, log2: bool | None = None, log2_offset: float | None = None,
           group_by: str | None = None, combine: str | None = None, max_missing: float | None = None,
           impute: str | None = None, knn_neighbors: int | None = None, normalise: str | None = None,
           mirror_hemisphere: bool | None = None, homologs: str | None = None, labels: str | None = None,
           label_table: str | None = None, region_means: bool | None = None,
           to: str | os.PathLike | None = None, volume: str | None = None,
           scheduler: str | None = None, cube: str | None = None, memory: str | int | None = None,
           quiet: bool = True, as_anndata: bool = False, at: str | None = None) -> Any:
    """Build a gene-by-voxel (or gene-by-region) matrix from the cube.

    Every keyword is the command line flag of the same name (``--knn-neighbors`` is
    ``knn_neighbors``); ``None`` keeps the recipe's value.

    Parameters
    ----------
    out : str or path-like, optional
        The mirror folder holding ``cube.zarr``, or the ``.zarr`` itself. Default: the
        folder ``run`` would use (``[output] out`` of the config file or environment).
    recipe : str, default "mhts"
        A named recipe (``mhts``: MouseHumanTranscriptomicSimilarity's pipeline) or a
        recipe TOML file, such as the ``.recipe.toml`` written beside every matrix.
    plane, genes_in_coronal, genes, ids, variable, mask, resample_images, zero_is_missing, \
log2, log2_offset, group_by, combine, max_missing, impute, knn_neighbors, normalise, \
mirror_hemisphere, homologs, labels, label_table, region_means
        Override one step of the recipe each; see ``docs/matrix.md``. ``genes`` and ``ids``
        may be lists.
    to : str or path-like, optional
        Also write the matrix there (``.csv`` in MHTS's layout, ``.parquet``, ``.h5ad``,
        ``.zarr``; with ``volume``, ``.mnc``/``.nii``/``.nii.gz``), with its
        ``.recipe.toml`` and ``.methods.md``, atomically.
    volume : str, optional
        With ``to``: write this gene's (or experiment's) processed map as an image instead.
    scheduler : str, optional
        Address of a ``dask.distributed`` scheduler to compute on (default: this machine,
        or ``DASK_SCHEDULER_ADDRESS``).
    cube : str, optional
        Where the cube lives when not ``{out}/cube.zarr``: a folder or an fsspec URL.
    memory : str or int, optional
        The memory budget (bytes, or text such as ``"4GB"``); default: ``[analysis] memory``.
        A request that cannot fit raises :class:`ambasync.errors.AnalysisError` before work starts.
    quiet : bool, default True
        No progress bars (the command line shows them unless ``-q``).
    as_anndata : bool, default False
        Return an ``anndata.AnnData`` (``obs``: catalogue columns; ``var``: voxel
        coordinates or region sizes; ``uns``: recipe and facts) instead of a DataFrame.
    at : str, optional
        The cube version to read (``--at``; ``cube_version`` in every output's methods and in
        ``ambasync status``): a cube at another version raises
        :class:`ambasync.errors.AnalysisError` before any work (this storage keeps no snapshots,
        so an older matrix is rebuilt from a copy of the cube kept at that version).

    Returns
    -------
    pandas.DataFrame or anndata.AnnData
        Rows are genes (or experiments), columns voxels (``"0"`` … in mask order) or regions.
        ``.attrs["ambasync"]`` holds the counts, the recipe hash, the cube read and, with
        ``to``, the files written.

    Raises
    ------
    ambasync.errors.AnalysisError
        Bad input (unknown gene, missing cube, unreadable mask…): one line saying what to do.

    Examples
    --------
    >>> import ambasync
    >>> m = ambasync.matrix("data", plane="coronal", impute="none")   # doctest: +SKIP
    >>> m.loc["Nrp1"].describe()                                      # doctest: +SKIP
    """
    from ambasync.analysis.matrix.build import build_matrix
    from ambasync.analysis.matrix.recipe import load_recipe, make_recipe
    from ambasync.analysis.matrix.write import as_anndata as to_anndata
    from ambasync.analysis.matrix.write import (
        as_frame,
        output_kind,
        write_matrix,
        write_row_image,
    )
    from ambasync.cube.read import resolve_cube
    from ambasync.errors import AnalysisError

    overrides = {k: v for k, v in dict(
        plane=plane, genes_in_coronal=genes_in_coronal, genes=_listed(genes), ids=_listed(ids), variable=variable,
        mask=mask, resample_images=resample_images, zero_is_missing=zero_is_missing, log2=log2,
        log2_offset=log2_offset, group_by=group_by, combine=combine, max_missing=max_missing, impute=impute,
        knn_neighbors=knn_neighbors, normalise=normalise, mirror_hemisphere=mirror_hemisphere, homologs=homologs,
        labels=labels, label_table=label_table, region_means=region_means).items() if v is not None}
    base = load_recipe(recipe)
    rec = make_recipe(overrides, base=base, where="matrix()") if overrides else base
    if volume is not None and to is None:
        raise AnalysisError("volume= writes an image: give to= (.mnc, .nii or .nii.gz) too")
    if to is not None:
        output_kind(str(to), volume)
        if not Path(to).parent.is_dir():  # before the build, which can take long
            raise AnalysisError(f"--to {to}: folder {Path(to).parent} does not exist")
    location = resolve_cube(out, cube, at)  # another version: one line, before any work
    built = build_matrix(location, rec, scheduler=scheduler, progress=not quiet, **_extra(memory=memory))
    facts = dict(built.facts)
    if to is not None:
        written = (write_row_image(built, volume, str(to)) if volume
                   else write_matrix(built, str(to), progress=not quiet))
        facts.update(written=written.path, recipe_path=written.recipe_path, methods_path=written.methods_path)
    result = to_anndata(built) if as_anndata else as_frame(built)
    if as_anndata:
        result.uns["ambasync"] = {k: v for k, v in facts.items() if isinstance(v, (str, int, float))}
    else:
        result.attrs["ambasync"] = facts
    return result


def _extra(**options: Any) -> dict[str, Any]:
    """Keywords passed on only when given, so a build that does not know them yet is unchanged."""
    return {k: v for k, v in options.items() if v is not None}


__all__ = ["DEFAULT_RECIPE", "matrix"]
