"""The cube's own membership records: which slot holds which experiment, with which grids.

They live inside the store (``cube.zarr/.ambasync/``), so the store describes itself and every
writer on every machine sees the same truth through the store alone (a shared filesystem or an
object store), with no lock service:

- ``members.json.gz``: the published member table, one row per slot (slot, experiment, sha256 of
  each volume's values, catalogue fields). Written only by the publisher, under the lease, after
  the arrays it describes.
- ``records/{time}-{writer}-{pid}-{seq}.json``: a writer's batch of changes (experiments added,
  with the sha256 of their staged grids; experiments removed). Each batch is a new object only
  its writer ever writes, made after the grids it names are staged, so a record never points at
  data that is not there; the run writes them from a thread, a batch every few hundred
  experiments or seconds, never once per experiment in the event loop.
- ``staged/{experiment}.{volume}``: a converted grid waiting for the publish (the worker's).
- ``publish.lease``: held while a writer publishes (created only if absent: ``link(2)`` on a disk,
  ``If-None-Match: *`` on S3).

Slots are given out by the publisher, not by the writers: a writer never claims anything, so two
shards (on one machine or several) cannot collide, and a run's event loop does no I/O per
experiment for the cube.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Mapping

from ambasync.errors import RunError
from ambasync.cube.layout import LEASE_KEY, MEMBERS_KEY, RECORDS

if TYPE_CHECKING:
    from ambasync.cube.kv import KV

RECORD_BATCH = 256  # records per batch object
RECORD_SECONDS = 5.0  # ... or a batch at least this often while a run records


@dataclass(frozen=True)
class Member:
    """An experiment in the cube: its slot (-1 until published), the sha256 of each volume's values
    (:func:`~ambasync.cube.layout.values_sha256`; ``sha256`` is energy's), its catalogue fields."""

    slot: int
    experiment_id: int
    sha256: str
    volumes: dict = field(default_factory=dict, hash=False, compare=False)  # volume -> sha256
    fields: dict = field(default_factory=dict, hash=False, compare=False)


class CubeBusyError(RunError):
    """Another writer held the publish lease for longer than we were willing to wait."""


# -- the published member table -----------------------------------------------------------------

def version_of(members: Mapping[int, Member]) -> str:
    """The cube's version: a digest of what it holds (slot, experiment, values), so the same
    content always has the same version and any change of a value changes it."""
    doc = [(slot, m.experiment_id, sorted(m.volumes.items())) for slot, m in sorted(members.items())]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:16]


def read_members(kv: KV) -> dict[int, Member]:
    blob = kv.get(MEMBERS_KEY)
    if blob is None:
        return {}
    doc = json.loads(gzip.decompress(blob))
    return {row[0]: Member(row[0], row[1], row[2]["energy"], row[2], row[3]) for row in doc["members"]}


def members_blob(members: Mapping[int, Member], version: str, updated: str) -> bytes:
    rows = [[slot, m.experiment_id, m.volumes, m.fields] for slot, m in sorted(members.items())]
    return gzip.compress(json.dumps({"version": version, "updated": updated, "members": rows},
                                    separators=(",", ":")).encode(), compresslevel=5)


# -- writers' record batches --------------------------------------------------------------------

def read_records(kv: KV) -> list[tuple[str, dict]]:
    """Every record batch in the store, oldest first (their names start with the time)."""
    out = []
    for key in sorted(kv.list(RECORDS)):
        blob = kv.get(key)
        if blob is None:
            continue  # applied and removed by a publisher meanwhile
        try:
            out.append((key, json.loads(blob)))
        except ValueError:
            continue  # cannot happen with whole-object writes; ignored
    return out


def apply_records(by_id: dict[int, Member], records: list[tuple[str, dict]]) -> dict[int, Member]:
    """The membership ``by_id`` (experiment -> Member) after ``records``: what a writer sees as held."""
    out = dict(by_id)
    for _, doc in records:
        for eid in doc.get("remove", []):
            out.pop(int(eid), None)
        for eid, volumes, fields in doc.get("add", []):
            old = out.get(int(eid))
            out[int(eid)] = Member(old.slot if old else -1, int(eid), volumes["energy"], volumes, fields)
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:40] or "writer"


class RecordLog:
    """One writer's records, batched into new objects from a thread (``kv``: where they go)."""

    def __init__(self, kv: KV, writer: str):
        self.kv = kv
        self.prefix = f"{_slug(writer)}-{_slug(socket.gethostname())}-{os.getpid()}"
        self._pending: dict = {"add": [], "remove": []}
        self._seq = 0
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def add(self, experiment_id: int, volumes: dict, fields: dict) -> None:
        self._pending["add"].append([experiment_id, volumes, fields])
        self._maybe_flush()

    def remove(self, experiment_id: int) -> None:
        self._pending["remove"].append(experiment_id)
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        n = len(self._pending["add"]) + len(self._pending["remove"])
        if n >= RECORD_BATCH or (n and time.monotonic() - self._last > RECORD_SECONDS):
            self._start_flush()

    def _take(self) -> tuple[str, bytes] | None:
        doc = self._pending
        if not doc["add"] and not doc["remove"]:
            return None
        self._pending = {"add": [], "remove": []}
        self._seq += 1
        self._last = time.monotonic()
        name = f"{RECORDS}/{time.time_ns():020d}-{self.prefix}-{self._seq:06d}.json"
        return name, json.dumps(doc, separators=(",", ":")).encode()

    def _write(self, item: tuple[str, bytes]) -> None:
        with self._lock:  # batches in order
            self.kv.put(*item)

    def _start_flush(self) -> None:
        item = self._take()
        if item is None:
            return
        if self._thread is not None:
            self._thread.join()

        def run() -> None:
            try:
                self._write(item)
            except BaseException as exc:  # noqa: BLE001  raised in the caller at its next record or flush
                self._error = exc

        self._thread = threading.Thread(target=run, name="cube-records", daemon=True)
        self._thread.start()

    def flush(self) -> None:
        """Every record so far written (blocking)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        item = self._take()
        if item is not None:
            self._write(item)


# -- the publish lease --------------------------------------------------------------------------

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
def lease(kv: KV, writer: str, wait_seconds: float, stale_seconds: float, poll_seconds: float = 0.2,
          ) -> Iterator[None]:
    """Hold the store's publish lease (an object created only if absent). A lease older than
    ``stale_seconds``, or held by a process of this machine that no longer exists, belongs to a
    writer that died: it is removed and taken again (two breakers: one creation wins). Clocks of
    the machines sharing a store must agree to well within ``stale_seconds``."""
    doc = {"writer": writer, "host": socket.gethostname(), "pid": os.getpid(), "time": time.time(),
           "token": os.urandom(8).hex()}
    mine = json.dumps(doc).encode()
    deadline = time.monotonic() + wait_seconds
    while not kv.create(LEASE_KEY, mine):
        raw = kv.get(LEASE_KEY)
        if raw is None:
            continue  # released meanwhile
        try:
            holder = json.loads(raw)
        except ValueError:
            holder = {}
        if time.time() - float(holder.get("time", 0)) > stale_seconds or _dead_here(holder):
            if kv.get(LEASE_KEY) == raw:  # still the dead holder's: remove it, then race to create
                kv.delete(LEASE_KEY)
            continue
        if time.monotonic() > deadline:
            raise CubeBusyError(
                f"{kv.location} is being updated by {holder.get('writer', '?')} on {holder.get('host', '?')} "
                f"(pid {holder.get('pid', '?')}): run again when it is done") from None
        time.sleep(poll_seconds)
    try:
        yield
    finally:
        if kv.get(LEASE_KEY) == mine:
            kv.delete(LEASE_KEY)
