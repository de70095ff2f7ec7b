"""Build (or complete) the cube from zips already on disk, e.g. the kept zips of a MINC-only
mirror (``{out}/.ambasync/zips/{sha[:2]}/{sha}.zip``), on every core.

Exact values come from the zips' ``.raw`` grids, never from the mirror's MINC files. The main
process claims slots and publishes; worker processes decode, reorient and write each slot.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import ExperimentError, RunError
from ..report import log
from .layout import CubeSettings
from .store import Cube, CubeTarget, PublishResult
from .writer import CubeWrite, write_experiment

MAX_RAW_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ZipSource:
    """One experiment's grid zip on disk and its catalogue fields (the manifest's columns)."""

    experiment_id: int
    path: str
    fields: dict


@dataclass(frozen=True)
class BuildResult:
    writes: tuple[CubeWrite, ...]  # for the state: experiment, slot, grid sha256
    failed: tuple[tuple[int, str], ...]  # (experiment id, reason): a bad zip fails that experiment only
    publish: PublishResult
    set_aside_to: str | None  # where a damaged, foreign or replaced store went

    @property
    def written(self) -> int:
        return sum(w.written for w in self.writes)

    @property
    def unchanged(self) -> int:
        return sum(not w.written for w in self.writes)


def _build_one(target: CubeTarget, zip_path: str, max_raw_bytes: int) -> CubeWrite:
    from ..grid import read_grid

    body = Path(zip_path).read_bytes()
    grids = {volume: read_grid(body, volume, max_raw_bytes) for volume in target.settings.volumes}
    return write_experiment(target, grids)


def build_from_zips(path: str | os.PathLike, settings: CubeSettings, sources: Iterable[ZipSource], *,
                    workers: int = 0, writer: str = "", force: bool = False, quiet: bool = False,
                    max_raw_bytes: int = MAX_RAW_BYTES) -> BuildResult:
    """Put every source into the cube at ``path`` and publish it. ``workers`` processes (0: one
    per CPU). Experiments already in the cube with the same grids are not rewritten, so this
    also completes an interrupted build. Returns what the state must record."""
    from ..convert import start_forkserver

    cube = Cube.open(path, settings, writer=writer, force=force)
    sources = list(sources)
    workers = workers or os.cpu_count() or 1
    writes: list[CubeWrite] = []
    failed: list[tuple[int, str]] = []
    bar = None
    if not quiet and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(sources), unit="exp", desc="cube", file=sys.stderr)
    last_line = time.monotonic()
    ctx = start_forkserver()
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        pending: dict[concurrent.futures.Future, CubeTarget] = {}
        it = iter(sources)
        while True:
            while len(pending) < 4 * workers:  # a bounded window: memory does not grow with the catalogue
                source = next(it, None)
                if source is None:
                    break
                target = cube.target(source.experiment_id, source.fields)
                pending[pool.submit(_build_one, target, source.path, max_raw_bytes)] = target
            if not pending:
                break
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                target = pending.pop(future)
                try:
                    result = future.result()
                except ExperimentError as exc:
                    cube.release(target)
                    failed.append((target.experiment_id, exc.reason))
                    continue
                except RunError:
                    raise
                except (OSError, ValueError) as exc:
                    cube.release(target)
                    failed.append((target.experiment_id, f"{type(exc).__name__}: {exc}"))
                    continue
                cube.done(result)
                writes.append(result)
            handled = len(writes) + len(failed)
            if bar is not None:
                bar.update(len(done))
            elif not quiet and time.monotonic() - last_line > 30:
                last_line = time.monotonic()
                log.info("cube: %d/%d experiments", handled, len(sources))
    if bar is not None:
        bar.close()
    published = cube.publish()
    return BuildResult(tuple(writes), tuple(failed), published,
                       str(cube.set_aside_to) if cube.set_aside_to else None)
