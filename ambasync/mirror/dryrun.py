"""`run --dry-run`: what a run would fetch, from the catalogue and a read-only look at the state.

Writes nothing (no lock, no state, no folder); the state is read if there is one.
"""

from __future__ import annotations

import contextlib
import logging
import time

from ambasync.config import Config
from ambasync.errors import UpstreamError
from ambasync.mirror.catalog import InvalidRow, Total
from ambasync.mirror.decide import Action, Policy
from ambasync.mirror.formats.outputs import Outputs
from ambasync.mirror.health import refuse_damaged
from ambasync.mirror.options import RunOptions
from ambasync.mirror.outdir import check_output_folder
from ambasync.mirror.plan import decisions
from ambasync.mirror.report import Progress, Summary
from ambasync.mirror.selection import Selection, selected
from ambasync.mirror.source import AllenSource
from ambasync.mirror.state import State
from ambasync.paths import Paths
from ambasync.settings import ConvertSettings

log = logging.getLogger("ambasync")

ZIP_SIZE_ESTIMATE = 390_000  # bytes, a typical real grid zip (for the estimate of what would be fetched)


async def dry_run(cfg: Config, opts: RunOptions) -> Summary:
    paths = Paths.for_config(cfg)
    check_output_folder(paths.out, create=False, writable=False)
    refuse_damaged(paths.state, paths.manifest)
    summary = Summary()
    progress = Progress(summary, cfg.pipeline.progress_interval, opts.quiet)
    selection = Selection.for_config(cfg)
    outputs = Outputs.for_config(cfg, paths)
    outputs.peek()  # e.g. which experiments the cube holds, read without writing
    settings = ConvertSettings.from_config(cfg).key()
    policy = Policy.for_run(cfg, opts, paths)
    state = State(paths.state, readonly=True) if paths.state.is_file() else None
    try:
        async with AllenSource.for_config(cfg) as source, contextlib.aclosing(decisions(
                selected(source.catalogue(cfg.planes), selection), lambda eid: state.get(eid) if state else None,
                outputs, settings, policy)) as items:
            async for plane, item in items:
                if isinstance(item, Total):
                    progress.catalogue_total(plane, item.rows, selection.limit)
                elif isinstance(item, InvalidRow):
                    log.warning("invalid catalogue row: %s", item.reason)
                    progress.count("invalid")
                elif item.verdict.action in (Action.SKIP, Action.QUARANTINE):
                    progress.count(item.verdict.action.value)
                else:
                    summary.would_fetch += 1
    except UpstreamError as exc:
        log.error("stopping: %s", exc)
        summary.error, summary.exit_code = str(exc), exc.exit_code
    finally:
        if state is not None:
            state.close()
        progress.close()
    summary.finished = time.time()
    return summary
