"""One experiment's conversion, run in a worker process: zip bytes in, output files out.

The event loop hands over the raw zip body (cheap to pickle) and gets back
paths and checksums; unzipping, numpy and libminc all happen here, off the loop.
The event-loop process never imports numpy or libminc (a run starts ~70 ms
sooner); the forkserver started here imports them once for every worker.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .files import atomic_path
from .paths import cached_zip_path
from .limits import MAX_BODY_BYTES
from .settings import ConvertSettings
from .target import Target

if TYPE_CHECKING:
    from .minc import Written

# What every worker needs, imported once by the forkserver before it forks them.
PRELOAD = ["ambasync.convert", "ambasync.writers", "ambasync.geometry", "ambasync.grid", "ambasync.minc",
           "ambasync.nifti", "ambasync.cube.writer", "pyminc.volumes.factory"]


@dataclass(frozen=True)
class ConvertJob:
    experiment_id: int
    body: bytes
    out: str  # the output folder; every target's path is relative to it
    targets: tuple[Target, ...]
    settings: ConvertSettings
    max_raw_bytes: int = MAX_BODY_BYTES
    cache_dir: str | None = None  # keep the zip here, content-addressed


@dataclass(frozen=True)
class ConvertResult:
    experiment_id: int
    outputs: tuple[tuple[Target, Written], ...]
    zip_sha256: str
    zip_size: int


def _keep_zip(cache_dir: str, sha256: str, body: bytes) -> None:
    path = cached_zip_path(cache_dir, sha256)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(body)


def convert(job: ConvertJob) -> ConvertResult:
    """Decode every requested volume first, then write them: a bad zip writes nothing.
    Each volume is reoriented once and handed to the writer of each of its targets."""
    from .grid import read_grid  # preloaded in workers (see PRELOAD)
    from .geometry import reorient
    from .writers import WRITERS

    out = Path(job.out)
    writers = {name: WRITERS[name](job.settings) for name in {t.format for t in job.targets}}
    volumes = sorted({t.volume for t in job.targets})
    grids = {volume: read_grid(job.body, volume, job.max_raw_bytes) for volume in volumes}
    written: list[tuple[Target, Written]] = []
    try:
        for volume, grid in grids.items():
            geometry = job.settings.geometry(grid.shape)
            data = reorient(grid, job.settings.orientation)
            for target in (t for t in job.targets if t.volume == volume):
                written.append((target, writers[target.format].write(data, geometry, target, out)))
    except BaseException:
        for _, w in written:  # all outputs of an experiment, or none
            Path(w.path).unlink(missing_ok=True)
        raise
    sha = hashlib.sha256(job.body).hexdigest()
    if job.cache_dir:
        _keep_zip(job.cache_dir, sha, job.body)
    return ConvertResult(job.experiment_id, tuple(sorted(written, key=lambda tw: tw[0])), sha, len(job.body))


def init_worker(run_pid: int | None = None) -> None:
    """Pool initializer: Ctrl-C belongs to the parent, which stops the run cleanly; and leave
    when the run's process is gone (a ``kill -9`` of it would otherwise leave workers waiting
    forever)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if run_pid is not None:
        threading.Thread(target=_exit_with, args=(run_pid,), daemon=True, name="ambasync-watchdog").start()


def _alive(pid: int) -> bool:
    """Whether the run's process still runs: a killed one not yet reaped by its parent is a
    zombie, which ``kill(pid, 0)`` still reaches, so /proc's state decides where there is one."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _exit_with(pid: int, period: float = 0.2) -> None:
    """Leave within ``period`` of the run's process (issue: gone within 1 s of it)."""
    while True:
        time.sleep(period)
        if not _alive(pid):
            os._exit(1)  # a conversion cut short leaves only a temporary file, swept by the next run


def start_forkserver() -> multiprocessing.context.BaseContext:
    """Start the forkserver now (it returns at once; the server imports PRELOAD meanwhile), e.g.
    before the event-loop process has imported aiohttp, so the workers are ready sooner."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    multiprocessing.forkserver.ensure_running()
    return ctx
