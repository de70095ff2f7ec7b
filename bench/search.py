"""Benchmark of ``ambasync search``: speed and memory from fresh processes, and the calibration
of its p-values.

    python -m bench.search [--rank 1000,2000] [--nulls-experiments 400] [--nulls 1000]
                           [--maps 100] [--calibration-nulls 100] [--cube DIR] [--json out.json]

* ``rank``: one map against every experiment of cubes of ``--rank`` sizes (the replica's
  grids, cycled from 64 variants), ``--nulls 0``, end to end from a fresh process (Python
  start-up included): wall time and peak RSS of the process tree, against the faithful
  baseline a user would write (read each experiment from the cube with xarray, ``np.corrcoef``
  over its voxels with data), on the cube stored 8 experiments per chunk (as the test cubes)
  and one per chunk (as the production writer); two sizes give the cost per experiment, which
  extrapolates linearly to the 26,078 experiments of the atlas (one pass over the cube).
* ``voxel``: with ``--cube DIR`` (a mirror folder whose cube has the voxel-major copy, as the
  production writer makes it; e.g. ``bench.cube``'s grown store), one map (smooth noise in the
  template brain, default mask ``brain``) against every experiment, ``--nulls 0``, fresh
  processes: the command (scored from ``expression_by_voxel``) against the same search forced
  to read ``expression`` experiment by experiment (``correlate(voxel_major=False)``), and the
  largest difference in r between the two tables.
* ``nulls``: the default 1,000 nulls on ``--nulls-experiments`` experiments, fresh process.
* ``atlas``: with ``--atlas-cube DIR`` (a mirror folder of an atlas-sized cube, e.g. the replica's
  26,078-experiment atlas scenario), one smooth map (or ``--atlas-map``) with ``--nulls 0``,
  ``--nulls 1000`` and ``--nulls 1000 --by gene``, fresh processes, ``--atlas-mask`` (default the
  real template brain, 63,545 voxels): wall, CPU, peak RSS, and the count of q < 0.05. Then the
  machine's floor: the three float32 products' flops (3 x 2 x (nulls + 1) x voxels x experiments)
  over this machine's measured single-thread float32 GEMM rate at the search's shapes, times the
  cores; and whether float32 is exact enough: the largest |r| difference from float64 over a block
  of the cube's experiments against the map and 1,000 smooth null-like columns.
* ``calibration``: the share of p < 0.05 over ``--maps`` smooth random maps against smooth
  experiments (Gaussian-filtered noise in the real template brain mask, as tests/test_search.py),
  for the nulls ambasync uses, for plain phase randomisation (no overlap correction) and for the
  textbook parametric p-value, at two smoothness settings. Computed with ambasync's own
  statistics functions on arrays (no cube needed: the same code the command runs per block).
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

from bench.matrix import CORONAL_MASK, VARIANTS, _experiments, write_cube
from bench.run import PY, measure

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # helpers' MINC reader: one copy
TEMPLATE_MASK = REPO / "tests" / "fixtures" / "average_template_200um_mask.mnc"
STARTS, STEP = (-2.7, -7.9, -5.7), 0.2  # the cube's grid (zspace, yspace, xspace)


def _read_mask(path: Path) -> np.ndarray:
    from helpers import read_minc

    return read_minc(path)[0] > 0.5


def _smooth(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise, cut from a box padded by 4 sigma: filtering the box itself
    reflects the noise at its faces, which makes every field smoother (and more alike) there."""
    from scipy import ndimage

    pad = int(np.ceil(4 * sigma))
    field = ndimage.gaussian_filter(rng.standard_normal(tuple(s + 2 * pad for s in shape)), sigma)
    field = field[pad:-pad, pad:-pad, pad:-pad]
    return field / field.std()


def _save_map(volume: np.ndarray, path: Path) -> Path:
    import nibabel

    affine = np.diag([STEP, STEP, STEP, 1.0])
    affine[:3, 3] = STARTS[::-1]
    nibabel.save(nibabel.Nifti1Image(np.transpose(volume, (2, 1, 0)).astype(np.float32), affine), str(path))
    return path


def child_baseline(out: str, map_path: str) -> None:
    """The loop a user would write: each experiment read from the cube, correlated over its voxels."""
    import nibabel
    import xarray as xr

    mask = _read_mask(CORONAL_MASK)
    y = np.transpose(np.asarray(nibabel.load(map_path).dataobj, dtype=np.float64), (2, 1, 0))
    ds = xr.open_zarr(f"{out}/cube.zarr")
    r = []
    for i in range(ds.sizes["experiment"]):
        x = ds["expression"].isel(experiment=i).values
        use = mask & (x != -1)
        r.append(np.corrcoef(x[use], y[use])[0, 1])
    print(len(r), file=sys.stderr)


def bench_rank(work: Path, sizes: list[int]) -> list[dict]:
    rng = np.random.default_rng(0)
    map_path = _save_map(np.where(_read_mask(CORONAL_MASK), _smooth(rng, (41, 67, 58), 2.5), 0.0), work / "map.nii")
    rows = []
    for n in sizes:
        cube = work / f"rank{n}"
        t = time.perf_counter()
        write_cube(cube, _experiments(n, VARIANTS))
        print(f"cube of {n} experiments written in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        one = work / f"rank{n}-one"
        _one_per_chunk(cube, one)
        base = measure("baseline loop", [PY, "-m", "bench.search", "--child-baseline", str(cube), str(map_path)], n)
        for layout, folder in (("8 experiments per chunk", cube), ("1 experiment per chunk", one)):
            ours = measure("search --nulls 0", [PY, "-m", "ambasync", "search", str(map_path), "--out", str(folder),
                                                "--to", str(work / "r.csv"), "--nulls", "0", "--mask", "coronal",
                                                "-q"], n)
            rows.append({"experiments": n, "layout": layout, "search_s": ours.wall_s, "search_cpu_s": ours.cpu_s,
                         "search_rss_mb": ours.peak_rss_mb, "baseline_s": base.wall_s,
                         "baseline_rss_mb": base.peak_rss_mb, "speedup": round(base.wall_s / ours.wall_s, 2)})
            print(rows[-1], file=sys.stderr)
        shutil.rmtree(cube)
        shutil.rmtree(one)
    return rows


def _one_per_chunk(src: Path, dst: Path) -> None:
    """A copy of the cube stored one experiment per chunk, as the production writer stores it
    (ambasync/cube/layout.py), to measure the per-chunk cost of reading."""
    import warnings

    import xarray as xr

    ds = xr.open_zarr(src / "cube.zarr")
    for variable in ds.variables.values():
        variable.encoding.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.chunk({"experiment": 1}).to_zarr(dst / "cube.zarr", mode="w", zarr_format=3, consolidated=True,
                                            encoding={"expression": {"chunks": (1, *ds["expression"].shape[1:])}})


def child_volume_major(out: str, map_path: str, to: str) -> None:
    """The same search read experiment by experiment from ``expression`` (the path cubes without
    the voxel-major copy take)."""
    from ambasync.analysis.search.correlate import correlate
    from ambasync.cube.read import resolve_cube

    correlate(resolve_cube(out), map_path, nulls=0, progress=False, voxel_major=False).experiments.to_csv(to, index=False)


def bench_voxel(work: Path, cube: Path) -> dict:
    import pandas as pd
    import xarray as xr

    n = xr.open_zarr(cube / "cube.zarr").sizes["experiment"]
    rng = np.random.default_rng(3)
    map_path = _save_map(np.where(_read_mask(TEMPLATE_MASK), _smooth(rng, (41, 67, 58), 2.5), 0.0), work / "v.nii")
    fast = measure("search --nulls 0 (voxel-major)", [PY, "-m", "ambasync", "search", str(map_path), "--out",
                                                       str(cube), "--to", str(work / "fast.csv"), "--nulls", "0", "-q"],
                   n)
    slow = measure("search --nulls 0 (volume-major)", [PY, "-m", "bench.search", "--child-volume-major", str(cube),
                                                       str(map_path), str(work / "slow.csv")], n)
    a, b = (pd.read_csv(work / f"{name}.csv").set_index("experiment_id") for name in ("fast", "slow"))
    diff = float((a["r"] - b.loc[a.index, "r"]).abs().max())
    row = {"experiments": n, "voxel_major_s": fast.wall_s, "voxel_major_cpu_s": fast.cpu_s,
           "voxel_major_rss_mb": fast.peak_rss_mb, "volume_major_s": slow.wall_s, "volume_major_cpu_s": slow.cpu_s,
           "volume_major_rss_mb": slow.peak_rss_mb, "speedup": round(slow.wall_s / fast.wall_s, 2),
           "max_abs_r_difference": diff, "same_n_voxels": bool((a["n_voxels"] == b.loc[a.index, "n_voxels"]).all())}
    print(row, file=sys.stderr)
    return row


def bench_nulls(work: Path, n: int, nulls: int) -> dict:
    rng = np.random.default_rng(1)
    map_path = _save_map(np.where(_read_mask(TEMPLATE_MASK), _smooth(rng, (41, 67, 58), 2.5), 0.0), work / "m.nii")
    cube = work / f"nulls{n}"
    write_cube(cube, _experiments(n, VARIANTS))
    result = measure(f"search --nulls {nulls}", [PY, "-m", "ambasync", "search", str(map_path), "--out", str(cube),
                                                 "--to", str(work / "n.csv"), "--nulls", str(nulls), "-q"], n)
    shutil.rmtree(cube)
    row = {"experiments": n, "nulls": nulls, "wall_s": result.wall_s, "peak_rss_mb": result.peak_rss_mb,
           "cpu_s": result.cpu_s}
    print(row, file=sys.stderr)
    return row


def bench_floor(cube: Path, mask_path: Path, experiments: int, nulls: int = 1000) -> dict:
    """This machine's floor for one search with ``nulls`` nulls, and float32's error against float64."""
    import os

    from scipy import ndimage
    from threadpoolctl import threadpool_limits

    from ambasync.analysis.search.stats import block_correlations, standardise_columns
    from ambasync.cube.read import read_experiments

    mask = _read_mask(mask_path)
    voxels = int(mask.sum())
    rng = np.random.default_rng(0)
    y = rng.standard_normal((voxels, nulls + 1)).astype(np.float32)
    left = rng.standard_normal((100, voxels)).astype(np.float32)  # a block: 50 experiments x [validity; values]
    rates = {}
    for threads in (1, 2):
        with threadpool_limits(limits=threads, user_api="blas"):
            (y.T @ left.T)
            best = np.inf
            for _ in range(3):
                t = time.process_time() if threads == 1 else time.perf_counter()
                (y.T @ left.T)
                best = min(best, (time.process_time() if threads == 1 else time.perf_counter()) - t)
            rates[threads] = 2 * y.shape[0] * y.shape[1] * left.shape[0] / best / 1e9
    flops = 3 * 2 * (nulls + 1) * voxels * experiments
    cores = os.cpu_count() or 1
    # float32 against float64 on real experiments of the cube: smooth columns like the nulls
    block = read_experiments(str(cube), 0, 50).reshape(50, -1)[:, mask.ravel()]
    cols = np.stack([ndimage.gaussian_filter(rng.standard_normal(mask.shape), 2.5)[mask] for _ in range(200)], axis=1)
    y32, y2 = standardise_columns(cols.astype(np.float32))
    r32, _ = block_correlations(block, y32, y2=y2)
    valid = (block != -1) & np.isfinite(block)
    r64 = np.full_like(r32, np.nan)
    for i in range(len(block)):
        if valid[i].sum() < 10:
            continue
        a = block[i, valid[i]].astype(np.float64)
        a -= a.mean()
        b = cols[valid[i]] - cols[valid[i]].mean(axis=0)
        r64[i] = (a @ b) / np.sqrt((a @ a) * (b * b).sum(axis=0))
    row = {"voxels": voxels, "experiments": experiments, "nulls": nulls, "flops": flops,
           "gemm_gflops_1_thread_cpu": round(rates[1], 1), "gemm_gflops_2_threads_wall": round(rates[2], 1),
           "floor_cpu_s": round(flops / (rates[1] * 1e9), 1),
           "floor_wall_s_all_cores": round(flops / (rates[1] * 1e9) / cores, 1),
           "float32_max_abs_r_error": float(np.nanmax(np.abs(r32 - r64)))}
    print(row, file=sys.stderr)
    return row


def bench_atlas(work: Path, cube: Path, mask_path: Path, map_path: Path | None, nulls: int) -> dict:
    import pandas as pd
    import xarray as xr

    n = xr.open_zarr(cube / "cube.zarr").sizes["experiment"]
    if map_path is None:
        rng = np.random.default_rng(3)
        map_path = _save_map(np.where(_read_mask(TEMPLATE_MASK), _smooth(rng, (41, 67, 58), 2.5), 0.0),
                             work / "atlas.nii")
    rows = []
    for label, extra in (("no nulls", ["--nulls", "0"]), (f"{nulls} nulls", ["--nulls", str(nulls)]),
                         (f"{nulls} nulls, --by gene", ["--nulls", str(nulls), "--by", "gene"])):
        to = work / "atlas.csv"
        result = measure(f"search {label}", [PY, "-m", "ambasync", "search", str(map_path), "--out", str(cube),
                                             "--to", str(to), "--mask", str(mask_path), "-q", *extra], n)
        table = pd.read_csv(to)
        rows.append({"search": label, "experiments": n, "wall_s": result.wall_s, "cpu_s": result.cpu_s,
                     "peak_rss_mb": result.peak_rss_mb, "q<0.05": int((table["q"] < 0.05).sum()),
                     "gpd_p": int((table.get("p_method", pd.Series(dtype=str)) == "gpd").sum())})
        print(rows[-1], file=sys.stderr)
    return {"runs": rows, "floor": bench_floor(cube / "cube.zarr", mask_path, n, nulls)}


def bench_calibration(maps: int, nulls: int, settings: list[tuple[float, float]], experiments: int = 20) -> list[dict]:
    """Share of p < 0.05 over ``maps`` independent smooth maps × ``experiments`` smooth experiments."""
    from ambasync.analysis.search.nulls import null_spectrum, phase_randomised
    from ambasync.analysis.search.stats import block_correlations, parametric_p, spatial_p, standardise_columns

    mask = _read_mask(TEMPLATE_MASK)
    rows = []
    for sigma_map, sigma_exp in settings:
        rng = np.random.default_rng(42)
        block = np.stack([np.where(mask, 3 + _smooth(rng, mask.shape, sigma_exp), -1.0)[mask]
                          for _ in range(experiments)])
        counts = {"ambasync": 0, "plain_phase_randomisation": 0, "parametric": 0}
        total = 0
        start = time.perf_counter()
        for m in range(maps):
            volume = _smooth(rng, mask.shape, sigma_map)
            for name, correct in (("ambasync", True), ("plain_phase_randomisation", False)):
                spectrum = null_spectrum(volume, mask, correct_overlap=correct)
                y = np.column_stack([volume[mask], phase_randomised(volume, mask, nulls, m, spectrum=spectrum)])
                y, y2 = standardise_columns(y)
                r, n = block_correlations(block, y, y2=y2)
                counts[name] += int((spatial_p(r) < 0.05).sum())
            counts["parametric"] += int((parametric_p(r[:, 0], n) < 0.05).sum())
            total += experiments
        row = {"sigma_map_voxels": sigma_map, "sigma_experiments_voxels": sigma_exp, "maps": maps,
               "experiments": experiments, "nulls": nulls, "tests": total,
               **{f"p<0.05 {k}": round(v / total, 4) for k, v in counts.items()},
               "seconds": round(time.perf_counter() - start, 1)}
        print(row, file=sys.stderr)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.search", description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", default="1000,2000", help="cube sizes for the ranking without nulls")
    p.add_argument("--nulls-experiments", type=int, default=400)
    p.add_argument("--nulls", type=int, default=1000)
    p.add_argument("--maps", type=int, default=100, help="smooth random maps for the calibration")
    p.add_argument("--calibration-nulls", type=int, default=100)
    p.add_argument("--only", choices=("rank", "nulls", "calibration", "voxel", "atlas"), help="one measurement only")
    p.add_argument("--atlas-cube", type=Path, help="mirror folder of an atlas-sized cube (the atlas measurement)")
    p.add_argument("--atlas-mask", type=Path, default=TEMPLATE_MASK, help="mask image for the atlas measurement")
    p.add_argument("--atlas-map", type=Path, help="map for the atlas measurement (default: smooth noise)")
    p.add_argument("--cube", type=Path,
                   help="mirror folder of a cube with the voxel-major copy (the voxel measurement)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.add_argument("--child-baseline", nargs=2, metavar=("CUBE", "MAP"), help=argparse.SUPPRESS)
    p.add_argument("--child-volume-major", nargs=3, metavar=("CUBE", "MAP", "TO"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_baseline:
        child_baseline(*args.child_baseline)
        return 0
    if args.child_volume_major:
        child_volume_major(*args.child_volume_major)
        return 0
    report: dict = {}
    work = Path(tempfile.mkdtemp(prefix="bench-search-"))
    try:
        if args.atlas_cube and args.only in (None, "atlas"):
            report["atlas"] = bench_atlas(work, args.atlas_cube, args.atlas_mask, args.atlas_map, args.nulls)
        if args.only in (None, "calibration"):
            report["calibration"] = bench_calibration(args.maps, args.calibration_nulls, [(2.5, 2.5), (4.0, 1.5)])
        if args.cube and args.only in (None, "voxel"):
            report["voxel"] = bench_voxel(work, args.cube)
        if args.only in (None, "nulls"):
            report["nulls"] = bench_nulls(work, args.nulls_experiments, args.nulls)
        if args.only in (None, "rank"):
            report["rank"] = bench_rank(work, [int(n) for n in args.rank.split(",")])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
