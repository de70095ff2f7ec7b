"""Publishing: the writers' records and staged grids become the cube readers see.

Run by one writer at a time, holding the store's lease (:func:`ambasync.cube.slots.lease`):

1. :func:`plan`: the published member table plus every record batch gives the new table. An
   experiment keeps its slot; a changed one is rewritten there; a new one takes the lowest free
   slot; a removed one frees its slot. The blocks (``block`` slots: one shard of each array)
   whose slots changed are the work.
2. ``publishing.json`` names those blocks first: a publish killed half-way is redone by the next.
3. :func:`rebuild_block`, one task per block on the worker processes: each slot's grid is read
   once (a staged object, or the block's own previous shard), the volume-major shard is written
   (an inner chunk whose experiments are all unchanged is copied, not re-encoded), the per-plane
   coverage counts, then the voxel-major shards.
4. :func:`finish`: array shapes, coordinates, the member table, the root's attributes and
   consolidated metadata last; then the applied records and staged grids are removed.

Every object is replaced whole, so a reader always opens a store (``kill -9`` at any moment); the
root metadata, written last, switches readers to the new shapes at once.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import warnings
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ambasync.cube import layout, shards
from ambasync.cube.kv import KV
from ambasync.cube.layout import (BLOCKS, BY_VOXEL, CATALOGUE_COLUMNS, FILL, FLOAT_COLUMNS, PLANES, STRING_COLUMNS,
                                  CubeSettings)
from ambasync.cube.slots import Member

PART_PLANES = 24  # planes of a block decoded together by a publish task (512 × 24 planes: 191 MB):
# two parts of the 41 planes, so each staged grid is read and decoded twice, not three times


@dataclass(frozen=True)
class Plan:
    members: dict[int, Member]  # slot -> member, after the records
    sources: dict[int, int]  # slot -> experiment whose staged grids go there (changed data)
    blocks: list[int]  # blocks to rebuild
    applied: list[str]  # record objects applied (removed at the end)
    staged: list[str]  # staged objects consumed or obsolete (removed at the end)
    n: int  # slots in the cube (the arrays' experiment extent)


def plan(settings: CubeSettings, old: Mapping[int, Member], records: list[tuple[str, dict]],
         staged: set[str], redo_blocks: list[int]) -> Plan:
    """The new member table and the blocks to rebuild (pure). ``staged``: the staged objects in
    the store; an added experiment whose grids are not all there is left out (its record too:
    the next run converts it again)."""
    changes: dict[int, tuple[dict, dict] | None] = {}
    removed: set[int] = set()  # taken out (pruned, or found damaged by verify): re-added, it is rewritten
    for _, doc in records:
        for eid in doc.get("remove", []):
            changes[int(eid)] = None
            removed.add(int(eid))
        for eid, volumes, fields in doc.get("add", []):
            changes[int(eid)] = (volumes, fields)
    new = dict(old)
    by_id = {m.experiment_id: m for m in old.values()}
    sources: dict[int, int] = {}
    adds = []
    for eid, change in sorted(changes.items()):
        member = by_id.get(eid)
        if change is None:
            if member is not None:
                del new[member.slot]
            continue
        volumes, fields = change
        fields = {c: layout.catalogue_value(c, fields.get(c)) for c in CATALOGUE_COLUMNS}
        same_data = member is not None and member.volumes == volumes and eid not in removed
        if not same_data and not all(layout.staged_key(eid, v) in staged for v in settings.volumes):
            continue  # its grids never reached the store (a killed writer): not in the cube
        if member is None:
            adds.append((eid, volumes, fields))
            continue
        new[member.slot] = Member(member.slot, eid, volumes["energy"], volumes, fields)
        if not same_data:
            sources[member.slot] = eid
    free = (s for s in _count() if s not in new)
    for eid, volumes, fields in adds:
        slot = next(free)
        new[slot] = Member(slot, eid, volumes["energy"], volumes, fields)
        sources[slot] = eid
    n = max(new) + 1 if new else 0
    changed = {slot // settings.block for slot in sources}
    for slot in set(old) | set(new):
        a, b = old.get(slot), new.get(slot)
        if (a is None) != (b is None) or (a and b and (a.experiment_id != b.experiment_id
                                                     or a.fields.get("plane") != b.fields.get("plane"))):
            changed.add(slot // settings.block)
    n_blocks = math.ceil(n / settings.block)
    blocks = sorted(b for b in changed | set(redo_blocks) if b < n_blocks)
    used = {layout.staged_key(eid, v) for eid in sources.values() for v in settings.volumes}
    obsolete = [key for key in staged if key in used or layout.staged_experiment(key) in changes]
    return Plan(new, sources, blocks, [name for name, _ in records], sorted(set(obsolete)), n)


def _count():
    i = 0
    while True:
        yield i
        i += 1


# -- one block ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _kv(location: str) -> KV:
    return KV.open(location)


def _decode(codec: layout.Codec, blob: bytes, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(layout.blosc(codec).decode(blob), dtype="<f4").reshape(shape)


def rebuild_block(location: str, settings: CubeSettings, b: int, rows: list[tuple[int, str | None, int | None]],
                  has_old: bool, expected: Mapping[int, dict]) -> tuple[int, dict[str, np.ndarray], list[int]]:
    """Rebuild block ``b``: ``rows`` gives, for each of its slots, (slot, plane or None for an
    empty slot, experiment whose staged grids to take or None to keep the block's previous
    values); ``expected``: slot -> the recorded sha256 of each staged volume. Returns the block, its
    per-plane counts of experiments with data (zspace, yspace, xspace) and the experiments whose
    staged grids did not match their record (left out: their slots read -1)."""
    import numcodecs.blosc

    numcodecs.blosc.use_threads = False  # one task per process and core: blosc's own threads only contend
    kv = _kv(location)
    geo = layout.geometry(settings)
    vol_shape = tuple(geo.sizes)
    per = settings.inner
    n_inner = settings.block // per
    bad: list[int] = []
    counts = {p: np.zeros(vol_shape, np.int32) for p in PLANES}
    for var_index, var in enumerate(settings.variables()):
        volume = settings.volumes[var_index]
        old_chunks: list[bytes | None] = [None] * n_inner
        if has_old:
            blob = kv.get(layout.shard_key(var, b))
            try:
                old_chunks = shards.split(blob, n_inner) if blob is not None else old_chunks
            except ValueError:  # a damaged shard: its kept experiments are reported, converted again
                old_chunks = [None] * n_inner
        main = var == "expression"
        # the block's planes in parts of whole shards (~24 planes: a part holds block × part planes of
        # floats), each grid decoded once per part
        part_z = max(1, PART_PLANES // settings.zshard) * settings.zshard
        zparts = range(0, vol_shape[0], part_z) if main and settings.by_voxel else [None]
        new_chunks = shards.Writer(kv, layout.shard_key(var, b), n_inner)  # streamed: not held in memory
        # one buffer each for the block's planes and an inner chunk, refilled rather than allocated
        # again: fresh allocations of this size cost their page faults every time
        slab_buffer = np.empty((settings.block, min(part_z, vol_shape[0]), *vol_shape[1:]), dtype=np.float32) \
            if main and settings.by_voxel else None
        vols_buffer = np.empty((per, *vol_shape), dtype=np.float32)
        for part, z0 in enumerate(zparts):
            z1 = vol_shape[0] if z0 is None else min(vol_shape[0], z0 + part_z)
            zlo = 0 if z0 is None else z0
            slab = None
            if slab_buffer is not None and z0 is not None:
                slab = slab_buffer[:, :z1 - zlo]
            slab_rows = np.zeros(settings.block, dtype=bool)  # rows of the slab given values (the rest: -1)
            for i in range(n_inner):
                group = [row[:3] for row in rows[i * per:(i + 1) * per]]
                ids = [row[3] for row in rows[i * per:(i + 1) * per]]
                if not group:
                    break
                reuse = len(group) == per and all(source is None and plane is not None for _, plane, source in group) \
                    and old_chunks[i] is not None
                if reuse and not main:
                    new_chunks.add(i, old_chunks[i])
                    continue
                old = None
                if any(source is None and plane is not None for _, plane, source in group):
                    try:
                        old = _decode(settings.codec, old_chunks[i], (per, *vol_shape)) \
                            if old_chunks[i] is not None else None
                    except (ValueError, RuntimeError):
                        old = None
                    if old is None and part == 0:  # kept experiments whose values cannot be read
                        bad.extend(ids[j] for j, (_, plane, source) in enumerate(group)
                                   if source is None and plane is not None and ids[j] not in bad)
                    reuse = reuse and old is not None
                vols = vols_buffer if part == 0 and not reuse else None
                vols_rows = np.zeros(per, dtype=bool)  # rows of vols given values (the rest: -1)
                has_data = False  # some value of the inner chunk is not -1 (else it is not stored)
                for j, (slot, plane, source) in enumerate(group):
                    if plane is None:
                        continue
                    if source is None:
                        if old is None:
                            continue
                        values = old[j]
                    else:
                        if source in bad:
                            continue
                        staged = kv.get(layout.staged_key(source, volume))
                        values = None if staged is None else _decode(layout.STAGED_CODEC, staged, vol_shape)
                        if values is None or (part == 0 and layout.values_sha256(values) != expected[slot][volume]):
                            if source not in bad:
                                bad.append(source)
                            continue
                    if vols is not None:
                        vols[j] = values
                        vols_rows[j] = True
                    if slab is not None:
                        slab[i * per + j] = values[zlo:z1]
                        slab_rows[i * per + j] = True
                    if part == 0:
                        with_data = values != FILL
                        if main:  # counted once, over the whole volume
                            np.add(counts[plane], with_data, out=counts[plane], casting="unsafe")
                        has_data = has_data or bool(with_data.any())
                if part == 0:
                    if reuse:
                        new_chunks.add(i, old_chunks[i])
                    elif vols is not None and has_data:
                        vols[~vols_rows] = FILL
                        new_chunks.add(i, layout.blosc(settings.codec).encode(vols))
            if slab is not None:
                slab[~slab_rows] = FILL
                # voxels some experiment of the block has data at: counted over whole volumes in part 0
                covered = (counts[PLANES[0]] + counts[PLANES[1]])[zlo:z1] > 0
                for zs in range(0, z1 - zlo, settings.zshard):
                    kv.put_parts(layout.by_voxel_shard_key((zlo + zs) // settings.zshard, b),
                                 _by_voxel_shard(settings, slab[:, zs:zs + settings.zshard],
                                                 covered[zs:zs + settings.zshard]))
            del slab
        new_chunks.close()
        del new_chunks, old_chunks, slab_buffer, vols_buffer
    buf = io.BytesIO()
    np.savez(buf, **counts)
    kv.put(f"{BLOCKS}/{b:06d}.npz", buf.getvalue())
    return b, counts, bad


def _by_voxel_shard(settings: CubeSettings, slab: np.ndarray, covered: np.ndarray) -> list[bytes]:
    """The voxel-major shard of ``slab`` (block experiments × its planes × every row and column);
    ``covered``: the voxels (of the slab's planes) where some experiment of the slab has data.
    Chunk by chunk: a small transpose stays in the CPU's cache (12× faster than one of the slab)."""
    cz, cy, cx = settings.by_voxel_chunk
    sz, sy, sx, e = layout.by_voxel_shard_shape(settings)
    codec = layout.blosc(settings.by_voxel_codec)
    chunk = np.empty((cz, cy, cx, e), dtype=np.float32)
    chunks: list[bytes | None] = []
    for z in range(0, sz, cz):
        for y in range(0, sy, cy):
            for x in range(0, sx, cx):
                part = slab[:, z:z + cz, y:y + cy, x:x + cx]
                if part.size == 0 or not covered[z:z + cz, y:y + cy, x:x + cx].any():
                    chunks.append(None)  # only -1 (no data): nothing stored, reads as -1
                    continue
                if part.shape[1:] != (cz, cy, cx) or part.shape[0] != e:
                    chunk.fill(FILL)  # an edge chunk: the part does not cover it
                chunk[:part.shape[1], :part.shape[2], :part.shape[3], :part.shape[0]] = np.moveaxis(part, 0, -1)
                chunks.append(codec.encode(chunk))
    return shards.parts(chunks)


def read_slot(location: str, slot: int, variable: str) -> np.ndarray | None:
    """One published slot's values, decoded from its shard (None: no shard or no such slot)."""
    kv = KV.open(location)
    settings = settings_of(kv)
    geo = layout.geometry(settings)
    n_inner = settings.block // settings.inner
    blob = kv.get(layout.shard_key(variable, slot // settings.block))
    if blob is None:
        return None
    chunk = shards.split(blob, n_inner)[(slot % settings.block) // settings.inner]
    if chunk is None:
        return np.full(geo.sizes, FILL, dtype=np.float32)
    return _decode(settings.codec, chunk, (settings.inner, *geo.sizes))[slot % settings.inner].copy()


def published_shas(location: str, variable: str, slots: list[int]) -> dict[int, str | None]:
    """sha256 of the values each of ``slots`` holds in the published shards (None: missing or
    damaged), reading each shard once: what ``verify`` compares with the member records."""
    kv = KV.open(location)
    settings = settings_of(kv)
    geo = layout.geometry(settings)
    n_inner, per = settings.block // settings.inner, settings.inner
    out: dict[int, str | None] = {}
    by_block: dict[int, list[int]] = {}
    for slot in slots:
        by_block.setdefault(slot // settings.block, []).append(slot)
    for b, members in sorted(by_block.items()):
        blob = kv.get(layout.shard_key(variable, b))
        try:
            chunks = shards.split(blob, n_inner) if blob is not None else None
        except ValueError:
            chunks = None
        decoded: dict[int, np.ndarray | None] = {}
        for slot in members:
            i = (slot % settings.block) // per
            if chunks is None or chunks[i] is None:
                out[slot] = None
                continue
            if i not in decoded:
                try:
                    decoded[i] = _decode(settings.codec, chunks[i], (per, *geo.sizes))
                except (ValueError, RuntimeError):
                    decoded[i] = None
            values = decoded[i]
            out[slot] = None if values is None else layout.values_sha256(values[slot % per])
    return out


def settings_of(kv: KV) -> CubeSettings:
    doc = json.loads(kv.get(layout.SETTINGS_KEY) or b"{}")
    codec = layout.Codec(**doc["codec"])
    by_voxel_codec = layout.Codec(**doc["by_voxel_codec"])
    return CubeSettings(orientation=doc["orientation"], space=doc["space"], expansion=doc["expansion"],
                        volumes=tuple(doc["volumes"]), by_voxel=doc["by_voxel"], block=doc["block"],
                        volume_chunk=doc["volume_chunk"], by_voxel_chunk=tuple(doc["by_voxel_chunk"]),
                        by_voxel_shard_z=doc["by_voxel_shard_z"], codec=codec, by_voxel_codec=by_voxel_codec)


def block_rows(settings: CubeSettings, p: Plan, b: int) -> tuple[list, dict[int, dict]]:
    lo, hi = b * settings.block, min((b + 1) * settings.block, p.n)
    rows, expected = [], {}
    for slot in range(lo, hi):
        m = p.members.get(slot)
        if m is None:
            rows.append((slot, None, None, None))
            continue
        source = p.sources.get(slot)
        rows.append((slot, m.fields.get("plane", ""), source, m.experiment_id))
        if source is not None:
            expected[slot] = m.volumes
    return rows, expected


def totals(kv: KV, settings: CubeSettings, n: int, rebuilt: set[int], fresh: Mapping[str, np.ndarray]
           ) -> dict[str, np.ndarray]:
    """Per-plane counts over every block: ``fresh`` (the sum over the ``rebuilt`` blocks, as
    computed now) plus the other blocks' saved counts."""
    geo = layout.geometry(settings)
    out = {p: np.zeros(geo.sizes, dtype=np.int64) + fresh.get(p, 0) for p in PLANES}
    for b in range(math.ceil(n / settings.block)):
        if b in rebuilt:
            continue
        blob = kv.get(f"{BLOCKS}/{b:06d}.npz")
        if blob is None:
            continue
        with np.load(io.BytesIO(blob)) as saved:
            for p in PLANES:
                out[p] += saved[p]
    return out


def zarr_store(location: str):
    """A zarr store object for ``location`` (a folder, or an fsspec URL)."""
    from ambasync.cube.kv import is_remote, local_path

    if is_remote(location):
        from zarr.storage import FsspecStore

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return FsspecStore.from_url(location, read_only=False)
    return str(local_path(location))


def small_objects(kv: KV, settings: CubeSettings) -> list[str]:
    """Every object of the store but the arrays' shards and the records: the metadata, the
    coordinates and the coverage (~100 objects of a few KB to a few MB whatever the cube's size)."""
    big = tuple(f"{v}/c/" for v in (*settings.variables(), BY_VOXEL))
    return sorted(k for k in kv.list("") if not k.startswith(layout.META) and not k.startswith(big))


def with_local_copy(location: str, settings: CubeSettings | None, work) -> None:
    """``work(folder)`` on zarr's own writes of the store's small objects, then the changed ones
    written back; for a store at a URL the folder is a local copy, uploaded concurrently with the
    root ``zarr.json`` last (zarr through fsspec makes one request per check and per object, one
    after another: ~100 round trips per publish)."""
    import tempfile
    from pathlib import Path

    from ambasync.cube.kv import LocalKV, is_remote

    if not is_remote(location):
        work(location)
        return
    kv = KV.open(location)
    before = kv.get_many(small_objects(kv, settings)) if settings is not None else {}
    with tempfile.TemporaryDirectory(prefix="ambasync-cube-meta-") as tmp:
        local = LocalKV(Path(tmp))
        for key, data in before.items():
            local.put(key, data)
        work(tmp)
        after = local.get_many(sorted(local.list("")))
    changed = {k: v for k, v in after.items() if before.get(k) != v and k != "zarr.json"}
    kv.put_many(changed)
    if "zarr.json" in after and before.get("zarr.json") != after["zarr.json"]:
        kv.put("zarr.json", after["zarr.json"])  # last: readers switch to the new shapes at once


def write_coordinates(location: str, settings: CubeSettings, members: Mapping[int, Member], n: int,
                      coverage: Mapping[str, np.ndarray], attrs: dict) -> None:
    """Shapes, coordinates along ``experiment``, coverage and root attributes (zarr's own writes);
    then the consolidated metadata, last."""
    with_local_copy(location, settings,
                    lambda folder: _write_coordinates(folder, settings, members, n, coverage, attrs))


def _write_coordinates(location: str, settings: CubeSettings, members: Mapping[int, Member], n: int,
                       coverage: Mapping[str, np.ndarray], attrs: dict) -> None:
    import zarr

    from zarr.core.sync import sync

    g = zarr.open_group(zarr_store(location), mode="r+", use_consolidated=False)
    geo = layout.geometry(settings)

    def resize(array, shape):
        if tuple(array.shape) != tuple(shape):
            sync(array.async_array.resize(shape, delete_outside_chunks=False))

    for var in settings.variables():
        resize(g[var], (n, *geo.sizes))
    if settings.by_voxel:
        resize(g[BY_VOXEL], (*geo.sizes, n))
    for name in ("experiment", *CATALOGUE_COLUMNS):
        resize(g[name], (n,))
    for plane in PLANES:
        g[f"coverage_{plane}"][...] = coverage[plane]
    if n:
        g["experiment"][:] = np.array([members[s].experiment_id if s in members else -(s + 1) for s in range(n)],
                                      dtype=np.int64)
        for col in CATALOGUE_COLUMNS:
            values = [layout.catalogue_value(col, members[s].fields.get(col) if s in members else None)
                      for s in range(n)]
            dtype = object if col in STRING_COLUMNS else np.float64 if col in FLOAT_COLUMNS else np.int64
            g[col][:] = np.array(values, dtype=dtype)
    g.attrs.update(attrs)
    with warnings.catch_warnings():  # "consolidated metadata is not part of the v3 spec": known, wanted
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(zarr_store(location))


def coverage_of(settings: CubeSettings, members: Mapping[int, Member], counts: Mapping[str, np.ndarray]):
    geo = layout.geometry(settings)
    planes = [m.fields.get("plane", "") for m in members.values()]
    out = {}
    for plane in PLANES:
        k = planes.count(plane)
        out[plane] = (counts[plane] / k if k else np.zeros(geo.sizes)).astype(np.float32)
    return out


def digest_of(members: Mapping[int, Member]) -> str:
    doc = [(slot, m.experiment_id, m.volumes, m.fields) for slot, m in sorted(members.items())]
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()
