"""`ambasync status`: what the mirror holds, read from its state alone (no network)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from ambasync.config import Config
from ambasync.mirror.health import refuse_damaged
from ambasync.mirror.outdir import check_output_folder
from ambasync.mirror.state import State
from ambasync.paths import Paths


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def print_cube(paths: Paths, location: str | None = None) -> None:
    """The cube, as its readers see it (the last publish): experiments, size, last update, version.
    ``location``: ``[output] cube`` (a folder or a URL); default ``{out}/cube.zarr``."""
    from ambasync.cube.kv import is_remote

    location = str(location or paths.cube)
    if not is_remote(location) and not Path(location).is_dir():
        return
    from ambasync.cube import CubeStoreError, cube_summary

    try:
        cube = cube_summary(location)
    except CubeStoreError as exc:
        print(f"\n{exc}")
        return
    if not cube.exists:
        return
    if cube.settings is None and not cube.experiments:
        print(f"\ncube {location}: not readable yet (the next run publishes it), {cube.size_bytes / 1e6:.1f} MB")
        return
    print(f"\ncube {location}: {cube.experiments} experiments, {cube.size_bytes / 1e6:.1f} MB on disk, "
          f"last update {cube.updated or '-'}" + (f", version {cube.version}" if cube.version else ""))


def print_status(cfg: Config, failures: int = 20) -> int:
    paths = Paths.for_config(cfg)
    check_output_folder(paths.out, create=False, writable=False)
    if not paths.state.is_file():
        print(f"no mirror at {paths.out} yet (no {paths.state}); run `python -m ambasync run --out {paths.out}`")
        return 0
    refuse_damaged(paths.state, paths.manifest)
    state = State(paths.state, readonly=True)
    try:
        print(f"mirror at {paths.out}")
        print(f"{'plane':<10} {'status':<8} {'experiments':>11}")
        for row in state.counts():
            print(f"{row['plane']:<10} {row['status']:<8} {row['n']:>11}")
        print("\nlast runs:")
        for run in state.last_runs(5):
            summary = json.loads(run["summary"]) if run["summary"] else {}
            outcome = f"exit {run['exit_code']}" if run["finished"] else "unfinished (killed, or still running)"
            print(f"  #{run['run_id']} {_when(run['started'])} {outcome}: {summary.get('done', 0)} done, "
                  f"{summary.get('failed', 0)} failed, {summary.get('skipped', 0)} skipped, "
                  f"{summary.get('duration_s', 0):.0f} s")
        from ambasync.mirror.formats.outputs import cube_location

        print_cube(paths, cube_location(cfg, paths))
        rows = state.failures(failures)
        if rows:
            print(f"\nfailures (first {failures}):")
            for f in rows:
                print(f"  {f['experiment_id']} {f['gene']} [{f['status']}, failed runs {f['failed_runs']}]: {f['error']}")
    finally:
        state.close()
    return 0
