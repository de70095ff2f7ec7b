"""`ambasync demo`: the whole pipeline against an in-process replica, no network needed (a command made of two
parts, the replica and the mirror, so it lives with the command line rather than in either)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ambasync.config import DEFAULT_CONFIG_TEXT, load_config
from ambasync.mirror.options import RunOptions
from ambasync.mirror.run import Run, install_uvloop
from ambasync.replica import ReplicaConfig, serve


def run_demo(out: Path, experiments: int = 36, quiet: bool = False, formats: str = "minc", sagittal: int = 0) -> int:
    """Mirror ``experiments`` coronal (and ``sagittal``) experiments of an in-process replica into
    ``out`` as ``formats`` (``minc,cube`` gives ``make view`` its cube)."""
    async def main() -> int:
        async with serve(ReplicaConfig(n_coronal=experiments, n_sagittal=sagittal)) as (_, base_url):
            cfg = load_config(DEFAULT_CONFIG_TEXT, {("source", "base_url"): base_url, ("output", "out"): str(out),
                                     ("source", "plane"): "all" if sagittal else "coronal",
                                     ("source", "page_size"): 25, ("download", "concurrency"): 8,
                                     ("output", "formats"): formats}, environ={})
            summary = await Run(cfg, RunOptions(quiet=quiet)).run()
        print(summary.text())
        print(f"demo: MINC files in {out}/coronal/, manifest {out}/manifest.csv; try `mincinfo` on one, "
              f"or `python -m ambasync status --out {out}`")
        return summary.exit_code

    install_uvloop(True)
    return asyncio.run(main())
