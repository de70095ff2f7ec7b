"""``ambasync view`` on the command line: the parser and a handler that starts
:mod:`ambasync.view` on 127.0.0.1 and prints its URL.

Nothing heavy is imported at module level (``ambasync.cli`` builds every parser in the run's
event-loop process, which never imports numpy).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``view`` subcommand (for ambasync.cli)."""
    p = subparsers.add_parser(
        "view", help="look at the cube in a browser: genes, slices, co-expression from a voxel, your map's matches",
        description="Serve a local web page on the cube (offline: every script and style is served by the app). "
                    "See docs/view.md.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", metavar="DIR", help="the mirror folder holding cube.zarr (or the .zarr itself)")
    where.add_argument("--cube", metavar="URL", help="the cube itself: a folder or an fsspec URL")
    p.add_argument("--port", type=int, default=8050, help="port (default 8050; 0 = any free port)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1). The app has no authentication: any other address "
                        "lets whoever reaches it read the cube and run searches")
    p.add_argument("--labels", metavar="PATH", help="a label image (MINC or NIfTI) drawn as contours; its label "
                                                    "is shown for a clicked voxel")
    p.add_argument("--label-names", metavar="CSV", help="label names: a CSV with a Label (or id) and a Structure "
                                                        "(or name) column")
    p.add_argument("--maps", metavar="DIR", help="a folder of maps (.mnc, .nii, .nii.gz) offered for search")
    p.add_argument("--memory-budget", type=int, default=None, metavar="MB",
                   help="memory for the co-expression profiles (default 1536; beyond it they are kept as int8)")
    p.add_argument("--seed-planes", default="coronal", metavar="P[,P]",
                   help="co-expression across the coronal experiments (default), or coronal,sagittal to also "
                        "offer the sagittal ones (a second matrix; the budget is shared)")
    p.add_argument("--no-coexpression", action="store_true", help="do not load the co-expression profiles")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more detail")
    return p


def cmd_view(args: argparse.Namespace) -> int:
    """``python -m ambasync view``: serve until Ctrl-C."""
    import logging
    import os

    from aiohttp import web

    from ambasync.cube.read import resolve_cube
    from ambasync.errors import AnalysisError
    from ambasync.view.app import KEY, View, make_app
    from ambasync.view.coexpression import DEFAULT_BUDGET_MB
    from ambasync.view.data import ViewError

    if not 0 <= args.port <= 65535:
        raise AnalysisError(f"--port {args.port}: 0..65535")
    if args.host not in LOCAL_HOSTS:
        print(f"ambasync view: WARNING: listening on {args.host}. The app has NO authentication: anyone who can "
              f"reach this address can read the cube and run searches on this machine.", file=sys.stderr)
    if args.maps is not None and not os.path.isdir(args.maps):
        raise AnalysisError(f"--maps {args.maps}: not a folder")
    if not args.quiet:
        logging.getLogger("ambasync").setLevel(min(logging.getLogger("ambasync").getEffectiveLevel(), logging.INFO))
    planes = tuple(p.strip() for p in args.seed_planes.split(",") if p.strip())
    if not planes or any(p not in ("coronal", "sagittal") for p in planes) or len(set(planes)) != len(planes):
        raise AnalysisError(f"--seed-planes {args.seed_planes}: coronal, sagittal or coronal,sagittal")
    location = resolve_cube(args.out, args.cube)
    if "://" not in location and not os.path.isdir(location):  # before binding: open_cube's own message
        from ambasync.cube.read import open_cube

        open_cube(cube=location)

    def open_view() -> View:
        return View(location, labels=args.labels, label_names=args.label_names, maps=args.maps,
                    budget_mb=args.memory_budget or DEFAULT_BUDGET_MB, coexpression=not args.no_coexpression,
                    seed_planes=planes)

    app = make_app(open_view)
    host = f"[{args.host}]" if ":" in args.host else args.host
    failed: list[BaseException] = []

    async def serve() -> None:
        import asyncio
        import signal

        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()  # starts opening the cube in a thread
        try:
            site = web.TCPSite(runner, args.host, args.port)
            await site.start()
            port = runner.addresses[0][1] if runner.addresses else args.port
            print(f"ambasync view: http://{host}:{port}/  (opening {location}; Ctrl-C to stop)", flush=True)
            opening = app[KEY]
            try:
                view = await opening.ready()
            except ViewError as exc:
                failed.append(exc)
                return
            if not args.quiet:
                print(f"ambasync view: ready, {len(view.data.catalogue)} experiments", file=sys.stderr, flush=True)
            await stop.wait()
        finally:
            await runner.cleanup()  # removes the app's temporary folder (uploads, search pictures)

    import asyncio

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # the port is taken, the address is not ours
        raise AnalysisError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    if failed:
        raise AnalysisError(str(failed[0]).replace("the cube could not be opened: ", "", 1))
    return 0


__all__ = ["add_parser", "cmd_view"]
