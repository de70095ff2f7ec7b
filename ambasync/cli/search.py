"""``ambasync search`` on the command line: the parser, the handler, and the results tables
it writes (CSV, atomically).

Nothing heavy is imported at module level: ``ambasync.cli`` builds this command's parser in
the run's event-loop process, which never imports numpy.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ambasync.files import atomic_path
from ambasync.analysis.search.correlate import (BY, DEFAULT_MASK, DEFAULT_NULLS, DEFAULT_SEED, METHODS, correlate, fold_change)

if TYPE_CHECKING:
    import pandas as pd


def write_table(table: pd.DataFrame, path: str | Path) -> Path:
    """A results table as CSV, atomically (an interrupted write leaves nothing under ``path``)."""
    from ambasync.errors import AnalysisError

    dest = Path(path)
    if not dest.parent.is_dir():
        raise AnalysisError(f"{dest}: the folder {dest.parent} does not exist")
    with atomic_path(dest) as tmp:
        table.to_csv(tmp, index=False)
    return dest


def genes_path(to: str | Path) -> Path:
    """Where ``--by gene`` writes its table: beside RESULTS, ``_genes`` before the suffix."""
    dest = Path(to)
    return dest.with_name(f"{dest.stem}_genes{dest.suffix or '.csv'}")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``search`` subcommand (for ambasync.cli)."""
    p = subparsers.add_parser(
        "search", help="which experiments and genes are expressed like a map (or enriched in a region)",
        description="Correlate a map (MINC or NIfTI, in the mirror's world space) with every experiment of the "
                    "cube, with spatial-null p-values; or, with --target, rank experiments by fold change. "
                    "See docs/search.md.")
    p.add_argument("map", nargs="?", metavar="MAP", help="the map (.mnc, .nii, .nii.gz); any grid in the same space")
    p.add_argument("--out", metavar="DIR", help="the mirror folder holding cube.zarr (or the .zarr itself)")
    p.add_argument("--to", required=True, metavar="RESULTS.csv", help="the table to write (CSV)")
    p.add_argument("--mask", default=DEFAULT_MASK, metavar="NAME|PATH",
                   help="voxels to use: brain (default), coronal, sagittal (coverage >= 0.8) or an image's nonzero voxels")
    p.add_argument("--method", choices=METHODS, default="pearson", help="correlation (default pearson)")
    p.add_argument("--nulls", type=int, default=DEFAULT_NULLS, metavar="N",
                   help=f"spatial null maps for p_spatial (default {DEFAULT_NULLS}; 0 = none)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed of the null maps (default {DEFAULT_SEED})")
    p.add_argument("--by", choices=BY, default="experiment",
                   help="gene: also write a gene-level table (experiments of a gene combined) beside RESULTS")
    p.add_argument("--target", metavar="ROI", help="differential mode: the region of interest (image, nonzero voxels)")
    p.add_argument("--contrast", metavar="ROI", help="differential mode: the region to compare with "
                                                     "(default: the rest of the mask)")
    p.add_argument("--plot", metavar="PNG", help="also draw the map beside the top experiments, and the top 20")
    p.add_argument("--scheduler", metavar="ADDRESS", help="dask.distributed scheduler to compute on")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more detail")
    return p


def cmd_search(args: argparse.Namespace) -> int:
    """``python -m ambasync search``: bad input is one line and exit 2."""
    from ambasync.errors import AnalysisError
    from ambasync.cube.read import mirror_folder
    from ambasync.analysis.search.plot import plot_result

    out = mirror_folder(args.out)
    progress = not args.quiet
    if progress:
        logging.getLogger("ambasync").setLevel(min(logging.getLogger("ambasync").getEffectiveLevel(), logging.INFO))
    if args.plot and not args.plot.lower().endswith(".png"):
        raise AnalysisError(f"--plot {args.plot}: the picture is written as PNG; give a name ending in .png")
    if args.target:
        if args.map:
            raise AnalysisError("give either MAP (correlation) or --target (fold change), not both")
        if args.plot or args.by == "gene":
            raise AnalysisError("--plot and --by gene go with a MAP (correlation mode), not with --target")
        table = fold_change(out, args.target, args.contrast, args.mask, args.scheduler, progress)
        written = write_table(table, args.to)
        if progress:
            print(f"wrote {written}: {len(table)} experiments by log2 fold change of {args.target} over "
                  f"{args.contrast or 'the rest of the mask'}", file=sys.stderr)
        return 0
    if args.contrast:
        raise AnalysisError("--contrast needs --target")
    if not args.map:
        raise AnalysisError("give a MAP to correlate with, or --target ROI for fold changes")
    result = correlate(out, args.map, args.mask, args.method, args.nulls, args.seed, args.by == "gene",
                       args.scheduler, progress)
    written = write_table(result.experiments, args.to)
    if result.genes is not None:
        write_table(result.genes, genes_path(args.to))
    if args.plot:
        plot_result(result, out, args.plot, Path(args.map).name)
    if progress:
        hits = int((result.experiments["q"] < 0.05).sum())
        print(f"wrote {written}: {len(result.experiments)} experiments, {hits} with q < 0.05 "
              f"({result.method}, {result.n_nulls} spatial nulls)"
              + (f"; genes in {genes_path(args.to)}" if result.genes is not None else "")
              + (f"; picture {args.plot}" if args.plot else ""), file=sys.stderr)
    return 0


__all__ = ["add_parser", "cmd_search", "genes_path", "write_table"]
