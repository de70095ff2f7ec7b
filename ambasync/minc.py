"""Write (and read back) MINC volumes with pyminc, atomically.

A volume is written under a temporary name in its destination folder, flushed
to disk, hashed, then renamed into place: a final name never holds a partial
file, whatever kills the process. Leftovers carry ``TMP_SUFFIX`` and are swept
by the next run.
"""

from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DiskFullError
from .geometry import Geometry

TMP_SUFFIX = ".ambasync-tmp"
DTYPES = ("ushort", "float")


@dataclass(frozen=True)
class Written:
    path: str
    sha256: str
    size: int


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tmp_name(path: Path) -> Path:
    """Hidden temporary sibling of ``path``, unique per process."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _raise_if_disk_full(folder: Path, exc: BaseException) -> None:
    """libminc reports a failed write without errno; tell disk full apart by looking."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFullError(f"no space left on the device holding {folder}: free space, then run again") from exc
    st = os.statvfs(folder)
    if st.f_bavail * st.f_frsize < 4 * 1024 * 1024:
        raise DiskFullError(f"no space left on the device holding {folder} while writing: free space, then run again") from exc


def write_volume(data: np.ndarray, geometry: Geometry, path: Path, dtype: str) -> Written:
    """Write ``data`` (already reoriented, shape == geometry.sizes) to ``path`` atomically.

    ``dtype`` is the stored type: ``ushort`` (as the notebook, with a real range)
    or ``float`` (exact values).
    """
    from pyminc.volumes.factory import volumeFromDescription  # libminc loads in worker processes only

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    if tuple(data.shape) != tuple(geometry.sizes):
        raise ValueError(f"data shape {data.shape} does not match geometry {geometry.sizes}")
    tmp = tmp_name(path)
    try:
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
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception):
            _raise_if_disk_full(path.parent, exc)
        raise
    return Written(str(path), digest, size)


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """Read a MINC volume back as float32 plus its geometry (for verify and tests)."""
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


def sweep_tmp(root: Path) -> int:
    """Remove temporary files a killed run left below ``root``; returns how many."""
    removed = 0
    for tmp in root.rglob(f"*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed
