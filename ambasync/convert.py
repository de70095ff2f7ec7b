"""One experiment's conversion, run in a worker process: zip bytes in, MINC files out.

The event loop hands over the raw zip body (cheap to pickle) and gets back
paths and checksums; unzipping, numpy and libminc all happen here, off the loop.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .files import atomic_path
from .geometry import output_geometry, reorient
from .grid import read_grid
from .minc import Written, write_volume


@dataclass(frozen=True)
class ConvertJob:
    experiment_id: int
    body: bytes
    targets: tuple[tuple[str, str], ...]  # (volume, absolute output path)
    orientation: str
    space: str
    expansion: float
    dtype: str
    max_raw_bytes: int
    cache_dir: str | None = None  # keep the zip here, content-addressed


@dataclass(frozen=True)
class ConvertResult:
    experiment_id: int
    outputs: tuple[tuple[str, Written], ...]  # (volume, written file)
    zip_sha256: str
    zip_size: int


def init_worker(run_pid: int | None = None) -> None:
    """Pool initializer: Ctrl-C belongs to the parent, which stops the run cleanly;
    import libminc once here rather than on the first experiment; and leave when the run's
    process is gone (a ``kill -9`` of it would otherwise leave workers waiting forever)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import pyminc.volumes.factory  # noqa: F401

    if run_pid is not None:
        threading.Thread(target=_exit_with, args=(run_pid,), daemon=True, name="ambasync-watchdog").start()


def _exit_with(pid: int, period: float = 1.0) -> None:
    while True:
        time.sleep(period)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(1)  # a conversion cut short leaves only a temporary file, swept by the next run
        except PermissionError:
            pass


def cached_zip_path(cache_dir: str | os.PathLike, sha256: str) -> Path:
    return Path(cache_dir) / sha256[:2] / f"{sha256}.zip"


def _keep_zip(cache_dir: str, sha256: str, body: bytes) -> None:
    path = cached_zip_path(cache_dir, sha256)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(body)


def convert(job: ConvertJob) -> ConvertResult:
    """Decode every requested volume first, then write them: a bad zip writes nothing."""
    grids = [(volume, read_grid(job.body, volume, job.max_raw_bytes)) for volume, _ in job.targets]
    written: list[tuple[str, Written]] = []
    try:
        for (volume, grid), (_, target) in zip(grids, job.targets):
            geometry = output_geometry(grid.shape, job.orientation, job.space, job.expansion)
            data = reorient(grid, job.orientation)
            written.append((volume, write_volume(data, geometry, Path(target), job.dtype)))
    except BaseException:
        for _, w in written:  # all volumes of an experiment, or none
            Path(w.path).unlink(missing_ok=True)
        raise
    sha = hashlib.sha256(job.body).hexdigest()
    if job.cache_dir:
        _keep_zip(job.cache_dir, sha, job.body)
    return ConvertResult(job.experiment_id, tuple(written), sha, len(job.body))
