"""The conversion processes and the event loop's handle on them.

:class:`ConversionPool` owns the worker processes (forkserver, recycling);
:class:`Converter` is what an experiment calls: zip bytes in, :class:`ConvertResult` out,
at most ``in_flight`` conversions at once, every failure classified.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from ambasync.errors import ExperimentError, PermanentError, RunError
from ambasync.mirror.convert import ConvertJob, ConvertResult, convert
from ambasync.settings import ConvertSettings
from ambasync.target import Target
from ambasync.workers import init_worker, start_forkserver


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


class Converter:
    """The event loop's side of conversion for one run: folders made once, a bounded number of
    conversions in flight (a downloaded zip waits here without holding up the next download)."""

    def __init__(self, pool: ConversionPool, out: Path, settings: ConvertSettings, in_flight: int,
                 max_raw_bytes: int, cache_dir: Path | None):
        self._pool = pool
        self._out = out
        self._settings = settings
        self._slots = asyncio.Semaphore(in_flight)
        self._max_raw_bytes = max_raw_bytes
        self._cache_dir = str(cache_dir) if cache_dir is not None else None
        self._folders: set[str] = set()  # output folders (relative) known to exist

    def _make_folders(self, targets: tuple[Target, ...]) -> None:
        for folder in {t.path.rsplit("/", 1)[0] for t in targets if "/" in t.path} - self._folders:
            (self._out / folder).mkdir(parents=True, exist_ok=True)  # an OSError here stops the run
            self._folders.add(folder)

    async def convert(self, experiment_id: int, body: bytes, targets: tuple[Target, ...]) -> ConvertResult:
        """Raises :class:`ExperimentError` for this experiment's data, :class:`RunError` when
        the run must stop (disk full, a broken pool)."""
        self._make_folders(targets)
        job = ConvertJob(experiment_id, body, str(self._out), targets, self._settings, self._max_raw_bytes,
                         self._cache_dir)
        async with self._slots:
            try:
                future = await self._pool.submit(job)
                try:
                    return await asyncio.shield(future)
                except asyncio.CancelledError:
                    # The run is stopping: this conversion is already writing its files; let it
                    # finish (milliseconds) so they are recorded rather than orphaned.
                    return await future
            except (ExperimentError, RunError):
                raise
            except BrokenProcessPool as exc:
                raise RunError(f"the conversion process pool broke ({exc}); run again") from None
            except Exception as exc:  # libminc or numpy refused the data: say so, per experiment
                raise PermanentError(f"conversion failed: {type(exc).__name__}: {exc}") from None
