"""The dask tasks of a search: the cube cut into blocks of whole experiments, each block read
(:func:`ambasync.cube.read.read_experiments`) and scored against the map and its nulls (or averaged
over two regions) by :mod:`ambasync.analysis.search.stats`, computed here or on a ``--scheduler`` cluster.

numpy is imported inside the functions: :mod:`ambasync.analysis.search.correlate` imports this module, and
``ambasync.cli`` imports that one's constants in the run's numpy-free event-loop process.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

from ambasync.cube.layout import (
    BY_VOXEL,  # the cube's voxel-major copy, when it has one
)

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("ambasync.search")

BLOCK_BYTES = 32 << 20  # cube grids (float32) read and scored per task: ~50 experiments at 200 µm
BLAS_THREADS = 1  # BLAS threads inside a voxel-major scoring task (the tasks fill the cores)


def experiment_blocks(expression: Any, block_bytes: int = BLOCK_BYTES) -> list[tuple[int, int]]:
    """The cube's ``expression`` (an xarray DataArray, experiment × volume) cut into ranges of
    whole experiments of about ``block_bytes``: a whole number of the store's own chunks when
    they are smaller than that (however dask was asked to chunk it: blocks are read by
    :func:`ambasync.cube.read.read_experiments`, not through the dask array)."""
    import math

    per = math.prod(expression.shape[1:]) * expression.dtype.itemsize
    stored = int((expression.encoding.get("chunks") or (1,))[0])
    n = max(1, block_bytes // per)
    if stored <= n:
        n = n // stored * stored
    total = expression.shape[0]
    return [(start, min(start + n, total)) for start in range(0, total, n)]


def design_matrix(map_values: np.ndarray, nulls: list[np.ndarray], method: str) -> tuple[np.ndarray, np.ndarray]:
    """Voxels × (map, nulls...) as block_correlations wants them (ranked for spearman), and its
    square, made once for all blocks (each ~250 MB at 1,000 nulls: float32 throughout)."""
    import numpy as np

    from ambasync.analysis.search.stats import ranks, standardise_columns

    y = np.column_stack([np.asarray(map_values, dtype=np.float32), *nulls])
    if method == "spearman":
        for j in range(y.shape[1]):  # a column at a time: float64 ranks of all would be 500 MB
            y[:, j] = ranks(y[:, j])
    return standardise_columns(y)


def score_block(location: str, span: tuple[int, int], voxels: np.ndarray, design: tuple[np.ndarray, np.ndarray],
                method: str) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    from ambasync.analysis.search.stats import block_correlations
    from ambasync.cube.read import read_experiments

    block = read_experiments(location, *span)
    y, y2 = design
    # np.take keeps rows contiguous (fancy indexing on the last axis gives a Fortran-ordered
    # array, which made every later pass over the block several times slower).
    return block_correlations(np.take(block.reshape(block.shape[0], -1), voxels, axis=1), y, method, y2=y2)


Piece = tuple[tuple[slice, slice, slice], "np.ndarray", "np.ndarray"]  # voxel_pieces' items


def voxel_pieces(mask: np.ndarray, chunks: tuple[int, int, int]) -> list[Piece]:
    """The mask cut along the voxel-major copy's chunks (zspace, yspace, xspace sizes) into rows
    of chunks along xspace, from the first to the last chunk holding mask voxels: one read per
    row (zarr fetches its chunks together; a read per chunk cost ~40 % more). For each row, its
    slices, the mask voxels' positions in it (C order) and their positions among the mask's voxels
    (the rows of the map and its nulls)."""
    import numpy as np

    cz, cy, cx = chunks
    order = np.cumsum(mask.ravel()).reshape(mask.shape) - 1  # position of each voxel among the mask's
    pieces = []
    for z in range(0, mask.shape[0], cz):
        for y in range(0, mask.shape[1], cy):
            xs = np.flatnonzero(mask[z:z + cz, y:y + cy].any(axis=(0, 1)))
            if xs.size == 0:
                continue
            x0, x1 = xs[0] // cx * cx, min(mask.shape[2], (xs[-1] // cx + 1) * cx)
            where = (slice(z, z + cz), slice(y, y + cy), slice(int(x0), int(x1)))
            local = np.flatnonzero(mask[where].ravel())
            pieces.append((where, local, order[where].ravel()[local]))
    return pieces


def voxel_spans(by_voxel: Any) -> list[tuple[int, int]]:
    """The experiments of the voxel-major copy (an xarray DataArray, voxels × experiment) cut at its
    stored chunks along ``experiment``: a task reads whole chunks, and each chunk once."""
    chunks = by_voxel.encoding.get("chunks") or by_voxel.encoding.get("preferred_chunks", {}).get("experiment")
    step = int(chunks[-1] if isinstance(chunks, (tuple, list)) else chunks or by_voxel.shape[-1])
    total = by_voxel.shape[-1]
    return [(start, min(start + step, total)) for start in range(0, total, step)]


def score_voxel_span(location: str, span: tuple[int, int], pieces: list[Piece],
                     design: tuple[np.ndarray, np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
    """Experiments ``span`` scored from the voxel-major copy: each chunk of the mask read (its
    mask voxels only are kept), its sums added, r from the sums (search_stats)."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from ambasync.analysis.search.stats import correlations_from_sums, voxel_block_sums
    from ambasync.cube.read import read_voxels

    y, nulls = design
    total = None
    # One BLAS thread per task: the tasks already fill the cores, and OpenBLAS's own threads spin
    # while they wait (without nulls: twice the CPU time and 1.5x the wall time of a 26,078-experiment
    # scan, measured). It also fixes the order of the float32 sums of the nulls' products, so the
    # same map gives the same p_spatial (several threads changed a p-value in 400 experiments).
    # The price: a cube of one block of experiments is one task, on one core. threadpoolctl comes
    # with scikit-learn.
    with threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
        for where, local, rows in pieces:
            chunk = read_voxels(location, where, *span, variable=BY_VOXEL)
            values = np.take(chunk.reshape(-1, chunk.shape[-1]), local, axis=0)
            sums = voxel_block_sums(values, y[rows], None if nulls is None else np.take(nulls, rows, axis=0))
            if total is None:
                total = sums
            else:
                for acc, part in zip(total, sums):
                    acc += part
    return correlations_from_sums(total)


def means_block(location: str, span: tuple[int, int], voxels: np.ndarray,
                regions: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, ...]:
    """Mean and count of each experiment of ``span`` over the target's and the contrast's voxels
    (two bool arrays over ``voxels``; they may overlap: an explicit contrast is used as given)."""
    import numpy as np

    from ambasync.analysis.search.stats import block_means
    from ambasync.cube.read import read_experiments

    target, contrast = regions
    block = read_experiments(location, *span)
    flat = np.take(block.reshape(block.shape[0], -1), voxels, axis=1)
    return (*block_means(flat, target), *block_means(flat, contrast))


def compute_tasks(make_tasks: Callable[[Any], list[Any]], scheduler: str | None, what: str, progress: bool,
                  first: Any = None) -> list[Any]:
    """Compute ``make_tasks(first)`` where ``scheduler`` says (atlas.compute_on); a bar on a terminal.

    ``first`` (a delayed) is persisted before the tasks are made: computed once and kept where
    it was computed (this process, or the cluster's workers). Otherwise the scheduler would read
    cube blocks ahead, into memory, while the nulls are still being made."""
    import dask

    from ambasync.analysis.cluster import compute_on

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


__all__ = ["BLAS_THREADS", "BLOCK_BYTES", "BY_VOXEL", "compute_tasks", "design_matrix", "experiment_blocks", "means_block",
           "score_block", "score_voxel_span", "voxel_pieces", "voxel_spans"]
