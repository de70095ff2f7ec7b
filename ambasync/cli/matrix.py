"""``ambasync matrix`` on the command line: the parser (every recipe field a flag), and the
handler that builds the matrix and writes it.

Nothing heavy is imported at module level: ``ambasync.cli`` builds this command's parser in
the run's event-loop process, which never imports numpy.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from ambasync.analysis.matrix.recipe import (
    COMBINE,
    GROUP_BY,
    IMPUTE,
    NORMALISE,
    PLANES,
    VARIABLES,
)

# flag name -> recipe field; booleans take --x / --no-x
_FLAGS = {
    "plane": ("--plane", dict(choices=PLANES, help="experiments of this plane (both: combine per --combine)")),
    "genes_in_coronal": ("--genes-in-coronal", dict(action=argparse.BooleanOptionalAction,
                                                    help="sagittal: only genes that also have a coronal experiment")),
    "genes": ("--genes", dict(metavar="A,B", help="only these gene acronyms")),
    "ids": ("--ids", dict(metavar="ID,ID", help="only these experiment ids")),
    "variable": ("--variable", dict(choices=VARIABLES, help="cube variable (grid volume) to use")),
    "mask": ("--mask", dict(metavar="coronal|sagittal|brain|PATH",
                            help="coverage >= 0.8 of a plane, voxels with any data, or an image's nonzero voxels")),
    "resample_images": ("--resample-images", dict(action=argparse.BooleanOptionalAction,
                                                  help="resample a mask or label image on another grid (nearest)")),
    "zero_is_missing": ("--zero-is-missing", dict(action=argparse.BooleanOptionalAction,
                                                  help="measured 0 is missing too (-1 always is)")),
    "log2": ("--log2", dict(action=argparse.BooleanOptionalAction, help="log2-transform the values")),
    "log2_offset": ("--log2-offset", dict(type=float, metavar="C", help="log2(x + C)")),
    "group_by": ("--group-by", dict(choices=GROUP_BY, help="one row per gene (mean skipping NaN) or per experiment")),
    "combine": ("--combine", dict(choices=COMBINE, help="--plane both: how a gene's two planes combine")),
    "max_missing": ("--max-missing", dict(type=float, metavar="F",
                                          help="keep rows whose NaN fraction is strictly below F")),
    "impute": ("--impute", dict(choices=IMPUTE, help="fill NaN: none, KNNImputer (as MHTS), or spatial neighbours")),
    "knn_neighbors": ("--knn-neighbors", dict(type=int, metavar="K", help="KNNImputer's n_neighbors")),
    "normalise": ("--normalise", dict(choices=NORMALISE, help="none, mhts, srs or zscore (abagen's)")),
    "mirror_hemisphere": ("--mirror-hemisphere", dict(action=argparse.BooleanOptionalAction,
                                                      help="fill sagittal maps across the midline")),
    "homologs": ("--homologs", dict(metavar="CSV", help="keep genes in its Mouse column")),
    "labels": ("--labels", dict(metavar="PATH", help="label image: gene x region means")),
    "label_table": ("--label-table", dict(metavar="CSV", help="columns Structure, Label (0 = none)")),
    "region_means": ("--region-means", dict(action=argparse.BooleanOptionalAction,
                                            help="with --labels: region means (default), or voxels named by region")),
}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``matrix`` subcommand, added to ``ambasync.cli``'s subparsers."""
    p = subparsers.add_parser(
        "matrix", help="gene-by-voxel or gene-by-region matrix from the cube",
        description="Build a gene-by-voxel (or -region) matrix from the cube, by a recipe (default mhts) "
                    "with any step overridden by its flag. See docs/matrix.md.")
    p.add_argument("--out", metavar="DIR", help="the mirror folder holding cube.zarr (or the .zarr itself)")
    p.add_argument("--cube", metavar="URL", help="the cube itself when not {out}/cube.zarr: a folder or an "
                                                 "fsspec URL such as s3://bucket/cube.zarr")
    p.add_argument("--at", metavar="VERSION", help="read the cube only if it is at this version (cube_version, "
                                                   "named in every output's methods): rebuild a paper's table "
                                                   "exactly, or stop (exit 2)")
    p.add_argument("--to", required=True, metavar="PATH",
                   help="output: .csv (MHTS layout), .parquet, .h5ad, .zarr; with --volume .mnc, .nii, .nii.gz")
    p.add_argument("--recipe", default="mhts", metavar="NAME|TOML", help="mhts (default) or a recipe file")
    for name, (flag, kwargs) in _FLAGS.items():
        p.add_argument(flag, dest=name, default=None, **kwargs)
    p.add_argument("--volume", metavar="GENE", help="write this gene's (or experiment's) processed map as an image")
    p.add_argument("--scheduler", metavar="ADDRESS", help="dask.distributed scheduler to compute on")
    p.add_argument("--memory", metavar="SIZE",
                   help="memory budget, e.g. 4GB (default: [analysis] memory, else half of RAM); a request "
                        "that cannot fit stops before it starts (exit 2)")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more detail")
    return p


def cmd_matrix(args: argparse.Namespace) -> int:
    """``python -m ambasync matrix``: :func:`ambasync.matrix` with the flags; bad input is one
    line and exit 2."""
    from ambasync.analysis.matrix.api import matrix

    overrides = {name: getattr(args, name) for name in _FLAGS if getattr(args, name, None) is not None}
    quiet = getattr(args, "quiet", False)
    if not quiet:  # progress lines (rate, ETA) when stderr is not a terminal
        logger = logging.getLogger("ambasync")
        logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
    m = matrix(args.out, args.recipe, to=args.to, volume=args.volume, scheduler=args.scheduler,
               cube=args.cube, memory=getattr(args, "memory", None), quiet=quiet, at=args.at, **overrides)
    facts = m.attrs["ambasync"]
    if not quiet:
        print(f"wrote {facts['written']}: {facts['n_rows']} {m.index.name.lower()}s x {facts['n_columns']} "
              f"{'regions' if facts.get('columns') == 'regions' else 'voxels'} from {facts['n_experiments']} "
              f"experiments; recipe {facts['recipe_path']}, methods {facts['methods_path']}", file=sys.stderr)
    return 0


__all__ = ["add_parser", "cmd_matrix"]
