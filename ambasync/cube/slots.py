"""The cube's own membership records: which slot holds which experiment, with which grids.

They live inside the store (``cube.zarr/.ambasync/``), so the store describes itself and
every writer on every machine sees the same truth through the shared filesystem, with no
lock service. Only two filesystem operations are relied on, both atomic on local disks and
on NFS: ``mkdir`` (taking the publish lease) and ``rename`` (claiming a slot: a folder made
whole, then renamed to the slot's name; every file: written under a temporary name, then
renamed, :func:`ambasync.files.atomic_path`).

- ``slots/{slot}/`` exists: the slot is claimed (``claim.json`` says for which experiment, by
  which writer). A claim is a folder renamed into place, so two writers never get one slot.
- ``slots/{slot}/member.json``: the slot's chunks hold that experiment's grids, whose
  :func:`~ambasync.cube.layout.values_sha256` is recorded per volume. Written after the chunks, so a
  record never points at data that is not there.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ambasync.errors import RunError
from ambasync.files import atomic_path

SLOT_DIGITS = 8


@dataclass(frozen=True)
class Member:
    """An experiment in the cube: its slot, the sha256 of each volume's values
    (:func:`~ambasync.cube.layout.values_sha256`; ``sha256`` is energy's), its catalogue fields."""

    slot: int
    experiment_id: int
    sha256: str
    volumes: dict = field(default_factory=dict, hash=False, compare=False)  # volume -> sha256
    fields: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Claim:
    slot: int
    experiment_id: int
    writer: str


class CubeBusyError(RunError):
    """Another writer held the publish lease for longer than we were willing to wait."""


def _write_json(path: Path, doc: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, sort_keys=True))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (ValueError, UnicodeDecodeError):
        return None  # cannot happen with atomic writes; treated as absent, so the slot is redone


def _claim_doc(experiment_id: int, writer: str) -> dict:
    return {"experiment_id": experiment_id, "writer": writer, "host": socket.gethostname(), "pid": os.getpid(),
            "time": time.time()}


def _member(slot: int, doc: dict) -> Member:
    return Member(slot, int(doc["experiment_id"]), doc["sha256"], doc.get("volumes", {}), doc.get("fields", {}))


class Slots:
    """Slot claims and member records of one store (``root`` = ``cube.zarr/.ambasync``)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.dir = self.root / "slots"

    def _slot_dir(self, slot: int) -> Path:
        return self.dir / f"{slot:0{SLOT_DIGITS}d}"

    def taken(self) -> set[int]:
        """Slots claimed now (with or without a member)."""
        try:
            return {int(name) for name in os.listdir(self.dir) if name.isdigit()}
        except FileNotFoundError:
            return set()

    def scan(self) -> tuple[dict[int, Member], dict[int, Claim]]:
        """(members by slot, claims without a member by slot): one pass over the records."""
        members: dict[int, Member] = {}
        orphans: dict[int, Claim] = {}
        for slot in sorted(self.taken()):
            d = self._slot_dir(slot)
            doc = _read_json(d / "member.json")
            if doc is not None:
                members[slot] = _member(slot, doc)
                continue
            claim = _read_json(d / "claim.json")
            if claim is not None:
                orphans[slot] = Claim(slot, int(claim["experiment_id"]), claim.get("writer", ""))
            else:  # claimed, killed before claim.json: nobody can tell whose; any writer may reuse it
                orphans[slot] = Claim(slot, -1, "")
        return members, orphans

    def claim(self, experiment_id: int, writer: str, taken: set[int], start: int = 0) -> int:
        """Take the lowest free slot at or above ``start`` for ``experiment_id``. ``taken`` is the
        caller's view of claimed slots (kept up to date here); the rename settles any race."""
        slot = start
        while True:
            while slot in taken:
                slot += 1
            taken.add(slot)
            if self.claim_free(slot, experiment_id, writer):
                return slot

    def sweep(self, older_than: float = 3600.0) -> None:
        """Remove half-made claim folders a killed writer left (old enough not to be in flight)."""
        for tmp in self.dir.glob(".claim-*") if self.dir.is_dir() else ():
            with contextlib.suppress(OSError):
                if time.time() - tmp.stat().st_mtime > older_than:
                    for leftover in tmp.iterdir():
                        leftover.unlink(missing_ok=True)
                    tmp.rmdir()

    def claim_age(self, slot: int) -> float:
        """Seconds since the slot was claimed (by its folder's time: no clock in the record needed)."""
        try:
            return time.time() - self._slot_dir(slot).stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def claim_of(self, slot: int) -> Claim | None:
        doc = _read_json(self._slot_dir(slot) / "claim.json")
        return None if doc is None else Claim(slot, int(doc["experiment_id"]), doc.get("writer", ""))

    def claim_free(self, slot: int, experiment_id: int, writer: str) -> bool:
        """Claim exactly ``slot`` if it is free; False if anyone holds it. The claim is made whole
        in a hidden folder and renamed to the slot's name: a kill never leaves a claim without
        its claim.json, and of two writers renaming to one name, the second fails (ENOTEMPTY)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".claim-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            _write_json(tmp / "claim.json", _claim_doc(experiment_id, writer))
            os.rename(tmp, self._slot_dir(slot))
        except OSError as exc:
            for leftover in tmp.glob("*") if tmp.exists() else ():
                leftover.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                tmp.rmdir()
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False
            raise
        return True

    def write_claim(self, slot: int, experiment_id: int, writer: str) -> None:
        _write_json(self._slot_dir(slot) / "claim.json", _claim_doc(experiment_id, writer))

    def write_member(self, member: Member) -> None:
        """Record that the slot's chunks now hold ``member`` (call after writing them)."""
        _write_json(self._slot_dir(member.slot) / "member.json", {
            "experiment_id": member.experiment_id, "sha256": member.sha256, "volumes": member.volumes,
            "fields": member.fields})

    def read_member(self, slot: int) -> Member | None:
        doc = _read_json(self._slot_dir(slot) / "member.json")
        return None if doc is None else _member(slot, doc)

    def unrecord(self, slot: int) -> None:
        """The slot no longer holds an experiment (its claim stays until :meth:`release`)."""
        (self._slot_dir(slot) / "member.json").unlink(missing_ok=True)

    def release(self, slot: int) -> None:
        """Free the slot for any writer."""
        d = self._slot_dir(slot)
        for name in ("member.json", "claim.json"):
            (d / name).unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError, OSError):
            d.rmdir()


def _dead_here(holder: dict) -> bool:
    """The lease's holder ran on this machine and its process is gone (killed): no need to wait."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@contextlib.contextmanager
def lease(root: Path, writer: str, wait_seconds: float, stale_seconds: float,
          poll_seconds: float = 0.2) -> Iterator[None]:
    """Hold the store's publish lease (``mkdir``; works across machines over NFS, where
    ``flock`` does not). A lease older than ``stale_seconds``, or held by a process of this
    machine that no longer exists, belongs to a writer that died: it is broken by renaming it
    aside (only one breaker can win the rename). Clocks of the machines sharing a store must
    agree to well within ``stale_seconds``."""
    path = Path(root) / "publish.lease"
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            os.mkdir(path)
            break
        except FileExistsError:
            holder = _read_json(path / "holder.json") or {}
            try:
                since = float(holder.get("time", path.stat().st_mtime))
            except FileNotFoundError:
                continue  # released meanwhile
            if time.time() - since > stale_seconds or _dead_here(holder):
                broken = path.with_name(f"publish.lease.broken-{uuid.uuid4().hex}")
                with contextlib.suppress(FileNotFoundError, OSError):
                    os.rename(path, broken)
                    for child in broken.iterdir():
                        child.unlink(missing_ok=True)
                    broken.rmdir()
                continue
            if time.monotonic() > deadline:
                raise CubeBusyError(
                    f"{path.parent.parent} is being updated by {holder.get('writer', '?')} on "
                    f"{holder.get('host', '?')} (pid {holder.get('pid', '?')}): run again when it is done") from None
            time.sleep(poll_seconds)
    try:
        _write_json(path / "holder.json", {"writer": writer, "host": socket.gethostname(), "pid": os.getpid(),
                                           "time": time.time()})
        yield
    finally:
        (path / "holder.json").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.rmdir()
