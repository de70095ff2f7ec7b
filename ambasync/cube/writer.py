"""Write one volume of one experiment into its cube slot, in a conversion worker.

The worker writes only its slot's own chunk file (one per variable), atomically; nothing
shared, so it needs no lock and can run in any process on any machine that sees the store.
The member record (written by the main process once every volume of the experiment is in
place: :meth:`ambasync.cube.store.Cube.record`) and everything shared (array shapes,
coordinates, the voxel-major copy: :meth:`~ambasync.cube.store.Cube.publish`) are not the
worker's job.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ambasync.errors import DiskFullError, disk_full
from ambasync.files import atomic_path
from ambasync.cube import layout
from ambasync.cube.slots import Slots

if TYPE_CHECKING:
    from ambasync.geometry import Geometry
    from ambasync.imaging.minc import Written
    from ambasync.settings import ConvertSettings
    from ambasync.target import Target


@dataclass(frozen=True)
class CubeWrite:
    """One volume in its slot: what the main process records (returned by the worker)."""

    slot: int
    volume: str
    sha256: str  # layout.values_sha256 of the values now in the slot
    path: str  # the chunk file
    size: int  # the chunk file's bytes
    written: bool  # False: the slot already held exactly these values; no byte was touched


def _store_layout(store: str) -> tuple[tuple[int, ...], dict]:
    """(volume shape, codec) the store was made with: read once per worker process and store
    (a store replaced at the same path, e.g. with --force, is a new file: read again)."""
    st = (Path(store) / layout.META / "settings.json").stat()
    return _read_layout(store, st.st_ino, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_layout(store: str, inode: int, mtime_ns: int) -> tuple[tuple[int, ...], dict]:
    doc = json.loads((Path(store) / layout.META / "settings.json").read_text())
    settings = layout.CubeSettings(orientation=doc["orientation"], space=doc["space"], expansion=doc["expansion"])
    return tuple(layout.geometry(settings).sizes), doc["codec"]


def write_slot(store: str | Path, slot: int, volume: str, data: np.ndarray) -> CubeWrite:
    """Put ``data`` (one volume, reoriented as the MINC files, float32, the cube's volume shape)
    into ``slot`` of the store. If the slot's member record says it already holds these exact
    values, nothing is written (a re-zipped or re-converted grid leaves the store untouched)."""
    store = Path(store)
    sizes, codec = _store_layout(str(store))
    if tuple(data.shape) != sizes:
        raise ValueError(f"slot {slot}: {volume} volume of shape {data.shape} does not fit the cube at {store} "
                         f"({sizes})")
    values = np.ascontiguousarray(data, dtype="<f4")
    sha = layout.values_sha256(values)
    chunk = store / layout.chunk_key(layout.VARIABLE_OF_VOLUME[volume], slot)
    current = Slots(store / layout.META).read_member(slot)
    if current is not None and current.volumes.get(volume) == sha and chunk.exists():
        return CubeWrite(slot, volume, sha, str(chunk), chunk.stat().st_size, False)
    blob = layout.blosc(layout.Codec(**codec)).encode(values)
    try:
        chunk.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(chunk) as tmp:
            tmp.write_bytes(blob)
    except OSError as exc:
        if disk_full(exc):
            raise DiskFullError(f"no space left on the device holding {store} while writing slot {slot}: "
                                "free space, then run again (the previous cube is still readable)") from exc
        raise
    return CubeWrite(slot, volume, sha, str(chunk), len(blob), True)


def slot_sha256(store: str | Path, slot: int, volume: str) -> str | None:
    """sha256 of the values a slot holds now (:func:`layout.values_sha256`), decoded from its
    chunk; None if the chunk is missing or unreadable. What ``verify`` compares with the state's
    sha256 for a cube output (the chunk file's own bytes are not what the state records)."""
    store = Path(store)
    try:
        _, codec = _store_layout(str(store))
        blob = (store / layout.chunk_key(layout.VARIABLE_OF_VOLUME[volume], slot)).read_bytes()
        return layout.values_sha256(np.frombuffer(layout.blosc(layout.Codec(**codec)).decode(blob), dtype="<f4"))
    except (OSError, ValueError, RuntimeError, KeyError):
        return None


@dataclass(frozen=True)
class CubeWriter:
    """The cube's output writer for the conversion worker (``ambasync.mirror.formats.writers.WRITERS["cube"]``):
    ``target.path`` is the store (relative to the output folder), ``target.index`` the slot.
    Returns the chunk file and the sha256 of the values (:func:`layout.values_sha256`)."""

    settings: ConvertSettings

    def write(self, data: np.ndarray, geometry: Geometry, target: Target, out: Path) -> Written:
        from ambasync.imaging.minc import Written

        if target.index is None:
            raise ValueError(f"cube target {target} has no slot: Cube.slot_for gives it before submit")
        w = write_slot(Path(out) / target.path, target.index, target.volume, data)
        return Written(w.path, w.sha256, w.size)
