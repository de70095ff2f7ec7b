"""What a run tells its operator: live progress, per-failure log lines, the final summary.

On a terminal a tqdm bar; elsewhere (cron, Docker logs) a plain line every
``interval`` seconds. The summary goes to stderr and to
``{out}/reports/run-YYYYmmddTHHMMSS.json``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiofiles

from ambasync.files import atomic_path

log = logging.getLogger("ambasync")

OUTCOMES = ("done", "failed", "skipped", "quarantined", "invalid")


@dataclass
class Summary:
    started: float = field(default_factory=time.time)
    finished: float | None = None
    catalogue_rows: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    quarantined: int = 0
    invalid: int = 0
    vanished: int = 0
    pruned: int = 0
    would_fetch: int = 0  # --dry-run
    requests: int = 0
    bytes_downloaded: int = 0
    bytes_written: int = 0
    exit_code: int = 0
    error: str | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)
    state_recovery: dict[str, Any] | None = None  # a damaged state set aside and rebuilt (recover.Recovery)

    @property
    def duration(self) -> float:
        return (self.finished or time.time()) - self.started

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["duration_s"] = round(self.duration, 3)
        out["throughput_per_s"] = round(self.done / self.duration, 3) if self.duration > 0 else 0.0
        return out

    def text(self) -> str:
        mb = 1024 * 1024
        lines = [
            f"ambasync: {self.done} done, {self.failed} failed, {self.skipped} skipped (up to date), "
            f"{self.quarantined} quarantined, {self.invalid} invalid catalogue rows, {self.vanished} vanished "
            f"upstream{f' ({self.pruned} pruned)' if self.pruned else ''}",
            f"ambasync: {self.requests} grid requests, {self.bytes_downloaded / mb:.1f} MiB downloaded, "
            f"{self.bytes_written / mb:.1f} MiB written in {self.duration:.1f} s "
            f"({self.to_dict()['throughput_per_s']:.2f} experiments/s); exit code {self.exit_code}",
        ]
        if self.error:
            lines.append(f"ambasync: run stopped: {self.error}")
        return "\n".join(lines)


class Progress:
    """Counts outcomes as they happen and shows them the way the output stream allows."""

    def __init__(self, summary: Summary, interval: float = 30.0, quiet: bool = False, stream: TextIO | None = None):
        self.summary = summary
        self.interval = interval
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.total: int | None = None
        self._totals: dict[str, int] = {}
        self._last_line = time.monotonic()
        self._bar = None
        if not quiet and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=None, unit="exp", file=self.stream, dynamic_ncols=True, smoothing=0.1)

    def catalogue_total(self, plane: str, rows: int, limit: int) -> None:
        """A plane's catalogue size is known: the summary's count, and the bar's total."""
        self._totals[plane] = rows
        self.summary.catalogue_rows = sum(self._totals.values())
        self.set_total(min(limit, self.summary.catalogue_rows) if limit else self.summary.catalogue_rows)

    def set_total(self, total: int) -> None:
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    @property
    def handled(self) -> int:
        s = self.summary
        return s.done + s.failed + s.skipped + s.quarantined + s.invalid

    def count(self, outcome: str) -> None:
        setattr(self.summary, outcome, getattr(self.summary, outcome) + 1)
        if self._bar is not None:
            s = self.summary
            self._bar.set_postfix_str(f"done {s.done} failed {s.failed} skipped {s.skipped}", refresh=False)
            self._bar.update(1)

    def line(self) -> str:
        s = self.summary
        of = f"/{self.total}" if self.total else ""
        rate = s.done / s.duration if s.duration > 0 else 0.0
        eta = ""
        if self.total and rate > 0:
            eta = f", eta {max(0, self.total - self.handled) / rate:.0f} s"
        return (f"progress: {self.handled}{of} handled: {s.done} done, {s.failed} failed, {s.skipped} skipped; "
                f"{rate:.2f} experiments/s{eta}")

    def tick(self) -> None:
        """Called every second by the run: a plain line when no bar is shown."""
        if self._bar is not None or self.quiet:
            return
        now = time.monotonic()
        if now - self._last_line >= self.interval:
            self._last_line = now
            log.info(self.line())

    async def ticking(self) -> None:
        """Tick every second (more often for short intervals) until cancelled."""
        while True:
            await asyncio.sleep(min(1.0, self.interval / 2))
            self.tick()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


async def write_report(summary: Summary, path: Path) -> None:
    """The run's summary as JSON, atomically (via aiofiles: the loop never blocks on disk)."""
    path.parent.mkdir(exist_ok=True)
    with atomic_path(path) as tmp:
        async with aiofiles.open(tmp, "w", encoding="utf-8") as fh:
            await fh.write(json.dumps(summary.to_dict(), indent=2, ensure_ascii=False))


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers; extra fields (experiment_id, url...) kept."""

    _SKIP = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
               "logger": record.name, "message": record.getMessage()}
        doc.update({k: v for k, v in vars(record).items() if k not in self._SKIP})
        return json.dumps(doc, default=str, ensure_ascii=False)


def setup_logging(fmt: str = "text", verbosity: int = 0, stream: TextIO | None = None) -> None:
    """``verbosity``: -1 quiet (warnings and errors), 0 info, 1+ debug."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    root.setLevel(logging.WARNING)
    logging.getLogger("ambasync").setLevel(level)
