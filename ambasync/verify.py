"""`ambasync verify`: re-read every mirrored file and hold it to what the state recorded.

A file that is missing, altered (sha256) or whose MINC header no longer has the
geometry its settings give is sent back to ``pending``, so the next run (or
``--repair``, now) fetches it again.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

from .config import Config
from .errors import EXIT_FAILED, EXIT_OK
from .files import sha256_file
from .lock import OutputLock
from .minc import read_volume
from .options import RunOptions
from .paths import Paths
from .settings import ConvertSettings
from .record import Output, Status
from .state import State

log = logging.getLogger("ambasync")


def check_output(out: Path, o: Output, settings: str | None) -> str | None:
    """Why this file is not what the state says, or None when it is."""
    path = out / o.path
    if not path.is_file():
        return f"{o.path}: missing"
    if path.stat().st_size != o.size or sha256_file(path) != o.sha256:
        return f"{o.path}: contents changed (sha256 differs from the state)"
    try:
        _, geo = read_volume(path)
    except Exception as exc:  # libminc cannot read it at all
        return f"{o.path}: unreadable MINC ({type(exc).__name__})"
    if settings:
        made_by = ConvertSettings.parse(settings)
        want = made_by.geometry(made_by.grid_shape(geo.sizes))
        got = (geo.dimnames, geo.starts, geo.steps, geo.x_cosines, geo.y_cosines, geo.z_cosines)
        exp = (want.dimnames, want.starts, want.steps, want.x_cosines, want.y_cosines, want.z_cosines)
        if got[0] != exp[0] or not all(
            math.isclose(g, e, abs_tol=1e-6) for gs, es in zip(got[1:], exp[1:]) for g, e in zip(gs, es)
        ):
            return f"{o.path}: header geometry differs from {settings}"
    return None


def verify_mirror(cfg: Config, repair: bool = False) -> int:
    paths = Paths.for_config(cfg)
    if not paths.state.is_file():
        print(f"nothing to verify: no mirror state at {paths.state}")
        return EXIT_OK
    broken: list[int] = []
    checked = 0
    with OutputLock(paths.lock):  # a run going on would be rewriting what is checked
        state = State(paths.state)
        try:
            for rec in state.iter_done():
                problems = [p for o in rec.outputs if (p := check_output(paths.out, o, rec.settings))]
                checked += len(rec.outputs)
                if problems:
                    broken.append(rec.experiment_id)
                    log.error("experiment %s (%s): %s", rec.experiment_id, rec.gene, "; ".join(problems))
                    state.mark_pending(rec.experiment_id, "verify: " + "; ".join(problems))
            waiting = [eid for eid in state.ids_with_status(Status.PENDING) if eid not in broken]
        finally:
            state.close()
    print(f"verify: {checked} files checked, {len(broken)} experiments broken or missing"
          + (" (marked for the next run)" if broken and not repair else ""))
    if waiting:
        print(f"verify: {len(waiting)} more experiments are waiting to be fetched again (found broken earlier)")
    if (broken or waiting) and repair:
        from .run import run_mirror  # only to repair: checking needs no run

        fix = replace(cfg, source=replace(cfg.source, experiment_ids=broken + waiting, limit=0))
        summary = run_mirror(fix, RunOptions())
        print(f"verify --repair: {summary.done} experiments fetched again, {summary.failed} failed")
    return EXIT_FAILED if broken or waiting else EXIT_OK
