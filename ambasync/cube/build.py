"""Build (or complete) the cube from zips already on disk, e.g. the kept zips of a MINC-only
mirror (``{out}/.ambasync/zips/{sha[:2]}/{sha}.zip``), on every core.

Exact values come from the zips' ``.raw`` grids, never from the mirror's MINC files. Worker
processes decode, reorient and stage each experiment; the main process records them and publishes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ambasync.cube.layout import CubeSettings
from ambasync.cube.slots import Member
from ambasync.cube.store import Cube, PublishResult
from ambasync.cube.writer import CubeWrite, write_slot
from ambasync.errors import ExperimentError, RunError

log = logging.getLogger("ambasync")

MAX_RAW_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ZipSource:
    """One experiment's grid zip on disk and its catalogue fields (the manifest's columns)."""

    experiment_id: int
    path: str
    fields: dict


@dataclass(frozen=True)
class BuildResult:
    members: tuple[Member, ...]  # for the state: experiment, slot, sha256 of its values
    failed: tuple[tuple[int, str], ...]  # (experiment id, reason): a bad zip fails that experiment only
    publish: PublishResult
    set_aside_to: str | None  # where a damaged, foreign or replaced store went

    written: int  # experiments whose chunks were (re)written
    unchanged: int  # experiments already in the cube with the same values: not a byte touched


class _InProcess:
    """``submit`` running at once in this process: a build without a pool (``workers=1``)."""

    def submit(self, fn, *args) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # noqa: BLE001  handed to the caller as a pool would
            future.set_exception(exc)
        return future


def _build_one(store: str, slot: int, zip_path: str, volumes: tuple[str, ...], orientation: str,
               max_raw_bytes: int) -> tuple[CubeWrite, ...]:
    """Worker: decode the zip's grids (never a MINC file), reorient, write each into the slot."""
    from ambasync.geometry import reorient
    from ambasync.imaging.allen_grid import read_grid

    body = Path(zip_path).read_bytes()
    grids = {volume: read_grid(body, volume, max_raw_bytes) for volume in volumes}  # all, before any write
    return tuple(write_slot(store, slot, v, reorient(grids[v], orientation)) for v in volumes)


def build_from_zips(path: str | os.PathLike, settings: CubeSettings, sources: Iterable[ZipSource], *,
                    workers: int = 0, writer: str = "", force: bool = False, prune: bool = False,
                    quiet: bool = False, max_raw_bytes: int = MAX_RAW_BYTES,
                    stage: str | os.PathLike | None = None) -> BuildResult:
    """Put every source into the cube at ``path`` and publish it. ``workers`` processes (0: one
    per CPU; 1: in this process, no pool). Experiments already in the cube with the same values
    are not rewritten, so this also completes an interrupted build. ``prune`` removes the
    experiments not among ``sources`` (as ``--prune``). ``writer`` names this writer (e.g.
    "shard 0/2"): give each concurrent writer its own. ``path`` may be an fsspec URL; ``stage`` is
    then the local folder grids wait in until the publish uploads them. Returns what the state
    must record."""
    from ambasync.workers import init_worker, start_forkserver

    cube = Cube.open(path, settings, writer=writer, force=force, stage=stage)
    sources = list(sources)
    workers = workers or os.cpu_count() or 1
    members: list[Member] = []
    written = 0
    failed: list[tuple[int, str]] = []
    bar = None
    if not quiet and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(sources), unit="exp", desc="cube", file=sys.stderr)
    last_line = time.monotonic()
    if workers == 1:
        pool_context = contextlib.nullcontext(_InProcess())
    else:
        pool_context = concurrent.futures.ProcessPoolExecutor(workers, mp_context=start_forkserver(),
                                                              initializer=init_worker, initargs=(os.getpid(),))
    with pool_context as pool:
        pending: dict[concurrent.futures.Future, tuple[ZipSource, int]] = {}
        it = iter(sources)
        while True:
            while len(pending) < 4 * workers:  # a bounded window: memory does not grow with the catalogue
                source = next(it, None)
                if source is None:
                    break
                slot = cube.slot_for(source.experiment_id)
                future = pool.submit(_build_one, str(cube.stage), slot, source.path, settings.volumes,
                                     settings.orientation, max_raw_bytes)
                pending[future] = (source, slot)
            if not pending:
                break
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                source, slot = pending.pop(future)
                try:
                    result = future.result()
                except RunError:
                    raise
                except (ExperimentError, OSError, ValueError) as exc:
                    cube.release(source.experiment_id, slot)
                    failed.append((source.experiment_id, getattr(exc, "reason", f"{type(exc).__name__}: {exc}")))
                    continue
                before = cube.unchanged
                members.append(cube.record(source.experiment_id, slot, {w.volume: w.sha256 for w in result},
                                           source.fields))
                written += cube.unchanged == before
            handled = len(members) + len(failed)
            if bar is not None:
                bar.update(len(done))
            elif not quiet and time.monotonic() - last_line > 30:
                last_line = time.monotonic()
                log.info("cube: %d/%d experiments", handled, len(sources))
    if bar is not None:
        bar.close()
    if prune:
        cube.prune(s.experiment_id for s in sources)
    published = cube.publish(workers=workers)
    return BuildResult(tuple(members), tuple(failed), published,
                       str(cube.set_aside_to) if cube.set_aside_to else None, written, len(members) - written)
