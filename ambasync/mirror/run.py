"""The mirror run: catalogue producer -> bounded queue -> one task per experiment -> process pool.

:class:`Run` owns the lifecycle and nothing else: the lock and the sweep of temporary
files, the signals, the conversion pool, the :class:`AllenSource`, the :class:`Recorder`.
Downloads are at most ``concurrency`` at once (the session's connection limit); a
downloaded zip waits for a conversion slot without holding up the next download. Memory
is bounded by the queue and the slots, never by the catalogue. Every outcome is recorded
as it happens, so a run can be stopped at any moment and the next one picks up where it
left off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sqlite3
import time
from typing import AsyncIterator

from ambasync.config import Config
from ambasync.errors import (
    EXIT_DISK_FULL,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    RunError,
    UpstreamError,
    disk_full,
)
from ambasync.files import sweep_tmp
from ambasync.mirror import early_signals
from ambasync.mirror.catalog import InvalidRow, Item, Row, Total
from ambasync.mirror.decide import Action, Policy
from ambasync.mirror.experiment import mirror_one, unexpected
from ambasync.mirror.formats.outputs import Outputs
from ambasync.mirror.lock import OutputLock, layout_for
from ambasync.mirror.manifest import write_manifest
from ambasync.mirror.metrics import render, textfile_path, write_textfile
from ambasync.mirror.options import RunOptions
from ambasync.mirror.outcome import Job
from ambasync.mirror.outdir import check_output_folder
from ambasync.mirror.plan import decisions
from ambasync.mirror.pool import ConversionPool, Converter
from ambasync.mirror.rebuild import recover_state
from ambasync.mirror.recorder import Recorder
from ambasync.mirror.report import Progress, Summary, write_report
from ambasync.mirror.selection import Selection, selected
from ambasync.mirror.source import AllenSource
from ambasync.mirror.state import State
from ambasync.mirror.stop import Stop
from ambasync.paths import Paths
from ambasync.settings import ConvertSettings

log = logging.getLogger("ambasync")

# Conversions per worker before the pool is replaced by fresh processes (see ConversionPool).
WORKER_TASKS = 500


class Run:
    def __init__(self, cfg: Config, opts: RunOptions | None = None):
        self.cfg = cfg
        self.opts = opts or RunOptions()
        self.paths = Paths.for_config(cfg)
        self.summary = Summary()
        self.progress = Progress(self.summary, cfg.pipeline.progress_interval, self.opts.quiet)
        self.stop = Stop(self.summary)
        self.settings = ConvertSettings.from_config(cfg)
        self.outputs = Outputs.for_config(cfg, self.paths)
        self.selection = Selection.for_config(cfg)
        self.policy = Policy.for_run(cfg, self.opts, self.paths)
        self.catalogue_complete = False
        self.interrupted = False  # SIGINT/SIGTERM: stop now
        self._tasks: list[asyncio.Task] = []  # producer and dispatcher
        self._jobs: set[asyncio.Task] = set()  # one per experiment in flight
        self.report_path = self.paths.report(self.summary.started)

    async def run(self) -> Summary:
        out = check_output_folder(self.paths.out, create=True)
        loop = asyncio.get_running_loop()
        for sig in early_signals.SIGNALS:  # from here on a signal stops the run cleanly
            loop.add_signal_handler(sig, self._on_signal, sig)
        if (noted := early_signals.take()) is not None:  # came while ambasync was starting
            self._on_signal(noted)
        try:
            with OutputLock(self.paths.lock, layout=layout_for(self.cfg.shard)) as lock:
                roots = [out] + ([] if self.paths.zips.is_relative_to(out) else [self.paths.zips])
                swept = lock.if_alone(lambda: sum(sweep_tmp(d) for d in roots if d.is_dir()))
                if swept:
                    log.info("removed %d temporary files left by an interrupted run", swept)
                elif swept is None:
                    log.info("another run (shard) uses %s: its temporary files are left alone", out)
                recovery = recover_state(self.paths.state, self.paths.manifest, out, self.settings.key())
                if recovery is not None:
                    log.warning("%s", recovery.text())
                    self.summary.state_recovery = recovery.to_dict()
                self.outputs.begin(self.opts.force)  # e.g. the cube: refused here if made with other settings
                state = State(self.paths.state)
                run_id = state.start_run()
                recorder = Recorder(state, run_id, self.settings.key(), out, self.summary, self.progress, self.outputs)
                source = AllenSource.for_config(self.cfg)
                try:
                    if not self.stop.requested:
                        await self._mirror(source, recorder)
                finally:
                    await self._finish(source, recorder)
                try:
                    await write_report(self.summary, self.report_path)
                except OSError as exc:
                    log.error("could not write the run report: %s", exc)
                try:
                    write_textfile(textfile_path(self.paths.reports, self.paths.suffix),
                                   render(self.summary, self.cfg.shard))
                except OSError as exc:
                    log.error("could not write the metrics textfile: %s", exc)
                # A stop (full disk, signal) can cut a conversion short in a worker, leaving its
                # temporary file; with no other shard running, nothing is left half-written.
                lock.if_alone(lambda: sum(sweep_tmp(d) for d in roots if d.is_dir()))
        finally:
            for sig in early_signals.SIGNALS:
                loop.remove_signal_handler(sig)
            self.progress.close()
        return self.summary

    async def _mirror(self, source: AllenSource, recorder: Recorder) -> None:
        cfg = self.cfg
        pool = ConversionPool(cfg.workers, WORKER_TASKS * cfg.workers, os.getpid())
        pool.start()  # while the first catalogue page is on its way, not on the first grid
        in_flight = cfg.pipeline.conversions_in_flight or 2 * cfg.workers
        converter = Converter(pool, self.paths.out, self.settings, in_flight, cfg.convert.max_raw_bytes,
                              self.paths.zips if cfg.output.keep_zips else None)
        queue: asyncio.Queue[Job | None] = asyncio.Queue(maxsize=cfg.pipeline.queue_size)
        ticker = asyncio.create_task(self.progress.ticking())
        try:
            async with source:
                self._tasks = [asyncio.create_task(self._produce(source, recorder, queue)),
                               asyncio.create_task(self._dispatch(queue, source, converter, recorder,
                                                                  cfg.download.concurrency + in_flight))]
                try:
                    await self._tasks[0]
                    await queue.put(None)
                    await self._tasks[1]
                except asyncio.CancelledError:
                    if not self.stop.requested:
                        raise
                    await asyncio.gather(*self._tasks, *self._jobs, return_exceptions=True)
        finally:
            ticker.cancel()
            # Conversions already running finish (milliseconds); queued ones are dropped.
            await pool.shutdown()

    async def _produce(self, source: AllenSource, recorder: Recorder, queue: asyncio.Queue[Job | None]) -> None:
        rows = self._seen(selected(source.catalogue(self.cfg.planes), self.selection), recorder)
        try:
            async with contextlib.aclosing(decisions(rows, recorder.state.get, self.outputs, self.settings.key(),
                                                     self.policy)) as items:
                async for plane, item in items:
                    if self.stop.requested:
                        return
                    if isinstance(item, Total):
                        self.progress.catalogue_total(plane, item.rows, self.selection.limit)
                    elif isinstance(item, InvalidRow):
                        recorder.invalid(item, plane)
                    elif item.verdict.action in (Action.SKIP, Action.QUARANTINE):
                        self.progress.count(item.verdict.action.value)
                    else:
                        await queue.put(Job(item.row, item.targets, item.record, item.verdict.cached_zip))
            self.catalogue_complete = self.selection.complete()
        except UpstreamError as exc:
            self.stop.request(exc.exit_code, str(exc))
        finally:
            recorder.state.commit()

    async def _seen(self, items: AsyncIterator[tuple[str, Item]], recorder: Recorder
                    ) -> AsyncIterator[tuple[str, Item]]:
        """Every row recorded as seen before it is decided (the state then knows the catalogue's
        rows even if the run stops before reaching them); nothing more once a stop is asked."""
        async with contextlib.aclosing(items) as rows:
            async for plane, item in rows:
                if self.stop.requested:
                    return
                if isinstance(item, Row):
                    recorder.seen(item, plane)
                yield plane, item

    async def _dispatch(self, queue: asyncio.Queue[Job | None], source: AllenSource, converter: Converter,
                        recorder: Recorder, slots: int) -> None:
        """One task per job, at most ``slots`` at once: a job whose zip is downloaded waits for a
        conversion slot without holding up the next download (the connector caps connections)."""
        free = asyncio.Semaphore(slots)
        while not self.interrupted:  # interrupted: tasks were cancelled; nobody feeds the queue any more
            job = await queue.get()
            if job is None:
                break
            if self.stop.requested:
                continue  # stopping: drain without working, so the producer never blocks
            await free.acquire()
            task = asyncio.create_task(self._one(job, source, converter, recorder))
            self._jobs.add(task)
            task.add_done_callback(lambda t: self._job_finished(t, free))
        await asyncio.gather(*self._jobs, return_exceptions=True)

    async def _one(self, job: Job, source: AllenSource, converter: Converter, recorder: Recorder) -> None:
        outcome = await mirror_one(self.outputs.before_submit(job), source, converter)
        error = recorder.apply(outcome)
        if error is not None:
            self.stop.request(error.exit_code, str(error))

    def _job_finished(self, task: asyncio.Task, free: asyncio.Semaphore) -> None:
        self._jobs.discard(task)
        free.release()
        exc = None if task.cancelled() else task.exception()
        if exc is not None:  # an output format's hook failed: a bug
            error = unexpected(exc)
            self.stop.request(error.exit_code, str(error))

    def _on_signal(self, signum: int) -> None:
        code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM
        self.stop.request(code, f"interrupted by {signal.Signals(signum).name}")
        self.interrupted = True
        for task in [*self._tasks, *self._jobs]:
            task.cancel()

    async def _finish(self, source: AllenSource, recorder: Recorder) -> None:
        s, state = self.summary, recorder.state
        complete = self.catalogue_complete and not self.stop.requested and not self.selection.filtered
        s.requests, s.bytes_downloaded = source.grid_requests, source.bytes_downloaded
        s.finished = time.time()
        s.exit_code = EXIT_FAILED if s.failed else EXIT_OK
        if self.stop.code is not None:
            s.exit_code = self.stop.code
        try:
            if complete:
                recorder.vanished(self.cfg.planes, self.opts.prune)
            try:
                if not self.interrupted:  # a signal wants the run gone now; the next run publishes
                    self.outputs.at_end(state, complete, self.opts.prune)
            except RunError as exc:  # e.g. disk full while publishing the cube: the previous one stays readable
                log.error("%s", exc)
                s.error, s.exit_code = str(exc), exc.exit_code
            state.commit()
            await write_manifest(state, self.paths.manifest)
            state.finish_run(recorder.run_id, s.exit_code, {k: v for k, v in s.to_dict().items() if k != "failures"})
        except (OSError, sqlite3.Error) as exc:  # the state itself stays consistent: it is transactional
            log.error("could not write the manifest or close the run record: %s", exc)
            if disk_full(exc):
                s.exit_code = EXIT_DISK_FULL
            elif s.exit_code == EXIT_OK:
                s.exit_code = EXIT_FAILED
        finally:
            state.close()


async def mirror_async(cfg: Config, opts: RunOptions | None = None) -> Summary:
    """One mirror pass (or a dry run) in the running event loop; returns its summary."""
    opts = opts or RunOptions()
    if opts.dry_run:
        from ambasync.mirror.dryrun import dry_run

        return await dry_run(cfg, opts)
    return await Run(cfg, opts).run()


def install_uvloop(enabled: bool) -> bool:
    if not enabled:
        return False
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def run_mirror(cfg: Config, opts: RunOptions | None = None) -> Summary:
    """Run one mirror pass to completion (or until stopped) and return its summary."""
    install_uvloop(cfg.pipeline.uvloop)
    return asyncio.run(mirror_async(cfg, opts))
