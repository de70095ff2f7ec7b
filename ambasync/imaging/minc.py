"""Write (and read back) MINC volumes with pyminc, atomically (see :mod:`ambasync.files`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

from ambasync.errors import DiskFullError, disk_full
from ambasync.files import atomic_path, sha256_file
from ambasync.geometry import Geometry

DTYPES = ("ushort", "float")


@dataclass(frozen=True)
class Written:
    path: str
    sha256: str
    size: int


def _raise_if_disk_full(folder: Path, exc: BaseException) -> None:
    """libminc reports a failed write without errno; tell disk full apart by looking."""
    if disk_full(exc):
        raise DiskFullError(f"no space left on the device holding {folder}: free space, then run again") from exc
    st = os.statvfs(folder)
    if st.f_bavail * st.f_frsize < 4 * 1024 * 1024:
        raise DiskFullError(f"no space left on the device holding {folder} while writing: free space, then run again") from exc


def write_volume(data: np.ndarray, geometry: Geometry, path: Path, dtype: str) -> Written:
    """Write ``data`` (already reoriented, shape == geometry.sizes) to ``path`` atomically.

    ``dtype`` is the stored type: ``ushort`` (as the notebook, with a real range)
    or ``float`` (exact values).
    """
    from pyminc.volumes.factory import (
        volumeFromDescription,  # libminc loads in worker processes only
    )

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    if tuple(data.shape) != tuple(geometry.sizes):
        raise ValueError(f"data shape {data.shape} does not match geometry {geometry.sizes}")
    try:
        with atomic_path(path, durable=True) as tmp:
            vol = volumeFromDescription(
                outputFilename=str(tmp),
                dimnames=list(geometry.dimnames),
                sizes=geometry.sizes,
                starts=list(geometry.starts),
                steps=list(geometry.steps),
                x_dir_cosines=geometry.x_cosines,
                y_dir_cosines=geometry.y_cosines,
                z_dir_cosines=geometry.z_cosines,
                volumeType=dtype,
                dtype="float",
            )
            try:
                vol.data = data
                vol.writeFile()
            finally:
                vol.closeVolume()
            digest = sha256_file(tmp)
            size = tmp.stat().st_size
    except Exception as exc:
        _raise_if_disk_full(path.parent, exc)
        raise
    return Written(str(path), digest, size)


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """Read a MINC volume back as float32 plus its geometry (for verify and tests)."""
    import numpy as np  # here: the event-loop process imports this module, never numpy
    from pyminc.volumes.factory import volumeFromFile

    vol = volumeFromFile(str(path), dtype="float")
    try:
        data = np.array(vol.data, dtype=np.float32)
        cos = {d: tuple(float(c) for c in vol.get_direction_cosines(d)[:3]) for d in ("xspace", "yspace", "zspace")}
        geometry = Geometry(
            dimnames=tuple(vol.dimnames),
            sizes=tuple(int(s) for s in vol.sizes[: vol.ndims]),
            starts=tuple(float(s) for s in vol.starts),
            steps=tuple(float(s) for s in vol.separations),
            x_cosines=cos["xspace"],
            y_cosines=cos["yspace"],
            z_cosines=cos["zspace"],
        )
    finally:
        vol.closeVolume()
    return data, geometry
