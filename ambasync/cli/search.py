"""``ambasync search`` on the command line: the parser, the handler, and the results tables
it writes (CSV, atomically).

Nothing heavy is imported at module level: ``ambasync.cli`` builds this command's parser in
the run's event-loop process, which never imports numpy.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from ambasync.analysis.search.correlate import (
    ALIGN,
    BY,
    DEFAULT_MASK,
    DEFAULT_NULLS,
    DEFAULT_SEED,
    DEFAULT_TAIL,
    METHODS,
    TAILS,
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``search`` subcommand (for ambasync.cli)."""
    p = subparsers.add_parser(
        "search", help="which experiments and genes are expressed like a map (or enriched in a region)",
        description="Correlate a map (MINC or NIfTI, in the mirror's world space) with every experiment of the "
                    "cube, with spatial-null p-values; or, with --target, rank experiments by fold change. "
                    "See docs/search.md.")
    p.add_argument("map", nargs="?", metavar="MAP", help="the map (.mnc, .nii, .nii.gz); any grid in the same space")
    p.add_argument("--out", metavar="DIR", help="the mirror folder holding cube.zarr (or the .zarr itself)")
    p.add_argument("--cube", metavar="URL", help="the cube itself when not {out}/cube.zarr: a folder or an "
                                                 "fsspec URL such as s3://bucket/cube.zarr")
    p.add_argument("--at", metavar="VERSION", help="read the cube only if it is at this version (cube_version, "
                                                   "named in every output's methods): rebuild a paper's table "
                                                   "exactly, or stop (exit 2)")
    p.add_argument("--to", required=True, metavar="RESULTS.csv", help="the table to write (CSV)")
    p.add_argument("--mask", default=DEFAULT_MASK, metavar="NAME|PATH",
                   help="voxels to use: brain (default), coronal, sagittal (coverage >= 0.8) or an image's nonzero voxels")
    p.add_argument("--method", choices=METHODS, default="pearson", help="correlation (default pearson)")
    p.add_argument("--nulls", type=int, default=DEFAULT_NULLS, metavar="N",
                   help=f"spatial null maps for p_spatial (default {DEFAULT_NULLS}; 0 = none)")
    p.add_argument("--tail", choices=TAILS, default=DEFAULT_TAIL,
                   help="p_spatial below 1/(nulls+1): gpd (default) fits a generalised Pareto tail to each "
                        "experiment's nulls where it fits; empirical counts nulls only")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed of the null maps (default {DEFAULT_SEED})")
    p.add_argument("--by", choices=BY, default="experiment",
                   help="gene: also write a gene-level table (experiments of a gene combined) beside RESULTS")
    p.add_argument("--target", metavar="ROI", help="differential mode: the region of interest (image, nonzero voxels)")
    p.add_argument("--target-above", type=float, metavar="T",
                   help="differential mode: the target is the voxels where the --target image is > T "
                        "(e.g. a t-map and 2) instead of its nonzero voxels")
    p.add_argument("--contrast", metavar="ROI", help="differential mode: the region to compare with, used as given "
                                                     "(voxels shared with the target included; "
                                                     "default: the rest of the mask)")
    p.add_argument("--contrast-at-most", type=float, metavar="T",
                   help="differential mode: the contrast is the voxels where the --contrast image (without one, "
                        "the --target image) is <= T instead of its nonzero voxels")
    p.add_argument("--align", choices=ALIGN, default=None,
                   help="how MAP, --mask, --target and --contrast meet the cube's grid: world (default: resample "
                        "by world coordinates) or voxel (index for index; needs the cube's shape). An image with "
                        "the cube's shape and step but an origin more than half a voxel off stops until you choose")
    p.add_argument("--plot", metavar="PNG", help="also draw the map beside the top experiments, and the top 20")
    p.add_argument("--scheduler", metavar="ADDRESS", help="dask.distributed scheduler to compute on")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more detail")
    return p


def cmd_search(args: argparse.Namespace) -> int:
    """``python -m ambasync search``: :func:`ambasync.search` with the flags; bad input is one
    line and exit 2."""
    from ambasync.analysis.search.api import run_search
    from ambasync.analysis.search.tables import genes_path

    progress = not args.quiet
    if progress:
        logging.getLogger("ambasync").setLevel(min(logging.getLogger("ambasync").getEffectiveLevel(), logging.INFO))
    done = run_search(args.out, args.map, to=args.to, mask=args.mask, method=args.method, nulls=args.nulls,
                      seed=args.seed, by=args.by, target=args.target, contrast=args.contrast, plot=args.plot,
                      scheduler=args.scheduler, cube=args.cube, quiet=not progress,
                      tail=args.tail, align=args.align, target_above=args.target_above,
                      contrast_at_most=args.contrast_at_most, at=args.at)
    if not progress:
        return 0
    for line in done.report:
        print(line, file=sys.stderr)
    if done.result is None:
        first = done.experiments.iloc[0] if len(done.experiments) else None
        target = first["target"] if first is not None else args.target
        contrast = first["contrast"] if first is not None else (args.contrast or "the rest of the mask")
        print(f"wrote {args.to}: {len(done.experiments)} experiments by log2 fold change of {target} over "
              f"{contrast}", file=sys.stderr)
        return 0
    hits = int((done.experiments["q"] < 0.05).sum())
    fitted = int((done.experiments["p_method"] == "gpd").sum())
    print(f"wrote {args.to}: {len(done.experiments)} experiments, {hits} with q < 0.05 "
          f"({done.result.method}, {done.result.n_nulls} spatial nulls, {fitted} p-values from a fitted tail)"
          + (f"; genes in {genes_path(args.to)}" if done.genes is not None else "")
          + (f"; picture {args.plot}" if args.plot else ""), file=sys.stderr)
    return 0


__all__ = ["add_parser", "cmd_search"]
