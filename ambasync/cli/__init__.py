"""Command line: ``python -m ambasync {run,status,verify,replica,demo,init-config}``.

The names of commands and options are a contract that scripts and schedules
rely on: add, never rename.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
from pathlib import Path
from typing import Sequence

from ambasync.cli.matrix import add_parser as add_matrix_parser
from ambasync.cli.matrix import cmd_matrix
from ambasync.cli.search import add_parser as add_search_parser
from ambasync.cli.search import cmd_search
from ambasync.cli.view import add_parser as add_view_parser
from ambasync.cli.view import cmd_view
from ambasync.config import (
    DEFAULT_CONFIG_TEXT,
    LOG_FORMATS,
    PLANES,
    VOLUMES,
    Config,
    load_config,
)
from ambasync.errors import EXIT_OK, EXIT_SIGINT, EXIT_USAGE, RunError, exit_codes_text
from ambasync.geometry import ORIENTATIONS, SPACES
from ambasync.imaging.minc import DTYPES
from ambasync.mirror import early_signals
from ambasync.mirror.report import setup_logging
from ambasync.version import __version__

EXIT_CODES = exit_codes_text()


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="PATH", help="config file (default: $AMBASYNC_CONFIG, else ./config.toml if present)")
    p.add_argument("--out", metavar="DIR", help="output folder [output.out]")
    p.add_argument("--cube", metavar="URL", help="where the cube lives: a folder or an fsspec URL such as "
                                                 "s3://bucket/cube.zarr (default {out}/cube.zarr) [output.cube]")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more detail (debug)")
    p.add_argument("--log-format", choices=LOG_FORMATS, help="log lines as text or JSON [pipeline.log_format]")


def _selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", metavar="URL", help="Allen API base URL [source.base_url]")
    p.add_argument("--plane", choices=[*PLANES, "all"], help="plane of section [source.plane]")
    p.add_argument("--limit", type=int, metavar="N", help="first N experiments in id order; 0 = all [source.limit]")
    p.add_argument("--genes", metavar="A,B", help="only these gene acronyms [source.genes]")
    p.add_argument("--ids", metavar="ID,ID", help="only these experiment ids [source.experiment_ids]")
    p.add_argument("--shard", metavar="K/N", help="take shard K of N of the catalogue (0-based) [source.shard]")
    p.add_argument("--page-size", type=int, metavar="N", help="catalogue rows per query page [source.page_size]")


def _conversion(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concurrency", type=int, metavar="N", help="downloads in flight [download.concurrency]")
    p.add_argument("--workers", type=int, metavar="N", help="conversion processes; 0 = CPUs [convert.workers]")
    p.add_argument("--dtype", choices=DTYPES, help="stored voxel type [convert.dtype]")
    p.add_argument("--orientation", choices=ORIENTATIONS, help="voxel order [convert.orientation]")
    p.add_argument("--space", choices=SPACES, help="world space [convert.space]")
    p.add_argument("--expansion", type=float, metavar="F", help="expansion factor [convert.expansion]")
    p.add_argument("--volumes", metavar="V,V", help=f"any of {','.join(VOLUMES)} [convert.volumes]")
    p.add_argument("--name-template", metavar="T", help="output file name [convert.name_template]")
    p.add_argument("--formats", metavar="F,F", help="outputs: any of minc,nifti,cube [output.formats]")
    p.add_argument("--keep-zips", action="store_const", const=True, help="keep downloaded zips [output.keep_zips]")


_OVERRIDES = {
    "base_url": ("source", "base_url"), "plane": ("source", "plane"), "limit": ("source", "limit"),
    "genes": ("source", "genes"), "ids": ("source", "experiment_ids"), "shard": ("source", "shard"),
    "page_size": ("source", "page_size"), "concurrency": ("download", "concurrency"),
    "workers": ("convert", "workers"), "dtype": ("convert", "dtype"), "orientation": ("convert", "orientation"),
    "space": ("convert", "space"), "expansion": ("convert", "expansion"), "volumes": ("convert", "volumes"),
    "name_template": ("convert", "name_template"), "keep_zips": ("output", "keep_zips"), "formats": ("output", "formats"),
    "out": ("output", "out"), "cube": ("output", "cube"), "log_format": ("pipeline", "log_format"),
}


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = {key: getattr(args, name) for name, key in _OVERRIDES.items() if hasattr(args, name)}
    return load_config(args.config, overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ambasync",
        description="Mirror Allen Mouse Brain Atlas ISH expression grids into MINC volumes.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ambasync {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    run = sub.add_parser("run", help="mirror new and failed experiments", epilog=EXIT_CODES, formatter_class=fmt,
                         description="Mirror every experiment of the catalogue that is new, changed or failed.")
    _common(run)
    _selection(run)
    _conversion(run)
    run.add_argument("--force", action="store_true", help="redo every experiment, even those up to date")
    run.add_argument("--verify", action="store_true", help="check the sha256 of files before trusting them")
    run.add_argument("--prune", action="store_true", help="delete files of experiments the catalogue no longer lists")
    run.add_argument("--retry-failed", action="store_true", help="also retry permanent failures and quarantined ones")
    run.add_argument("--dry-run", action="store_true", help="say what would be fetched (counts, size); write nothing")

    status = sub.add_parser("status", help="what the mirror holds (offline)", epilog=EXIT_CODES, formatter_class=fmt)
    _common(status)
    status.add_argument("--shard", metavar="K/N", help="the state of shard K of N")

    verify = sub.add_parser("verify", help="re-read every MINC file; mark broken ones for the next run",
                            epilog=EXIT_CODES, formatter_class=fmt)
    _common(verify)
    verify.add_argument("--shard", metavar="K/N", help="the state of shard K of N")
    verify.add_argument("--repair", action="store_true", help="fetch broken or missing files now")
    verify.add_argument("--base-url", metavar="URL", help="Allen API base URL, for --repair [source.base_url]")

    rep = sub.add_parser("replica", help="serve the offline replica of the Allen API on 127.0.0.1")
    rep.add_argument("--port", type=int, default=8088, help="port (0 = any free port); default 8088")
    rep.add_argument("--experiments", type=int, default=60, metavar="N", help="synthetic coronal experiments")
    rep.add_argument("--sagittal", type=int, default=20, metavar="N", help="synthetic sagittal experiments")
    rep.add_argument("--latency-ms", type=float, default=0.0, help="delay before every response")
    rep.add_argument("--bandwidth-kbps", type=float, default=0.0, help="per-connection body throttle, KB/s")
    rep.add_argument("--fault-rate", type=float, default=0.0, help="share of grid requests given a transient fault")
    rep.add_argument("--max-connections", type=int, default=0, help="answer 429 beyond this many requests in flight")
    rep.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and faults")
    rep.add_argument("--prebuild", action="store_true", help="build every zip before serving (benchmarks)")
    rep.add_argument("--variants", type=int, default=0, metavar="K",
                     help="serve only K distinct synthetic grids, cycled by id (atlas-scale benchmarks)")

    demo = sub.add_parser("demo", help="mirror a few dozen experiments from an in-process replica (offline)")
    demo.add_argument("--out", default="demo", metavar="DIR", help="output folder (default ./demo)")
    demo.add_argument("--experiments", type=int, default=36, metavar="N", help="experiments to mirror")
    demo.add_argument("--sagittal", type=int, default=0, metavar="N", help="sagittal experiments too (default 0)")
    demo.add_argument("--formats", default="minc", metavar="F,F", help="outputs: any of minc,nifti,cube (default minc)")
    demo.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")

    init = sub.add_parser("init-config", help="write a commented config.toml to start from")
    init.add_argument("path", nargs="?", default="config.toml", help="where to write it (default ./config.toml)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    add_matrix_parser(sub)
    add_search_parser(sub)
    add_view_parser(sub)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if not args.dry_run:
        from ambasync.workers import start_forkserver

        with early_signals.sigint_blocked():  # a Ctrl-C while it imports: no traceback from it
            start_forkserver()  # its imports overlap ours (below) on another core
    from ambasync.mirror.options import RunOptions
    from ambasync.mirror.run import run_mirror

    if args.dry_run:  # writes nothing, so needs no clean stop: Python's defaults
        if (interrupted := early_signals.restore()) is not None:
            return _interrupted_at_start(interrupted)
    elif signal.SIGINT in early_signals.noted():  # Ctrl-C before the run began: one line, nothing done
        early_signals.restore()
        return _interrupted_at_start(signal.SIGINT)
    setup_logging(cfg.pipeline.log_format, args.verbosity)
    opts = RunOptions(force=args.force, verify=args.verify, prune=args.prune, dry_run=args.dry_run,
                      retry_failed=args.retry_failed, quiet=args.quiet)
    summary = run_mirror(cfg, opts)
    if args.dry_run:
        from ambasync.mirror.dryrun import ZIP_SIZE_ESTIMATE

        print(f"dry run: {summary.catalogue_rows} catalogue rows; would fetch {summary.would_fetch} experiments "
              f"(about {summary.would_fetch * ZIP_SIZE_ESTIMATE / 1e6:.0f} MB), {summary.skipped} up to date, "
              f"{summary.quarantined} quarantined, {summary.invalid} invalid rows; nothing written")
    else:
        print(summary.text(), file=sys.stderr)
    return summary.exit_code


def cmd_status(args: argparse.Namespace) -> int:
    from ambasync.mirror.status import print_status

    return print_status(config_from_args(args))


def cmd_verify(args: argparse.Namespace) -> int:
    from ambasync.mirror.verify import verify_mirror

    return verify_mirror(config_from_args(args), repair=args.repair)


def cmd_replica(args: argparse.Namespace) -> int:
    from ambasync.replica import ReplicaConfig, main_serve

    main_serve(ReplicaConfig(n_coronal=args.experiments, n_sagittal=args.sagittal, seed=args.seed,
                             latency_ms=args.latency_ms, bandwidth_kbps=args.bandwidth_kbps,
                             fault_rate=args.fault_rate, max_connections=args.max_connections,
                             prebuild=args.prebuild, variants=args.variants), args.port)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from ambasync.cli.demo import run_demo

    return run_demo(Path(args.out), args.experiments, quiet=args.quiet, formats=args.formats, sagittal=args.sagittal)


def cmd_init_config(args: argparse.Namespace) -> int:
    dest = Path(args.path)
    if dest.exists() and not args.force:
        print(f"ambasync: {dest} exists; use --force to overwrite it", file=sys.stderr)
        return EXIT_USAGE
    shutil.copyfile(DEFAULT_CONFIG_TEXT, dest)
    print(f"wrote {dest}; edit it, then: python -m ambasync run --config {dest}")
    return EXIT_OK


COMMANDS = {"run": cmd_run, "status": cmd_status, "verify": cmd_verify, "replica": cmd_replica,
            "demo": cmd_demo, "init-config": cmd_init_config, "matrix": cmd_matrix,
            "search": cmd_search, "view": cmd_view}


def _interrupted_at_start(sig: signal.Signals) -> int:
    print(f"ambasync: interrupted by {sig.name} while starting; nothing was done", file=sys.stderr)
    return early_signals.EXIT_CODES[sig]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command != "run":  # only a run stops cleanly on a signal noted while starting
            interrupted = early_signals.restore()
            if interrupted is not None:
                return _interrupted_at_start(interrupted)
        args.verbosity = -1 if getattr(args, "quiet", False) else getattr(args, "verbose", 0)
        setup_logging(getattr(args, "log_format", None) or "text", args.verbosity)
        return COMMANDS[args.command](args)
    except RunError as exc:
        print(f"ambasync: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("ambasync: interrupted by SIGINT", file=sys.stderr)
        return EXIT_SIGINT


