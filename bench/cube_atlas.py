"""The cube at atlas scale, built for real: 26,078 experiments mirrored from the replica on
loopback with ``--formats minc,cube`` against ``--formats minc``, then the reads a user makes,
each from a fresh process; and the same reads from a local S3 API server (moto) against local disk.

    python -m bench.cube_atlas [--coronal 4345] [--sagittal 21733] [--variants 1024] [--concurrency 8]
                               [--s3-experiments 2048] [--work DIR] [--json out.json]

Measured from outside, as the other scenarios (``bench.run.measure``: wall time, peak RSS of
the process tree, CPU seconds):

- ``ambasync run --plane all --formats minc`` and then ``--formats minc,cube``, each from an
  empty folder against one replica (``--variants`` distinct grids, prebuilt, so the replica's
  own cost is the same for both); the cost is their wall-time ratio;
- the store's size against the zips downloaded (the run's own ``bytes_downloaded``);
- reads from fresh processes (``python -m bench.cube _read``, five processes each, the median reported
  with all five beside it): one volume after a plain
  ``xr.open_zarr(path)``, one voxel across every experiment, a full Pearson scan;
- S3: a cube of ``--s3-experiments`` built from the replica's zips into moto's server on
  127.0.0.1 and on local disk (the same build), the same reads from each; the ratios.

Figures are from one run on a shared machine: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

PY = sys.executable


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _size(path: Path) -> int:
    return sum(e.stat().st_size for e in path.rglob("*") if e.is_file())


def _downloaded(out: Path) -> int:
    report = sorted((out / "reports").glob("run-*.json"))[-1]
    return int(json.loads(report.read_text())["bytes_downloaded"])


REPEATS = 5  # fresh processes per read: a full garbage collection (~70 ms with xarray, dask and
# distributed imported) lands in some of them and not in others, so one process is not a figure


def _reads(store: str, kinds: tuple[str, ...], env: dict | None = None) -> dict:
    """Each read from ``REPEATS`` fresh processes (one for the scan): the median process (by its
    open + read time) with every process's open + read beside it."""
    from bench.cube import _run_child

    out = {}
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        for kind in kinds:
            runs = [_run_child(kind, ["_read", kind, store]) for _ in range(1 if kind == "scan" else REPEATS)]
            runs.sort(key=lambda r: r["child"]["wall_s"])
            median = runs[len(runs) // 2]
            out[kind] = {**median, "all_open_read_ms": [round(r["child"]["wall_s"] * 1e3) for r in runs]}
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return out


def moto_floor(store: str, env: dict) -> dict:
    """What the S3 server itself costs for the requests a read makes, without zarr, xarray or
    botocore's start-up: one small GET (the root metadata) and ranged GETs of a few KB from the
    end of a volume-major and of a voxel-major shard (their index; the chunk read after it costs
    the same on moto, which reads the whole object for every range). Timed in this process with
    one warm client, median of 10."""
    import statistics

    import boto3

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        bucket, _, prefix = store[len("s3://"):].partition("/")
        s3 = boto3.client("s3")
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                for o in page.get("Contents", [])]

        def first(infix: str) -> tuple[str, int]:
            key = sorted(k for k in keys if infix in k)[0]
            return key, s3.head_object(Bucket=bucket, Key=key)["ContentLength"]

        def median_ms(**kwargs) -> float:
            times = []
            for _ in range(10):
                t = time.perf_counter()
                s3.get_object(Bucket=bucket, **kwargs)["Body"].read()
                times.append(time.perf_counter() - t)
            return round(statistics.median(times) * 1e3, 1)

        out = {"root_get_ms": median_ms(Key=f"{prefix}/zarr.json")}
        # what any fsspec reader pays first, in a fresh process: s3fs's client (botocore loads its
        # service model and credentials) and one small GET, after the imports
        probe = ("import json, time, s3fs; t = time.perf_counter(); "
                 f"s3fs.S3FileSystem().cat({store + '/zarr.json'!r}); print(time.perf_counter() - t)")
        starts = [float(subprocess.run([PY, "-c", probe], capture_output=True, text=True, check=True).stdout)
                  for _ in range(3)]
        out["fresh_s3fs_client_and_first_get_ms"] = round(statistics.median(starts) * 1e3, 1)
        for name, infix in (("volume_major", "/expression/c/"), ("voxel_major", "/expression_by_voxel/c/")):
            key, size = first(infix)
            out[f"{name}_shard_mb"] = round(size / 2**20, 1)
            out[f"{name}_range_get_ms"] = median_ms(Key=key, Range=f"bytes={size - 4096}-{size - 1}")
        return out
    finally:
        os.environ.clear()
        os.environ.update(saved)


def s3_ratios(work: Path, n: int, variants: int) -> dict:
    """The same cube (``n`` replica experiments) built on local disk and into moto's S3 server on
    127.0.0.1; the same reads from each, from fresh processes."""
    from bench.cube import prepare
    from tests.s3_process import S3Process

    sources, _ = prepare(work / "s3src", n, variants)
    server = S3Process()
    env = server.env
    try:
        subprocess.run([PY, "-c", "import boto3; boto3.client('s3').create_bucket(Bucket='bench')"],
                       env={**os.environ, **env}, check=True)
        local = work / "s3local" / "cube.zarr"
        url = "s3://bench/cube.zarr"
        builds = {}
        for name, store in (("local", str(local)), ("s3", url)):
            t = time.perf_counter()
            subprocess.run([PY, "-m", "bench.cube", "_build", store, str(sources), str(os.cpu_count() or 1)],
                           env={**os.environ, **env}, check=True, stdout=subprocess.DEVNULL)
            builds[name] = round(time.perf_counter() - t, 2)
        kinds = ("volume", "profile", "scan")
        local_reads = _reads(str(local), kinds)
        s3_reads = _reads(url, kinds, env)
        floor = moto_floor(url, env)
    finally:
        server.close()
    ratios = {k: round(s3_reads[k]["child"]["wall_s"] / local_reads[k]["child"]["wall_s"], 2) for k in kinds}
    return {"experiments": n, "builds_s": builds, "local": local_reads, "s3": s3_reads,
            "s3 / local (wall of open + read)": ratios, "moto_floor": floor}


def main(argv: list[str] | None = None) -> int:
    from bench.run import measure
    from tests.replica_process import ReplicaProcess

    p = argparse.ArgumentParser(prog="python -m bench.cube_atlas", description=__doc__.split("\n")[0])
    p.add_argument("--coronal", type=int, default=4345)
    p.add_argument("--sagittal", type=int, default=21733)
    p.add_argument("--variants", type=int, default=1024,
                   help="distinct grids the replica serves (prebuilt); more than the cube's block of 512, so no "
                        "voxel-major chunk sees an experiment twice")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--s3-experiments", type=int, default=2048, help="0: skip the S3 reads")
    p.add_argument("--skip-minc", action="store_true", help="skip the --formats minc run (cost not measured)")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="ambasync-bench-atlas-"))
    work.mkdir(parents=True, exist_ok=True)
    n = args.coronal + args.sagittal
    report: dict = {"experiments": n, "variants": args.variants, "concurrency": args.concurrency,
                    "cpus": os.cpu_count(), "load_before": _load()}
    try:
        server = ReplicaProcess("--experiments", str(args.coronal), "--sagittal", str(args.sagittal),
                                "--variants", str(args.variants), "--prebuild")
        try:
            runs = {}
            for formats in ("minc", "minc,cube"):
                if formats == "minc" and args.skip_minc:
                    continue
                out = work / formats.replace(",", "-")
                shutil.rmtree(out, ignore_errors=True)
                load = _load()
                r = measure(f"ambasync --formats {formats}", [
                    PY, "-m", "ambasync", "run", "--base-url", server.url, "--out", str(out), "--plane", "all",
                    "--concurrency", str(args.concurrency), "--formats", formats, "-q"], n, server=server)
                runs[formats] = {**asdict(r), "load_before": load, "load_after": _load(),
                                 "zip_bytes": _downloaded(out)}
                print(f"{formats}: {r.wall_s:.1f} s, peak RSS {r.peak_rss_mb:.0f} MB, CPU {r.cpu_s:.0f} s "
                      f"(load {load} -> {_load()})", flush=True)
                if formats == "minc":
                    shutil.rmtree(out, ignore_errors=True)
        finally:
            server.close()
        report["runs"] = runs
        store = work / "minc-cube" / "cube.zarr"
        report["cube_bytes"] = _size(store)
        report["cube_objects"] = sum(1 for e in store.rglob("*") if e.is_file())
        report["zip_bytes"] = runs["minc,cube"]["zip_bytes"]
        report["reads"] = _reads(str(store), ("volume", "volume_512", "profile", "scan"))
        report["load_after_reads"] = _load()
        if args.s3_experiments:
            report["s3"] = s3_ratios(work, args.s3_experiments, min(args.variants, args.s3_experiments))
        _print(report)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1, default=str))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _print(report: dict) -> None:
    runs = report["runs"]
    print(f"\ncube at atlas scale: {report['experiments']} experiments, {report['variants']} distinct grids, "
          f"concurrency {report['concurrency']}, {report['cpus']} CPUs; load average before {report['load_before']}")
    for formats, r in runs.items():
        print(f"  --formats {formats:<10} wall {r['wall_s']:8.1f} s  peak RSS {r['peak_rss_mb']:7.0f} MB  "
              f"CPU {r['cpu_s']:7.0f} s  (load {r['load_before']} -> {r['load_after']})")
    if "minc" in runs:
        print(f"  cost minc,cube / minc: {runs['minc,cube']['wall_s'] / runs['minc']['wall_s']:.2f} (target <= 1.3); "
              f"CPU {runs['minc,cube']['cpu_s'] / runs['minc']['cpu_s']:.2f}")
    print(f"  size: cube {report['cube_bytes'] / 2**30:.2f} GiB in {report['cube_objects']} objects, zips "
          f"{report['zip_bytes'] / 2**30:.2f} GiB: {report['cube_bytes'] / report['zip_bytes']:.2f} (target <= 1.6)")
    for kind, target in (("volume", 0.05), ("volume_512", None), ("profile", 0.2), ("scan", 30.0)):
        c = report["reads"][kind]["child"]
        print(f"  {kind:<11} open_zarr {c['open_s'] * 1e3:7.0f} ms + read {c['read_s'] * 1e3:8.0f} ms"
              + (f"  (target <= {target * 1e3:.0f} ms for the read)" if target else "")
              + f"  peak RSS {report['reads'][kind]['peak_rss_mb']:.0f} MB"
              + f"  (open + read of each process, ms: {report['reads'][kind]['all_open_read_ms']})")
    if "s3" in report:
        s3 = report["s3"]
        print(f"  S3 (moto on 127.0.0.1), {s3['experiments']} experiments: s3 / local {s3['s3 / local (wall of open + read)']} "
              f"(target <= 3); builds {s3['builds_s']}")
        for kind in ("volume", "profile", "scan"):
            print(f"    {kind:<8} local {s3['local'][kind]['all_open_read_ms']} ms, s3 {s3['s3'][kind]['all_open_read_ms']} ms")
        print(f"    the server's own cost (warm client, no zarr): {s3['moto_floor']}")


if __name__ == "__main__":
    sys.exit(main())
