"""A fresh state rebuilt from ``manifest.csv`` and the files on disk, after
:mod:`ambasync.mirror.health` has set a damaged one aside.

:func:`rebuild_state` writes through :class:`ambasync.mirror.state.State`'s public
methods, except one read of the new file's schema. A file whose sha256 is the manifest's,
and whose header has the run's settings, is recorded done and so never fetched again;
anything else is left for the next run to fetch. :func:`recover_state` is the whole
sequence a run performs. The caller holds the output folder's lock throughout.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ambasync.files import TMP_SUFFIX, atomic_path, tmp_name
from ambasync.mirror.catalog import COLUMNS
from ambasync.mirror.health import (
    Health,
    StateCheck,
    check_state,
    set_aside_state,
    sidecars,
)
from ambasync.mirror.record import Status
from ambasync.mirror.state import Output, State

log = logging.getLogger("ambasync")
# run_id recorded by a rebuild: runs count from 1, so no run ever had it.
REBUILD_RUN_ID = 0
# Catalogue columns kept as text; the others are numbers (or null) as upstream sent them.
_TEXT_COLUMNS = {"plane", "gene", "gene_name"}
PROGRESS_SECONDS = 10.0  # a log line this often while files are checked (26,000 files take minutes)
STATUSES = tuple(s.value for s in Status)  # what a manifest row may say
REPORT_PATHS = 100  # paths listed per category in to_dict(); the counts are always complete


@dataclass(frozen=True)
class Rebuild:
    """What a rebuild did. Paths are relative to the output folder, as in the manifest."""

    state: Path
    manifest: Path
    manifest_found: bool
    experiments: int = 0  # catalogue rows restored (every status)
    trusted: tuple[str, ...] = ()  # sha256 and header as the manifest says: recorded done, never fetched again
    differed: tuple[str, ...] = ()  # on disk but not the manifest's file (sha256, header, or settings): fetched again
    missing: tuple[str, ...] = ()  # rows marked done whose file is gone: fetched again
    failed: int = 0  # failures carried over (retried by the next run, as transient)
    invalid: int = 0  # invalid catalogue rows (the next run's catalogue reports them again)
    unusable_rows: int = 0  # manifest lines without a valid id, status or path
    untracked: tuple[str, ...] = ()  # files in the mirror's folders that the manifest does not list
    seconds: float = 0.0
    reasons: dict[str, str] = field(default_factory=dict)  # path -> why it was not trusted

    def text(self) -> str:
        if not self.manifest_found:
            return (f"rebuilt an empty state {self.state}: no {self.manifest} to rebuild from, so every "
                    "experiment is fetched again")
        return (f"rebuilt {self.state} from {self.manifest.name} and the files on disk in {self.seconds:.1f} s: "
                f"{len(self.trusted)} files trusted, {len(self.differed)} differ from the manifest, "
                f"{len(self.missing)} missing, {self.failed} failures carried over, {self.unusable_rows} unusable "
                f"manifest rows, {len(self.untracked)} files not in the manifest")

    def to_dict(self) -> dict[str, Any]:
        """For the JSON run report: every count, and the first REPORT_PATHS paths of each kind."""
        return {
            "state": str(self.state), "manifest": str(self.manifest), "manifest_found": self.manifest_found,
            "experiments": self.experiments, "trusted": len(self.trusted), "differed": len(self.differed),
            "missing": len(self.missing), "failed": self.failed, "invalid": self.invalid,
            "unusable_rows": self.unusable_rows, "untracked": len(self.untracked), "seconds": round(self.seconds, 3),
            "differed_paths": {p: self.reasons.get(p, "") for p in self.differed[:REPORT_PATHS]},
            "missing_paths": list(self.missing[:REPORT_PATHS]),
            "untracked_paths": list(self.untracked[:REPORT_PATHS]),
        }


def _catalog_value(column: str, text: str | None) -> Any:
    """A manifest cell back to the type the catalogue gave it (CSV keeps only text)."""
    if text is None or text == "":
        return None
    if column in _TEXT_COLUMNS:
        return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _safe_relative(text: str | None) -> str | None:
    """A manifest path the rebuild may trust: relative, inside the output folder."""
    if not text:
        return None
    p = PurePosixPath(text)
    if p.is_absolute() or ".." in p.parts or p.parts[:1] == (".ambasync",):
        return None
    return str(p)


def _read_manifest(path: Path) -> tuple[dict[int, list[dict[str, Any]]], int]:
    """Rows grouped by experiment id (manifest order), and the count of unusable lines."""
    experiments: dict[int, list[dict[str, Any]]] = {}
    unusable = 0
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        for row in csv.DictReader(fh):
            try:
                eid = int(row.get("experiment_id") or "")
            except ValueError:
                unusable += 1
                continue
            status = row.get("status")
            if eid <= 0 or status not in STATUSES or (status == "done" and not (
                    _safe_relative(row.get("path")) and row.get("sha256") and row.get("volume"))):
                unusable += 1
                continue
            experiments.setdefault(eid, []).append(row)
    return experiments, unusable


def _stored_type(path: Path) -> str:
    """The voxel type a MINC file stores (ushort, float...), as pyminc names it."""
    from pyminc.volumes.factory import (
        volumeFromFile,  # only a rebuild needs libminc here
    )

    vol = volumeFromFile(str(path), dtype="float")
    try:
        return str(vol.volumeType)
    finally:
        vol.closeVolume()


def _why_not_trusted(out: Path, output: Output, settings: str) -> str | None:
    """None when the file is the manifest's (sha256) with the header ``settings`` give."""
    from ambasync.mirror.filecheck import (
        check_output,  # the one check of a file against a record (sha256, header)
    )

    problem = check_output(out, output, settings)
    if problem:
        return problem
    dtype = settings.rsplit("/", 1)[-1]
    try:
        stored = _stored_type(out / output.path)
    except Exception as exc:  # libminc refuses it
        return f"{output.path}: unreadable MINC ({type(exc).__name__})"
    if stored != dtype:
        return f"{output.path}: stores {stored}, the settings say {dtype}"
    return None


def rebuild_state(state_path: str | os.PathLike, manifest_path: str | os.PathLike, out: str | os.PathLike,
                  settings: str, batch: int = 500) -> Rebuild:
    """Write a fresh state at ``state_path`` (which must not exist: :func:`ambasync.mirror.health.set_aside_state` first) from
    ``manifest_path`` and the files under ``out``.

    ``settings`` is the run's settings key (:meth:`ambasync.settings.ConvertSettings.key`): a file is trusted only if
    its header matches it, since the manifest does not say which settings made it. The state is
    built under a temporary name and renamed into place, so an interrupted rebuild leaves none.
    ``batch``: catalogue rows per transaction.
    """
    state_path, manifest_path, out = Path(state_path), Path(manifest_path), Path(out)
    if any(os.path.lexists(p) for p in (state_path, *sidecars(state_path))):
        raise FileExistsError(f"{state_path} (or its -wal/-shm) exists: set it aside before rebuilding")
    started = time.monotonic()
    found = manifest_path.is_file()
    experiments, unusable = _read_manifest(manifest_path) if found else ({}, 0)
    trusted: list[str] = []
    differed: list[str] = []
    missing: list[str] = []
    reasons: dict[str, str] = {}
    failed = invalid = 0
    listed: set[str] = set()
    folders: set[str] = set()
    total = sum(len(rows) for rows in experiments.values())
    checked = 0
    last_line = time.monotonic()
    state_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(state_path)
    try:
        with atomic_path(state_path, durable=True) as tmp:
            state = State(tmp)
            try:
                for n, (eid, rows) in enumerate(experiments.items(), 1):
                    first = rows[0]
                    status = first["status"]
                    if status == "invalid":
                        invalid += 1
                        continue
                    fields = {col: _catalog_value(col, first.get(col)) for col in COLUMNS}
                    fields["experiment_id"] = eid
                    state.seen(eid, first.get("gene") or "", first.get("plane") or "", fields, REBUILD_RUN_ID)
                    if status == "failed":
                        state.mark_failed(eid, first.get("error") or "failed before the state was rebuilt",
                                          True, 0, REBUILD_RUN_ID)
                        failed += 1
                    elif status == "done":
                        outputs, good = [], True
                        for row in rows:
                            rel = _safe_relative(row.get("path")) or ""
                            listed.add(rel)
                            folders.add(str(PurePosixPath(rel).parent))
                            checked += 1
                            file = out / rel
                            if not file.is_file():
                                missing.append(rel)
                                good = False
                                continue
                            output = Output(row["volume"], rel, row["sha256"], file.stat().st_size)
                            problem = _why_not_trusted(out, output, settings)
                            if problem:
                                differed.append(rel)
                                reasons[rel] = problem
                                good = False
                            else:
                                outputs.append(output)
                        if good:
                            state.mark_done(eid, outputs, settings, 0, None, None, None, None)
                            trusted.extend(o.path for o in outputs)
                    if n % batch == 0:
                        state.commit()
                    if time.monotonic() - last_line >= PROGRESS_SECONDS:
                        log.info("rebuilding the state: %d/%d files checked", checked, total)
                        last_line = time.monotonic()
            finally:
                state.close()
    except BaseException:
        for side in sidecars(tmp):
            side.unlink(missing_ok=True)
        raise
    untracked = sorted(
        f"{folder}/{name}" for folder in folders if (out / folder).is_dir()
        for name in os.listdir(out / folder)
        if f"{folder}/{name}" not in listed and not name.endswith(TMP_SUFFIX) and (out / folder / name).is_file()
    )
    return Rebuild(
        state=state_path, manifest=manifest_path, manifest_found=found,
        experiments=len(experiments) - invalid, trusted=tuple(trusted), differed=tuple(differed),
        missing=tuple(missing), failed=failed, invalid=invalid, unusable_rows=unusable, untracked=tuple(untracked),
        seconds=time.monotonic() - started, reasons=reasons,
    )


@dataclass(frozen=True)
class Recovery:
    """A damaged state found, set aside and rebuilt: one line for the log, a dict for the report."""

    check: StateCheck
    set_aside: Path
    rebuild: Rebuild

    def text(self) -> str:
        return f"{self.check.text()}; set aside as {self.set_aside.name}; {self.rebuild.text()}"

    def to_dict(self) -> dict[str, Any]:
        return {"damaged": self.check.reason, "set_aside": str(self.set_aside), **self.rebuild.to_dict()}


def recover_state(state_path: str | os.PathLike, manifest_path: str | os.PathLike, out: str | os.PathLike,
                  settings: str) -> Recovery | None:
    """The start of a run: None when the state is intact or missing; when it is damaged, set it
    aside, rebuild it and say what happened."""
    check = check_state(state_path)
    if check.health is not Health.DAMAGED:
        return None
    aside = set_aside_state(state_path)
    return Recovery(check, aside, rebuild_state(state_path, manifest_path, out, settings))

