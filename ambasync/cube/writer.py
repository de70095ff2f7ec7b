"""Write one experiment into its cube slot, in a conversion worker: decoded grids in, chunks out.

The worker writes only its slot's own chunk files (one per variable) and then the slot's member
record, each atomically; nothing shared. So it needs no lock and can run in any process on any
machine that sees the store. Array shapes and everything else shared are the publisher's job
(:meth:`ambasync.cube.store.Cube.publish`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import DiskFullError, disk_full
from ..files import atomic_path
from ..geometry import reorient
from . import layout
from .slots import Member, Slots
from .store import CubeTarget, geometry


@dataclass(frozen=True)
class CubeWrite:
    """What the state records for an experiment in the cube (returned to the main process)."""

    experiment_id: int
    slot: int
    sha256: str  # layout.grid_sha256 of the grids now in the slot
    written: bool  # False: the slot already held exactly these grids; no byte was touched


def write_experiment(target: CubeTarget, grids: Mapping[str, np.ndarray]) -> CubeWrite:
    """Put ``grids`` (volume -> decoded Allen grid as stored, PIR float32, as
    :func:`ambasync.grid.read_grid` returns it) into ``target``'s slot, reoriented like the MINC
    files. Unchanged grids are not rewritten; changed catalogue fields rewrite the record only."""
    settings = target.settings
    sha = layout.grid_sha256(grids, settings.volumes)
    store = Path(target.store)
    slots = Slots(store / layout.META)
    member = Member(target.slot, target.experiment_id, sha, dict(target.fields))
    current = slots.read_member(target.slot)
    try:
        if current is not None and current.experiment_id == target.experiment_id and current.sha256 == sha:
            if current.fields != member.fields:
                slots.write_member(member)
            return CubeWrite(target.experiment_id, target.slot, sha, False)
        sizes = tuple(geometry(settings).sizes)
        compressor = layout.blosc(settings.codec)
        encoded = []
        for volume in settings.volumes:  # encode all first: a bad grid writes nothing
            data = np.ascontiguousarray(reorient(np.asarray(grids[volume], dtype=np.float32), settings.orientation),
                                        dtype="<f4")
            if data.shape != sizes:
                raise ValueError(f"experiment {target.experiment_id}: {volume} grid of shape {data.shape} after "
                                 f"reorientation does not fit the cube's {sizes}")
            encoded.append((layout.VARIABLE_OF_VOLUME[volume], compressor.encode(data)))
        for variable, blob in encoded:
            chunk = store / layout.chunk_key(variable, target.slot)
            chunk.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(chunk) as tmp:
                tmp.write_bytes(blob)
        slots.write_member(member)  # last: the record never points at data that is not there
    except OSError as exc:
        if disk_full(exc):
            raise DiskFullError(f"no space left on the device holding {store} while writing experiment "
                                f"{target.experiment_id}: free space, then run again") from exc
        raise
    return CubeWrite(target.experiment_id, target.slot, sha, True)
