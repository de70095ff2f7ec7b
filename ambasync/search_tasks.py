"""The dask tasks of a search: the cube cut into blocks of whole experiments, each block read
(:func:`ambasync.atlas.read_experiments`) and scored against the map and its nulls (or averaged
over two regions) by :mod:`ambasync.search_stats`, computed here or on a ``--scheduler`` cluster.

numpy is imported inside the functions: :mod:`ambasync.search` imports this module, and
``ambasync.cli`` imports that one's constants in the run's numpy-free event-loop process.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("ambasync.search")

BLOCK_BYTES = 32 << 20  # cube grids (float32) read and scored per task: ~50 experiments at 200 µm


def experiment_blocks(expression: Any, block_bytes: int = BLOCK_BYTES) -> list[tuple[int, int]]:
    """The cube's ``expression`` (an xarray DataArray, experiment × volume) cut into ranges of
    whole experiments of about ``block_bytes``: a whole number of the store's own chunks when
    they are smaller than that (however dask was asked to chunk it: blocks are read by
    :func:`ambasync.atlas.read_experiments`, not through the dask array)."""
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

    from .search_stats import ranks, standardise_columns

    y = np.column_stack([np.asarray(map_values, dtype=np.float32), *nulls])
    if method == "spearman":
        for j in range(y.shape[1]):  # a column at a time: float64 ranks of all would be 500 MB
            y[:, j] = ranks(y[:, j])
    return standardise_columns(y)


def score_block(location: str, span: tuple[int, int], voxels: np.ndarray, design: tuple[np.ndarray, np.ndarray],
                method: str) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    from .atlas import read_experiments
    from .search_stats import block_correlations

    block = read_experiments(location, *span)
    y, y2 = design
    # np.take keeps rows contiguous (fancy indexing on the last axis gives a Fortran-ordered
    # array, which made every later pass over the block several times slower).
    return block_correlations(np.take(block.reshape(block.shape[0], -1), voxels, axis=1), y, method, y2=y2)


def means_block(location: str, span: tuple[int, int], voxels: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, ...]:
    import numpy as np

    from .atlas import read_experiments
    from .search_stats import block_means

    block = read_experiments(location, *span)
    flat = np.take(block.reshape(block.shape[0], -1), voxels, axis=1)
    return (*block_means(flat, target), *block_means(flat, ~target))


def compute_tasks(make_tasks: Callable[[Any], list[Any]], scheduler: str | None, what: str, progress: bool,
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


__all__ = ["BLOCK_BYTES", "compute_tasks", "design_matrix", "experiment_blocks", "means_block", "score_block"]
