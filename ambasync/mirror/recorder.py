"""Applies what happens to the state, the summary and the progress, as it happens.

Every method records one thing and returns; an error that must stop the run (the state
cannot be written) is returned as a value, never raised into the caller's loop.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from ambasync.errors import DiskFullError, RunError, disk_full
from ambasync.mirror.catalog import InvalidRow, Row
from ambasync.mirror.decide import sizes_match
from ambasync.mirror.experiment import unexpected
from ambasync.mirror.formats.outputs import Outputs
from ambasync.mirror.outcome import Done, Failed, Fatal, Outcome
from ambasync.mirror.record import Status
from ambasync.mirror.report import Progress, Summary
from ambasync.mirror.state import State

log = logging.getLogger("ambasync")

MAX_FAILURES_IN_REPORT = 1000
COMMIT_EVERY = 200  # catalogue rows between commits of the rows seen


class Recorder:
    def __init__(self, state: State, run_id: int, settings: str, out: Path, summary: Summary, progress: Progress,
                 outputs: Outputs):
        self.state = state
        self.run_id = run_id
        self.settings = settings  # the run's ConvertSettings.key()
        self.out = out
        self.summary = summary
        self.progress = progress
        self.outputs = outputs
        self._seen = 0

    def seen(self, row: Row, plane: str) -> None:
        """A catalogue row this run takes; committed in batches."""
        self.state.seen(row.experiment_id, row.gene, plane, row.fields, self.run_id)
        self._seen += 1
        if self._seen % COMMIT_EVERY == 0:
            self.state.commit()

    def invalid(self, row: InvalidRow, plane: str) -> None:
        eid = row.fields.get("experiment_id")
        log.warning("invalid catalogue row skipped: %s", row.reason, extra={"experiment_id": eid})
        self.progress.count("invalid")
        if isinstance(eid, int):
            self.state.mark_invalid(eid, str(row.fields.get("gene") or ""), plane, row.fields, self.run_id, row.reason)

    def apply(self, outcome: Outcome) -> RunError | None:
        """Record an experiment's outcome; returns the error that must stop the run, if any."""
        if isinstance(outcome, Fatal):
            return outcome.error
        try:
            if isinstance(outcome, Done):
                self._done(outcome)
            else:
                self._failed(outcome)
        except sqlite3.Error as exc:
            return self._state_broke(exc)
        except OSError as exc:  # a stale file that cannot be removed
            return unexpected(exc)
        return None

    def _done(self, done: Done) -> None:
        job = done.job
        self.state.mark_done(job.row.experiment_id, done.outputs, self.settings, done.attempts, done.zip_sha256,
                             done.zip_size, done.last_modified, done.etag)
        keep = {o.path for o in done.outputs}
        for stale in (job.previous.outputs if job.previous else []):  # renamed gene, changed template or volumes
            if stale.path not in keep:
                (self.out / stale.path).unlink(missing_ok=True)
        self.summary.bytes_written += sum(o.size for o in done.outputs)
        self.progress.count("done")
        self.outputs.after_done(done)

    def _failed(self, failed: Failed) -> None:
        row, prev = failed.job.row, failed.job.previous
        if prev is not None and prev.status is Status.DONE and sizes_match(prev, self.out):
            # A refresh (--force, new settings, --verify) failed: the files from before are still
            # good, so keep them and their record, and note the error.
            self.state.note_error(row.experiment_id, failed.reason, failed.transient, failed.attempts)
        else:
            for o in (prev.outputs if prev else []):
                (self.out / o.path).unlink(missing_ok=True)  # a failed experiment keeps no file
            self.state.mark_failed(row.experiment_id, failed.reason, failed.transient, failed.attempts, self.run_id)
        kind = "transient" if failed.transient else "permanent"
        log.error("experiment %s (%s) failed: %s [%s, %s]", row.experiment_id, row.gene, failed.reason, failed.url,
                  kind, extra={"experiment_id": row.experiment_id, "gene": row.gene, "url": failed.url,
                               "reason": failed.reason})
        if len(self.summary.failures) < MAX_FAILURES_IN_REPORT:
            self.summary.failures.append({"experiment_id": row.experiment_id, "gene": row.gene, "url": failed.url,
                                          "reason": failed.reason, "kind": kind})
        self.progress.count("failed")

    def _state_broke(self, exc: sqlite3.Error) -> RunError:
        """The state cannot be written: most likely the disk is full."""
        if disk_full(exc):
            return DiskFullError(f"cannot write the state {self.state.path}: {exc}; free space, then run again")
        return RunError(f"cannot write the state {self.state.path}: {exc}")

    def vanished(self, planes: tuple[str, ...], prune: bool) -> None:
        """Experiments the (complete) catalogue of this run no longer lists: reported, or removed."""
        for rec in self.state.vanished(self.run_id, planes):
            self.summary.vanished += 1
            if prune:
                for o in rec.outputs:
                    (self.out / o.path).unlink(missing_ok=True)
                self.state.forget(rec.experiment_id)
                self.summary.pruned += 1
            else:
                log.warning("experiment %s (%s) is no longer in the catalogue; --prune removes its files",
                            rec.experiment_id, rec.gene)
