"""The cube store in the main process: open (create, check, set aside), give out slots,
remove experiments, publish, summarise.

Who writes what (so that no two writers ever share a chunk, on one machine or several):

- conversion workers write one experiment's volume-major chunks (its slot's own files) and then
  its member record (:mod:`ambasync.cube.writer`); a slot is claimed by one writer (``mkdir``);
- everything shared (the voxel-major copy, coverage, coordinates, array shapes, consolidated
  metadata) is written only by :meth:`Cube.publish`, under the store's publish lease.

Readers always see a store that opens: every file is replaced atomically, coordinates have a
fixed chunk size, and the consolidated metadata (one file) is written last, so a reader holding
the previous metadata still decodes every chunk. The member records are the truth about what
the cube holds; :meth:`Cube.publish` derives everything else from them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import math
import os
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

if TYPE_CHECKING:
    import numpy as np

from ambasync import __version__
from ambasync.errors import ConfigError, DiskFullError, disk_full
from ambasync.files import atomic_path
from ambasync.cube import layout
from ambasync.cube.layout import (BY_VOXEL, CATALOGUE_COLUMNS, COORD_CHUNK, DIMS, FILL, FLOAT_COLUMNS, FORMAT_VERSION, INT_COLUMNS, META, PLANES, STRING_COLUMNS, CubeSettings)
from ambasync.cube.slots import Member, Slots, lease

STALE_CLAIM_SECONDS = 24 * 3600  # a slot claimed this long ago and never filled is free again
BROKEN_CLAIM_SECONDS = 60  # a claim folder without its claim.json (killed between the two) this old is free
LEASE_WAIT_SECONDS = 900.0  # how long a publish waits for another writer's publish
LEASE_STALE_SECONDS = 3600.0  # a publish lease this old was left by a dead writer
SLAB_BYTES = 128 * 1024 * 1024  # at most this much of a block in one rebuild task (peak RSS <= 1 GB on 2 workers)


class CubeSettingsError(ConfigError):
    """The store at cube.zarr was written with other settings: never mixed (exit 2, or --force)."""


@dataclass(frozen=True)
class PublishResult:
    changed: bool  # False: nothing to publish, the store's bytes were not touched
    experiments: int
    empty_slots: int  # slots inside the cube holding no experiment (shown with negative ids)
    blocks_rebuilt: int


@dataclass(frozen=True)
class CubeSummary:
    """What ``status`` shows."""

    path: str
    exists: bool
    experiments: int = 0  # published experiments
    size_bytes: int = 0  # all files of the store
    updated: str = ""  # ISO 8601 UTC of the last publish
    settings: dict | None = None


geometry = layout.geometry  # the cube's grid (importable from here, as before)


def _timestamp(now: float | None = None) -> str:
    return dt.datetime.fromtimestamp(time.time() if now is None else now, dt.timezone.utc).strftime("%Y%m%dT%H%M%S")


def _iso(now: float | None = None) -> str:
    return dt.datetime.fromtimestamp(time.time() if now is None else now, dt.timezone.utc).isoformat(
        timespec="seconds")


def set_aside(path: Path, reason: str, now: float | None = None) -> Path:
    """Rename a store out of the way (``cube.zarr.{reason}-YYYYmmddTHHMMSS``), never delete it."""
    base = path.with_name(f"{path.name}.{reason}-{_timestamp(now)}")
    target, i = base, 1
    while target.exists():
        target, i = base.with_name(f"{base.name}-{i}"), i + 1
    os.rename(path, target)
    return target


def _blosc_codec(c: layout.Codec):
    from zarr.codecs import BloscCodec

    return BloscCodec(cname=c.cname, clevel=c.clevel, shuffle=c.shuffle, typesize=4)


def _consolidate(path: Path) -> None:
    import zarr

    with warnings.catch_warnings():  # "consolidated metadata is not part of the v3 spec": known, wanted
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path))


def _create(path: Path, settings: CubeSettings) -> None:
    """Make an empty store beside ``path`` and rename it into place: a killed creation leaves no
    half store under the final name; of two writers creating at once, one wins, one opens it."""
    import zarr

    tmp = path.with_name(f".{path.name}.creating-{uuid.uuid4().hex}")
    geo = geometry(settings)
    try:
        g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        coords = " ".join(CATALOGUE_COLUMNS)
        for var in settings.variables():
            g.create_array(var, shape=(0, *geo.sizes), chunks=(1, *geo.sizes), dtype="float32", fill_value=FILL,
                           compressors=[_blosc_codec(settings.codec)], dimension_names=["experiment", *DIMS],
                           attributes={"coordinates": coords})
        if settings.by_voxel:
            g.create_array(BY_VOXEL, shape=(*geo.sizes, 0), chunks=(*settings.by_voxel_chunk, settings.block),
                           dtype="float32", fill_value=FILL, compressors=[_blosc_codec(settings.by_voxel_codec)],
                           dimension_names=[*DIMS, "experiment"], attributes={"coordinates": coords})
        g.create_array("experiment", shape=(0,), chunks=(COORD_CHUNK,), dtype="int64", fill_value=0,
                       dimension_names=["experiment"],
                       attributes={"long_name": "Allen experiment (SectionDataSet) id; < 0: empty slot"})
        for col in CATALOGUE_COLUMNS:
            dtype, fill = ("str", "") if col in STRING_COLUMNS else ("float64", math.nan) if col in FLOAT_COLUMNS \
                else ("int64", -1)
            g.create_array(col, shape=(0,), chunks=(COORD_CHUNK,), dtype=dtype, fill_value=fill,
                           dimension_names=["experiment"])
        cosines = {"xspace": geo.x_cosines, "yspace": geo.y_cosines, "zspace": geo.z_cosines}
        for i, dim in enumerate(DIMS):
            a = g.create_array(dim, shape=(geo.sizes[i],), chunks=(geo.sizes[i],), dtype="float64",
                               dimension_names=[dim], attributes={
                                   "units": "mm", "start": geo.starts[i], "step": geo.steps[i],
                                   "direction_cosines": list(cosines[dim])})
            a[:] = layout.world_axis(geo.starts[i], geo.steps[i], geo.sizes[i])
        for plane in PLANES:
            g.create_array(f"coverage_{plane}", shape=geo.sizes, chunks=geo.sizes, dtype="float32", fill_value=0.0,
                           dimension_names=list(DIMS), attributes={
                               "long_name": f"fraction of the cube's {plane} experiments with data at the voxel"})
        g.attrs.update(_root_attrs(settings, now=None))
        (tmp / META).mkdir()
        with atomic_path(tmp / META / "settings.json") as t:
            t.write_text(json.dumps(settings.identity(), sort_keys=True))
        _consolidate(tmp)
        try:
            os.rename(tmp, path)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another writer created it first
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(exc):
            raise DiskFullError(f"no space left on the device holding {path}: free space, then run again") from exc
        raise


def _root_attrs(settings: CubeSettings, now: float | None) -> dict:
    return {
        "ambasync_version": __version__, "format_version": FORMAT_VERSION, "orientation": settings.orientation,
        "space": settings.space, "expansion": float(settings.expansion), "volumes": list(settings.volumes),
        "source_url": settings.source_url, "updated": _iso(now), "ambasync_settings": settings.identity(),
    }


def recorded_settings(path: Path) -> dict | None:
    """The settings a store was made with, or None if it is not a readable ambasync cube.

    Plain JSON (the root's consolidated metadata, the array's metadata, our settings), no zarr:
    the run's event-loop process opens the cube without importing numpy."""
    try:
        recorded = json.loads((path / META / "settings.json").read_text())
        root = json.loads((path / "zarr.json").read_text())
        arrays = root["consolidated_metadata"]["metadata"]
        if (root["zarr_format"], root["node_type"]) != (3, "group") or "expression" not in arrays or \
                int(root["attributes"]["format_version"]) != FORMAT_VERSION:
            return None
        if json.loads((path / "expression" / "zarr.json").read_text())["node_type"] != "array":
            return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None  # any failure to read means damaged or foreign
    return recorded if isinstance(recorded, dict) else None


def _sweep_creations(parent: Path, name: str, older_than: float = 3600.0) -> None:
    for leftover in parent.glob(f".{name}.creating-*"):
        with contextlib.suppress(OSError):
            if time.time() - leftover.stat().st_mtime > older_than:
                shutil.rmtree(leftover, ignore_errors=True)


class Cube:
    """A cube store opened for writing by one run (main process). Not thread-safe."""

    def __init__(self, path: Path, settings: CubeSettings, writer: str, set_aside_to: Path | None):
        self.path = Path(path)
        self.settings = settings
        self.writer = writer
        self.set_aside_to = set_aside_to  # where a damaged, foreign or (with force) other store went
        self.slots = Slots(self.path / META)
        self.slots.sweep()
        self._taken = self.slots.taken()
        members, self._orphans = self.slots.scan()
        self._by_id: dict[int, Member] = {}
        for slot in sorted(members):  # a duplicate (two runs on one experiment) keeps its first slot
            self._by_id.setdefault(members[slot].experiment_id, members[slot])
        self._low = 0
        self._claimed: dict[int, int] = {}  # slots this Cube claimed: slot -> experiment id

    @classmethod
    def open(cls, path: str | os.PathLike, settings: CubeSettings, *, writer: str = "", force: bool = False,
             now: float | None = None) -> Cube:
        """Open ``path`` (``{out}/cube.zarr``) for writing, creating it if need be.

        A damaged or foreign store is renamed ``cube.zarr.damaged-…`` and a new one made. A
        store written with other settings raises :class:`CubeSettingsError`, or with ``force``
        is renamed ``cube.zarr.replaced-…`` and a new one made. ``writer`` names this writer
        in claims and the lease (e.g. "shard 0/2 on host"); informational only.
        """
        layout.validate(settings)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep_creations(path.parent, path.name)
        moved: Path | None = None
        if path.exists() or path.is_symlink():
            recorded = recorded_settings(path) if path.is_dir() else None
            if recorded is None:
                moved = set_aside(path, "damaged", now)
            elif recorded != settings.identity():
                if not force:
                    raise CubeSettingsError(
                        f"{path} was written with {_describe(recorded)}, not {_describe(settings.identity())}: "
                        "run with --force to rebuild it (the old one is kept beside it), or choose another --out")
                moved = set_aside(path, "replaced", now)
        if not path.exists():
            _create(path, settings)
            if recorded_settings(path) != settings.identity():  # lost a creation race to other settings
                raise CubeSettingsError(f"{path} was just created by another writer with other settings: "
                                        "run again with the same settings or another --out")
        return cls(path, settings, writer, moved)

    # -- membership -------------------------------------------------------------------------------
    def members(self) -> dict[int, Member]:
        """Experiments in the cube (as of opening and this run's own changes), by experiment id."""
        return dict(self._by_id)

    def holds(self, experiment_id: int) -> bool:
        """Whether the experiment is in the cube (asked once per catalogue row: no copy)."""
        return experiment_id in self._by_id

    def missing(self, experiment_ids: Iterable[int]) -> list[int]:
        """Those of ``experiment_ids`` the cube does not hold (what a MINC-only mirror must add)."""
        return [e for e in experiment_ids if e not in self._by_id]

    def slot_for(self, experiment_id: int) -> int:
        """The experiment's slot: its own if it is in the cube, else a free one, claimed now.
        Call in the main process before submitting its conversion."""
        member = self._by_id.get(experiment_id)
        if member is not None:
            return member.slot
        for slot, claim in sorted(self._orphans.items()):
            # our own experiment's claim left by a killed run (only its shard writes it), or a stale one
            age = self.slots.claim_age(slot)
            if claim.experiment_id == experiment_id or age > STALE_CLAIM_SECONDS or (
                    claim.experiment_id == -1 and age > BROKEN_CLAIM_SECONDS):
                del self._orphans[slot]
                self.slots.write_claim(slot, experiment_id, self.writer)
                self._claimed[slot] = experiment_id
                return slot
        try:
            slot = self.slots.claim(experiment_id, self.writer, self._taken, self._low)
        except OSError as exc:
            if disk_full(exc):
                raise DiskFullError(f"no space left on the device holding {self.path}: free space, then run again") \
                    from exc
            raise
        self._low = slot + 1
        self._claimed[slot] = experiment_id
        return slot

    def record(self, experiment_id: int, slot: int, shas: Mapping[str, str], fields: Mapping | None = None) -> Member:
        """Every volume of the experiment is in its slot (the worker's :class:`CubeWrite` s, or the
        run's Done): write its member record. This is what makes it part of the cube."""
        missing = [v for v in self.settings.volumes if v not in shas]
        if missing:
            raise ValueError(f"experiment {experiment_id}: no {', '.join(missing)} written to slot {slot}")
        member = Member(slot, experiment_id, shas["energy"], {v: shas[v] for v in self.settings.volumes},
                        {c: layout.catalogue_value(c, (fields or {}).get(c)) for c in CATALOGUE_COLUMNS})
        current = self.slots.read_member(slot)
        if current is None or (current.experiment_id, current.sha256, current.volumes, current.fields) != (
                member.experiment_id, member.sha256, member.volumes, member.fields):
            try:
                self.slots.write_member(member)
            except OSError as exc:
                if disk_full(exc):
                    raise DiskFullError(f"no space left on the device holding {self.path}: free space, then run "
                                        "again") from exc
                raise
        self._by_id[experiment_id] = member
        self._claimed.pop(slot, None)
        return member

    def release(self, experiment_id: int, slot: int) -> None:
        """The conversion of an experiment failed: a newly claimed slot is freed; a slot that
        already held the experiment keeps it (its previous grids are still there, unharmed)."""
        if experiment_id not in self._by_id or self._by_id[experiment_id].slot != slot:
            self._remove_slot(slot)

    def remove(self, experiment_id: int) -> bool:
        """Take an experiment out of the cube (``--prune``); its slot is free for the next new one."""
        member = self._by_id.pop(experiment_id, None)
        if member is None:
            return False
        self._remove_slot(member.slot)
        return True

    def prune(self, keep: Iterable[int], shard: tuple[int, int] | None = None) -> list[int]:
        """Remove the experiments not in ``keep`` (the complete catalogue), and leftover claims
        for them; returns the removed ids. With ``shard=(K, N)`` only experiments with
        ``id % N == K`` are considered, so one shard never removes another's."""
        keep = set(keep)

        def mine(eid: int) -> bool:
            return shard is None or eid % shard[1] == shard[0]

        gone = sorted(e for e in self._by_id if e not in keep and mine(e))
        for eid in gone:
            self.remove(eid)
        for slot, claim in list(self._orphans.items()):
            # a claim without its record for an experiment that is gone; a broken claim (no
            # claim.json) only once it is old: a writer may be between its mkdir and its claim.json
            if (claim.experiment_id not in keep and claim.experiment_id != -1 and mine(claim.experiment_id)) or (
                    claim.experiment_id == -1 and self.slots.claim_age(slot) > BROKEN_CLAIM_SECONDS):
                del self._orphans[slot]
                self._remove_slot(slot)
        return gone

    def _remove_slot(self, slot: int) -> None:
        # record first (readers and publish stop counting it), then the data, then the claim
        self.slots.unrecord(slot)
        for var in self.settings.variables():
            (self.path / layout.chunk_key(var, slot)).unlink(missing_ok=True)
        self.slots.release(slot)
        self._taken.discard(slot)
        self._claimed.pop(slot, None)
        self._low = min(self._low, slot)

    # -- publish ----------------------------------------------------------------------------------
    def publish(self, *, workers: int = 0, now: float | None = None, wait_seconds: float = LEASE_WAIT_SECONDS,
                stale_seconds: float = LEASE_STALE_SECONDS) -> PublishResult:
        """Bring the shared parts up to date with the member records (run end). Does nothing,
        and writes nothing, when the members are those last published. The voxel-major copy
        is rebuilt on ``workers`` processes (0: one per CPU; 1: in this process).

        First the slots this Cube claimed but never recorded (experiments that failed) are
        freed, and free slots below the end are filled with this writer's last experiments
        (see :meth:`_compact`), so the published cube has no empty slot in the usual case."""
        for slot in list(self._claimed):
            self._remove_slot(slot)
        members, _ = self.slots.scan()
        if _digest(members) == self._published_digest():
            return PublishResult(False, len(members), 0, 0)
        try:
            with lease(self.path / META, self.writer, wait_seconds, stale_seconds):
                _sweep_partials(self.path, self.settings)
                members = self._compact()
                digest = _digest(members)
                if digest == self._published_digest():
                    return PublishResult(False, len(members), 0, 0)
                result = _publish(self.path, self.settings, members, now, workers or os.cpu_count() or 1)
                with atomic_path(self.path / META / "published.json") as tmp:
                    tmp.write_text(json.dumps({"digest": digest, "time": _iso(now)}))
                return result
        except OSError as exc:
            if disk_full(exc):
                raise DiskFullError(f"no space left on the device holding {self.path} while publishing the cube: "
                                    "free space, then run again (the previous cube is still readable)") from exc
            raise

    def _compact(self) -> dict[int, Member]:
        """Move this writer's highest experiments down into free slots (and drop its duplicates),
        under the lease. Only this writer's own: no other writer can be rewriting them now (a
        shard's runs never overlap: the run's lock). Each move copies the chunks, records the new
        slot, then frees the old one: a kill at any point leaves the data in at least one
        recorded slot (a duplicate is resolved to its lowest slot, holding the same values)."""
        members, orphans = self.slots.scan()
        mine = {s for s in members if (c := self.slots.claim_of(s)) is not None and c.writer == self.writer}
        first: dict[int, int] = {}
        for slot in sorted(members):
            eid = members[slot].experiment_id
            if eid in first and slot in mine:
                self._remove_slot(slot)  # a duplicate left by a killed move: the lower slot holds it
                del members[slot]
            first.setdefault(eid, slot)
        free = 0
        while True:
            candidates = sorted((s for s in members if s in mine), reverse=True)
            taken = set(members) | set(orphans)
            while free in taken:
                free += 1
            if not candidates or candidates[0] < free:
                return members
            high = candidates[0]
            member = members[high]
            if not self.slots.claim_free(free, member.experiment_id, self.writer):
                orphans[free] = None  # taken by another writer meanwhile
                continue
            for var in self.settings.variables():
                src, dst = self.path / layout.chunk_key(var, high), self.path / layout.chunk_key(var, free)
                dst.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(dst) as tmp:
                    shutil.copyfile(src, tmp)
            moved = Member(free, member.experiment_id, member.sha256, member.volumes, member.fields)
            self.slots.write_member(moved)
            self._remove_slot(high)
            del members[high]
            members[free] = moved
            mine.add(free)
            self._by_id[moved.experiment_id] = moved

    def _published_digest(self) -> str | None:
        try:
            return json.loads((self.path / META / "published.json").read_text())["digest"]
        except (OSError, ValueError, KeyError):
            return None


def _sweep_partials(path: Path, settings: CubeSettings) -> None:
    """Remove what a killed publish left of zarr's own atomic writes (``*.partial`` beside a
    metadata or coordinate file). Only publish writes through zarr, and we hold its lease."""
    big = {*settings.variables(), BY_VOXEL}
    for entry in path.iterdir():
        if entry.name.endswith(".partial"):
            entry.unlink(missing_ok=True)
        elif entry.is_dir() and entry.name != META:
            pattern = "*.partial" if entry.name in big else "**/*.partial"
            for leftover in entry.glob(pattern):
                leftover.unlink(missing_ok=True)


def _describe(identity: dict) -> str:
    return (f"orientation={identity.get('orientation')} space={identity.get('space')} "
            f"expansion={identity.get('expansion')} volumes={','.join(identity.get('volumes', []))}"
            + ("" if identity.get("by_voxel", True) else " without the voxel-major copy"))


def _digest(members: Mapping[int, Member]) -> str:
    doc = [(slot, m.experiment_id, m.sha256, m.fields) for slot, m in sorted(members.items())]
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _resize(array, shape: tuple[int, ...]) -> None:
    """Resize keeping chunks outside the shape: slots past the published end belong to writers
    that have not published yet."""
    from zarr.core.sync import sync

    if tuple(array.shape) != tuple(shape):
        sync(array.async_array.resize(shape, delete_outside_chunks=False))


def _publish(path: Path, settings: CubeSettings, members: Mapping[int, Member], now: float | None,
             workers: int) -> PublishResult:
    import numpy as np

    import zarr

    g = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    by_slot: dict[int, Member] = {}
    seen: set[int] = set()
    for slot in sorted(members):
        if members[slot].experiment_id not in seen:  # a duplicate stays out (an empty slot)
            seen.add(members[slot].experiment_id)
            by_slot[slot] = members[slot]
    n = max(by_slot) + 1 if by_slot else 0
    geo = geometry(settings)
    for var in settings.variables():
        _resize(g[var], (n, *geo.sizes))
    if settings.by_voxel:
        _resize(g[BY_VOXEL], (*geo.sizes, n))
    for name in ("experiment", *CATALOGUE_COLUMNS):
        _resize(g[name], (n,))

    # voxel-major copy and coverage counts, one block of slots at a time, only where members changed
    blocks_dir = path / META / "blocks"
    blocks_dir.mkdir(exist_ok=True)
    n_blocks = math.ceil(n / settings.block)
    todo: dict[int, dict] = {}
    for b in range(n_blocks):
        lo, hi = b * settings.block, min((b + 1) * settings.block, n)
        want = {str(s): [by_slot[s].sha256, by_slot[s].fields.get("plane", "")] for s in range(lo, hi) if s in by_slot}
        want_doc = {"slots": want, "end": hi}
        try:
            same = json.loads((blocks_dir / f"{b:06d}.json").read_text()) == want_doc and \
                (blocks_dir / f"{b:06d}.npz").exists()
        except (OSError, ValueError):
            same = False
        if not same:
            todo[b] = want_doc
    _rebuild_blocks(path, settings, by_slot, sorted(todo), n, workers)
    totals = {plane: np.zeros(geo.sizes, dtype=np.int64) for plane in PLANES}
    for b in range(n_blocks):
        if b in todo:  # the block's counts were written by _rebuild_blocks: now its record
            with atomic_path(blocks_dir / f"{b:06d}.json") as tmp:
                tmp.write_text(json.dumps(todo[b], sort_keys=True))
        with np.load(blocks_dir / f"{b:06d}.npz") as saved:
            for plane in PLANES:
                totals[plane] += saved[plane]
    for stale in blocks_dir.glob("*.json"):
        if stale.stem.isdigit() and int(stale.stem) >= n_blocks:
            stale.unlink(missing_ok=True)
            (blocks_dir / f"{stale.stem}.npz").unlink(missing_ok=True)

    planes = [by_slot[s].fields.get("plane", "") for s in sorted(by_slot)]
    for plane in PLANES:
        count = planes.count(plane)
        coverage = (totals[plane] / count if count else np.zeros(geo.sizes)).astype(np.float32)
        g[f"coverage_{plane}"][...] = coverage

    if n:
        g["experiment"][:] = np.array([by_slot[s].experiment_id if s in by_slot else -(s + 1) for s in range(n)],
                                      dtype=np.int64)
        for col in CATALOGUE_COLUMNS:
            values = [layout.catalogue_value(col, by_slot[s].fields.get(col) if s in by_slot else None)
                      for s in range(n)]
            dtype = object if col in STRING_COLUMNS else np.float64 if col in FLOAT_COLUMNS else np.int64
            g[col][:] = np.array(values, dtype=dtype)
    g.attrs.update(_root_attrs(settings, now))
    _consolidate(path)  # last: readers switch to the new shapes in one rename
    return PublishResult(True, len(by_slot), n - len(by_slot), len(todo))


def _rebuild_blocks(path: Path, settings: CubeSettings, by_slot: Mapping[int, Member], blocks: list[int], n: int,
                    workers: int) -> None:
    """Rebuild the voxel-major chunks and coverage counts of ``blocks``, each block split into
    slabs of zspace chunks, one task per (block, slab) on ``workers`` processes: a task holds one
    slab of one block (block × slab × 637 KB / 41 planes), so memory stays bounded."""
    import numpy as np

    if not blocks:
        return
    geo = geometry(settings)
    cz = settings.by_voxel_chunk[0]
    starts = list(range(0, geo.sizes[0], cz))
    plane_bytes = settings.block * geo.sizes[1] * geo.sizes[2] * 4
    # as few slabs as the memory cap allows: each slab decodes every volume of its block again
    per = max(1, min(math.ceil(len(starts) / max(1, workers)), SLAB_BYTES // (plane_bytes * cz)))
    slabs = [(starts[i], min(geo.sizes[0], starts[i] + per * cz)) for i in range(0, len(starts), per)]
    tasks = []
    for b in blocks:
        lo, hi = b * settings.block, min((b + 1) * settings.block, n)
        rows = [(s, by_slot[s].fields.get("plane", "")) if s in by_slot else (s, None) for s in range(lo, hi)]
        tasks.extend((str(path), settings, b, rows, z0, z1) for z0, z1 in slabs)
    if workers <= 1:
        parts = [_rebuild_slab(*t) for t in tasks]
    else:
        import concurrent.futures

        from ambasync.mirror.pool import start_forkserver

        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=start_forkserver()) as pool:
            parts = list(pool.map(_rebuild_slab, *zip(*tasks)))
    counts: dict[int, dict[str, np.ndarray]] = {b: {p: np.zeros(geo.sizes, np.int64) for p in PLANES} for b in blocks}
    for (_, _, b, _, z0, z1), part in zip(tasks, parts):
        for plane in PLANES:
            counts[b][plane][z0:z1] = part[plane]
    for b in blocks:
        with atomic_path(path / META / "blocks" / f"{b:06d}.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **counts[b])


def _rebuild_slab(store: str, settings: CubeSettings, b: int, rows: list[tuple[int, str | None]], z0: int,
                  z1: int) -> dict[str, np.ndarray]:
    """One (block, slab) task: read the block's volume-major chunks (empty slots: -1), keep the
    slab, write its voxel-major chunks (full chunk shape, padded with -1, as zarr stores edge
    chunks), return its per-plane counts of voxels with data."""
    import numpy as np

    geo = geometry(settings)
    codec = layout.blosc(settings.codec)
    by_voxel_codec = layout.blosc(settings.by_voxel_codec)
    path = Path(store)
    data = np.full((settings.block, z1 - z0, *geo.sizes[1:]), FILL, dtype=np.float32)
    for i, (slot, plane) in enumerate(rows):
        if plane is None:
            continue  # an empty slot: whatever a killed writer left there is not in the cube
        try:
            blob = (path / layout.chunk_key("expression", slot)).read_bytes()
        except FileNotFoundError:
            continue  # reads as -1 through zarr too
        data[i] = np.frombuffer(codec.decode(blob), dtype="<f4").reshape(geo.sizes)[z0:z1]
    counts = {}
    for plane in PLANES:
        idx = [i for i, (_, p) in enumerate(rows) if p == plane]
        counts[plane] = np.count_nonzero(data[idx] != FILL, axis=0).astype(np.int64) if idx \
            else np.zeros(data.shape[1:], dtype=np.int64)
    if settings.by_voxel:
        cz, cy, cx = settings.by_voxel_chunk
        _, y, x = geo.sizes
        chunk = np.empty((cz, cy, cx, settings.block), dtype="<f4")
        for zs in range(z0, z1, cz):
            for ys in range(0, y, cy):
                for xs in range(0, x, cx):
                    chunk.fill(FILL)
                    part = data[:, zs - z0:zs - z0 + cz, ys:ys + cy, xs:xs + cx]
                    chunk[:part.shape[1], :part.shape[2], :part.shape[3], :] = np.moveaxis(part, 0, -1)
                    key = path / BY_VOXEL / "c" / str(zs // cz) / str(ys // cy) / str(xs // cx) / str(b)
                    key.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_path(key) as tmp:
                        tmp.write_bytes(by_voxel_codec.encode(chunk))
    return counts


def _store_size(path: Path) -> int:
    total = 0
    stack = [path]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def cube_summary(path: str | os.PathLike) -> CubeSummary:
    """Experiments, size on disk and last update of the cube at ``path`` (what readers see)."""
    import numpy as np

    import zarr

    path = Path(path)
    if not path.is_dir():
        return CubeSummary(str(path), False)
    try:
        g = zarr.open_group(str(path), mode="r", use_consolidated=True)
        ids = np.asarray(g["experiment"][:]) if g["experiment"].shape[0] else np.zeros(0, dtype=np.int64)
        attrs = dict(g.attrs)
    except Exception:  # noqa: BLE001  a damaged store is reported as such by the run, not here
        return CubeSummary(str(path), True, size_bytes=_store_size(path))
    return CubeSummary(str(path), True, int(np.count_nonzero(ids >= 0)), _store_size(path),
                       str(attrs.get("updated", "")), attrs.get("ambasync_settings"))
