"""The cube store in the main process: open (create, check, set aside), record what the run
converted, remove experiments, publish, summarise. The store is a folder or any fsspec URL
(:mod:`ambasync.cube.kv`).

Who writes what (so that no two writers ever write the same object, on one machine or several):

- conversion workers stage each experiment's grids (``staged/{id}.{volume}``, one object per
  experiment and volume: shards of the catalogue never share an experiment) under the stage
  folder: the store itself when it is a folder, else the run's local stage, uploaded by
  :meth:`Cube.publish` before it publishes;
- the run's main process writes its own record batches (new objects, from a thread);
- everything shared (the sharded arrays, the voxel-major copy, coverage, coordinates, the member
  table, metadata) is written only by :meth:`Cube.publish`, under the store's publish lease.

Readers always see a store that opens: every object is replaced whole, coordinates have a fixed
chunk size, and the consolidated metadata (the root ``zarr.json``) is written last.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import errno
import json
import math
import os
import shutil
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from ambasync import __version__
from ambasync.errors import ConfigError, DiskFullError, disk_full
from ambasync.cube import layout
from ambasync.cube.kv import KV, CubeStoreError, LocalKV, check_reachable, is_remote, local_path
from ambasync.cube.layout import (BLOCKS, BY_VOXEL, CATALOGUE_COLUMNS, COORD_CHUNK, DIMS, FILL, FLOAT_COLUMNS,
                                  FORMAT_VERSION, INTENT_KEY, MEMBERS_KEY, META, PLANES, RECORDS, SETTINGS_KEY,
                                  STAGED, STRING_COLUMNS, CubeSettings)
from ambasync.cube.slots import Member, RecordLog, apply_records, lease, read_members, read_records

LEASE_WAIT_SECONDS = 900.0  # how long a publish waits for another writer's publish
LEASE_STALE_SECONDS = 3600.0  # a publish lease this old was left by a dead writer
ORPHAN_SECONDS = 24 * 3600  # a staged grid no record names, this old, was left by a killed writer


class CubeSettingsError(ConfigError):
    """The store at cube.zarr was written with other settings: never mixed (exit 2, or --force)."""


@dataclass(frozen=True)
class PublishResult:
    changed: bool  # False: nothing to publish, the store's bytes were not touched
    experiments: int
    empty_slots: int  # slots inside the cube holding no experiment (shown with negative ids)
    blocks_rebuilt: int
    version: str = ""  # the cube's version after this publish


@dataclass(frozen=True)
class CubeSummary:
    """What ``status`` shows."""

    path: str
    exists: bool
    experiments: int = 0  # published experiments
    size_bytes: int = 0  # all objects of the store
    updated: str = ""  # ISO 8601 UTC of the last publish
    settings: dict | None = None
    version: str = ""


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

    return BloscCodec(cname=c.cname, clevel=c.clevel, shuffle=c.shuffle, typesize=4, blocksize=c.blocksize)


def _make_arrays(location: str, settings: CubeSettings) -> None:
    """An empty cube (zarr's own writes), its settings, then the consolidated metadata last (for a
    store at a URL: made in a local folder, then uploaded, the root last)."""
    from ambasync.cube.publish import with_local_copy

    if is_remote(location):
        KV.open(location).put(SETTINGS_KEY, json.dumps(settings.identity(), sort_keys=True).encode())
    with_local_copy(location, None, lambda folder: _make_local_arrays(folder, settings))


def _make_local_arrays(location: str, settings: CubeSettings) -> None:
    import zarr

    from ambasync.cube.publish import zarr_store

    geo = geometry(settings)
    # "a", arrays overwritten one by one: "w" would first delete the whole prefix, and with it the
    # lease a store at a URL is created under
    g = zarr.open_group(zarr_store(location), mode="a", zarr_format=3)
    coords = " ".join(CATALOGUE_COLUMNS)
    for var in settings.variables():
        g.create_array(var, overwrite=True, shape=(0, *geo.sizes), chunks=(settings.inner, *geo.sizes),
                       shards=(settings.block, *geo.sizes), dtype="float32", fill_value=FILL,
                       compressors=[_blosc_codec(settings.codec)], dimension_names=["experiment", *DIMS],
                       attributes={"coordinates": coords})
    if settings.by_voxel:
        g.create_array(BY_VOXEL, overwrite=True, shape=(*geo.sizes, 0), chunks=(*settings.by_voxel_chunk, settings.block),
                       shards=layout.by_voxel_shard_shape(settings), dtype="float32", fill_value=FILL,
                       compressors=[_blosc_codec(settings.by_voxel_codec)], dimension_names=[*DIMS, "experiment"],
                       attributes={"coordinates": coords})
    g.create_array("experiment", overwrite=True, shape=(0,), chunks=(COORD_CHUNK,), dtype="int64", fill_value=0,
                   dimension_names=["experiment"],
                   attributes={"long_name": "Allen experiment (SectionDataSet) id; < 0: empty slot"})
    for col in CATALOGUE_COLUMNS:
        dtype, fill = ("str", "") if col in STRING_COLUMNS else ("float64", math.nan) if col in FLOAT_COLUMNS \
            else ("int64", -1)
        g.create_array(col, overwrite=True, shape=(0,), chunks=(COORD_CHUNK,), dtype=dtype, fill_value=fill,
                       dimension_names=["experiment"])
    cosines = {"xspace": geo.x_cosines, "yspace": geo.y_cosines, "zspace": geo.z_cosines}
    for i, dim in enumerate(DIMS):
        a = g.create_array(dim, overwrite=True, shape=(geo.sizes[i],), chunks=(geo.sizes[i],), dtype="float64",
                           dimension_names=[dim], attributes={
                               "units": "mm", "start": geo.starts[i], "step": geo.steps[i],
                               "direction_cosines": list(cosines[dim])})
        a[:] = layout.world_axis(geo.starts[i], geo.steps[i], geo.sizes[i])
    for plane in PLANES:
        g.create_array(f"coverage_{plane}", overwrite=True, shape=geo.sizes, chunks=geo.sizes, dtype="float32", fill_value=0.0,
                       dimension_names=list(DIMS), attributes={
                           "long_name": f"fraction of the cube's {plane} experiments with data at the voxel"})
    g.attrs.update(_root_attrs(settings, now=None, version=""))
    KV.open(location).put(SETTINGS_KEY, json.dumps(settings.identity(), sort_keys=True).encode())
    with warnings.catch_warnings():  # "consolidated metadata is not part of the v3 spec": known, wanted
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(zarr_store(location))


def _create(path: Path, settings: CubeSettings) -> None:
    """Make an empty store beside ``path`` and rename it into place: a killed creation leaves no
    half store under the final name; of two writers creating at once, one wins, one opens it."""
    tmp = path.with_name(f".{path.name}.creating-{uuid.uuid4().hex}")
    try:
        _make_arrays(str(tmp), settings)
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


def _root_attrs(settings: CubeSettings, now: float | None, version: str) -> dict:
    return {
        "ambasync_version": __version__, "format_version": FORMAT_VERSION, "orientation": settings.orientation,
        "space": settings.space, "expansion": float(settings.expansion), "volumes": list(settings.volumes),
        "source_url": settings.source_url, "updated": _iso(now), "ambasync_settings": settings.identity(),
        "cube_version": version,
    }


def recorded_settings(path: str | os.PathLike | KV) -> dict | None:
    """The settings a store was made with (an earlier layout's lack ``layout``: they never match),
    or None if it is not a readable ambasync cube.

    Plain JSON (the root's consolidated metadata, the array's metadata, our settings), no zarr:
    the run's event-loop process opens the cube without importing numpy."""
    kv = path if isinstance(path, KV) else KV.open(path)
    try:
        root = json.loads(kv.get("zarr.json") or b"")
        arrays = root["consolidated_metadata"]["metadata"]
        if (root["zarr_format"], root["node_type"]) != (3, "group") or "expression" not in arrays or \
                int(root["attributes"]["format_version"]) != FORMAT_VERSION:
            return None
        recorded = json.loads(kv.get(SETTINGS_KEY) or b"")
        if json.loads(kv.get("expression/zarr.json") or b"")["node_type"] != "array":
            return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None  # any failure to read means damaged or foreign
    return recorded if isinstance(recorded, dict) else None


def _sweep_creations(parent: Path, name: str, older_than: float = 3600.0) -> None:
    for leftover in parent.glob(f".{name}.creating-*"):
        try:
            if time.time() - leftover.stat().st_mtime > older_than:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def _full(location: str, exc: BaseException, what: str = "") -> DiskFullError:
    return DiskFullError(f"no space left on the device holding {location}{what}: free space, then run again "
                         "(the published cube is still readable)")


class Cube:
    """A cube store opened for writing by one run (main process). Not thread-safe."""

    def __init__(self, location: str, settings: CubeSettings, writer: str, set_aside_to: Path | None,
                 kv: KV, stage: Path):
        self.location = location
        self.path = Path(location) if not is_remote(location) else Path(stage)
        self.settings = settings
        self.writer = writer
        self.set_aside_to = set_aside_to  # where a damaged, foreign or (with force) other store went
        self.kv = kv
        self.stage = Path(stage)  # where workers stage grids and records go before the publish
        self.stage_kv: KV = kv if not is_remote(location) else LocalKV(self.stage)
        published = read_members(kv)
        self._published = {m.experiment_id: m for m in published.values()}
        pending = read_records(kv) + (read_records(self.stage_kv) if self.stage_kv is not kv else [])
        self._by_id = apply_records(self._published, pending)
        self._log = RecordLog(self.stage_kv, writer)
        self.unchanged = 0  # experiments recorded with exactly the values the cube holds

    @classmethod
    def open(cls, path: str | os.PathLike, settings: CubeSettings, *, writer: str = "", force: bool = False,
             now: float | None = None, stage: str | os.PathLike | None = None) -> Cube:
        """Open the store at ``path`` (``{out}/cube.zarr``, or an fsspec URL) for writing, creating
        it if need be. ``stage``: for a store at a URL, the local folder where this writer's workers
        stage grids until the publish uploads them (default: a new temporary folder).

        A damaged or foreign local store is renamed ``cube.zarr.damaged-…`` and a new one made. A
        store written with other settings raises :class:`CubeSettingsError`, or with ``force`` (a
        local store) is renamed ``cube.zarr.replaced-…`` and a new one made. ``writer`` names this
        writer in records and the lease (e.g. "shard 0/2"); informational only.
        """
        layout.validate(settings)
        location = str(path)
        if is_remote(location):
            return cls._open_remote(location.rstrip("/"), settings, writer, force, stage)
        path = local_path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep_creations(path.parent, path.name)
        moved: Path | None = None
        if path.exists() or path.is_symlink():
            recorded = recorded_settings(path) if path.is_dir() else None
            settings = layout.with_recorded_tuning(settings, recorded)
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
        return cls(str(path), settings, writer, moved, KV.open(path), path)

    @classmethod
    def _open_remote(cls, location: str, settings: CubeSettings, writer: str, force: bool,
                     stage: str | os.PathLike | None) -> Cube:
        kv = KV.open(location)
        check_reachable(kv)
        recorded = recorded_settings(kv)
        if recorded is None:
            # under the lease: of two writers creating it at once, one makes it, the other opens it
            with lease(kv, writer, LEASE_WAIT_SECONDS, LEASE_STALE_SECONDS):
                recorded = recorded_settings(kv)
                if recorded is None:
                    foreign = [k for k in kv.list("") if not k.startswith(META)]
                    if kv.get("zarr.json") is not None or (foreign and kv.get(SETTINGS_KEY) is None):
                        raise CubeSettingsError(f"{location} holds something that is not an ambasync cube: remove "
                                                "it or choose another --cube")
                    _make_arrays(location, settings)  # nothing there (or our own creation, killed): make it
                    recorded = recorded_settings(kv)
        settings = layout.with_recorded_tuning(settings, recorded)
        if recorded != settings.identity():
            raise CubeSettingsError(
                f"{location} was written with {_describe(recorded)}, not {_describe(settings.identity())}: "
                "remove it (a store at a URL is never replaced by --force) or choose another --cube")
        stage = Path(stage) if stage is not None else Path(tempfile.mkdtemp(prefix="ambasync-cube-stage-"))
        (stage / META).mkdir(parents=True, exist_ok=True)
        LocalKV(stage).put(SETTINGS_KEY, kv.get(SETTINGS_KEY) or b"")  # the workers read the volume shape here
        return cls(location, settings, writer, None, kv, stage)

    # -- membership -------------------------------------------------------------------------------
    def members(self) -> dict[int, Member]:
        """Experiments in the cube (published, and recorded since), by experiment id; an
        experiment not yet published has slot -1."""
        return dict(self._by_id)

    def holds(self, experiment_id: int) -> bool:
        """Whether the experiment is in the cube (asked once per catalogue row: no copy)."""
        return experiment_id in self._by_id

    def missing(self, experiment_ids: Iterable[int]) -> list[int]:
        """Those of ``experiment_ids`` the cube does not hold (what a MINC-only mirror must add)."""
        return [e for e in experiment_ids if e not in self._by_id]

    def slot_for(self, experiment_id: int) -> int:
        """What the experiment's cube target carries (``Target.index``): the experiment's key in
        the stage. Slots are given by the publisher; nothing is claimed or written here."""
        return experiment_id

    def record(self, experiment_id: int, key: int, shas: Mapping[str, str], fields: Mapping | None = None) -> Member:
        """Every volume of the experiment is staged (the worker's :class:`CubeWrite` s, or the
        run's Done): record it (batched; written from a thread). An experiment whose values and
        fields are those the cube already holds is not recorded again, and its staged grids are
        dropped: nothing to publish."""
        missing = [v for v in self.settings.volumes if v not in shas]
        if missing:
            raise ValueError(f"experiment {experiment_id}: no {', '.join(missing)} staged")
        volumes = {v: shas[v] for v in self.settings.volumes}
        fields = {c: layout.catalogue_value(c, (fields or {}).get(c)) for c in CATALOGUE_COLUMNS}
        current = self._by_id.get(experiment_id)
        if current is not None and current.volumes == volumes and current.fields == fields:
            self.unchanged += 1
            published = self._published.get(experiment_id)
            if published is not None and published.volumes == volumes and published.fields == fields:
                # the cube holds exactly this: the staged copy is not needed (a recorded but not yet
                # published one is: its record names it)
                self.stage_kv.delete_many(layout.staged_key(experiment_id, v) for v in self.settings.volumes)
            return current
        member = Member(current.slot if current else -1, experiment_id, volumes["energy"], volumes, fields)
        try:
            self._log.add(experiment_id, volumes, fields)
        except OSError as exc:
            if disk_full(exc):
                raise _full(self.location, exc) from exc
            raise
        self._by_id[experiment_id] = member
        return member

    def release(self, experiment_id: int, key: int) -> None:
        """The conversion of an experiment failed: nothing was recorded, the cube keeps what it had
        (the worker removed what it had staged)."""

    def remove(self, experiment_id: int) -> bool:
        """Take an experiment out of the cube (``--prune``, or a damaged slot): recorded, and done
        by the next publish; its slot is then free for the next new experiment."""
        if self._by_id.pop(experiment_id, None) is None:
            return False
        self._log.remove(experiment_id)
        return True

    def prune(self, keep: Iterable[int], shard: tuple[int, int] | None = None) -> list[int]:
        """Remove the experiments not in ``keep`` (the complete catalogue); returns the removed
        ids. With ``shard=(K, N)`` only experiments with ``id % N == K`` are considered, so one
        shard never removes another's."""
        keep = set(keep)
        gone = sorted(e for e in self._by_id if e not in keep and (shard is None or e % shard[1] == shard[0]))
        for eid in gone:
            self.remove(eid)
        return gone

    def flush(self) -> None:
        """Every record so far written to the stage (the run calls it before it ends)."""
        self._log.flush()

    # -- publish ----------------------------------------------------------------------------------
    def _upload(self) -> None:
        """A store at a URL: this writer's staged grids, then its record batches (so a record never
        names a grid the store lacks), each object once, then removed from the local stage."""
        if self.stage_kv is self.kv:
            return
        for prefix in (STAGED, RECORDS):
            keys = sorted(self.stage_kv.list(prefix))
            for i in range(0, len(keys), 64):  # bounded memory: 64 grids (~20 MB) in flight
                batch = {k: self.stage_kv.get(k) for k in keys[i:i + 64]}
                self.kv.put_many({k: v for k, v in batch.items() if v is not None})
                self.stage_kv.delete_many(batch)

    def publish(self, *, workers: int = 0, now: float | None = None, wait_seconds: float = LEASE_WAIT_SECONDS,
                stale_seconds: float = LEASE_STALE_SECONDS) -> PublishResult:
        """Bring the cube readers see up to date with every writer's records (run end). Does
        nothing, and writes nothing, when no record waits and no publish was left half-done. The
        changed blocks are rebuilt on ``workers`` processes (0: one per CPU; 1: in this process)."""
        try:
            self._log.flush()
            self._upload()
            if not self.kv.list(RECORDS) and self.kv.get(INTENT_KEY) is None:
                members = read_members(self.kv)
                return PublishResult(False, len(members), _empty(members), 0, _version(self.kv))
            with lease(self.kv, self.writer, wait_seconds, stale_seconds):
                result = self._publish(workers or os.cpu_count() or 1, now)
            self._published = {m.experiment_id: m for m in read_members(self.kv).values()}
            self._by_id = apply_records(self._published, read_records(self.stage_kv) if self.stage_kv
                                        is not self.kv else [])
            return result
        except OSError as exc:
            if disk_full(exc):
                raise _full(self.location, exc, " while publishing the cube") from exc
            raise

    def _publish(self, workers: int, now: float | None) -> PublishResult:
        from ambasync.cube.publish import (block_rows, coverage_of, plan, rebuild_block, totals,
                                           write_coordinates)
        from ambasync.cube.slots import members_blob, version_of
        from ambasync.mirror.report import log

        kv, settings = self.kv, self.settings
        old = read_members(kv)
        records = read_records(kv)
        staged = kv.list(STAGED)
        intent = json.loads(kv.get(INTENT_KEY) or b'{"blocks": []}')
        p = plan(settings, old, records, set(staged), intent.get("blocks", []))
        old_n = _old_extent(kv)
        kv.put(INTENT_KEY, json.dumps({"blocks": p.blocks, "writer": self.writer, "time": time.time()}).encode())
        tasks = []
        for b in p.blocks:
            rows, expected = block_rows(settings, p, b)
            tasks.append((self.location, settings, b, rows, b * settings.block < old_n, expected))
        fresh: dict = {}  # the rebuilt blocks' counts, summed as they come (not kept per block: 1.3 MB each)
        found: set[int] = set()

        def take(result) -> None:
            _, counts, bad_ids = result
            for plane, values in counts.items():
                if plane in fresh:
                    fresh[plane] += values
                else:
                    fresh[plane] = values.astype("int64")
            found.update(bad_ids)

        if workers <= 1 or len(tasks) <= 1:
            for t in tasks:
                take(rebuild_block(*t))
        else:
            from ambasync.workers import start_forkserver

            with concurrent.futures.ProcessPoolExecutor(min(workers, len(tasks)),
                                                        mp_context=start_forkserver()) as pool:
                for result in pool.map(rebuild_block, *zip(*tasks)):
                    take(result)
        bad = sorted(found)
        members = dict(p.members)
        if bad:
            log.warning("cube: %d staged grids did not match their record and were left out (converted again by "
                        "the next run): %s", len(bad), ", ".join(map(str, bad[:20])))
            members = {s: m for s, m in members.items() if m.experiment_id not in bad}
        n = p.n
        version = version_of(members)
        counts = totals(kv, settings, n, set(p.blocks), fresh)
        write_coordinates(self.location, settings, members, n, coverage_of(settings, members, counts),
                          _root_attrs(settings, now, version))
        kv.put(MEMBERS_KEY, members_blob(members, version, _iso(now)))
        # what the new extent no longer covers, then what was applied
        n_blocks = math.ceil(n / settings.block)
        for b in range(n_blocks, math.ceil(old_n / settings.block)):
            kv.delete_many([*(layout.shard_key(v, b) for v in settings.variables()), f"{BLOCKS}/{b:06d}.npz",
                            *(layout.by_voxel_shard_key(z, b) for z in range(_z_shards(settings)))])
        orphans = [k for k, t in staged.items() if time.time() - t > ORPHAN_SECONDS]
        kv.delete_many(sorted(set(p.staged) | set(orphans)))
        _sweep_staged_folders(kv)
        kv.delete_many(p.applied)
        kv.delete(INTENT_KEY)
        return PublishResult(True, len(members), n - len(members), len(p.blocks), version)


def _sweep_staged_folders(kv: KV) -> None:
    """Remove the empty per-experiment folders under ``staged/`` that stores written before the
    flat staged keys kept after every publish (a folder still holding a grid is left)."""
    if not isinstance(kv, LocalKV):
        return  # an object store has no folders
    with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(kv.root / STAGED) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(OSError):  # not empty: an unpublished grid of the old layout
                    os.rmdir(entry.path)


def _z_shards(settings: CubeSettings) -> int:
    return -(-geometry(settings).sizes[0] // settings.zshard)


def _old_extent(kv: KV) -> int:
    try:
        return int(json.loads(kv.get("expression/zarr.json") or b"")["shape"][0])
    except (ValueError, KeyError, TypeError, IndexError):
        return 0


def _empty(members: Mapping[int, Member]) -> int:
    return (max(members) + 1 - len(members)) if members else 0


def _version(kv: KV) -> str:
    try:
        return json.loads(kv.get("zarr.json") or b"")["attributes"].get("cube_version", "")
    except (ValueError, KeyError, TypeError):
        return ""


def _describe(identity: dict) -> str:
    if identity.get("layout") != layout.LAYOUT_VERSION:
        return "an earlier ambasync's layout (one file per experiment)"
    return (f"orientation={identity.get('orientation')} space={identity.get('space')} "
            f"expansion={identity.get('expansion')} volumes={','.join(identity.get('volumes', []))}"
            + ("" if identity.get("by_voxel", True) else " without the voxel-major copy"))


def cube_summary(path: str | os.PathLike) -> CubeSummary:
    """Experiments, size and last update of the cube at ``path`` (a folder or a URL): what readers see."""
    location = str(path)
    if not is_remote(location) and not local_path(location).is_dir():
        return CubeSummary(location, False)
    kv = KV.open(location)
    try:
        root = json.loads(kv.get("zarr.json") or b"")
        attrs = root["attributes"]
    except (ValueError, KeyError, TypeError):
        if is_remote(location) and not kv.list(""):
            return CubeSummary(location, False)
        return CubeSummary(location, True, size_bytes=kv.total_size())
    members = read_members(kv)
    return CubeSummary(location, True, len(members), kv.total_size(), str(attrs.get("updated", "")),
                       attrs.get("ambasync_settings"), str(attrs.get("cube_version", "")))


__all__ = ["Cube", "CubeSettingsError", "CubeStoreError", "CubeSummary", "PublishResult", "cube_summary",
           "recorded_settings", "set_aside"]
