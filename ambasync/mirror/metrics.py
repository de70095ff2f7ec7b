"""The last run as Prometheus metrics, in the textfile node_exporter's textfile collector reads.

A nightly cron or systemd job is monitored by what it leaves behind: node_exporter
(``--collector.textfile.directory``) exports every ``*.prom`` file of a folder, so an
alert can fire when the last run failed or is too old. :func:`render` is pure (a run
summary in, exposition text out); :func:`write_textfile` replaces the file atomically,
so a scrape never reads half of it. No sample carries a timestamp: the textfile
collector refuses them. Every series has a ``shard`` label (``unsharded`` or ``K/N``),
so the shards of one mirror each write their own file and stay apart.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Protocol

from ambasync.files import atomic_path

PREFIX = "ambasync_"
OUTCOMES = ("done", "failed", "skipped", "quarantined", "invalid")
FILE_MODE = 0o644  # node_exporter runs as its own user: it must be able to read the file


class RunSummary(Protocol):
    """What :func:`render` reads of a run's summary (ambasync.mirror.report.Summary has it)."""

    started: float
    duration: float
    exit_code: int
    done: int
    failed: int
    skipped: int
    quarantined: int
    invalid: int
    bytes_downloaded: int
    bytes_written: int


def shard_label(shard: tuple[int, int] | None) -> str:
    return "unsharded" if shard is None else f"{shard[0]}/{shard[1]}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render(summary: RunSummary, shard: tuple[int, int] | None = None) -> str:
    """The exposition text (format 0.0.4) of one run: HELP and TYPE before each family, one
    series per family and shard (experiments: one per outcome), a newline after every line."""
    labels = {"shard": shard_label(shard)}
    families = [
        ("last_run_start_timestamp_seconds", "Start of the last ambasync run, seconds since the Unix epoch.",
         [({}, summary.started)]),
        ("last_run_duration_seconds", "Wall-clock duration of the last ambasync run.", [({}, summary.duration)]),
        ("last_run_exit_code", "Exit code of the last ambasync run (0 ok, 1 some experiments failed, 2 usage, "
         "3 locked, 4 upstream, 5 disk full, 130/143 interrupted).", [({}, summary.exit_code)]),
        ("last_run_experiments", "Experiments of the last ambasync run, by outcome.",
         [({"outcome": o}, getattr(summary, o)) for o in OUTCOMES]),
        ("last_run_downloaded_bytes", "Bytes of grid zips downloaded by the last ambasync run.",
         [({}, summary.bytes_downloaded)]),
        ("last_run_written_bytes", "Bytes of output files written by the last ambasync run.",
         [({}, summary.bytes_written)]),
    ]
    lines = []
    for name, help_text, samples in families:
        full = PREFIX + name
        lines.append(f"# HELP {full} {help_text}")
        lines.append(f"# TYPE {full} gauge")
        for extra, value in samples:
            pairs = ",".join(f'{k}="{_escape(v)}"' for k, v in {**labels, **extra}.items())
            lines.append(f"{full}{{{pairs}}} {_number(value)}")
    return "\n".join(lines) + "\n"


def textfile_path(reports: Path, suffix: str = "") -> Path:
    """``{out}/reports/ambasync{suffix}.prom``: one file per shard (``suffix`` as the state's)."""
    return reports / f"ambasync{suffix}.prom"


def write_textfile(path: str | os.PathLike, text: str) -> Path:
    """Replace ``path`` with ``text`` atomically (a temporary name the collector ignores, then a
    rename), readable by node_exporter's user."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, durable=True) as tmp:
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, FILE_MODE)
    return path
