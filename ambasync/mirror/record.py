"""What the state holds of one experiment, as values: its :class:`Record`, its files
(:class:`Output`) and its :class:`Status`."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ambasync.target import Target, file_format


class Status(str, enum.Enum):
    """An experiment's status; the values are what the database and the manifest hold."""

    PENDING = "pending"  # seen, not mirrored yet (or sent back by verify)
    DONE = "done"  # its files are in place, recorded with their checksums
    FAILED = "failed"  # the last attempt failed: ``transient`` says whether retrying may help
    INVALID = "invalid"  # the catalogue row cannot be mirrored (no usable experiment id)


@dataclass
class Output:
    volume: str
    path: str  # relative to the output folder
    sha256: str
    size: int


@dataclass
class Record:
    experiment_id: int
    gene: str
    plane: str
    status: Status
    attempts: int
    failed_runs: int
    error: str | None
    transient: bool
    settings: str | None
    zip_sha256: str | None
    outputs: list[Output] = field(default_factory=list)

    @property
    def targets(self) -> tuple[Target, ...]:
        """Where its files are, sorted as the run's targets are."""
        return tuple(sorted(Target(o.volume, o.path, file_format(o.path)) for o in self.outputs))
