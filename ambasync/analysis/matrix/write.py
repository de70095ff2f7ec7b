"""Writing a built matrix: CSV in MHTS's layout, Parquet, AnnData (.h5ad) or Zarr, or one row
back to an image, each with its recipe and methods text beside it, all atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ambasync import __version__
from ambasync.analysis.matrix.build import Matrix
from ambasync.analysis.matrix.recipe import Recipe, dumps
from ambasync.errors import AnalysisError
from ambasync.files import tmp_name

FORMATS = (".csv", ".parquet", ".h5ad", ".zarr")
IMAGE_FORMATS = (".mnc", ".nii", ".nii.gz")
CSV_BATCH_ROWS = 32  # rows formatted at once: ~40 MB of text (x3 while joined) at 61,000 voxels


def output_kind(to: str, volume: str | None) -> str:
    """The output format from ``--to``'s extension; anything else is an error naming the choices."""
    name = str(to).lower()
    allowed = IMAGE_FORMATS if volume else FORMATS
    for ext in allowed:
        if name.endswith(ext):
            return ext
    what = "--volume writes an image" if volume else "a matrix is written"
    raise AnalysisError(f"--to {to}: unknown extension; {what} as {', '.join(allowed)}")


@dataclass(frozen=True)
class MatrixFiles:
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


def _write_csv(m: Matrix, tmp: Path, bar: Any = None) -> None:
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
            pending.append((pool.submit(_csv_rows, m.values[start:stop], labels[start:stop]),
                            len(labels[start:stop])))
            if len(pending) > workers:
                future, n = pending.pop(0)
                fh.write(future.result())
                if bar is not None:
                    bar.update(n)
        for future, n in pending:
            fh.write(future.result())
            if bar is not None:
                bar.update(n)


def _write_parquet(m: Matrix, tmp: Path, bar: Any = None) -> None:
    """What ``as_frame(m).to_parquet(tmp)`` writes (its schema and pandas metadata: pandas reads
    back the same frame), with one Arrow copy of the matrix beside it: the columns are copied
    from the matrix one by one, where pandas' conversion held ~2 copies more (3.2 GB for a 1.1 GB
    matrix)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    head = as_frame(Matrix(m.values[:1], m.rows[:1], m.row_label, m.obs, m.var, m.columns, m.mask,
                           m.geometry, m.recipe, m.facts))
    schema = pa.Schema.from_pandas(head)
    labels = pa.array([str(r) for r in m.rows], type=schema.field(m.row_label).type)
    arrays = {m.row_label: labels}
    step = max(1, len(head.columns) // 100)
    for j, name in enumerate(head.columns):
        arrays[name] = pa.array(np.ascontiguousarray(m.values[:, j]), type=pa.float64())
        if bar is not None and (j + 1) % step == 0:
            bar.update(step * len(m.rows))
    table = pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema)
    del arrays
    pq.write_table(table, tmp, use_dictionary=False)  # float columns: a dictionary only costs time


def as_frame(m: Matrix) -> Any:
    """The matrix as a pandas DataFrame: rows named by gene (or experiment id), columns by voxel
    index or region; what ``.parquet`` holds and :func:`ambasync.matrix` returns."""
    import pandas as pd

    return pd.DataFrame(m.values, index=pd.Index([str(r) for r in m.rows], name=m.row_label),
                        columns=[str(c) for c in m.columns])


def as_anndata(m: Matrix) -> Any:
    """The matrix as AnnData: ``obs`` the catalogue columns of each row, ``var`` each voxel's
    i/j/k and x/y/z (or each region's size), ``uns`` the recipe (exact TOML too) and the facts."""
    import anndata
    import numpy as np

    adata = anndata.AnnData(X=m.values, obs=m.obs.copy(), var=m.var.copy())
    adata.obs.index = adata.obs.index.astype(str)
    adata.var.index = adata.var.index.astype(str)
    adata.uns["recipe"] = {k: (np.array(v, dtype=str) if isinstance(v, list) else v)
                           for k, v in m.recipe.to_dict().items()}
    adata.uns["recipe_toml"] = dumps(m.recipe, __version__)  # exact: `--recipe` reads it back
    adata.uns["ambasync"] = {k: v for k, v in m.facts.items() if isinstance(v, (str, int, float))}
    return adata


def _write_h5ad(m: Matrix, tmp: Path) -> None:
    as_anndata(m).write_h5ad(tmp)


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


def write_matrix(m: Matrix, to: str, progress: bool = False) -> MatrixFiles:
    """The matrix at ``to`` (format by extension) with ``{to}.recipe.toml`` and ``{to}.methods.md``,
    all atomically: each is written under a temporary name, then renamed, the matrix last.
    ``progress``: CSV and Parquet report rows (Parquet: cells converted) with an ETA."""
    from ambasync.analysis.matrix.methods import methods_text
    from ambasync.progress import Progress

    kind = output_kind(to, None)
    path = Path(to)
    if not path.parent.is_dir():
        raise AnalysisError(f"--to {to}: folder {path.parent} does not exist")
    tmp = tmp_name(path)
    try:
        with _side_files(to, m.recipe, methods_text(m.recipe, m.facts, output=path.name)) as (recipe_path,
                                                                                             methods_path):
            if kind == ".zarr":
                _write_zarr(m, tmp)
            elif kind == ".csv":
                with Progress("writing", len(m.rows), "rows", progress) as bar:
                    _write_csv(m, tmp, bar)
            elif kind == ".parquet":
                with Progress("writing", int(m.values.size), "cells", progress) as bar:
                    _write_parquet(m, tmp, bar)
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
    return MatrixFiles(str(path), str(recipe_path), str(methods_path))


def write_row_image(m: Matrix, row: str, to: str) -> MatrixFiles:
    """One row's processed map (a gene or experiment) back on the cube's grid as an image;
    voxels outside the mask are NaN."""
    import numpy as np

    from ambasync.analysis.matrix.methods import methods_text
    from ambasync.imaging.regrid import write_image

    output_kind(to, row)
    if m.var.index.name != "voxel":
        raise AnalysisError("--volume writes a voxel map; leave out --labels to get one")
    hits = np.flatnonzero(m.rows.astype(str) == str(row))
    if hits.size == 0:
        raise AnalysisError(f"--volume {row}: no such {m.row_label.lower()} in the matrix (unknown, or removed by "
                            f"--max-missing {m.recipe.max_missing}{' or --homologs' if m.recipe.homologs else ''})")
    volume = np.full(m.mask.shape, np.nan, dtype=np.float64)
    volume[m.mask] = m.values[hits[0]]
    path = Path(to)
    methods = methods_text(m.recipe, m.facts, output=f"{path.name} ({m.row_label.lower()} {row})")
    with _side_files(to, m.recipe, methods) as (recipe_path, methods_path):
        write_image(volume, m.geometry, path)  # atomic itself
    return MatrixFiles(str(path), str(recipe_path), str(methods_path))


__all__ = ["FORMATS", "IMAGE_FORMATS", "MatrixFiles", "as_anndata", "as_frame", "output_kind", "write_matrix", "write_row_image"]
