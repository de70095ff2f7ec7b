"""What the run hands an experiment (a :class:`Job`) and what it gets back (an Outcome).

Outcomes are values: :func:`ambasync.mirror.experiment.mirror_one` returns one, and
:class:`ambasync.mirror.recorder.Recorder` applies it to the state, the summary and the
progress. A new kind of outcome is a new frozen dataclass here, added to ``Outcome``,
and one more case in ``Recorder.apply``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ambasync.errors import RunError
from ambasync.imaging.minc import Written
from ambasync.mirror.catalog import Row
from ambasync.mirror.record import Output, Record
from ambasync.target import Target


@dataclass(frozen=True)
class Job:
    row: Row
    targets: tuple[Target, ...]  # sorted, as a record's targets
    previous: Record | None = None  # what the state held before this run
    cached_zip: Path | None = None  # re-convert from the zip cache instead of downloading


@dataclass(frozen=True)
class Done:
    """The experiment's outputs are in place (renamed into their final names)."""

    job: Job
    outputs: tuple[Output, ...]  # the files the state records
    attempts: int  # grid requests it took (0: converted from the zip cache)
    zip_sha256: str
    zip_size: int
    last_modified: str | None = None
    etag: str | None = None
    written: tuple[tuple[Target, Written], ...] = ()  # every output, store slots too (for the formats' hooks)


@dataclass(frozen=True)
class Failed:
    """The experiment could not be mirrored; the run goes on."""

    job: Job
    reason: str
    transient: bool  # retrying in a later run may help
    attempts: int
    url: str


@dataclass(frozen=True)
class Fatal:
    """The run must stop (disk full, a broken pool, an unexpected error)."""

    error: RunError


Outcome = Done | Failed | Fatal
