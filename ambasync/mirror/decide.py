"""What to do with one experiment of the catalogue, decided from what the state holds.

:func:`decide` is pure but for looking at the files the record names (their sizes, and
with ``verify`` their checksums: run it in a thread then). Like pooch's
``download_action``, it returns a verdict and does nothing itself.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from pathlib import Path

from ambasync.config import Config
from ambasync.files import sha256_file
from ambasync.mirror.options import RunOptions
from ambasync.mirror.record import Record, Status
from ambasync.paths import Paths, cached_zip_path
from ambasync.target import Target


class Action(enum.Enum):
    FETCH = "fetch"  # download and convert
    RECONVERT = "reconvert"  # convert again from the kept zip (settings or names changed)
    SKIP = "skipped"  # up to date (the value is the summary's counter)
    QUARANTINE = "quarantined"  # failed too often, or for good: reported, not retried


@dataclass(frozen=True)
class Verdict:
    action: Action
    cached_zip: Path | None = None  # with RECONVERT


@dataclass(frozen=True)
class Policy:
    """What the run was asked, as :func:`decide` needs it."""

    out: Path  # the output folder
    zips: Path | None  # the zip cache, when zips are kept
    quarantine_after: int  # failed runs before a transient failure is quarantined
    force: bool = False  # redo everything
    verify: bool = False  # check the checksums of done files before skipping them
    retry_failed: bool = False  # retry permanent failures and quarantined experiments too

    @classmethod
    def for_run(cls, cfg: Config, opts: RunOptions, paths: Paths) -> "Policy":
        return cls(paths.out, paths.zips if cfg.output.keep_zips else None, cfg.download.quarantine_after,
                   opts.force, opts.verify, opts.retry_failed)


def sizes_match(rec: Record, out: Path) -> bool:
    """Cheap check that a done experiment's files are still there, whole."""
    try:
        return all((out / o.path).stat().st_size == o.size for o in rec.outputs)
    except OSError:
        return False


def checksums_match(rec: Record, out: Path) -> bool:
    """Thorough check (reads every file)."""
    try:
        return all(sha256_file(out / o.path) == o.sha256 for o in rec.outputs)
    except OSError:
        return False


def decide(record: Record | None, targets: tuple[Target, ...], settings: str, policy: Policy,
           held: bool = True) -> Verdict:
    """``settings``: the run's :meth:`ConvertSettings.key`; ``targets`` sorted; ``held``: every
    store format (the cube) already holds the experiment (``Outputs.holds``)."""
    if policy.force or record is None:
        return Verdict(Action.FETCH)
    if record.status is Status.DONE:
        if held and record.settings == settings and record.targets == targets and sizes_match(record, policy.out):
            if not policy.verify or checksums_match(record, policy.out):
                return Verdict(Action.SKIP)
        if policy.zips is not None and record.zip_sha256:
            cached = cached_zip_path(policy.zips, record.zip_sha256)
            if cached.is_file():
                return Verdict(Action.RECONVERT, cached)
        return Verdict(Action.FETCH)
    if record.status is Status.FAILED and not policy.retry_failed:
        if not record.transient or record.failed_runs >= policy.quarantine_after:
            return Verdict(Action.QUARANTINE)
    return Verdict(Action.FETCH)


async def judge(record: Record | None, targets: tuple[Target, ...], settings: str, policy: Policy,
                held: bool = True) -> Verdict:
    """:func:`decide` from the event loop: in a thread when it reads whole files (verify)."""
    if policy.verify and record is not None:
        return await asyncio.to_thread(decide, record, targets, settings, policy, held)
    return decide(record, targets, settings, policy, held)
