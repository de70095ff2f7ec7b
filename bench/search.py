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

    correlate(out, map_path, nulls=0, progress=False, voxel_major=False).experiments.to_csv(to, index=False)


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
    p.add_argument("--only", choices=("rank", "nulls", "calibration", "voxel"), help="one measurement only")
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
