"""One experiment's conversion, run in a worker process: zip bytes in, MINC files out.

The event loop hands over the raw zip body (cheap to pickle) and gets back
paths and checksums; unzipping, numpy and libminc all happen here, off the loop.
The event-loop process never imports numpy or libminc (a run starts ~70 ms
sooner); the forkserver imports them once for every worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .files import atomic_path

if TYPE_CHECKING:
    from .minc import Written

# What every worker needs, imported once by the forkserver before it forks them.
PRELOAD = ["ambasync.convert", "ambasync.geometry", "ambasync.grid", "ambasync.minc", "pyminc.volumes.factory"]


@dataclass(frozen=True)
class ConvertJob:
    experiment_id: int
    body: bytes
    targets: tuple[tuple[str, str], ...]  # (volume, absolute output path)
    orientation: str
    space: str
    expansion: float
    dtype: str
    max_raw_bytes: int
    cache_dir: str | None = None  # keep the zip here, content-addressed


@dataclass(frozen=True)
class ConvertResult:
    experiment_id: int
    outputs: tuple[tuple[str, Written], ...]  # (volume, written file)
    zip_sha256: str
    zip_size: int


def init_worker(run_pid: int | None = None) -> None:
    """Pool initializer: Ctrl-C belongs to the parent, which stops the run cleanly; and leave
    when the run's process is gone (a ``kill -9`` of it would otherwise leave workers waiting
    forever)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if run_pid is not None:
        threading.Thread(target=_exit_with, args=(run_pid,), daemon=True, name="ambasync-watchdog").start()


def _exit_with(pid: int, period: float = 1.0) -> None:
    while True:
        time.sleep(period)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(1)  # a conversion cut short leaves only a temporary file, swept by the next run
        except PermissionError:
            pass


def cached_zip_path(cache_dir: str | os.PathLike, sha256: str) -> Path:
    return Path(cache_dir) / sha256[:2] / f"{sha256}.zip"


def _keep_zip(cache_dir: str, sha256: str, body: bytes) -> None:
    path = cached_zip_path(cache_dir, sha256)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(body)


def convert(job: ConvertJob) -> ConvertResult:
    """Decode every requested volume first, then write them: a bad zip writes nothing."""
    from .geometry import output_geometry, reorient  # preloaded in workers (see PRELOAD)
    from .grid import read_grid
    from .minc import write_volume

    grids = [(volume, read_grid(job.body, volume, job.max_raw_bytes)) for volume, _ in job.targets]
    written: list[tuple[str, Written]] = []
    try:
        for (volume, grid), (_, target) in zip(grids, job.targets):
            geometry = output_geometry(grid.shape, job.orientation, job.space, job.expansion)
            data = reorient(grid, job.orientation)
            written.append((volume, write_volume(data, geometry, Path(target), job.dtype)))
    except BaseException:
        for _, w in written:  # all volumes of an experiment, or none
            Path(w.path).unlink(missing_ok=True)
        raise
    sha = hashlib.sha256(job.body).hexdigest()
    if job.cache_dir:
        _keep_zip(job.cache_dir, sha, job.body)
    return ConvertResult(job.experiment_id, tuple(written), sha, len(job.body))


def start_forkserver() -> multiprocessing.context.BaseContext:
    """Start the forkserver now (it returns at once; the server imports PRELOAD meanwhile), e.g.
    before the event-loop process has imported aiohttp, so the workers are ready sooner."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    multiprocessing.forkserver.ensure_running()
    return ctx


class ConversionPool:
    """The conversion processes, replaced by fresh ones every ``recycle`` conversions.

    libminc keeps ~2 KB per volume written (a worker grows 42 -> 54 MB over 3,000 files), so
    fresh processes bound memory at atlas scale. The old pool's conversions finish before the
    new one starts, so two pools never hold memory at once. Not ``max_tasks_per_child``: on
    Python 3.11 a worker leaving can be replaced by none (CPython gh-115634) and the run hangs.
    Workers come from a forkserver that has imported numpy and libminc once. Use it from one
    event loop.
    """

    def __init__(self, workers: int, recycle: int = 1000, run_pid: int | None = None):
        self.workers = workers
        self.recycle = recycle
        self._run_pid = run_pid
        self._ctx = start_forkserver()
        self._pool = self._new()
        self._used = 0
        self._ready: asyncio.Future | None = None  # the workers are up

    def _new(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(
            self.workers, mp_context=self._ctx, initializer=init_worker, initargs=(self._run_pid,))

    def pids(self) -> list[int]:
        """Start every worker if need be (blocking) and return their pids."""
        for future in [self._pool.submit(os.getpid) for _ in range(self.workers)]:
            future.result()
        return sorted(self._pool._processes)  # type: ignore[attr-defined]  # each submit spawned one

    def _renew(self, old: concurrent.futures.ProcessPoolExecutor) -> list[int]:
        old.shutdown(wait=True)
        return self.pids()

    def start(self) -> None:
        """Start the workers in a thread (a forkserver start blocks ~0.1 s) and return at once,
        so the loop goes on, e.g. to fetch the first catalogue page."""
        self._ready = asyncio.ensure_future(asyncio.to_thread(self.pids))

    async def submit(self, job: ConvertJob) -> asyncio.Future:
        """Hand ``job`` to a worker once the pool is up; returns the conversion's future."""
        if self._ready is None:
            self.start()
        while not (self._ready.done() and self._used < self.recycle):  # type: ignore[union-attr]
            if self._ready.done():  # type: ignore[union-attr]
                old, self._pool, self._used = self._pool, self._new(), 0
                self._ready = asyncio.ensure_future(asyncio.to_thread(self._renew, old))
            # shared by every caller: one caller's cancellation must not cancel it
            await asyncio.shield(self._ready)  # type: ignore[arg-type]
        self._ready.result()  # type: ignore[union-attr]  # a pool that could not start says why
        self._used += 1
        return asyncio.wrap_future(self._pool.submit(convert, job))

    async def shutdown(self) -> None:
        """Wait for the conversions running now; drop those not started."""
        if self._ready is not None:
            await asyncio.gather(self._ready, return_exceptions=True)
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
