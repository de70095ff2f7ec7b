"""Write one volume of one experiment for the cube, in a conversion worker.

The worker writes only its experiment's own staged object (``.ambasync/staged/{id}.{volume}``
under the stage folder: the local store itself, or for a store at a URL the run's local stage),
atomically, encoded with the fastest codec (blosc lz4); nothing shared, so it needs no lock and
can run in any process on any machine. The record (written by the main process in batches once
every volume of the experiment is staged: :meth:`ambasync.cube.store.Cube.record`) and everything
shared (the sharded arrays, coordinates, the voxel-major copy, the member table:
:meth:`~ambasync.cube.store.Cube.publish`) are not the worker's job.
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

if TYPE_CHECKING:
    from ambasync.geometry import Geometry
    from ambasync.imaging.minc import Written
    from ambasync.settings import ConvertSettings
    from ambasync.target import Target


@dataclass(frozen=True)
class CubeWrite:
    """One volume staged: what the main process records (returned by the worker)."""

    slot: int  # the experiment id (the staged object's key)
    volume: str
    sha256: str  # layout.values_sha256 of the values staged
    path: str  # the staged file
    size: int  # its bytes
    written: bool = True


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


def write_slot(stage: str | Path, key: int, volume: str, data: np.ndarray) -> CubeWrite:
    """Stage ``data`` (one volume, reoriented as the MINC files, float32, the cube's volume shape)
    for experiment ``key`` under the stage folder ``stage``."""
    stage = Path(stage)
    sizes, _ = _store_layout(str(stage))
    if tuple(data.shape) != sizes:
        raise ValueError(f"experiment {key}: {volume} volume of shape {data.shape} does not fit the cube staged at "
                         f"{stage} ({sizes})")
    import numcodecs.blosc

    numcodecs.blosc.use_threads = False  # each conversion worker has its core: blosc's threads only contend
    values = np.ascontiguousarray(data, dtype="<f4")
    sha = layout.values_sha256(values)
    blob = layout.blosc(layout.STAGED_CODEC).encode(values)
    path = stage / layout.staged_key(key, volume)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_bytes(blob)
    except OSError as exc:
        if disk_full(exc):
            raise DiskFullError(f"no space left on the device holding {stage} while staging experiment {key}: "
                                "free space, then run again (the published cube is still readable)") from exc
        raise
    return CubeWrite(key, volume, sha, str(path), len(blob), True)


def slot_sha256(location: str | Path, slot: int, volume: str) -> str | None:
    """sha256 of the values a published slot holds (:func:`layout.values_sha256`), decoded from its
    shard; None if the shard is missing or damaged. What ``verify`` compares with the member
    record (a shard's bytes are not what is recorded)."""
    from ambasync.cube.publish import read_slot

    try:
        values = read_slot(str(location), slot, layout.VARIABLE_OF_VOLUME[volume])
    except (OSError, ValueError, RuntimeError, KeyError):
        return None
    return None if values is None else layout.values_sha256(values)


@dataclass(frozen=True)
class CubeWriter:
    """The cube's output writer for the conversion worker (``ambasync.mirror.formats.writers.WRITERS["cube"]``):
    ``target.path`` is the stage folder (relative to the output folder: the store itself, or the
    run's stage of a store at a URL), ``target.index`` the experiment. Returns the staged file and
    the sha256 of the values (:func:`layout.values_sha256`)."""

    settings: ConvertSettings

    def write(self, data: np.ndarray, geometry: Geometry, target: Target, out: Path) -> Written:
        from ambasync.imaging.minc import Written

        if target.index is None:
            raise ValueError(f"cube target {target} has no experiment: Cube.slot_for gives it before submit")
        w = write_slot(Path(out) / target.path, target.index, target.volume, data)
        return Written(w.path, w.sha256, w.size)
