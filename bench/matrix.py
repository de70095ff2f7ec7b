"""Benchmark of ``ambasync matrix`` against MHTS's ``build_voxel_matrix.py`` (bench/mhts_baseline.py).

    python -m bench.matrix [--experiments 40] [--atlas 4345] [--knn 22x5000,22x10000] [--json out.json]

Three measurements, each from one run on this machine:

* ``compare``: the same ``--experiments`` coronal experiments (the replica's synthetic grids plus
  the real Nrp1 and Pdyn), MHTS's script on float MINC files against ``matrix --recipe mhts
  --impute none`` on a cube of them, end to end (Python start-up included), on the real coronal
  coverage mask (61,315 voxels); the two CSVs are compared cell by cell.
* ``atlas``: the atlas-scale coronal set (``--atlas`` experiments, ~2 per gene, grids cycled
  from 64 synthetic variants) on the same mask: wall time and peak RSS of the whole process tree,
  for CSV and for .h5ad output.
* The atlas-scale table of issue 19 (the default recipe with KNN on 4,345 coronal experiments, the
  sagittal set, gene x region, the read and BLAS floors) is ``python -m bench.atlas_matrix all``.
* ``knn``: KNN imputation alone (scikit-learn's KNNImputer, as MHTS) at a few matrix shapes,
  to give its scaling: quadratic in voxels, linear in genes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.run import PY, Result, measure

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tests/cubes.py and helpers.py: the test cube layout, one copy

CORONAL_MASK = REPO / "tests" / "fixtures" / "coronal_200um_coverage_bin0.8.mnc"
VARIANTS = 64
REAL_IDS = (74272479, 71717084)


def _experiments(n: int, variants: int = 0):
    """``n`` coronal experiments of the replica (the last two the real Nrp1 and Pdyn when n >= 2)."""
    from cubes import TestExperiment

    from ambasync.replica import Replica, ReplicaConfig

    rep = Replica(ReplicaConfig(n_coronal=max(0, n - 2), n_sagittal=0, seed=0, variants=variants,
                                real_dir=str(REPO / "tests" / "fixtures" / "allen-grids")))
    cache: dict[int, np.ndarray] = {}
    for r in rep.rows[:n]:
        eid = int(r["experiment_id"])
        key = eid % variants if variants and eid not in REAL_IDS else eid  # the replica's own cycling
        if key not in cache:
            cache[key] = rep.raw_grid(eid)
        yield TestExperiment(eid, r["gene"], r["plane"], cache[key], dict(r))


def write_cube(out: Path, experiments, batch: int = 256, per_chunk: int = 8, volume=None, coverage=None) -> int:
    """A cube in the contract's layout (as tests/cubes.py writes it), appended in batches so the
    atlas-scale set never sits in memory at once. Returns the number of experiments.

    ``per_chunk``: experiments per stored chunk; ``volume(experiment, ras) -> ras``: each volume as
    stored (default as served); ``coverage``: the coronal coverage (default that of the first batch)."""
    import warnings

    import xarray as xr
    from cubes import CATALOGUE_COLUMNS, SIZES, STARTS, STEP, _column

    from helpers import notebook_ras

    out.mkdir(parents=True, exist_ok=True)
    store = out / "cube.zarr"
    n, chunk = 0, []
    it = iter(experiments)
    while True:
        e = next(it, None)
        if e is not None:
            chunk.append(e)
            if len(chunk) < batch:
                continue
        if not chunk:
            break
        expression = np.stack([(volume or (lambda _, v: v))(x, notebook_ras(np.asarray(x.grid, dtype=np.float32)))
                               for x in chunk])
        coords = {"experiment": np.array([x.experiment_id for x in chunk], dtype=np.int64)}
        coords.update({name: ("experiment", _column(chunk, name)) for name in CATALOGUE_COLUMNS})
        data = {"expression": (("experiment", "zspace", "yspace", "xspace"), expression)}
        if n == 0:
            for d, (name, size, start) in enumerate(zip(("zspace", "yspace", "xspace"), SIZES, STARTS)):
                cos = [float(name == axis) for axis in ("xspace", "yspace", "zspace")]
                coords[name] = xr.Variable(name, start + STEP * np.arange(size),
                                           attrs={"units": "mm", "start": start, "step": STEP,
                                                  "direction_cosines": cos})
            if coverage is None:
                coverage = (expression != -1).mean(axis=0)  # of the first batch: a bench cube
            data["coverage_coronal"] = (("zspace", "yspace", "xspace"), np.asarray(coverage, dtype=np.float32))
            data["coverage_sagittal"] = (("zspace", "yspace", "xspace"), np.zeros(SIZES, np.float32))
        ds = xr.Dataset(data, coords=coords, attrs={"ambasync_version": "bench", "format_version": 1,
                                                    "orientation": "RAS", "space": "MICe", "expansion": 1.0,
                                                    "source_url": "bench", "updated": "2026-01-01T00:00:00Z"})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if n == 0:
                ds.to_zarr(store, mode="w", zarr_format=3, consolidated=True,
                           encoding={"expression": {"chunks": (per_chunk, *SIZES)}})
            else:
                ds.to_zarr(store, append_dim="experiment", zarr_format=3, consolidated=True)
        n += len(chunk)
        chunk = []
        if e is None:
            break
    return n


def write_minc_files(folder: Path, experiments) -> int:
    """Float MINC files ``{gene}_{id}.mnc`` of the experiments, as ``run --dtype float`` writes them."""
    from helpers import notebook_ras

    from ambasync.geometry import output_geometry
    from ambasync.imaging.minc import write_volume

    folder.mkdir(parents=True, exist_ok=True)
    geometry = output_geometry((58, 41, 67), "RAS", "MICe", 1.0)
    n = 0
    for e in experiments:
        write_volume(notebook_ras(np.asarray(e.grid)).astype(np.float32), geometry,
                     folder / f"{e.gene}_{e.experiment_id}.mnc", "float")
        n += 1
    return n


def compare_csv(ours: Path, theirs: Path) -> dict:
    import pandas as pd

    a = pd.read_csv(ours, index_col=0, float_precision="round_trip")
    b = pd.read_csv(theirs, index_col=0, float_precision="round_trip")
    same_cells = list(a.index) == list(b.index) and list(a.columns) == list(b.columns)
    nan_same = same_cells and bool(np.array_equal(np.isnan(a.to_numpy()), np.isnan(b.to_numpy())))
    diff = float(np.nanmax(np.abs(a.to_numpy() - b.to_numpy()))) if same_cells else float("nan")
    return {"genes": len(a), "voxels": a.shape[1], "same_genes_and_columns": same_cells, "same_nan": nan_same,
            "max_abs_diff": diff}


def scenario_compare(n: int, work: Path, knn: bool = True) -> dict:
    """Like for like (both without imputation; with ``knn`` also both with KNN), and MHTS as
    build_AMBA_data.sh runs it (its defaults: KNN) against ``matrix --impute none``."""
    exps = list(_experiments(n))
    write_minc_files(work / "expression" / "coronal", exps)
    write_cube(work, exps)

    def mhts(impute: str, out: Path) -> Result:
        return measure(f"mhts build_voxel_matrix.py --impute {impute}",
                       [PY, "-m", "bench.mhts_baseline", "--datadir", str(work / "expression"), "--dataset", "coronal",
                        "--mask", str(CORONAL_MASK), "--impute", impute, "--out", str(out)], n)

    def ours(impute: str, out: Path) -> Result:
        return measure(f"ambasync matrix --recipe mhts --impute {impute}",
                       [PY, "-m", "ambasync", "matrix", "-q", "--out", str(work), "--recipe", "mhts", "--mask",
                        str(CORONAL_MASK), "--impute", impute, "--to", str(out)], n)

    base, mine = mhts("false", work / "mhts.csv"), ours("none", work / "ambasync.csv")
    report = {"results": [vars(base), vars(mine)],
              "speedup_without_imputation": round(base.wall_s / mine.wall_s, 1),
              "agreement_without_imputation": compare_csv(work / "ambasync.csv", work / "mhts.csv")}
    if knn:
        base_knn, mine_knn = mhts("true", work / "mhts_knn.csv"), ours("knn", work / "ambasync_knn.csv")
        report["results"] += [vars(base_knn), vars(mine_knn)]
        report["speedup_mhts_defaults_vs_impute_none"] = round(base_knn.wall_s / mine.wall_s, 1)
        report["speedup_both_knn"] = round(base_knn.wall_s / mine_knn.wall_s, 2)
        report["agreement_knn"] = compare_csv(work / "ambasync_knn.csv", work / "mhts_knn.csv")
    return report


def scenario_atlas(n: int, work: Path) -> dict:
    t = time.perf_counter()
    written = write_cube(work, _experiments(n, VARIANTS))
    setup = time.perf_counter() - t
    results = []
    for ext in ("csv", "h5ad"):
        to = work / f"atlas.{ext}"
        r = measure(f"ambasync matrix --recipe mhts --impute none -> .{ext}",
                    [PY, "-m", "ambasync", "matrix", "-q", "--out", str(work), "--recipe", "mhts", "--mask",
                     str(CORONAL_MASK), "--impute", "none", "--to", str(to)], written)
        r.note = f"{to.stat().st_size / 1e6:.0f} MB"
        results.append(vars(r))
    return {"experiments": written, "cube_seconds": round(setup, 1), "results": results}


def scenario_knn(shapes: list[tuple[int, int]]) -> dict:
    """KNN imputation time alone (``knn_impute``: scikit-learn's KNNImputer, chunks over dask),
    on genes x voxels matrices like the atlas's (gamma values, 5% missing like the synthetic
    grids' zeros): seconds and peak memory growth, to fit its scaling in genes and voxels."""
    import resource

    from ambasync.analysis.matrix.impute import knn_impute

    rng = np.random.default_rng(0)
    rows = []
    for genes, voxels in shapes:
        x = rng.gamma(1.5, 1.0, (genes, voxels))
        x[rng.random(x.shape) < 0.05] = np.nan
        t, c = time.perf_counter(), time.process_time()
        knn_impute(x)
        rows.append({"genes": genes, "voxels": voxels, "wall_s": round(time.perf_counter() - t, 1),
                     "cpu_s": round(time.process_time() - c, 1),
                     "peak_rss_mb_so_far": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})
    return {"runs": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiments", type=int, default=40, help="experiments of the MHTS comparison")
    p.add_argument("--atlas", type=int, default=4345, help="experiments of the atlas-scale run (0 = skip)")
    p.add_argument("--knn", default="22x5000,22x10000,22x20000,88x10000", metavar="GxV,...",
                   help="genes x voxels shapes of the KNN timing (empty = skip)")
    p.add_argument("--work", metavar="DIR", help="working folder (default: a temporary one, removed)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    args = p.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-matrix-"))
    report: dict = {}
    try:
        if args.experiments:
            report["compare"] = scenario_compare(args.experiments, work / "compare")
            print(json.dumps(report["compare"], indent=1), flush=True)
        if args.atlas:
            report["atlas"] = scenario_atlas(args.atlas, work / "atlas")
            print(json.dumps(report["atlas"], indent=1), flush=True)
        if args.knn:
            shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.knn.split(",")]
            report["knn"] = scenario_knn(shapes)  # type: ignore[arg-type]
            print(json.dumps(report["knn"], indent=1), flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
