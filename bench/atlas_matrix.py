"""The ``atlas-matrix`` scenario: ``ambasync matrix`` on a replica cube the size of the Allen atlas.

    python -m bench.atlas_matrix all --work DIR            # the atlas-matrix scenario: build if absent, run
    python -m bench.atlas_matrix build --work DIR          # the cube, once (~12 min on 2 cores; 5.7 GB)
    python -m bench.atlas_matrix run --work DIR [--only floor,none,knn,sagittal,spatial,regions,exact] [--json PATH]

The cube holds 4,345 coronal experiments (the replica's catalogue: ~2 per gene, the two real
grids among them) and 21,733 sagittal ones whose genes are the coronal genes (~10 per gene, as
MHTS's "genes in coronal" sagittal set), with the replica's realistic grids
(:func:`ambasync.replica.grids.synthetic_grid`: region-structured, smooth, measured zeros,
per-plane coverage; a gene's experiments share its pattern). It is written directly with
xarray in the cube contract's layout (one experiment per chunk, blosc zstd 1 with byte
shuffle, as ``ambasync.cube.layout``), not through ``run`` (that is bench/cube.py's job): the
matrix reads it exactly as it reads a mirrored cube. Sagittal experiments cycle two grids per
gene, to keep the build short.

``run`` measures, each as its own process tree (wall time, peak RSS of the tree, CPU):

* ``knn``: the default mhts recipe on the coronal set with MHTS's coronal mask (61,315 voxels);
* ``none``: the same with ``--impute none``;
* ``sagittal``: ``--plane sagittal --mask`` MHTS's sagittal mask, with KNN;
* ``regions``: gene x region (DSURQE labels), ``--plane both``;
* ``floor``: reading the coronal experiments with nothing else (zarr decode of every chunk on
  all cores, then the mask), and the BLAS rate that bounds KNN's distance products; with the
  ratios of the matrix's own read and impute phases to them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

CORONAL_MASK = REPO / "tests" / "fixtures" / "coronal_200um_coverage_bin0.8.mnc"
SAGITTAL_MASK = REPO / "tests" / "fixtures" / "mhts" / "sagittal_200um_coverage_bin0.8.mnc"
LABELS = REPO / "tests" / "fixtures" / "mhts" / "DSURQE_CCFv3_labels_200um.mnc"
DSURQE_MASK = REPO / "tests" / "fixtures" / "mhts" / "DSURQE_CCFv3_mask_200um.mnc"
LABEL_TABLE = REPO / "tests" / "fixtures" / "mhts" / "DSURQE_40micron_R_mapping_long.csv"
N_CORONAL, N_SAGITTAL = 4345, 21733
SAGITTAL_GRIDS_PER_GENE = 2


def _rows(n_coronal: int, n_sagittal: int) -> list[dict]:
    """The catalogue: the replica's coronal rows, then sagittal rows on the coronal genes."""
    from ambasync.replica import Replica, ReplicaConfig

    rep = Replica(ReplicaConfig(n_coronal=max(0, n_coronal - 2), n_sagittal=0, seed=0,
                                real_dir=str(REPO / "tests" / "fixtures" / "allen-grids")))
    rows = [dict(r) for r in rep.rows[:n_coronal]]
    genes = sorted({r["gene"] for r in rows})
    for i in range(n_sagittal):
        gene = genes[i % len(genes)]
        base = next(r for r in rows if r["gene"] == gene)
        row = dict(base, experiment_id=5_000_000 + 11 * i, plane="sagittal", specimen_id=9_000_000 + i)
        rows.append(row)
    return rows


def _grid(args: tuple) -> np.ndarray:
    eid, gene, plane, variant = args
    from ambasync.replica.grids import REAL_IDS, real_grid, synthetic_grid

    if eid in REAL_IDS:
        return real_grid(REPO / "tests" / "fixtures" / "allen-grids", eid)
    seed_id = eid if plane == "coronal" else 5_000_000 + variant
    return synthetic_grid(0, seed_id, plane=plane, gene=gene)


def build(work: Path, n_coronal: int = N_CORONAL, n_sagittal: int = N_SAGITTAL, batch: int = 256,
          processes: int = 2) -> dict:
    """Write ``work/cube.zarr``; grids made on ``processes`` processes, appended in batches."""
    import multiprocessing
    import warnings

    import numcodecs
    import xarray as xr
    import zarr
    from cubes import CATALOGUE_COLUMNS, SIZES, STARTS, STEP, TestExperiment, _column

    from helpers import notebook_ras

    t0 = time.perf_counter()
    rows = _rows(n_coronal, n_sagittal)
    seen: dict[tuple, int] = {}
    gene_index = {g: i for i, g in enumerate(sorted({x["gene"] for x in rows}))}
    jobs = []
    for r in rows:
        j = seen.get((r["gene"], r["plane"]), 0)
        seen[(r["gene"], r["plane"])] = j + 1
        variant = (gene_index[r["gene"]] * SAGITTAL_GRIDS_PER_GENE
                   + j % SAGITTAL_GRIDS_PER_GENE) if r["plane"] == "sagittal" else 0
        jobs.append((int(r["experiment_id"]), r["gene"], r["plane"], variant))
    work.mkdir(parents=True, exist_ok=True)
    store = work / "cube.zarr"
    compressor = zarr.codecs.BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")
    cache: dict[tuple, np.ndarray] = {}
    cover = {p: np.zeros(SIZES, np.float64) for p in ("coronal", "sagittal")}
    count = {"coronal": 0, "sagittal": 0}
    written = 0
    with multiprocessing.get_context("forkserver").Pool(processes) as pool:
        for start in range(0, len(rows), batch):
            part = jobs[start:start + batch]
            need = [j for j in part if j[2] == "coronal" or (j[1], j[3]) not in cache]
            need = list({(j[1], j[3]) if j[2] == "sagittal" else j[0]: j for j in need}.values())
            made = dict(zip([(j[1], j[3]) if j[2] == "sagittal" else j[0] for j in need], pool.map(_grid, need)))
            grids = []
            for j in part:
                key = (j[1], j[3]) if j[2] == "sagittal" else j[0]
                g = made.get(key)
                if g is None:
                    g = cache[key]
                elif j[2] == "sagittal":
                    cache[key] = g
                grids.append(notebook_ras(np.asarray(g, dtype=np.float32)))
            exps = [TestExperiment(j[0], j[1], j[2], None, rows[start + i]) for i, j in enumerate(part)]
            expression = np.stack(grids)
            for p in cover:
                sel = np.array([e.plane == p for e in exps])
                if sel.any():
                    cover[p] += (expression[sel] != -1).sum(axis=0)
                    count[p] += int(sel.sum())
            coords = {"experiment": np.array([e.experiment_id for e in exps], dtype=np.int64)}
            coords.update({name: ("experiment", _column(exps, name)) for name in CATALOGUE_COLUMNS})
            data = {"expression": (("experiment", "zspace", "yspace", "xspace"), expression)}
            if written == 0:
                for name, size, st in zip(("zspace", "yspace", "xspace"), SIZES, STARTS):
                    cos = [float(name == axis) for axis in ("xspace", "yspace", "zspace")]
                    coords[name] = xr.Variable(name, st + STEP * np.arange(size),
                                               attrs={"units": "mm", "start": st, "step": STEP,
                                                      "direction_cosines": cos})
            ds = xr.Dataset(data, coords=coords, attrs={
                "ambasync_version": "bench", "format_version": 1, "orientation": "RAS", "space": "MICe",
                "expansion": 1.0, "source_url": "bench", "updated": "2026-01-01T00:00:00Z"})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if written == 0:
                    ds.to_zarr(store, mode="w", zarr_format=3, consolidated=True,
                               encoding={"expression": {"chunks": (1, *SIZES), "compressors": [compressor]}})
                else:
                    ds.to_zarr(store, append_dim="experiment", zarr_format=3, consolidated=True)
            written += len(part)
            if start // batch % 8 == 0:
                print(f"cube: {written}/{len(rows)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    cov = xr.Dataset({f"coverage_{p}": (("zspace", "yspace", "xspace"),
                                        (cover[p] / max(1, count[p])).astype(np.float32)) for p in cover})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cov.to_zarr(store, mode="a", zarr_format=3, consolidated=True)
    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    del numcodecs
    return {"experiments": written, "coronal": count["coronal"], "sagittal": count["sagittal"],
            "seconds": round(time.perf_counter() - t0, 1), "bytes": size}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("all", "build", "run"))
    p.add_argument("--work", required=True, metavar="DIR")
    p.add_argument("--coronal", type=int, default=N_CORONAL)
    p.add_argument("--sagittal", type=int, default=N_SAGITTAL)
    p.add_argument("--only", default="floor,none,knn,sagittal,spatial,regions,exact")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    work = Path(args.work)
    report = {}
    if args.what == "build" or (args.what == "all" and not (work / "cube.zarr").exists()):
        report["cube"] = build(work, args.coronal, args.sagittal)
    if args.what != "build":
        report.update(run(work, args.only.split(",")))
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


LIMIT_KB = 10 * 2**20  # address-space cap of every measured command: a runaway never takes the machine


def measure_logged(method: str, argv: list[str], experiments: int) -> tuple[dict, str]:
    """bench.run.measure's sampling (wall, peak RSS of the tree, CPU), keeping stderr (the
    progress lines give each phase's time), under an address-space cap."""
    import subprocess
    import threading

    from bench.run import _cpu_ticks, _rss_kb, _tree

    cmd = ["bash", "-c", f"ulimit -v {LIMIT_KB}; exec \"$@\"", "bash", *argv]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, ticks, done = 0, {}, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            tree = _tree(proc.pid)
            peak = max(peak, sum(_rss_kb(p) for p in tree))
            for p in tree:
                ticks[p] = max(ticks.get(p, 0), _cpu_ticks(p))
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    t.join()
    row = {"method": method, "experiments": experiments, "wall_s": round(wall, 1),
           "peak_rss_mb": round(peak / 1024), "cpu_s": round(sum(ticks.values()) / os.sysconf("SC_CLK_TCK"), 1),
           "exit": proc.returncode}
    if proc.returncode != 0:
        row["stderr"] = err[-2000:]
    for line in err.splitlines():
        for what, key in (("reading the cube", "read_s"), ("imputing (knn)", "impute_s"),
                          ("imputing (spatial)", "impute_s"), ("writing", "write_s")):
            if f"{what}:" in line and "(100%)" in line:
                row[key] = _seconds_of(line)
    return row, err


def _seconds_of(line: str) -> float:
    import re

    m = re.search(r"\(100%\), ([0-9.]+) (s|min|h)", line)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"s": 1, "min": 60, "h": 3600}[m.group(2)]


def read_floor(work: Path, plane: str = "coronal", mask: Path = CORONAL_MASK) -> dict:
    """Every chunk of the plane's experiments read from disk and decoded (blosc, on all cores),
    then masked: nothing a matrix can skip. Page cache warm, as for the matrix runs after it."""
    from concurrent.futures import ThreadPoolExecutor

    import numcodecs
    import xarray as xr

    from ambasync.imaging.regrid import read_image

    ds = xr.open_zarr(work / "cube.zarr")
    planes = np.asarray(ds["plane"].values).astype(object).astype(str)
    positions = np.flatnonzero(planes == plane)
    mask_flat = np.asarray(read_image(str(mask))[0]).ravel() > 0.5
    where = np.flatnonzero(mask_flat)
    blosc = numcodecs.Blosc()
    chunk_dir = work / "cube.zarr" / "expression" / "c"

    def one(p: int) -> int:
        raw = (chunk_dir / str(p) / "0" / "0" / "0").read_bytes()
        vol = np.frombuffer(blosc.decode(raw), dtype="<f4")
        return int(np.take(vol, where).size)

    workers = os.cpu_count() or 1
    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, positions, chunksize=64))
    wall = time.perf_counter() - t
    t = time.perf_counter()
    n_bytes = sum((chunk_dir / str(p) / "0" / "0" / "0").stat().st_size for p in positions[:512])
    for p in positions[:512]:
        (chunk_dir / str(p) / "0" / "0" / "0").read_bytes()
    io_per = (time.perf_counter() - t) / min(512, positions.size)
    return {"experiments": int(positions.size), "floor_s": round(wall, 1), "workers": workers,
            "bytes_per_experiment": round(n_bytes / min(512, positions.size)),
            "file_read_ms_per_experiment": round(1e3 * io_per, 3)}


def blas_rate(n_genes: int = 2000, side: int = 2048, repeat: int = 3) -> dict:
    """Multiply-adds per second of this machine's BLAS on all cores, at KNN's shapes."""
    rng = np.random.default_rng(0)
    a = rng.random((side, n_genes))
    b = rng.random((n_genes, side))
    a @ b
    t, c = time.perf_counter(), time.process_time()
    for _ in range(repeat):
        a @ b
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    madds = side * side * n_genes * repeat
    return {"madds_per_s": madds / wall, "madds_per_cpu_s": madds / cpu, "shape": [side, n_genes, side]}


def read_ab(work: Path, rounds: int = 2) -> dict:
    """The read floor and the matrix's own read phase (``--impute none``, nothing written),
    alternated in one process so both see the same load: seconds and their ratio."""
    import ambasync

    out = {"floor_s": [], "matrix_read_s": []}
    for _ in range(rounds):
        out["floor_s"].append(read_floor(work)["floor_s"])
        m = ambasync.matrix(work, mask=str(CORONAL_MASK), impute="none")
        out["matrix_read_s"].append(round(m.attrs["ambasync"]["read_seconds"], 1))
        del m
    out["ratio_best"] = round(min(out["floor_s"]) / min(out["matrix_read_s"]), 2)
    out["load"] = os.getloadavg()
    return out


def exactness(work: Path, genes: int = 400, voxels: int = 8000) -> dict:
    """``--impute knn`` against scikit-learn's KNNImputer on the atlas's own ``--impute none``
    matrix, cut to ``genes`` rows and a slab of ``voxels`` consecutive voxels (a range of z): what
    scikit-learn can run in a minute here. The full size would take it hours."""
    from sklearn.impute import KNNImputer

    import ambasync
    from ambasync.analysis.matrix.impute import knn_impute_blocked

    cached = work / "none_matrix.npy"
    if cached.exists():
        full = np.load(cached, mmap_mode="r")
    else:
        full = ambasync.matrix(work, mask=str(CORONAL_MASK), impute="none").to_numpy()
        np.save(cached, full)
    start = (full.shape[1] - voxels) // 2
    x = np.array(full[:genes, start:start + voxels])
    x = x[~np.isnan(x).all(axis=1)]
    t = time.perf_counter()
    want = KNNImputer(missing_values=np.nan).fit_transform(x.T).T
    t_sk = time.perf_counter() - t
    t = time.perf_counter()
    got = knn_impute_blocked(x, 5)
    t_ours = time.perf_counter() - t
    diff = np.abs(got - want)
    return {"shape": list(x.shape), "nan_cells": int(np.isnan(x).sum()), "sklearn_s": round(t_sk, 1),
            "ours_s": round(t_ours, 1), "max_abs_diff": float(diff.max()),
            "cells_off_by_more_than_1e-5": int((diff > 1e-5).sum())}


def run(work: Path, only: list[str]) -> dict:
    from bench.run import PY

    report: dict = {"load_before": os.getloadavg()}
    common = [PY, "-m", "ambasync", "matrix", "--out", str(work), "--recipe", "mhts"]
    n_cor, n_sag = _count(work)
    if "floor" in only:
        report["read_floor"] = read_floor(work)
        report["blas"] = blas_rate()
        print(json.dumps(report, indent=1), flush=True)
    rows = []

    def go(name: str, extra: list[str], n: int, to: str) -> None:
        row, err = measure_logged(name, [*common, *extra, "--to", str(work / to)], n)
        target = work / to
        if target.exists():
            row["output_mb"] = round(sum(f.stat().st_size for f in target.rglob("*")) / 1e6 if target.is_dir()
                                     else target.stat().st_size / 1e6)
        for line in err.splitlines():
            if "imputing" in line and "NaN cells" in line:
                row["imputing"] = line.split("imputing ", 1)[1]
        rows.append(row)
        print(json.dumps(row), flush=True)

    if "none" in only:
        go("coronal, --impute none -> .parquet", ["--mask", str(CORONAL_MASK), "--impute", "none"], n_cor,
           "none.parquet")
        go("coronal, --impute none -> .csv", ["--mask", str(CORONAL_MASK), "--impute", "none"], n_cor, "none.csv")
    if "knn" in only:
        go("coronal, default mhts (KNN) -> .parquet", ["--mask", str(CORONAL_MASK)], n_cor, "knn.parquet")
    if "sagittal" in only:
        go("sagittal, genes in coronal, KNN -> .parquet", ["--plane", "sagittal", "--mask", str(SAGITTAL_MASK)],
           n_sag, "sagittal.parquet")
    if "spatial" in only:
        go("coronal, --impute spatial -> .parquet", ["--mask", str(CORONAL_MASK), "--impute", "spatial"], n_cor,
           "spatial.parquet")
    if "regions" in only:
        go("gene x region (DSURQE), both planes -> .csv",
           ["--plane", "both", "--mask", str(DSURQE_MASK), "--max-missing", "0.5", "--labels", str(LABELS),
            "--label-table", str(LABEL_TABLE), "--impute", "none"], n_cor + n_sag, "regions.csv")
    if "read-ab" in only:
        report["read_ab"] = read_ab(work)
        print(json.dumps(report["read_ab"]), flush=True)
    if "exact" in only:
        report["exactness"] = exactness(work)
        print(json.dumps(report["exactness"]), flush=True)
    report["results"] = rows
    floor = report.get("read_floor")
    for row in rows:
        if floor and "read_s" in row and row["experiments"] == floor["experiments"]:
            row["read_floor_ratio"] = round(floor["floor_s"] / row["read_s"], 2)
    report["load_after"] = os.getloadavg()
    return report


def _count(work: Path) -> tuple[int, int]:
    import xarray as xr

    planes = np.asarray(xr.open_zarr(work / "cube.zarr")["plane"].values).astype(object).astype(str)
    return int((planes == "coronal").sum()), int((planes == "sagittal").sum())


if __name__ == "__main__":
    sys.exit(main())
