"""The mirror run: catalogue producer -> bounded queue -> download tasks -> process pool.

Downloads are at most ``concurrency`` at once (the session's connection limit);
a downloaded zip waits for one of the conversion slots without holding up the
next download. Memory is bounded by the queue size, the download and conversion
slots (one zip each), never by the catalogue. Every outcome is written to the
state as it happens, so a run can be stopped at any moment and the next one
picks up where it left off.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import signal
import sqlite3
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiofiles
import aiohttp

from . import catalog
from .catalog import InvalidRow, Row
from .config import Config
from .convert import ConversionPool, ConvertJob, ConvertResult, cached_zip_path
from .errors import (
    EXIT_DISK_FULL, EXIT_FAILED, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM, ExperimentError, PermanentError, RunError,
    UpstreamError, disk_full,
)
from .fetch import Throttle, get_bytes, make_session, with_retries
from .lock import OutputLock
from .files import atomic_path, sha256_file, sweep_tmp
from .names import output_name
from .report import Progress, Summary, log
from .state import MANIFEST_EXTRA, Output, Record, State

ZIP_SIZE_ESTIMATE = 390_000  # bytes, a typical real grid zip (for --dry-run estimates)
MAX_FAILURES_IN_REPORT = 1000
# Conversions per worker before the pool is replaced by fresh processes (see ConversionPool).
WORKER_TASKS = 500


@dataclass
class RunOptions:
    force: bool = False  # redo everything
    verify: bool = False  # check sha256 of done files before skipping them
    prune: bool = False  # delete files of experiments the catalogue no longer lists
    dry_run: bool = False  # say what would be fetched; write nothing
    retry_failed: bool = False  # retry permanent failures and quarantined experiments too
    quiet: bool = False


@dataclass
class Job:
    row: Row
    targets: tuple[tuple[str, str], ...]  # (volume, path relative to the output folder)
    previous: Record | None = None  # what the state held before this run
    cached_zip: Path | None = None  # re-convert from the zip cache instead of downloading


@dataclass(frozen=True)
class Paths:
    """Where a run keeps things; sharded runs keep their own state, lock and manifest."""

    out: Path
    suffix: str = ""

    @property
    def meta(self) -> Path:
        return self.out / ".ambasync"

    @property
    def state(self) -> Path:
        return self.meta / f"state{self.suffix}.sqlite"

    @property
    def manifest(self) -> Path:
        return self.out / f"manifest{self.suffix}.csv"

    @property
    def lock(self) -> Path:
        return self.meta / f"lock{self.suffix}"

    @property
    def reports(self) -> Path:
        return self.out / "reports"

    @classmethod
    def for_config(cls, cfg: Config) -> "Paths":
        shard = cfg.shard
        return cls(Path(cfg.output.out), f"-shard{shard[0]}of{shard[1]}" if shard else "")


def targets_for(cfg: Config, row: Row, plane: str) -> tuple[tuple[str, str], ...]:
    """(volume, path relative to the output folder) of each file of an experiment, sorted as the state's."""
    return tuple(sorted(
        (volume, f"{plane}/{output_name(cfg.convert.name_template, row.gene, row.experiment_id, plane, volume)}")
        for volume in cfg.convert.volumes
    ))


def sizes_match(rec: Record, out: Path) -> bool:
    """Cheap check that a done experiment's files are still there, whole."""
    try:
        return all((out / o.path).stat().st_size == o.size for o in rec.outputs)
    except OSError:
        return False


def checksums_match(rec: Record, out: Path) -> bool:
    """Thorough check (reads every file): run it in a thread."""
    try:
        return all(sha256_file(out / o.path) == o.sha256 for o in rec.outputs)
    except OSError:
        return False


async def write_manifest(state: State, path: Path) -> int:
    """Export the state as CSV (readable with pandas), atomically: temporary file, then rename.
    Written through aiofiles in pieces, so neither the loop nor memory grows with the catalogue."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, [*catalog.COLUMNS, *MANIFEST_EXTRA])
    writer.writeheader()
    count = 0
    with atomic_path(path) as tmp:
        async with aiofiles.open(tmp, "w", newline="", encoding="utf-8") as fh:
            for row in state.manifest_rows():
                writer.writerow(row)
                count += 1
                if count % 2000 == 0:
                    await fh.write(buf.getvalue())
                    buf.seek(0)
                    buf.truncate()
            await fh.write(buf.getvalue())
    return count


class Pipeline:
    def __init__(self, cfg: Config, opts: RunOptions | None = None):
        self.cfg = cfg
        self.opts = opts or RunOptions()
        self.paths = Paths.for_config(cfg)
        self.out = self.paths.out
        self.summary = Summary()
        self.progress = Progress(self.summary, cfg.pipeline.progress_interval, self.opts.quiet)
        self.settings = cfg.settings_key()
        self.state: State | None = None
        self.run_id = 0
        self.stop_code: int | None = None  # set when the run must stop early
        self.interrupted = False  # SIGINT/SIGTERM: stop now
        self.catalogue_complete = False
        self._tasks: list[asyncio.Task] = []  # producer and dispatcher
        self._jobs: set[asyncio.Task] = set()  # one per experiment in flight
        self.report_path: Path | None = None
        self._folders: set[str] = set()  # output folders (relative) known to exist

    # -- decisions ------------------------------------------------------------
    async def decide(self, row: Row, plane: str) -> tuple[str, Job | None]:
        """'fetch' (with a job), or why not: 'skipped' (up to date) / 'quarantined'."""
        targets = targets_for(self.cfg, row, plane)
        rec = self.state.get(row.experiment_id) if self.state else None
        job = Job(row, targets, rec)
        if self.opts.force or rec is None:
            return "fetch", job
        if rec.status == "done":
            have = tuple((o.volume, o.path) for o in rec.outputs)  # sorted by volume, as targets
            if rec.settings == self.settings and targets == have and sizes_match(rec, self.out):
                if not self.opts.verify or await asyncio.to_thread(checksums_match, rec, self.out):
                    return "skipped", None
            if self.cfg.output.keep_zips and rec.zip_sha256:
                cached = cached_zip_path(self.cache_dir, rec.zip_sha256)
                if cached.is_file():
                    job.cached_zip = cached
            return "fetch", job
        if rec.status == "failed" and not self.opts.retry_failed:
            if not rec.transient or rec.failed_runs >= self.cfg.download.quarantine_after:
                return "quarantined", None
        return "fetch", job

    @property
    def cache_dir(self) -> Path:
        return Path(self.cfg.output.cache_dir) if self.cfg.output.cache_dir else self.paths.meta / "zips"

    # -- producer -------------------------------------------------------------
    def _wanted(self, row: Row) -> bool:
        src = self.cfg.source
        if src.genes and row.gene not in src.genes:
            return False
        if src.experiment_ids and row.experiment_id not in src.experiment_ids:
            return False
        shard = self.cfg.shard
        return shard is None or row.experiment_id % shard[1] == shard[0]

    async def produce(self, session: aiohttp.ClientSession, queue: asyncio.Queue, throttle: Throttle) -> None:
        seen: set[int] = set()
        taken = 0
        limit = self.cfg.source.limit
        totals: dict[str, int] = {}

        def on_total(plane: str, n: int) -> None:
            totals[plane] = n
            self.summary.catalogue_rows = sum(totals.values())
            self.progress.set_total(min(limit, self.summary.catalogue_rows) if limit else self.summary.catalogue_rows)

        streams = {plane: catalog.iter_rows(session, self.cfg, plane, throttle, lambda n, p=plane: on_total(p, n))
                   for plane in self.cfg.planes}
        try:
            async with contextlib.AsyncExitStack() as stack:
                # Planes merged in experiment-id order, so --limit N takes the first N ids of all of them.
                merged = catalog.merge_by_id(streams)
                for stream in (*streams.values(), merged):  # closed last to first
                    stack.push_async_callback(stream.aclose)
                async for plane, row in merged:
                    if self.stop_code is not None:
                        return
                    if isinstance(row, InvalidRow):
                        self._invalid(row, plane)
                        continue
                    if row.experiment_id in seen:  # upstream repeats rows (seen: 78153149)
                        continue
                    seen.add(row.experiment_id)
                    if not self._wanted(row):
                        continue
                    if limit and taken >= limit:
                        return
                    taken += 1
                    if self.state and not self.opts.dry_run:
                        self.state.seen(row.experiment_id, row.gene, plane, row.fields, self.run_id)
                    verdict, job = await self.decide(row, plane)
                    if job is None:
                        self.progress.count(verdict)
                    elif self.opts.dry_run:
                        self.summary.would_fetch += 1
                    else:
                        await queue.put(job)
                    if taken % 200 == 0 and self.state and not self.opts.dry_run:
                        self.state.commit()
            self.catalogue_complete = not limit or taken < limit
        except UpstreamError as exc:
            self._stop(exc.exit_code, str(exc))
        finally:
            if self.state and not self.opts.dry_run:
                self.state.commit()

    def _invalid(self, row: InvalidRow, plane: str) -> None:
        eid = row.fields.get("experiment_id")
        log.warning("invalid catalogue row skipped: %s", row.reason, extra={"experiment_id": eid})
        self.progress.count("invalid")
        if isinstance(eid, int) and self.state and not self.opts.dry_run:
            self.state.mark_invalid(eid, str(row.fields.get("gene") or ""), plane, row.fields, self.run_id, row.reason)

    # -- workers --------------------------------------------------------------
    async def dispatch(self, queue: asyncio.Queue, session: aiohttp.ClientSession, throttle: Throttle,
                       pool: ConversionPool, conversions: asyncio.Semaphore, slots: int) -> None:
        """One task per job, at most ``slots`` at once: a job whose zip is downloaded waits for a
        conversion slot without holding up the next download (the connector caps connections)."""
        free = asyncio.Semaphore(slots)
        while not self.interrupted:  # interrupted: tasks were cancelled; nobody feeds the queue any more
            job = await queue.get()
            if job is None:
                break
            if self.stop_code is not None:
                continue  # stopping: drain without working, so the producer never blocks
            await free.acquire()
            task = asyncio.create_task(self.handle(job, session, throttle, pool, conversions))
            self._jobs.add(task)
            task.add_done_callback(lambda t: self._job_finished(t, free))
        await asyncio.gather(*self._jobs, return_exceptions=True)

    def _job_finished(self, task: asyncio.Task, free: asyncio.Semaphore) -> None:
        self._jobs.discard(task)
        free.release()
        exc = None if task.cancelled() else task.exception()
        if exc is not None:  # not an experiment's failure: a bug, or the file system refusing
            log.error("unexpected error", exc_info=exc)
            self._stop(EXIT_DISK_FULL if disk_full(exc) else EXIT_FAILED, f"{type(exc).__name__}: {exc}")

    async def handle(self, job: Job, session: aiohttp.ClientSession, throttle: Throttle,
                     pool: ConversionPool, conversions: asyncio.Semaphore) -> None:
        row = job.row
        url = catalog.grid_url(self.cfg.source.base_url, row.experiment_id, tuple(self.cfg.convert.volumes))
        attempts = 0
        meta: dict[str, Any] = {}

        async def convert_body(body: bytes) -> ConvertResult:
            c = self.cfg.convert
            task = ConvertJob(
                row.experiment_id, body, tuple((v, os.path.join(self.out, rel)) for v, rel in job.targets),
                c.orientation, c.space, c.expansion, c.dtype, c.max_raw_bytes,
                str(self.cache_dir) if self.cfg.output.keep_zips else None,
            )
            async with conversions:
                try:
                    future = await pool.submit(task)
                    try:
                        return await asyncio.shield(future)
                    except asyncio.CancelledError:
                        if self.stop_code is None:
                            raise
                        # Stopping: this conversion is already writing its file; let it finish
                        # (milliseconds) so the file is recorded rather than orphaned.
                        return await future
                except (ExperimentError, RunError):
                    raise
                except BrokenProcessPool as exc:
                    raise RunError(f"the conversion process pool broke ({exc}); run again") from None
                except Exception as exc:  # libminc or numpy refused the data: say so, per experiment
                    raise PermanentError(f"conversion failed: {type(exc).__name__}: {exc}") from None

        async def attempt() -> ConvertResult:
            nonlocal attempts
            attempts += 1
            self.summary.requests += 1
            resp = await get_bytes(session, url, self.cfg.download.max_zip_bytes, throttle)
            self.summary.bytes_downloaded += len(resp.body)
            meta.update(last_modified=resp.last_modified, etag=resp.etag)
            return await convert_body(resp.body)

        for folder in {rel.rsplit("/", 1)[0] for _, rel in job.targets} - self._folders:
            (self.out / folder).mkdir(parents=True, exist_ok=True)
            self._folders.add(folder)
        try:
            result = None
            if job.cached_zip is not None:
                try:
                    async with aiofiles.open(job.cached_zip, "rb") as fh:
                        result = await convert_body(await fh.read())
                except (OSError, ExperimentError) as exc:
                    log.info("experiment %s: cached zip unusable (%s); downloading", row.experiment_id, exc)
            if result is None:
                result = await with_retries(attempt, self.cfg.download, f"experiment {row.experiment_id}")
        except ExperimentError as exc:
            try:
                self._failed(job, url, exc, attempts)
            except sqlite3.Error as db_exc:
                self._state_broke(db_exc)
            return
        except RunError as exc:
            self._stop(exc.exit_code, str(exc))
            return
        try:
            self._done(job, result, attempts, meta)
        except sqlite3.Error as exc:
            self._state_broke(exc)

    def _state_broke(self, exc: sqlite3.Error) -> None:
        """The state cannot be written: stop the run (most likely the disk is full)."""
        full = disk_full(exc)
        self._stop(EXIT_DISK_FULL if full else EXIT_FAILED, f"cannot write the state {self.paths.state}: {exc}"
                   + ("; free space, then run again" if full else ""))

    def _done(self, job: Job, result: ConvertResult, attempts: int, meta: dict[str, Any]) -> None:
        assert self.state is not None
        old = job.previous
        rel = dict(job.targets)
        outputs = [Output(v, rel[v], w.sha256, w.size) for v, w in result.outputs]
        self.state.mark_done(job.row.experiment_id, outputs, self.settings, attempts, result.zip_sha256,
                             result.zip_size, meta.get("last_modified"), meta.get("etag"))
        keep = {o.path for o in outputs}
        for stale in (old.outputs if old else []):  # renamed gene, changed template or volumes
            if stale.path not in keep:
                (self.out / stale.path).unlink(missing_ok=True)
        self.summary.bytes_written += sum(o.size for o in outputs)
        self.progress.count("done")

    def _failed(self, job: Job, url: str, exc: ExperimentError, attempts: int) -> None:
        assert self.state is not None
        row, prev = job.row, job.previous
        if prev is not None and prev.status == "done" and sizes_match(prev, self.out):
            # A refresh (--force, new settings, --verify) failed: the files from before are still
            # good, so keep them and their record, and note the error.
            self.state.note_error(row.experiment_id, exc.reason, exc.transient, attempts)
        else:
            for o in (prev.outputs if prev else []):
                (self.out / o.path).unlink(missing_ok=True)  # a failed experiment keeps no file
            self.state.mark_failed(row.experiment_id, exc.reason, exc.transient, attempts, self.run_id)
        kind = "transient" if exc.transient else "permanent"
        log.error("experiment %s (%s) failed: %s [%s, %s]", row.experiment_id, row.gene, exc.reason, url, kind,
                  extra={"experiment_id": row.experiment_id, "gene": row.gene, "url": url, "reason": exc.reason})
        if len(self.summary.failures) < MAX_FAILURES_IN_REPORT:
            self.summary.failures.append(
                {"experiment_id": row.experiment_id, "gene": row.gene, "url": url, "reason": exc.reason, "kind": kind})
        self.progress.count("failed")

    def _stop(self, code: int, reason: str) -> None:
        if self.stop_code is None or code in (EXIT_SIGINT, EXIT_SIGTERM):
            self.stop_code = code
            self.summary.error = reason
        log.error("stopping: %s", reason)

    def on_signal(self, signum: int) -> None:
        code = EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM
        self._stop(code, f"interrupted by {signal.Signals(signum).name}")
        self.interrupted = True
        for task in [*self._tasks, *self._jobs]:
            task.cancel()

    # -- the run --------------------------------------------------------------
    def _handle_vanished(self) -> None:
        src = self.cfg.source
        if not self.catalogue_complete or self.stop_code is not None or src.genes or src.experiment_ids:
            return
        assert self.state is not None
        for rec in self.state.vanished(self.run_id, self.cfg.planes):
            self.summary.vanished += 1
            if self.opts.prune:
                for o in rec.outputs:
                    (self.out / o.path).unlink(missing_ok=True)
                self.state.forget(rec.experiment_id)
                self.summary.pruned += 1
            else:
                log.warning("experiment %s (%s) is no longer in the catalogue; --prune removes its files",
                            rec.experiment_id, rec.gene)

    async def _ticker(self) -> None:
        period = min(1.0, self.cfg.pipeline.progress_interval / 2)
        while True:
            await asyncio.sleep(period)
            self.progress.tick()

    async def run(self) -> Summary:
        if self.opts.dry_run:
            return await self._dry_run()
        self.out.mkdir(parents=True, exist_ok=True)
        lock = OutputLock(self.paths.lock)
        lock.acquire()
        try:
            roots = [self.out] + ([] if self.cache_dir.is_relative_to(self.out) else [self.cache_dir])
            swept = lock.if_alone(lambda: sum(sweep_tmp(d) for d in roots if d.is_dir()))
            if swept:
                log.info("removed %d temporary files left by an interrupted run", swept)
            elif swept is None:
                log.info("another run (shard) uses %s: its temporary files are left alone", self.out)
            self.state = State(self.paths.state)
            self.run_id = self.state.start_run()
            try:
                await self._mirror()
            finally:
                await self._finish()
            try:
                await self._write_report()
            except OSError as exc:
                log.error("could not write the run report: %s", exc)
        finally:
            lock.release()
            self.progress.close()
        return self.summary

    async def _mirror(self) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.on_signal, sig)
        pool = ConversionPool(cfg.workers, WORKER_TASKS * cfg.workers, os.getpid())
        pool.start()  # while the first catalogue page is on its way, not on the first grid
        in_flight = cfg.pipeline.conversions_in_flight or 2 * cfg.workers
        conversions = asyncio.Semaphore(in_flight)
        queue: asyncio.Queue = asyncio.Queue(maxsize=cfg.pipeline.queue_size)
        throttle = Throttle(cfg.download.requests_per_second)
        ticker = asyncio.create_task(self._ticker())
        try:
            async with make_session(cfg.download, cfg.source.base_url) as session:
                producer = asyncio.create_task(self.produce(session, queue, throttle))
                dispatcher = asyncio.create_task(self.dispatch(queue, session, throttle, pool, conversions,
                                                               cfg.download.concurrency + in_flight))
                self._tasks = [producer, dispatcher]
                try:
                    await producer
                    await queue.put(None)
                    await dispatcher
                except asyncio.CancelledError:
                    if self.stop_code is None:
                        raise
                    await asyncio.gather(*self._tasks, *self._jobs, return_exceptions=True)
        finally:
            ticker.cancel()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            # Conversions already running finish (milliseconds); queued ones are dropped.
            await pool.shutdown()

    async def _finish(self) -> None:
        assert self.state is not None
        s = self.summary
        if self.stop_code is None:
            self._handle_vanished()
        s.finished = time.time()
        s.exit_code = self.stop_code if self.stop_code is not None else (EXIT_FAILED if s.failed else EXIT_OK)
        try:
            self.state.commit()
            await write_manifest(self.state, self.paths.manifest)
            self.state.finish_run(self.run_id, s.exit_code, {k: v for k, v in s.to_dict().items() if k != "failures"})
        except (OSError, sqlite3.Error) as exc:  # the state itself stays consistent: it is transactional
            log.error("could not write the manifest or close the run record: %s", exc)
            if disk_full(exc):
                s.exit_code = EXIT_DISK_FULL
            elif s.exit_code == EXIT_OK:
                s.exit_code = EXIT_FAILED
        finally:
            self.state.db.close()

    async def _write_report(self) -> None:
        """The run's summary as JSON in {out}/reports/ (via aiofiles: the loop never blocks on disk)."""
        self.paths.reports.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(self.summary.started))
        path = self.paths.reports / f"run-{stamp}{self.paths.suffix}.json"
        with atomic_path(path) as tmp:
            async with aiofiles.open(tmp, "w", encoding="utf-8") as fh:
                await fh.write(json.dumps(self.summary.to_dict(), indent=2, ensure_ascii=False))
        self.report_path = path

    async def _dry_run(self) -> Summary:
        if self.paths.state.is_file():
            self.state = State(self.paths.state, readonly=True)
        throttle = Throttle(self.cfg.download.requests_per_second)
        try:
            async with make_session(self.cfg.download, self.cfg.source.base_url) as session:
                await self.produce(session, asyncio.Queue(), throttle)
        finally:
            if self.state:
                self.state.db.close()
        self.summary.finished = time.time()
        self.summary.exit_code = self.stop_code or EXIT_OK
        return self.summary


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
    pipeline = Pipeline(cfg, opts)
    return asyncio.run(pipeline.run())
