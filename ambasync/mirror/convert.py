"""One experiment's conversion, run in a worker process: zip bytes in, output files out.

The event loop hands over the raw zip body (cheap to pickle) and gets back
paths and checksums; unzipping, numpy and libminc all happen here, off the loop.
The event-loop process never imports numpy or libminc (a run starts ~70 ms
sooner); the forkserver started here imports them once for every worker.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ambasync.files import atomic_path
from ambasync.limits import MAX_BODY_BYTES
from ambasync.paths import cached_zip_path
from ambasync.settings import ConvertSettings
from ambasync.target import Target

if TYPE_CHECKING:
    from ambasync.imaging.minc import Written


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
    from ambasync.geometry import reorient
    from ambasync.imaging.allen_grid import (
        read_grid,  # preloaded in workers (see PRELOAD)
    )
    from ambasync.mirror.formats.writers import WRITERS

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

