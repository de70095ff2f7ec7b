"""Benchmark of the exact expression cube at atlas scale, on this machine, in one run.

    python -m bench.cube [--experiments 26078] [--variants 256] [--workers 2] [--work DIR] [--json out.json]

(The real atlas build, a run with --formats minc,cube against minc alone, is ``python -m bench.cube_atlas``.)

The replica's catalogue of N rows, grid content cycling through ``--variants`` distinct grids
(as the atlas scenario of ``python -m bench``), kept as zips on disk like a MINC-only mirror's
``keep_zips``. Measured, each as its own process tree (wall time, peak RSS of the tree):

- build: ``ambasync.cube.build_from_zips`` (decode, reorient, write, publish) on ``--workers``;
- floor: the same work with nothing but zipfile, numpy and numcodecs, on as many processes:
  decompress, reorient, encode and write every chunk of both variables (the volume-major
  chunk per experiment, the voxel-major chunks per block), no zarr, no records, no publish;
- reads, each from a fresh process with ``xarray.open_zarr`` (time after the imports, which
  are reported apart; open and read apart too): one experiment's volume; one voxel over every
  experiment (from the voxel-major copy, and from the volume-major variable alone for
  comparison); a full scan (Pearson correlation of one map with every experiment over brain
  voxels, coverage >= 0.8, from the voxel-major copy on the threaded scheduler);
- size on disk against the zips' size for the same experiments.
Figures are ratios from one run: the machine is shared.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable
PROBE_VOXEL = (20, 33, 29)  # zspace, yspace, xspace: inside the brain in RAS/MICe


def prepare(work: Path, n: int, variants: int) -> tuple[Path, int]:
    """Zips of the distinct grids, and the sources (id, zip, catalogue row) of every experiment."""
    from ambasync.replica import Replica, ReplicaConfig

    n_coronal = max(1, n // 6)  # the atlas is mostly sagittal
    replica = Replica(ReplicaConfig(n_coronal=n_coronal, n_sagittal=n - n_coronal, variants=variants,
                                    real_dir="/nonexistent", zip_cache=variants + 1))
    zips = work / "zips"
    zips.mkdir(parents=True, exist_ok=True)
    sources, total = [], 0
    for row in replica.rows:
        eid = row["experiment_id"]
        path = zips / f"{eid % variants}.zip"
        if not path.exists():
            path.write_bytes(replica.zip_for(eid))
        total += path.stat().st_size
        sources.append([eid, str(path), row])
    (work / "sources.json").write_text(json.dumps(sources))
    return work / "sources.json", total


def _sources(path: str):
    from ambasync.cube import ZipSource

    return [ZipSource(eid, p, fields) for eid, p, fields in json.loads(Path(path).read_text())]


def child_build(store: str, sources: str, workers: str) -> None:
    from ambasync.cube import CubeSettings, build_from_zips

    src = _sources(sources)
    start = time.perf_counter()
    result = build_from_zips(store, CubeSettings(), src, workers=int(workers), quiet=True)
    wall = time.perf_counter() - start
    print(json.dumps({"wall_s": wall, "members": len(result.members), "failed": len(result.failed),
                      "blocks": result.publish.blocks_rebuilt}))


def _floor_part(args: tuple) -> int:
    """One process's share of the floor: whole blocks, so its voxel-major chunks are its own."""
    import numpy as np

    from ambasync.cube.layout import CubeSettings, blosc
    from ambasync.geometry import reorient
    from ambasync.imaging.allen_grid import read_grid

    rows, out, block_ids = args
    settings = CubeSettings()
    codec, by_voxel_codec = blosc(settings.codec), blosc(settings.by_voxel_codec)
    cz, cy, cx = settings.by_voxel_chunk
    written = 0
    for b in block_ids:
        members = rows[b * settings.block:(b + 1) * settings.block]
        data = None
        for i, (eid, path, _) in enumerate(members):
            vol = np.ascontiguousarray(reorient(read_grid(Path(path).read_bytes()), "RAS"), dtype="<f4")
            if data is None:
                data = np.full((settings.block, *vol.shape), -1.0, dtype=np.float32)
            data[i] = vol
            with open(f"{out}/v{b}_{i}", "wb") as fh:
                written += fh.write(codec.encode(vol))
        z, y, x = data.shape[1:]
        for z0 in range(0, z, cz):
            slab = np.moveaxis(data[:, z0:z0 + cz], 0, -1)
            for y0 in range(0, y, cy):
                for x0 in range(0, x, cx):
                    chunk = np.ascontiguousarray(slab[:, y0:y0 + cy, x0:x0 + cx])
                    with open(f"{out}/b{b}_{z0}_{y0}_{x0}", "wb") as fh:
                        written += fh.write(by_voxel_codec.encode(chunk))
    return written


def child_floor(sources: str, out: str, workers: str) -> None:
    import multiprocessing

    from ambasync.cube.layout import CubeSettings

    rows = json.loads(Path(sources).read_text())
    block = CubeSettings().block
    n_blocks = -(-len(rows) // block)
    workers = int(workers)
    parts = [(rows, out, list(range(k, n_blocks, workers))) for k in range(workers)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(abs, range(workers))  # started
        start = time.perf_counter()
        pool.map(_floor_part, parts)
        wall = time.perf_counter() - start
    print(json.dumps({"wall_s": wall}))


def child_read(kind: str, store: str) -> None:
    t0 = time.perf_counter()
    import dask
    import dask.array  # noqa: F401  (xarray imports it lazily at the first open: an import, not a read)
    import numpy as np  # noqa: F401  (imported here to time the imports apart)
    import xarray as xr
    import zarr  # noqa: F401

    with contextlib.suppress(ImportError):  # dask looks for a distributed client at the first compute
        import distributed  # noqa: F401

    imports = time.perf_counter() - t0
    start = time.perf_counter()
    # volume_512: the same read with Dask chunks of 512 experiments (a graph 512× smaller)
    ds = xr.open_zarr(store, chunks={"experiment": 512}) if kind == "volume_512" else xr.open_zarr(store)
    n = ds.sizes["experiment"]
    opened = time.perf_counter()
    z, y, x = PROBE_VOXEL
    if kind in ("volume", "volume_512"):
        value = ds.expression.sel(experiment=int(ds.experiment[n // 2])).values
        check = float(value.sum())
    elif kind == "profile":
        check = float(ds.expression_by_voxel.isel(zspace=z, yspace=y, xspace=x).values.sum())
    elif kind == "profile_volume_major":
        check = float(ds.expression.isel(zspace=z, yspace=y, xspace=x).values.sum())
    elif kind == "scan":
        check = _scan(store)
    else:
        raise SystemExit(f"unknown read {kind}")
    end = time.perf_counter()
    print(json.dumps({"imports_s": imports, "open_s": opened - start, "read_s": end - opened, "wall_s": end - start,
                      "experiments": n, "check": check}))


def _scan(store: str, slab: int = 8) -> float:
    """Pearson correlation of one map (here the first experiment) with every experiment over the
    brain voxels (coverage >= 0.8 in either plane) where both have data, from the voxel-major
    copy: one dask task per (zspace slab, block of experiments) gives per-experiment sums."""
    import dask
    import numpy as np
    import xarray as xr

    ds = xr.open_zarr(store, chunks={"zspace": slab, "yspace": -1, "xspace": -1, "experiment": 512})
    brain = (np.maximum(ds.coverage_coronal.values, ds.coverage_sagittal.values) >= 0.8)
    reference = ds.expression.isel(experiment=0).values
    blocks = ds.expression_by_voxel.data.to_delayed()  # (z slabs, 1, 1, experiment blocks)

    def sums(chunk: np.ndarray, b: np.ndarray, m: np.ndarray) -> np.ndarray:
        """(6, experiments): n, Σx, Σx², Σy, Σy², Σxy over the slab's brain voxels where both have data."""
        v = chunk[b]  # (brain voxels of the slab, experiments): a copy, changed in place below
        mm = m[b]
        m_ok = mm != -1
        okf = (v != -1).astype(np.float32)
        np.maximum(v, np.float32(0), out=v)  # -1 -> 0; expression values are never negative
        v[~m_ok] = 0  # voxels where the map has no data do not count
        m0 = np.where(m_ok, mm, np.float32(0))
        a = okf.T @ np.stack([m_ok.astype(np.float32), m0, m0 * m0], axis=1)  # n, Σy, Σy²: BLAS products
        return np.stack([a[:, 0], v.sum(0), np.einsum("ij,ij->j", v, v), a[:, 1], a[:, 2], v.T @ m0]).astype(
            np.float64)

    tasks = []
    for i in range(blocks.shape[0]):
        zs = slice(i * slab, (i + 1) * slab)
        for e in range(blocks.shape[3]):
            tasks.append((e, dask.delayed(sums)(blocks[i, 0, 0, e], brain[zs], reference[zs])))
    with dask.config.set(scheduler="threads", num_workers=os.cpu_count()):
        parts = dask.compute(*[t for _, t in tasks])
    total: dict[int, np.ndarray] = {}
    for (e, _), part in zip(tasks, parts):
        total[e] = total.get(e, 0) + part
    k, sx, sxx, sy, syy, sxy = np.concatenate([total[e] for e in sorted(total)], axis=1)
    r = (sxy - sx * sy / k) / np.sqrt((sxx - sx * sx / k) * (syy - sy * sy / k))
    assert r.shape[0] == ds.sizes["experiment"] and abs(r[0] - 1) < 1e-3  # the map with itself
    return float(np.nanmean(r))


def _run_child(method: str, args: list[str]) -> dict:
    """Run one step as its own process tree: wall time, peak RSS of the tree, and what it printed."""
    import threading

    from bench.run import _rss_kb, _tree

    start = time.perf_counter()
    proc = subprocess.Popen([PY, "-m", "bench.cube", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, sum(_rss_kb(p) for p in _tree(proc.pid)))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed (exit {proc.returncode}):\n{err[-3000:]}")
    return {"wall_s": round(time.perf_counter() - start, 3), "peak_rss_mb": round(peak / 1024, 1),
            "child": json.loads(out.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cube", description=__doc__.split("\n")[0])
    parser.add_argument("--experiments", type=int, default=26078)
    parser.add_argument("--variants", type=int, default=512,
                        help="distinct grids; at least the cube's block (512), else the voxel-major chunks see "
                             "repeated experiments and compress unrealistically well")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one, removed)")
    parser.add_argument("--skip-volume-major-profile", action="store_true",
                        help="skip the slow voxel profile read from the volume-major variable")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="ambasync-bench-cube-"))
    work.mkdir(parents=True, exist_ok=True)
    n = args.experiments
    try:
        sources, zip_bytes = prepare(work, n, args.variants)
        store = work / "out" / "cube.zarr"
        shutil.rmtree(store.parent, ignore_errors=True)
        floor_dir = work / "floor"  # first, and removed before the build: the disk holds one cube at a time
        shutil.rmtree(floor_dir, ignore_errors=True)
        floor_dir.mkdir()
        floor = _run_child("floor", ["_floor", str(sources), str(floor_dir), str(args.workers)])
        shutil.rmtree(floor_dir, ignore_errors=True)
        build = _run_child("build", ["_build", str(store), str(sources), str(args.workers)])
        reads = {}
        kinds = ["volume", "volume_512", "profile", "scan"] + ([] if args.skip_volume_major_profile else ["profile_volume_major"])
        for kind in kinds:
            reads[kind] = _run_child(kind, ["_read", kind, str(store)])
        size = sum(e.stat().st_size for e in store.rglob("*") if e.is_file())  # at read_experiments
        report = {"experiments": n, "variants": args.variants, "workers": args.workers,
                  "results": {"build": build, "floor": floor, **reads}}
        report["cube_bytes"] = size
        report["zip_bytes"] = zip_bytes
        report["read_experiments"] = n
        _print(report)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1, default=str))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _print(report: dict) -> None:
    res = report["results"]

    def child(name: str) -> dict:
        return res[name]["child"]

    n = report["read_experiments"]
    print(f"\ncube benchmark: built {report['experiments']} experiments ({report['variants']} distinct grids), "
          f"read {n}, {report['workers']} workers")
    print(f"{'step':<24} {'wall s (child)':>15} {'wall s (process)':>17} {'peak RSS MB':>12}")
    for name, r in res.items():
        print(f"{name:<24} {child(name).get('wall_s', float('nan')):>15.3f} {r['wall_s']:>17.2f} "
              f"{r['peak_rss_mb']:>12.1f}")
    print(f"  build / floor (floor time / build time, target >= 0.8): "
          f"{child('floor')['wall_s'] / child('build')['wall_s']:.2f}")
    print(f"  size: cube {report['cube_bytes'] / 1e6:.1f} MB, zips {report['zip_bytes'] / 1e6:.1f} MB, "
          f"ratio {report['cube_bytes'] / report['zip_bytes']:.2f} (target <= 1.6); "
          f"{report['cube_bytes'] / n / 1e3:.0f} KB per experiment")
    for kind, target in (("volume", 0.05), ("volume_512", 0.05), ("profile", 0.2), ("scan", 30.0),
                         ("profile_volume_major", None)):
        if kind in res:
            c = child(kind)
            print(f"  read {kind}: {c['wall_s'] * 1e3:.0f} ms = open_zarr {c['open_s'] * 1e3:.0f} + read "
                  f"{c['read_s'] * 1e3:.0f} (after {c['imports_s'] * 1e3:.0f} ms of imports)"
                  + (f"; target <= {target * 1e3:.0f} ms: ratio {c['wall_s'] / target:.2f}" if target else ""))


def _dispatch() -> int:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        {"_build": child_build, "_floor": child_floor, "_read": child_read}[sys.argv[1]](
            *sys.argv[2:])
        return 0
    return main()


if __name__ == "__main__":
    sys.exit(_dispatch())
