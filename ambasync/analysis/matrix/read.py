"""What ``matrix`` reads: the cube's catalogue and its experiments in blocks of whole genes
(through :mod:`ambasync.cube.read`'s lazy cube), and the recipe's side inputs (homolog and label
tables, the label image on the cube's grid)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterator

from ambasync.analysis.matrix.recipe import Recipe
from ambasync.analysis.matrix.steps import ExperimentSelection, mirror_hemisphere
from ambasync.errors import AnalysisError

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("ambasync.matrix")

BLOCK_EXPERIMENTS = 128  # experiments read per block: ~80 MB of float32 grids on the 200 µm grid
BLOCKS_AHEAD = 2  # blocks read and transformed while the caller groups the current one
READ_THREADS = 4  # read_experiments calls in flight (zarr's own I/O and decoding run beneath them)


def read_catalogue(ds: Any) -> Any:
    """The catalogue columns along ``experiment``, read in one go (they are lazy coordinates)."""
    import dask
    import numpy as np
    import pandas as pd

    names = [n for n in ds["experiment"].coords if n != "experiment" and ds[n].dims == ("experiment",)]
    values = dask.compute(ds["experiment"].data, *[ds[n].data for n in names])
    data = {"experiment_id": np.asarray(values[0], dtype=np.int64)}
    # numpy 2's variable-width strings (zarr 3's string arrays) as Python str: .astype(str) refuses them
    data.update({n: (np.asarray(v).astype(object) if np.asarray(v).dtype.kind == "T" else np.asarray(v))
                 for n, v in zip(names, values[1:])})
    return pd.DataFrame(data)


def read_blocks(data: Any, sel: ExperimentSelection, mask_flat: np.ndarray, mirror_axis: int | None,
                digest: Any, progress: bool, block: int = BLOCK_EXPERIMENTS, location: str | None = None,
                variable: str = "expression", transform: Any = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows of this block in ``sel`` order, masked float32 voxels), whole genes per block of
    about ``block`` experiments (the memory budget sets it). The next block is read while the
    caller works on this one.

    With ``location`` (computing on this machine) each run of consecutive storage positions of
    the block is one :func:`ambasync.cube.read.read_experiments` call, READ_THREADS at once:
    zarr then fetches and decodes a run's chunks together, 2-2.5x faster than a dask task per
    chunk (measured on the atlas bench). Without it (a ``--scheduler`` cluster) the dask array
    ``data`` is gathered by the cluster's workers.

    ``transform`` (masked float32 -> the caller's array, e.g. missing values and log2) runs in
    the reading threads, BLOCKS_AHEAD blocks ahead of the caller; the digest is taken here, in
    block order. Yields (rows, transform(masked)), or (rows, masked) without a transform."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from ambasync.progress import Progress

    n = sel.ids.size
    bounds, start = [], 0
    while start < n:
        stop = min(n, start + max(1, block))
        while stop < n and sel.genes[stop] == sel.genes[stop - 1]:
            stop += 1
        bounds.append((start, stop))
        start = stop
    n_vox = int(mask_flat.sum())
    where = np.flatnonzero(mask_flat)

    runs_pool = ThreadPoolExecutor(READ_THREADS) if location is not None else None

    def gather(positions: np.ndarray) -> np.ndarray:
        """The volumes at sorted ``positions``: a read_experiments call per run of consecutive ones."""
        from ambasync.cube.read import read_experiments

        cuts = np.flatnonzero(np.diff(positions) != 1) + 1
        runs = np.split(positions, cuts)
        parts = list(runs_pool.map(lambda r: read_experiments(location, int(r[0]), int(r[-1]) + 1, variable), runs))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def load(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.arange(start, stop)
        pos = sel.positions[rows]
        order = np.argsort(pos, kind="stable")  # read the cube in storage order, then put back
        raw = gather(pos[order]) if runs_pool is not None else np.asarray(data[pos[order]].compute())
        if mirror_axis is not None:
            sag = sel.planes[rows][order] == "sagittal"
            if sag.any():
                raw[sag] = mirror_hemisphere(raw[sag], mirror_axis + 1)
        masked = np.empty((len(rows), n_vox), dtype=raw.dtype)
        masked[order] = np.take(raw.reshape(len(rows), -1), where, axis=1)
        del raw
        return rows, masked, (transform(masked) if transform is not None else masked)

    bar = Progress("reading the cube", n, "experiments", progress)
    try:
        with ThreadPoolExecutor(BLOCKS_AHEAD) as reader:
            ahead = [reader.submit(load, *b) for b in bounds[:BLOCKS_AHEAD]]
            for i in range(len(bounds)):
                rows, masked, out = ahead.pop(0).result()
                if i + BLOCKS_AHEAD < len(bounds):
                    ahead.append(reader.submit(load, *bounds[i + BLOCKS_AHEAD]))
                digest.update(np.ascontiguousarray(masked, dtype="<f4").data)  # hashlib lets go of the GIL
                del masked
                bar.update(len(rows))
                yield rows, out
    finally:
        if runs_pool is not None:
            runs_pool.shutdown()
    bar.close()


def hemisphere_axis(ds: Any) -> int:
    """Index (0..2, of zspace/yspace/xspace) of the left-right axis: the Allen grid's stored z
    axis, which the notebook's RAS reorientation puts last (xspace) and PIR keeps first."""
    return 2 if ds.attrs.get("orientation", "RAS") == "RAS" else 0


def read_table(path: str, columns: tuple[str, str], what: str) -> Any:
    import pandas as pd

    try:
        table = pd.read_csv(path)
    except FileNotFoundError:
        raise AnalysisError(f"{what} {path}: no such file") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise AnalysisError(f"{what} {path}: not a readable CSV ({exc})") from None
    absent = [c for c in columns if c not in table.columns]
    if absent:
        raise AnalysisError(f"{what} {path}: no column {absent[0]!r} (needs columns {', '.join(columns)})")
    return table


def labels_on_grid(recipe: Recipe, ds: Any) -> np.ndarray:
    import numpy as np

    from ambasync.cube.read import cube_geometry
    from ambasync.imaging.regrid import describe, on_grid, read_image, same_grid

    data, geometry = read_image(recipe.labels)
    grid = cube_geometry(ds)
    if not same_grid(geometry, grid):
        if not recipe.resample_images:
            raise AnalysisError(f"labels {recipe.labels} are on another grid ({describe(geometry)}) than the cube "
                                f"({describe(grid)}); resample them onto the cube's grid first, or --resample-images")
        data = on_grid(data, geometry, grid, "nearest")
    return np.nan_to_num(np.rint(data), nan=0).astype(np.int64)


__all__ = ["hemisphere_axis", "labels_on_grid", "read_blocks", "read_catalogue", "read_table"]
