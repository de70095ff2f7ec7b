"""One experiment mirrored: its zip (from the cache, or downloaded with retries) converted
into its outputs. Returns an Outcome; never touches the state, the summary or the run."""

from __future__ import annotations

import logging
from dataclasses import replace

import aiofiles

from ambasync.errors import DiskFullError, ExperimentError, RunError, disk_full
from ambasync.mirror.convert import ConvertResult
from ambasync.mirror.fetch import retrying
from ambasync.mirror.outcome import Done, Failed, Fatal, Job, Outcome
from ambasync.mirror.pool import Converter
from ambasync.mirror.record import Output
from ambasync.mirror.source import AllenSource, Download

log = logging.getLogger("ambasync")


def _done(job: Job, result: ConvertResult, download: Download | None, attempts: int) -> Done:
    # The state records files; an output inside a shared store (an index) is the store's to record.
    outputs = tuple(Output(t.volume, t.path, w.sha256, w.size) for t, w in result.outputs if t.index is None)
    return Done(job, outputs, attempts, result.zip_sha256, result.zip_size,
                download.last_modified if download else None, download.etag if download else None,
                result.outputs)


async def _from_cache(job: Job, converter: Converter) -> Done | None:
    """Re-convert from the kept zip; None when it cannot be used (then it is downloaded)."""
    assert job.cached_zip is not None
    try:
        async with aiofiles.open(job.cached_zip, "rb") as fh:
            body = await fh.read()
        return _done(job, await converter.convert(job.row.experiment_id, body, job.targets), None, 0)
    except (OSError, ExperimentError) as exc:
        log.info("experiment %s: cached zip unusable (%s); downloading", job.row.experiment_id, exc)
        return None


def unexpected(exc: BaseException) -> RunError:
    """Not an experiment's failure: a bug, or the file system refusing (e.g. a folder that
    cannot be made). The run stops naming it."""
    log.error("unexpected error", exc_info=exc)
    kind = DiskFullError if disk_full(exc) else RunError
    return kind(f"{type(exc).__name__}: {exc}")


async def mirror_one(job: Job, source: AllenSource, converter: Converter) -> Outcome:
    eid = job.row.experiment_id

    async def attempt() -> Done:  # a corrupt zip shows only when decoded: download and convert retry together
        download = await source.grid(eid)
        return _done(job, await converter.convert(eid, download.body, job.targets), download, 0)

    try:
        if job.cached_zip is not None and (done := await _from_cache(job, converter)) is not None:
            return done
        tried = await retrying(attempt, source.retries, f"experiment {eid}")
        if tried.value is not None:
            return replace(tried.value, attempts=tried.attempts)
        error = tried.error or ExperimentError("no attempt was made")
        return Failed(job, error.reason, error.transient, tried.attempts, source.grid_url(eid))
    except RunError as exc:
        return Fatal(exc)
    except Exception as exc:
        return Fatal(unexpected(exc))
