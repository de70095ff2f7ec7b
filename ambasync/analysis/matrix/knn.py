"""scikit-learn's ``KNNImputer`` for a genes x voxels matrix at atlas scale, same numbers.

``knn_impute(values, k)`` equals
``KNNImputer(n_neighbors=k, weights="uniform").fit_transform(values.T).T`` (voxels are the
samples, genes the features) to rounding, without ever holding a receivers x voxels distance
matrix. How:

* Only the voxels that miss a gene (*receivers*) need neighbours. The distances between a block
  of receivers and a tile of voxels come from one BLAS product of the NaN-filled-with-zero
  matrix, plus sparse corrections for the few missing cells (missingness is sparse)::

      sum over genes present in both (x - y)^2
          = |x|^2 + |y|^2 - 2 x.y - sum_{g missing in y} x_g^2 - sum_{g missing in x} y_g^2
      genes present in both = G - m_x - m_y + |missing(x) & missing(y)|

  with x, y zero where missing (so ``x.y`` already skips them). Each gene is first shifted by
  its mean, kept to 6 significant bits (distances do not change when every voxel's gene g moves
  by the same amount): the expanded formula then cancels far less than scikit-learn's own
  (the same formula on the raw values), and integer or few-bit data stay exact, so exact ties
  stay exact ties.
* The distance between two receivers is the same both ways, so each pair of receiver blocks is
  computed once and serves both (half the multiply-adds when most voxels are receivers).
* For every missing cell (receiver r, gene g) only the k + 1 nearest voxels that have g are
  kept, merged between batches of tiles. Each block is first compared with itself, then with
  its neighbours in voxel order, then farther: voxels near in space are near in expression, so
  every cell soon has a close bound on its (k+1)-th nearest donor, and later tiles only look at
  the few distances that beat it.
* The k nearest donors are averaged. A tie between the k-th and the (k+1)-th is settled as
  scikit-learn settles it: the receiver's whole distance row is recomputed in its form and
  voxel order, and ``np.argpartition`` picks, as in ``sklearn/impute/_knn.py``.

The tiles run as ``dask.delayed`` tasks under whatever scheduler is active (the local threads, or
a ``distributed`` Client); the big shared arrays are one key (scattered once to a cluster).
"""

from __future__ import annotations

import math
import os
import uuid
from typing import Any

import numpy as np

__all__ = ["knn_impute", "knn_memory_estimate"]

_TILE_MAX = 768  # voxels per side of a distance tile; larger gains no speed (measured), costs memory
_TILE_MIN = 4
_TOP = 64  # nearest voxels kept per receiver row of a tile before masking each gene's gaps
_TIE_RTOL = 1e-12  # k-th and (k+1)-th distances this close count as a tie (settled as sklearn)
_CELL_BYTES = 72  # working bytes of a tile task per distance it computes (traced: ~65)
_GENE_BYTES = 8  # ... plus per gene and voxel of a side (the missing genes' masks and values)
_PAIR_BYTES = 120  # per missing cell: its k + 1 candidates (two copies while merging) and lookups
_BASE_BYTES = 96 * 2**20  # the interpreter with numpy, scipy and dask imported
_BLOCK_LIMIT = 4096  # receivers per exact-tie task at most


def knn_impute(values: np.ndarray, n_neighbors: int = 5, memory_bytes: int | None = None,
               progress: Any = None) -> np.ndarray:
    """Fill NaN cells exactly as scikit-learn's ``KNNImputer`` does, at atlas scale.

    The result equals
    ``KNNImputer(n_neighbors=n_neighbors, missing_values=np.nan, weights="uniform")
    .fit_transform(values.T).T`` to rounding (voxels, the columns, are the samples; genes, the
    rows, are the features): for each missing cell (gene g, voxel r), the mean of g over the
    ``n_neighbors`` voxels that have g and are nearest to r in scikit-learn's ``nan_euclidean``
    distance, ``sqrt(G / n * sum over the n genes present in both of (x - y)^2)``. Voxels with no
    gene in common with r (distance NaN) are never donors; with fewer valid donors than
    ``n_neighbors`` those there are are used, and with none the cell gets g's mean over the
    voxels that have it.

    Parameters
    ----------
    values : numpy.ndarray
        Float array, genes x voxels, with NaN for missing cells. Not modified. float32 input is
        computed in float64 (scikit-learn would compute float32 input in float32).
    n_neighbors : int, default 5
        Donors averaged per missing cell.
    memory_bytes : int, optional
        Working memory the call may use beyond ``values`` and the result: the distance tiles
        of all tasks that run at once in this process are sized to fit in it (each task gets
        ``memory_bytes`` divided by the local scheduler's threads; a ``distributed`` worker's
        task gets the same share of it). Default: a quarter of the memory free now
        (``os.sysconf``), of which at most ~65 MB per concurrent task is used at 4,000 genes
        (tiles are at most 768 x 768 distances). Use :func:`knn_memory_estimate` to know the peak before
        starting.
    progress : object, optional
        Anything with ``update(n)``, e.g. a ``tqdm`` bar: called after each batch of tasks with
        the receivers' worth of work that batch finished (the work is spread over the
        receivers by distance computations done, so the updates add up to the number of
        receivers, and an ETA from them is linear). If it has a ``total`` attribute that is
        None, it is set to the number of receivers first. Receivers are the voxels with at
        least one NaN.

    Returns
    -------
    numpy.ndarray
        A new C-contiguous float64 array of the same shape: ``values`` with every NaN filled.

    Raises
    ------
    ValueError
        ``values`` is not 2-D, holds an infinity, ``n_neighbors`` < 1, or a gene (row) is NaN in
        every voxel. scikit-learn drops such a feature from its output (the result then has
        fewer rows, which no caller expects); drop the row first, e.g. with
        ``values[~np.isnan(values).all(axis=1)]``.

    Notes
    -----
    Tasks are ``dask.delayed`` calls run with ``dask.compute`` in batches; the local threaded
    scheduler, a ``distributed`` Client (the shared arrays are scattered to each worker once,
    so each worker holds a copy of the float64 matrix) and the synchronous scheduler all work;
    the multiprocessing scheduler would ship the matrix with every task. Under the threaded
    scheduler BLAS is held to one thread per task, since the tasks already fill the cores.
    CPU time is about (receivers x voxels x genes) / 2 float64 multiply-adds at one core's BLAS
    speed, plus ~50 % (pairs of receivers are computed once for both; the rest is the sparse
    corrections and the selection): 430-470 CPU-seconds for 4,127 genes x 61,315 voxels, all of
    them receivers, on this project's 2-core machine. Ties between the k-th and (k+1)-th nearest donors are settled by
    recomputing that receiver's distances in scikit-learn's form and running its
    ``np.argpartition`` on them; the outcome equals scikit-learn's when its distances tie
    exactly too (duplicate voxels), and can differ when they differ only by rounding.
    """
    import dask

    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"values must be 2-D (genes x voxels), not {values.ndim}-D")
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)
    k = int(n_neighbors)
    if k < 1:
        raise ValueError(f"n_neighbors must be at least 1, not {n_neighbors}")
    n_genes, n_vox = values.shape

    gaps, means = _scan(values)
    receivers = np.zeros(n_vox, dtype=bool)
    for gap in gaps:
        receivers[gap] = True
    n_rcv = int(receivers.sum())
    if n_rcv == 0:
        return np.array(values, dtype=np.float64, order="C")
    if progress is not None and getattr(progress, "total", 0) is None:
        progress.total = n_rcv
        if hasattr(progress, "refresh"):
            progress.refresh()

    kind, client, concurrency = _scheduler()
    if memory_bytes is None:
        memory_bytes = _default_memory()
    side = _tile_side(n_genes, memory_bytes // max(1, concurrency))

    # positions: receivers first (in voxel order), then complete voxels; the scratch copy is in
    # position order and, once the distances are done, becomes the result.
    perm = np.concatenate([np.flatnonzero(receivers), np.flatnonzero(~receivers)])
    inv = np.empty(n_vox, dtype=np.int64)
    inv[perm] = np.arange(n_vox)
    del receivers
    shared = _prepare(values, gaps, means, perm, inv, n_rcv)
    del gaps

    k2 = k + 1
    n_pairs = shared.vox_genes.size
    best_pos = np.full((n_pairs, k2), -1, dtype=np.int32 if n_vox < 2**31 else np.int64)
    best_val = np.full((n_pairs, k2), np.inf)

    tasks = _tile_plan(n_rcv, n_vox, side)
    total_work = sum(w for *_, w in tasks)
    reporter = _Progress(progress, n_rcv, total_work)
    with _compute_context(kind, concurrency):
        handle = _share(shared, client)
        try:
            for batch in _waves(tasks, concurrency):
                bound = best_val.max(axis=1)  # each cell's (k+1)-th nearest so far: farther is no use
                ptr = shared.vox_ptr
                calls = [dask.delayed(_tile_task, pure=False)(
                    handle, i0, i1, j0, j1, k2, bound[ptr[i0]:ptr[i1]],
                    bound[ptr[j0]:ptr[j1]] if j0 < n_rcv else None) for i0, i1, j0, j1, _ in batch]
                parts = [part for result in dask.compute(*calls) for part in result]
                _merge(best_pos, best_val, *(np.concatenate(arrays) for arrays in zip(*parts)), k2)
                reporter.add(sum(w for *_, w in batch))

            donors, count, tied = _resolve(best_pos, best_val, k)
            del best_pos, best_val
            if tied.size:  # settle ties as scikit-learn's argpartition does, on whole rows
                owner = shared.pair_owner(tied)
                rows = np.unique(owner)
                per_task = _task_bytes(n_genes, side, side)  # whole rows, then the tiles' work
                per = max(1, min(_BLOCK_LIMIT, per_task // (8 * n_vox + _CELL_BYTES * side)))
                calls = [dask.delayed(_exact_task, pure=False)(handle, rows[a:a + per], side, k)
                         for a in range(0, rows.size, per)]
                exact: dict[int, np.ndarray] = {}
                for part in dask.compute(*calls):
                    exact.update(part)
                for p in tied:
                    chosen = exact[int(p)]
                    donors[p] = -1
                    donors[p, :chosen.size] = chosen
                    count[p] = chosen.size
        finally:
            del handle
    reporter.finish()

    # the scratch becomes the result: the input, then the imputed cells
    out = shared.scratch
    pair_gene = shared.vox_genes
    pair_voxel = perm[shared.pair_owner(np.arange(n_pairs))]
    del shared
    np.copyto(out, values, casting="unsafe")
    out[pair_gene, pair_voxel] = _averages(values, pair_gene, donors, count, perm, means)
    return out


def knn_memory_estimate(n_genes: int, n_voxels: int, n_receivers: int, memory_bytes: int | None,
                        n_missing: int | None = None, n_neighbors: int = 5,
                        concurrency: int | None = None) -> int:
    """Peak memory (bytes) of :func:`knn_impute` in the calling process, input included.

    Parameters
    ----------
    n_genes, n_voxels : int
        Shape of ``values`` (genes x voxels), counted as float64.
    n_receivers : int
        Voxels with at least one NaN.
    memory_bytes : int or None
        As passed to :func:`knn_impute` (None: its default).
    n_missing : int, optional
        NaN cells; default ``n_receivers * min(n_genes, 32)``, generous for ISH atlases
        (the Allen 200 um atlas has about 10 per receiver).
    n_neighbors : int, default 5
    concurrency : int, optional
        Tasks running at once in this process; default the local threaded scheduler's
        (``dask.config`` ``num_workers`` or the CPU count). With a ``distributed`` Client the
        tasks run in the workers, which each also hold a copy of the matrix.

    Returns
    -------
    int
        Bytes: the input and the result (float64, ``8 * n_genes * n_voxels`` each), the
        concurrent tile tasks, the per-cell candidate lists, and the interpreter.
    """
    if memory_bytes is None:
        memory_bytes = _default_memory()
    if concurrency is None:
        import dask

        concurrency = int(dask.config.get("num_workers", None) or os.cpu_count() or 1)
    if n_missing is None:
        n_missing = n_receivers * min(n_genes, 32)
    if n_receivers == 0:
        return 16 * n_genes * n_voxels + _BASE_BYTES
    side = _tile_side(n_genes, memory_bytes // max(1, concurrency))
    rows = min(side, n_receivers)
    cols = min(side, n_voxels)
    task = _task_bytes(n_genes, rows, cols)
    k2 = n_neighbors + 1
    pairs = n_missing * (_PAIR_BYTES + 16 * k2)
    waves = max(4, 4 * concurrency) * 2 * min(n_missing, rows * min(n_genes, 64)) * 16 * k2
    voxels = 64 * n_voxels
    return int(16 * n_genes * n_voxels + concurrency * task + pairs + waves + voxels + _BASE_BYTES)


# ---------------------------------------------------------------- preparation


class _Shared:
    """Everything a tile task reads (one dask key). Voxels are addressed by *position*:
    receivers first, in voxel order, then the complete voxels."""

    def __init__(self, scratch: np.ndarray, sq: np.ndarray, n_miss: np.ndarray, vox_ptr: np.ndarray,
                 vox_genes: np.ndarray, key: np.ndarray, perm: np.ndarray, n_rcv: int):
        self.scratch = scratch  # genes x positions: centred values, 0 where missing
        self.sq = sq  # per position: sum of its squared centred values
        self.n_miss = n_miss  # per position: genes missing (float)
        self.vox_ptr = vox_ptr  # CSR by position -> its missing genes (pairs, in position order)
        self.vox_genes = vox_genes
        self.key = key  # sorted gene * V + position of every missing cell
        self.perm = perm  # position -> voxel
        self.n_rcv = n_rcv

    @property
    def n_genes(self) -> int:
        return self.scratch.shape[0]

    @property
    def n_vox(self) -> int:
        return self.scratch.shape[1]

    def pair_owner(self, pairs: np.ndarray) -> np.ndarray:
        """Position of the receiver of each pair (missing cell)."""
        return np.searchsorted(self.vox_ptr, pairs, side="right") - 1


def _scan(values: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Each gene's missing voxels and its mean over the others (numpy.ma's, as scikit-learn)."""
    n_genes, n_vox = values.shape
    gaps, means = [], np.empty(n_genes)
    empty = []
    for g in range(n_genes):
        row = values[g]
        missing = np.isnan(row)
        gap = np.flatnonzero(missing)
        if gap.size == n_vox:
            empty.append(g)
            continue
        if np.isinf(row).any():
            raise ValueError(f"values holds an infinity (row {g}); scikit-learn's KNNImputer rejects it too")
        gaps.append(gap)
        means[g] = np.nansum(row, dtype=np.float64) * 1.0 / (n_vox - gap.size)  # numpy.ma: filled(0).sum() / count
    if empty:
        raise ValueError(f"{len(empty)} row(s) are NaN in every voxel (first: row {empty[0]}); scikit-learn's "
                         "KNNImputer drops such features, changing the shape: drop them before imputing")
    return gaps, means


def _prepare(values: np.ndarray, gaps: list[np.ndarray], means: np.ndarray, perm: np.ndarray,
             inv: np.ndarray, n_rcv: int) -> _Shared:
    n_genes, n_vox = values.shape
    scratch = np.empty((n_genes, n_vox))
    sq = np.zeros(n_vox)
    tmp = np.empty(n_vox)
    keys = []
    for g in range(n_genes):
        row = scratch[g]
        if values.dtype == np.float64:
            np.take(values[g], perm, out=row)
        else:
            row[:] = values[g][perm]
        row -= _coarse(means[g])
        pos = np.sort(inv[gaps[g]])
        row[pos] = 0.0
        np.square(row, out=tmp)
        sq += tmp
        keys.append(pos + g * n_vox)
    key = np.concatenate(keys) if keys else np.empty(0, dtype=np.int64)
    where = key % n_vox
    order = np.argsort(where, kind="stable")  # by position, genes ascending within
    vox_genes = (key[order] // n_vox).astype(np.int64)
    counts = np.bincount(where, minlength=n_vox)
    vox_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return _Shared(scratch, sq, counts.astype(np.float64), vox_ptr, vox_genes, key, perm, n_rcv)


def _coarse(mean: float) -> float:
    """The gene's shift: its mean kept to 6 significant bits. Shifting leaves every distance
    unchanged and shrinks the expanded formula's cancellation; a coarse shift keeps integer or
    few-bit data exact (x - shift exact, every sum exact), so exact ties stay exact ties, as in
    scikit-learn's own (exact) arithmetic on such data."""
    frac, exp = math.frexp(float(mean))
    return math.ldexp(round(frac * 64) / 64, exp)


# ---------------------------------------------------------------- planning


def _default_memory() -> int:
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        free = 4 * 2**30
    return int(free // 4)


def _task_bytes(n_genes: int, rows: int, cols: int) -> int:
    return _CELL_BYTES * rows * cols + _GENE_BYTES * n_genes * max(rows, cols)


def _tile_side(n_genes: int, per_task: int) -> int:
    """Largest tile side s with _task_bytes(G, s, s) <= per_task, within [_TILE_MIN, _TILE_MAX]."""
    a, b = _CELL_BYTES, _GENE_BYTES * n_genes
    s = int((-b + math.sqrt(b * b + 4 * a * max(per_task, 0))) / (2 * a))
    return max(_TILE_MIN, min(_TILE_MAX, s))


def _tile_plan(n_rcv: int, n_vox: int, side: int) -> list[tuple[int, int, int, int, int]]:
    """(i0, i1, j0, j1, work): receiver blocks against receiver blocks (each unordered pair
    once, serving both) and against tiles of complete voxels. In the order they run: each
    block with itself first, then its neighbours in voxel order, then farther: voxels near in
    space are near in expression, so the early tiles give every cell a close bound on its
    (k+1)-th nearest donor, and the later tiles only look at what beats it."""
    blocks = [(a, min(a + side, n_rcv)) for a in range(0, n_rcv, side)]
    tiles = [(a, min(a + side, n_vox)) for a in range(n_rcv, n_vox, side)]
    plan = []
    for gap in range(len(blocks)):
        for i in range(len(blocks) - gap):
            (i0, i1), (j0, j1) = blocks[i], blocks[i + gap]
            plan.append((i0, i1, j0, j1, (i1 - i0) * (j1 - j0)))
        if gap == 1 or (gap == 0 and len(blocks) == 1):
            plan += [(i0, i1, j0, j1, (i1 - i0) * (j1 - j0)) for i0, i1 in blocks for j0, j1 in tiles]
    return plan


def _waves(tasks: list[tuple[int, int, int, int, int]], concurrency: int):
    """Batches of tasks computed together: their candidates are merged, and the bounds
    tightened, between batches (fresh bounds save far more than a batch's tail costs). The
    blocks' own tiles first, then 4 tasks per thread."""
    diagonal = [t for t in tasks if t[0] == t[2]]
    rest = [t for t in tasks if t[0] != t[2]]
    size = 4 * max(1, concurrency)
    for group in (diagonal, rest):
        for a in range(0, len(group), size):
            yield group[a:a + size]


def _scheduler() -> tuple[str, Any, int]:
    """(kind, distributed client or None, tasks at once per process)."""
    import dask
    from dask.base import get_scheduler

    sched = get_scheduler()
    client = getattr(sched, "__self__", None)
    if client is not None and "Client" in type(client).__name__:
        threads = list(client.nthreads().values()) or [1]
        return "distributed", client, max(1, max(threads))
    if sched is dask.local.get_sync:
        return "sync", None, 1
    if sched is None or sched is dask.threaded.get:
        return "threads", None, int(dask.config.get("num_workers", None) or os.cpu_count() or 1)
    return "other", None, int(dask.config.get("num_workers", None) or os.cpu_count() or 1)


class _compute_context:
    """One BLAS thread per task while local threads run the tasks (they fill the cores)."""

    def __init__(self, kind: str, concurrency: int):
        self.limit = None
        if kind == "threads" and concurrency > 1:
            try:
                from threadpoolctl import threadpool_limits
            except ImportError:  # comes with scikit-learn; without it BLAS is oversubscribed
                return
            self.limit = threadpool_limits(limits=1, user_api="blas")

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        if self.limit is not None:
            self.limit.restore_original_limits()


def _share(shared: _Shared, client: Any) -> Any:
    """One key for the shared arrays: scattered once to a cluster's workers, or a delayed
    object (no hashing of the data) for the local schedulers."""
    import dask

    if client is not None:
        return client.scatter(shared, broadcast=True, hash=False)
    return dask.delayed(shared, name=f"knn-shared-{uuid.uuid4().hex}", traverse=False)


class _Progress:
    def __init__(self, bar: Any, n_rcv: int, total_work: int):
        self.bar, self.n, self.total, self.done, self.told = bar, n_rcv, max(1, total_work), 0, 0

    def add(self, work: int) -> None:
        self.done += work
        self._tell(self.n * self.done // self.total)

    def finish(self) -> None:
        self._tell(self.n)

    def _tell(self, upto: int) -> None:
        if self.bar is not None and upto > self.told:
            self.bar.update(upto - self.told)
        self.told = max(self.told, upto)


# ---------------------------------------------------------------- tile tasks


def _segments(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner, index) of every element of the concatenated ranges lo[i]:hi[i]."""
    counts = hi - lo
    owner = np.repeat(np.arange(lo.size), counts)
    index = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts - lo, counts)
    return owner, index


def _missing_genes(sh: _Shared, rows: slice | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The rows' missing cells: (pair ids, local row of each, genes U missing in any row, index
    of each cell's gene in U)."""
    if isinstance(rows, slice):
        p0, p1 = sh.vox_ptr[rows.start], sh.vox_ptr[rows.stop]
        pairs = np.arange(p0, p1)
        owner = np.searchsorted(sh.vox_ptr[rows.start:rows.stop + 1], pairs, side="right") - 1
    else:
        owner, pairs = _segments(sh.vox_ptr[rows], sh.vox_ptr[rows + 1])
    genes = sh.vox_genes[pairs]
    u, u_idx = np.unique(genes, return_inverse=True)
    return pairs, owner, u, u_idx.reshape(-1)


def _miss_mask(sh: _Shared, genes: np.ndarray, c0: int, c1: int) -> np.ndarray:
    """mask[i, j]: position c0 + j misses genes[i]."""
    mask = np.zeros((genes.size, c1 - c0), dtype=bool)
    if genes.size:
        base = genes * sh.n_vox
        lo = np.searchsorted(sh.key, base + c0)
        hi = np.searchsorted(sh.key, base + c1)
        owner, index = _segments(lo, hi)
        mask[owner, sh.key[index] - base[owner] - c0] = True
    return mask


def _csr_accumulate(n_rows: int, indptr: np.ndarray, indices: np.ndarray, dense: np.ndarray,
                    out: np.ndarray) -> None:
    """out += A @ dense, A the 0/1 CSR (n_rows x dense rows), in place."""
    try:  # accumulates in place (the public product would allocate the result)
        from scipy.sparse._sparsetools import csr_matvecs
    except ImportError:  # pragma: no cover - scipy moved it; the public product (a temporary)
        import scipy.sparse as sp

        a = sp.csr_array((np.ones(indices.size), indices, indptr), shape=(n_rows, dense.shape[0]))
        out += a @ dense
        return
    assert out.flags.c_contiguous and dense.flags.c_contiguous
    csr_matvecs(n_rows, dense.shape[0], dense.shape[1], indptr.astype(np.int64), indices.astype(np.int64),
                np.ones(indices.size), dense.reshape(-1), out.reshape(-1))


def _chunked_csr(owner: np.ndarray, u_idx: np.ndarray, n_rows: int, n_u: int, chunk: int):
    """Per chunk of genes a:b, the CSR (rows x genes a:b) of the cells whose gene is in it."""
    for a in range(0, n_u, chunk):
        b = min(a + chunk, n_u)
        sel = (u_idx >= a) & (u_idx < b)
        if not sel.any():
            continue
        indptr = np.concatenate([[0], np.cumsum(np.bincount(owner[sel], minlength=n_rows))])
        yield a, b, indptr, u_idx[sel] - a


def _distances(sh: _Shared, rows: slice | np.ndarray, c0: int, c1: int):
    """Q = (sum over genes present in both of (x - y)^2) / (genes present in both) between the
    rows (positions) and positions c0:c1; inf or NaN where no gene is present in both.

    Returns (Q, row cells, row mask): Q a (rows x cols) view, row cells from _missing_genes, and
    the mask of the rows' missing genes over the columns."""
    x = sh.scratch
    n_genes = sh.n_genes
    xr = x[:, rows]
    b, t = xr.shape[1], c1 - c0
    work = np.empty((b, 2 * t))
    s, c = work[:, :t], work[:, t:]
    np.matmul(xr.T, x[:, c0:c1], out=s)
    s *= -2.0
    s += sh.sq[rows][:, None]
    s += sh.sq[c0:c1]
    np.subtract(n_genes - sh.n_miss[rows][:, None], sh.n_miss[c0:c1], out=c)

    chunk = max(1, min(512, b))  # genes per sparse product: its dense operand <= 16 bytes per distance
    # the rows' missing genes: minus their squares at the columns, plus genes missing in both
    cells = _missing_genes(sh, rows)
    _, owner, u, u_idx = cells
    mask = _miss_mask(sh, u, c0, c1)
    for a, z, indptr, idx in _chunked_csr(owner, u_idx, b, u.size, chunk):
        dense = np.empty((z - a, 2 * t))
        np.square(x[u[a:z], c0:c1], out=dense[:, :t])
        np.negative(dense[:, :t], out=dense[:, :t])
        dense[:, t:] = mask[a:z]
        _csr_accumulate(b, indptr, idx, dense, work)
    # the columns' missing genes: minus the rows' squares there
    if c0 < sh.n_rcv:
        _, c_owner, cu, cu_idx = _missing_genes(sh, slice(c0, c1))
        if cu.size:
            corr = np.zeros((t, b))
            for a, z, indptr, idx in _chunked_csr(c_owner, cu_idx, t, cu.size, chunk):
                dense = np.square(x[cu[a:z], rows] if isinstance(rows, slice) else x[np.ix_(cu[a:z], rows)])
                _csr_accumulate(t, indptr, idx, dense, corr)
            s -= corr.T
            del corr
    np.maximum(s, 0.0, out=s)
    with np.errstate(divide="ignore", invalid="ignore"):
        np.divide(s, c, out=s)  # no gene in common: inf, or NaN (0 / 0); both never pass a "<"
    return s, cells, mask


def _select(q: np.ndarray, owner: np.ndarray, u_idx: np.ndarray, mask: np.ndarray, offset: int,
            k2: int) -> tuple[np.ndarray, np.ndarray]:
    """For each missing cell (row owner[i] of q, gene u_idx[i] of mask): the k2 smallest q among
    the columns that have the gene, as (positions, values); +inf pads.

    A cell whose gene is missing in h of the columns finds its k2 among the row's h + k2
    nearest columns. So cells are grouped by that depth (rounded up to a power of two, at least
    _TOP); each group's rows are partitioned once to it, and each cell masks its gene's gaps
    within its depth only."""
    n, (nr, nc) = owner.size, q.shape
    pos = np.full((n, k2), -1, dtype=np.int64)
    val = np.full((n, k2), np.inf)
    if n == 0:
        return pos, val
    hits = mask.sum(axis=1)[u_idx]
    depth = np.maximum(_TOP, 1 << np.ceil(np.log2(hits + k2)).astype(np.int64))
    depth = np.minimum(depth, nc)
    kk = min(k2, nc)
    few = np.flatnonzero(4 * (nc - hits) <= nc)  # the gene's gaps cover most columns: take its donors
    for a in range(0, few.size, max(1, nr)):
        sel = few[a:a + nr]
        ci, cc = np.nonzero(~mask[u_idx[sel]])
        counts = np.bincount(ci, minlength=sel.size)
        width = max(1, int(counts.max()))
        rank = np.arange(ci.size) - (np.cumsum(counts) - counts)[ci]
        v = np.full((sel.size, width), np.inf)
        c = np.zeros((sel.size, width), dtype=np.int64)
        v[ci, rank] = q[owner[sel][ci], cc]
        c[ci, rank] = cc
        m = min(kk, width)
        part = np.argpartition(v, m - 1, axis=1)[:, :m] if width > m else np.broadcast_to(np.arange(m), (sel.size, m))
        pos[sel, :m] = np.take_along_axis(c, part, axis=1) + offset
        val[sel, :m] = np.take_along_axis(v, part, axis=1)
    depth[few] = 0
    for d in np.unique(depth[depth > 0]):
        group = np.flatnonzero(depth == d)
        rows, local = np.unique(owner[group], return_inverse=True)
        local = local.reshape(-1)
        sub = q if rows.size == nr else q[rows]
        if d < nc:
            cand = np.argpartition(sub, d - 1, axis=1)[:, :d]
            cval = np.take_along_axis(sub, cand, axis=1)
        else:
            cand = np.broadcast_to(np.arange(nc), (rows.size, nc))
            cval = sub
        step = max(1, (nr * nc) // max(1, d))  # cells per chunk: at most one tile's worth of entries
        for a in range(0, group.size, step):
            sel, lr = group[a:a + step], local[a:a + step]
            c = cand[lr]
            v = cval[lr]  # a copy (fancy index)
            v[mask[u_idx[sel][:, None], c]] = np.inf
            if d > kk:
                part = np.argpartition(v, kk - 1, axis=1)[:, :kk]
            else:
                part = np.broadcast_to(np.arange(d), (sel.size, d))
            pos[sel, :kk] = np.take_along_axis(c, part, axis=1) + offset
            val[sel, :kk] = np.take_along_axis(v, part, axis=1)
    pos[~np.isfinite(val)] = -1
    return pos, val


def _candidates(q: np.ndarray, cells: np.ndarray, owner: np.ndarray, u_idx: np.ndarray, mask: np.ndarray,
                offset: int, k2: int, bound: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cell ids, positions, distances) of the columns of q that may be among each cell's k2
    nearest donors: those nearer than the cell's bound, among its gene's donors.

    Rows whose every cell has a close bound keep few columns: those are taken directly. The
    others (no bound yet, or a loose one) go through _select."""
    nr, nc = q.shape
    if cells.size == 0:
        return cells, np.empty(0, dtype=np.int64), np.empty(0)
    if bound is None:
        bound = np.full(cells.size, np.inf)
    starts = np.searchsorted(owner, np.arange(nr))
    tau = np.maximum.reduceat(bound, starts)  # a row keeps what beats its loosest cell's bound
    near = q < tau[:, None]
    few = near.sum(axis=1) <= _TOP
    out_ids, out_pos, out_val = [], [], []
    if few.any():
        near[~few] = False
        rr, cc = np.nonzero(near)
        del near
        lo = np.searchsorted(rr, np.arange(nr))
        hi = np.searchsorted(rr, np.arange(nr), side="right")
        sel = np.flatnonzero(few[owner])
        which, entry = _segments(lo[owner[sel]], hi[owner[sel]])
        cell = sel[which]
        col = cc[entry]
        val = q[rr[entry], col]
        keep = (val < bound[cell]) & ~mask[u_idx[cell], col]
        out_ids.append(cells[cell[keep]])
        out_pos.append(col[keep] + offset)
        out_val.append(val[keep])
    else:
        del near
    if not few.all():
        rows = np.flatnonzero(~few)
        local = np.full(nr, -1, dtype=np.int64)
        local[rows] = np.arange(rows.size)
        sel = np.flatnonzero(local[owner] >= 0)
        pos, val = _select(q[rows], local[owner[sel]], u_idx[sel], mask, offset, k2)
        keep = val < bound[sel][:, None]
        out_ids.append(np.broadcast_to(cells[sel][:, None], keep.shape)[keep])
        out_pos.append(pos[keep])
        out_val.append(val[keep])
    return np.concatenate(out_ids), np.concatenate(out_pos), np.concatenate(out_val)


def _tile_task(sh: _Shared, i0: int, i1: int, j0: int, j1: int, k2: int, bound_rows: np.ndarray,
               bound_cols: np.ndarray | None) -> list[tuple[np.ndarray, ...]]:
    """Candidates for the missing cells of receivers i0:i1 among positions j0:j1 and, when j0:j1
    is another receiver block, of those receivers among i0:i1. ``bound_*``: each cell's
    (k+1)-th nearest donor distance so far (inf: fewer than k+1 yet)."""
    q, (cells, owner, _, u_idx), mask = _distances(sh, slice(i0, i1), j0, j1)
    out = [_candidates(q, cells, owner, u_idx, mask, j0, k2, bound_rows)]
    del mask
    if j0 != i0 and j0 < sh.n_rcv:
        c_cells, c_owner, cu, cu_idx = _missing_genes(sh, slice(j0, j1))
        qt = np.ascontiguousarray(q.T)
        del q
        c_mask = _miss_mask(sh, cu, i0, i1)
        out.append(_candidates(qt, c_cells, c_owner, cu_idx, c_mask, i0, k2, bound_cols))
    return out


# ---------------------------------------------------------------- merging and the result


def _merge(best_pos: np.ndarray, best_val: np.ndarray, ids: np.ndarray, pos: np.ndarray, val: np.ndarray,
           k2: int) -> None:
    """Keep each cell's k2 nearest among its candidates so far and new (cell, position,
    distance) triples."""
    if ids.size == 0:
        return
    touched = np.unique(ids)
    all_ids = np.concatenate([np.repeat(touched, k2), ids])
    all_val = np.concatenate([best_val[touched].ravel(), val])
    all_pos = np.concatenate([best_pos[touched].ravel(), pos])
    order = np.lexsort((all_val, all_ids))
    all_ids = all_ids[order]
    first = np.searchsorted(all_ids, touched)
    rank = np.arange(all_ids.size) - np.repeat(first, np.diff(np.append(first, all_ids.size)))
    keep = order[rank < k2]  # every touched cell has k2 old entries (inf-padded): k2 kept each
    best_val[touched] = all_val[keep].reshape(-1, k2)
    best_pos[touched] = all_pos[keep].reshape(-1, k2)


def _resolve(best_pos: np.ndarray, best_val: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(donor positions (cells x k, -1 unused), donors per cell, cells whose k-th and (k+1)-th
    nearest tie). Fewer than k finite candidates: all there are (scikit-learn drops the NaN
    distances' donors from its average)."""
    order = np.argsort(best_val, axis=1, kind="stable")
    val = np.take_along_axis(best_val, order, axis=1)
    pos = np.take_along_axis(best_pos, order, axis=1)
    finite = np.isfinite(val)
    count = np.minimum(finite.sum(axis=1), k)
    tied = np.flatnonzero(finite[:, k] & (val[:, k] <= val[:, k - 1] * (1.0 + _TIE_RTOL)))
    donors = np.where(np.arange(k) < count[:, None], pos[:, :k], -1)
    return donors, count, tied


def _exact_task(sh: _Shared, rows: np.ndarray, side: int, k: int) -> dict[int, np.ndarray]:
    """scikit-learn's own choice for the cells of receivers ``rows`` (positions): their whole
    distance rows in its form (sqrt(G * sum / n), NaN when nothing in common) and voxel order,
    each cell's donors picked by ``np.argpartition`` as in ``KNNImputer._calc_impute``.
    Returns {cell: donor positions}."""
    n_vox, n_genes = sh.n_vox, sh.n_genes
    inv = np.empty(n_vox, dtype=np.int64)
    inv[sh.perm] = np.arange(n_vox)
    dist = np.empty((rows.size, n_vox))
    for c0 in range(0, n_vox, side):
        c1 = min(c0 + side, n_vox)
        dist[:, sh.perm[c0:c1]] = _distances(sh, rows, c0, c1)[0]
    dist[~np.isfinite(dist)] = np.nan
    dist *= n_genes
    np.sqrt(dist, out=dist)
    chosen: dict[int, np.ndarray] = {}
    present = np.empty(n_vox, dtype=bool)
    for i, r in enumerate(rows):
        for cell in range(sh.vox_ptr[r], sh.vox_ptr[r + 1]):
            g = int(sh.vox_genes[cell])
            lo, hi = np.searchsorted(sh.key, [g * n_vox, (g + 1) * n_vox])
            present[:] = True
            present[sh.perm[sh.key[lo:hi] - g * n_vox]] = False
            donors = np.flatnonzero(present)
            d = dist[i, donors]
            if donors.size == 0 or np.isnan(d).all():
                chosen[cell] = np.empty(0, dtype=np.int64)
                continue
            nn = min(k, donors.size)
            pick = np.argpartition(d, nn - 1)[:nn]
            pick = pick[~np.isnan(d[pick])]
            chosen[cell] = inv[donors[pick]]
    return chosen


def _averages(values: np.ndarray, genes: np.ndarray, donors: np.ndarray, count: np.ndarray, perm: np.ndarray,
              means: np.ndarray) -> np.ndarray:
    """Each cell's mean over its donors' values of its gene; the gene's mean without donors."""
    out = np.empty(genes.size)
    step = 1 << 16
    for a in range(0, genes.size, step):
        g, d, n = genes[a:a + step], donors[a:a + step], count[a:a + step]
        vals = values[g[:, None], perm[np.maximum(d, 0)]].astype(np.float64)
        vals[d < 0] = 0.0
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = vals.sum(axis=1) / n
        out[a:a + step] = np.where(n > 0, mean, means[g])
    return out
