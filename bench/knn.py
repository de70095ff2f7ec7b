"""KNN imputation at atlas scale: ``ambasync.analysis.matrix.knn.knn_impute`` on a synthetic
genes x voxels matrix shaped like the Allen 200 um coronal atlas.

    python -m bench.knn --genes 4127 --voxels 61315 --nan-fraction 0.0025 [--compare 300x3000]
                        [--memory-mb N] [--neighbors 5] [--seed 0] [--json out.json]

The matrix: voxels of a brain-shaped (ellipsoid) mask on the 200 um grid (67 x 41 x 58, C order,
first axis anterior-posterior), each gene log2(1 + a smooth expression field built from a few
spatial bumps) plus a little noise; NaN cells come per gene in spatially clustered gaps, as ISH
coverage gaps do: thin slabs of one or two coronal sections restricted to a patch of the section
(damaged or missing sections), and a few large blobs, sizes log-uniform, until ``--nan-fraction``
of the cells are NaN.

Prints one JSON object: the imputation's wall time, the process's peak RSS (``getrusage``; the
input and the result are 8 bytes per cell each), receivers (voxels with a NaN), this machine's
BLAS rate measured now (a float64 matmul of the tiles' shape on all cores), the physical floor
``receivers x voxels x genes`` multiply-adds at that rate, and the ratio. The same on CPU time
(the call's CPU seconds, all threads, against the floor at one core's BLAS rate timed on its
thread's CPU clock) is steadier when other processes share the cores. With ``--compare GxV``
it also runs scikit-learn's KNNImputer on the first G genes x V voxels of the same matrix and
reports the largest difference. Other processes on the machine make every figure noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np

GRID = (67, 41, 58)  # the 200 um Allen grid: anterior-posterior, dorsal-ventral, left-right


def brain_mask(n_voxels: int) -> np.ndarray:
    """Flat indices (C order) of the n_voxels grid points nearest the centre in an ellipsoidal
    metric: a brain-shaped mask with exactly n_voxels voxels."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in GRID], indexing="ij")
    r = (z / 0.95) ** 2 + (y / 0.8) ** 2 + (x / 0.9) ** 2
    if n_voxels > r.size:
        raise SystemExit(f"--voxels at most {r.size} on the {GRID} grid")
    return np.sort(np.argsort(r.ravel(), kind="stable")[:n_voxels])


def synthetic(n_genes: int, n_voxels: int, nan_fraction: float, seed: int) -> np.ndarray:
    """The genes x voxels float64 matrix with NaN gaps (see the module docstring)."""
    rng = np.random.default_rng(seed)
    flat = brain_mask(n_voxels)
    coords = np.stack(np.unravel_index(flat, GRID), axis=1).astype(np.float64)  # voxels x 3 (grid units)
    n_bumps = 48
    centres = coords[rng.integers(0, n_voxels, n_bumps)]
    widths = rng.uniform(4.0, 14.0, n_bumps)
    fields = np.empty((n_bumps, n_voxels))
    for b in range(n_bumps):
        fields[b] = np.exp(-((coords - centres[b]) ** 2).sum(axis=1) / (2 * widths[b] ** 2))
    loadings = rng.gamma(0.6, 1.0, (n_genes, n_bumps)) * (rng.random((n_genes, n_bumps)) < 0.25)
    values = np.empty((n_genes, n_voxels))
    step = 256
    for a in range(0, n_genes, step):
        block = loadings[a:a + step] @ fields
        block *= rng.uniform(0.5, 20.0, (block.shape[0], 1))  # expression energy
        block += rng.gamma(1.0, 0.05, block.shape)  # background and noise
        np.log2(1.0 + block, out=values[a:a + step])
    del fields

    target = int(round(nan_fraction * n_genes * n_voxels))
    placed = 0
    plane = coords[:, 0].astype(np.int64)
    while placed < target:
        g = int(rng.integers(n_genes))
        size = int(np.exp(rng.uniform(np.log(20), np.log(3000 if rng.random() < 0.9 else 15000))))
        centre = coords[rng.integers(n_voxels)]
        if rng.random() < 0.7:  # damaged or missing sections: a patch of 1-2 coronal planes
            planes = (plane == centre[0]) | ((plane == centre[0] + 1) & (rng.random() < 0.5))
            d2 = ((coords[:, 1:] - centre[1:]) ** 2).sum(axis=1)
            d2[~planes] = np.inf
        else:  # a blob
            d2 = ((coords - centre) ** 2).sum(axis=1)
        near = np.argpartition(d2, min(size, n_voxels - 1))[:size]
        near = near[np.isfinite(d2[near])]
        row = values[g]
        fresh = near[~np.isnan(row[near])]
        fresh = fresh[: target - placed]
        if np.isnan(row).sum() + fresh.size >= n_voxels:  # never a whole gene
            continue
        row[fresh] = np.nan
        placed += fresh.size
    return values


def blas_rate(n_genes: int, side: int = 1024, repeats: int = 3) -> float:
    """Multiply-adds per second of a float64 (side x genes) @ (genes x 2*side) matmul, all cores,
    best of ``repeats``."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((side, n_genes))
    b = rng.standard_normal((n_genes, 2 * side))
    a @ b
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return side * n_genes * 2 * side / best


def blas_rate_one_core(n_genes: int, side: int = 1024, repeats: int = 3) -> float:
    """Multiply-adds per CPU second of the same matmul on one BLAS thread, timed by the thread's
    CPU clock: what a core does when it gets the core, whatever else runs on the machine."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(1)
    a = rng.standard_normal((side, n_genes))
    b = rng.standard_normal((n_genes, 2 * side))
    with threadpool_limits(limits=1, user_api="blas"):
        a @ b
        best = np.inf
        for _ in range(repeats):
            t0 = time.thread_time()
            a @ b
            best = min(best, time.thread_time() - t0)
    return side * n_genes * 2 * side / best


def cpu_seconds() -> float:
    """CPU time of this process, all threads (user + system)."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--genes", type=int, default=4127)
    p.add_argument("--voxels", type=int, default=61315)
    p.add_argument("--nan-fraction", type=float, default=0.0025)
    p.add_argument("--neighbors", type=int, default=5)
    p.add_argument("--memory-mb", type=float, default=None, help="knn_impute's memory_bytes, MiB (default its own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", default=None, metavar="GxV", help="also scikit-learn on this corner")
    p.add_argument("--progress", action="store_true", help="a tqdm bar on stderr")
    p.add_argument("--json", default=None, help="also write the report here")
    args = p.parse_args(argv)

    from ambasync.analysis.matrix.knn import knn_impute, knn_memory_estimate

    t0 = time.perf_counter()
    values = synthetic(args.genes, args.voxels, args.nan_fraction, args.seed)
    make_s = time.perf_counter() - t0
    nan = np.isnan(values)
    n_missing = int(nan.sum())
    receivers = int(nan.any(axis=0).sum())
    del nan
    rate = blas_rate(args.genes)
    rate_core = blas_rate_one_core(args.genes)
    memory = None if args.memory_mb is None else int(args.memory_mb * 2**20)
    estimate = knn_memory_estimate(args.genes, args.voxels, receivers, memory, n_missing=n_missing,
                                   n_neighbors=args.neighbors)

    bar = None
    if args.progress:
        from tqdm import tqdm

        bar = tqdm(total=None, unit="receivers", file=sys.stderr)
    rss_before = rss_now()
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    out = knn_impute(values, args.neighbors, memory_bytes=memory, progress=bar)
    wall = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
    if bar is not None:
        bar.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert not np.isnan(out).any()
    floor_madds = float(receivers) * args.voxels * args.genes
    report = {
        "genes": args.genes, "voxels": args.voxels, "nan_cells": n_missing, "receivers": receivers,
        "neighbors": args.neighbors, "make_matrix_s": round(make_s, 1),
        "knn_impute_s": round(wall, 1),
        "knn_impute_cpu_s": round(cpu, 1),
        "cpu_s_per_core": round(cpu / (os.cpu_count() or 1), 1),
        "peak_rss_gib": round(peak / 2**30, 3), "rss_before_call_gib": round(rss_before / 2**30, 3),
        "input_plus_output_gib": round(16 * args.genes * args.voxels / 2**30, 3),
        "memory_estimate_gib": round(estimate / 2**30, 3),
        "blas_gmadds_per_s": round(rate / 1e9, 1), "cores": os.cpu_count(),
        "floor_madds": floor_madds, "floor_s": round(floor_madds / rate, 1),
        "ratio_to_floor": round(wall / (floor_madds / rate), 2),
        "blas_gmadds_per_cpu_s_one_core": round(rate_core / 1e9, 1),
        "floor_cpu_s": round(floor_madds / rate_core, 1),
        "ratio_to_floor_by_cpu": round(cpu / (floor_madds / rate_core), 2),
        "load_average_after": os.getloadavg(),
    }
    if args.compare:
        from sklearn.impute import KNNImputer

        g, v = (int(n) for n in args.compare.lower().split("x"))
        sub = values[:g, :v]
        sub = sub[~np.isnan(sub).all(axis=1)]
        t0 = time.perf_counter()
        want = KNNImputer(n_neighbors=args.neighbors).fit_transform(sub.T).T
        sk_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = knn_impute(sub, args.neighbors)
        ours_s = time.perf_counter() - t0
        report["compare"] = {"shape": list(sub.shape), "nan_cells": int(np.isnan(sub).sum()),
                             "sklearn_s": round(sk_s, 2), "knn_impute_s": round(ours_s, 2),
                             "max_abs_diff": float(np.abs(got - want).max()),
                             "cells_off_by_more_than_1e-5": int((np.abs(got - want) > 1e-5).sum())}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
