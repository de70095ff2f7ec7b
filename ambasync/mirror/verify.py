"""`ambasync verify`: re-read every mirrored file and hold it to what the state recorded.

A file that is missing, altered (sha256) or whose MINC header no longer has the
geometry its settings give is sent back to ``pending``, so the next run (or
``--repair``, now) fetches it again.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path

from ambasync.config import Config
from ambasync.errors import EXIT_FAILED, EXIT_OK
from ambasync.mirror.filecheck import check_output
from ambasync.mirror.health import refuse_damaged
from ambasync.mirror.lock import OutputLock, layout_for
from ambasync.mirror.manifest import write_manifest
from ambasync.mirror.options import RunOptions
from ambasync.mirror.outdir import check_output_folder
from ambasync.mirror.record import Status
from ambasync.mirror.state import State
from ambasync.paths import Paths

log = logging.getLogger("ambasync")


def check_cube(cfg: Config, paths: Paths, done: list[int]) -> list[int]:
    """Done experiments the cube lacks, or whose published slot no longer holds the values its
    member record names (a damaged or missing shard: taken out of the cube, named in the log). The
    next run (or ``--repair``) converts them again. Only when the run's formats include the cube."""
    from ambasync.cube.kv import is_remote
    from ambasync.mirror.formats.outputs import CubeOutput, cube_location

    location = cube_location(cfg, paths)
    if "cube" not in cfg.output.formats or (not is_remote(location) and not Path(location).is_dir()):
        return []
    from ambasync.cube.layout import VARIABLE_OF_VOLUME
    from ambasync.cube.publish import published_shas

    output = CubeOutput.from_config(cfg, paths)
    output.begin(force=False)
    members = {eid: m for eid, m in output.cube.members().items() if m.slot >= 0}  # published ones
    found = {v: published_shas(location, VARIABLE_OF_VOLUME[v], [m.slot for m in members.values()])
             for v in output.settings.volumes}
    broken = []
    for eid, member in sorted(members.items()):
        bad = [v for v, sha in member.volumes.items() if found[v].get(member.slot) != sha]
        if bad:
            log.error("experiment %s: cube slot %d holds other values than recorded (%s)", eid, member.slot,
                      ", ".join(bad))
            output.cube.remove(eid)
            broken.append(eid)
    output.cube.flush()
    lacking = output.cube.missing(done)
    print(f"verify: {len(output.cube.members()) + len(broken)} experiments of the cube checked, {len(broken)} "
          f"damaged; {len(lacking)} done experiments missing from the cube"
          + (" (converted again by the next run)" if lacking else ""))
    return lacking


def verify_mirror(cfg: Config, repair: bool = False) -> int:
    """Exit code: 0 when every file is what the state says (with ``repair``: once every broken
    one was fetched again and checked), 1 when some are still broken or waiting."""
    paths = Paths.for_config(cfg)
    check_output_folder(paths.out, create=False)
    if not paths.state.is_file():
        print(f"nothing to verify: no mirror state at {paths.state}")
        return EXIT_OK
    refuse_damaged(paths.state, paths.manifest)
    broken: list[int] = []
    checked = 0
    # A run going on would be rewriting what is checked; a run of another layout may not start meanwhile.
    with OutputLock(paths.lock, layout=layout_for(cfg.shard)):
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
            done = state.ids_with_status(Status.DONE)
            cube_broken = [eid for eid in check_cube(cfg, paths, done) if eid not in broken]
            if broken:  # the manifest is the state's export: it must not go on saying "done"
                asyncio.run(write_manifest(state, paths.manifest))
        finally:
            state.close()
    print(f"verify: {checked} files checked, {len(broken)} experiments broken or missing"
          + (" (marked for the next run)" if broken and not repair else ""))
    if waiting:
        print(f"verify: {len(waiting)} more experiments are waiting to be fetched again (found broken earlier)")
    if not (broken or waiting or cube_broken):
        return EXIT_OK
    if not repair:
        return EXIT_FAILED
    return _repair(cfg, paths, broken + waiting + cube_broken)


def _repair(cfg: Config, paths: Paths, ids: list[int]) -> int:
    """Fetch ``ids`` again with a run of their own; 0 when each is done afterwards, else the run's
    code (1 when it ended well but some are still not done: failed, or no longer listed)."""
    from ambasync.mirror.run import run_mirror  # only to repair: checking needs no run

    fix = replace(cfg, source=replace(cfg.source, experiment_ids=ids, limit=0))
    summary = run_mirror(fix, RunOptions())
    state = State(paths.state, readonly=True)
    try:
        not_done = [eid for eid in ids if (rec := state.get(eid)) is None or rec.status is not Status.DONE]
    finally:
        state.close()
    print(f"verify --repair: {summary.done} experiments fetched again, {summary.failed} failed"
          + (f"; still not done: {', '.join(map(str, not_done[:20]))}" if not_done else ""))
    if summary.exit_code != EXIT_OK:
        return summary.exit_code
    return EXIT_FAILED if not_done else EXIT_OK
