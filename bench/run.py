"""Benchmark: ambasync against the notebook, aria2c and the CPU floor, on one machine, in one run.

    python -m bench [--experiments 64] [--latency-ms 250] [--bandwidth-kbps 600] [--concurrency 16] [--json out.json]
    python -m bench --scenario loopback --experiments 1000
    python -m bench --scenario memory        # peak RSS at 200 and 2,000 experiments (loopback)
    python -m bench --scenario atlas         # 26,078 rows mirrored, then the no-op nightly run
    python -m bench --scenario cube --experiments 1000   # --formats minc,cube against minc alone, in pairs

Every method runs as its own process tree against the project's replica
(127.0.0.1) and is measured from outside: wall time, experiments/s, peak RSS
of the whole tree (sampled every 20 ms from /proc), CPU seconds (of
every process of the tree, from /proc). Figures are ratios from one run: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ambasync.replica import Replica, ReplicaConfig
from tests.replica_process import ReplicaProcess  # test scaffolding, shared with the tests (one copy)

PY = sys.executable


@dataclass
class Result:
    method: str
    experiments: int
    wall_s: float
    per_s: float
    peak_rss_mb: float
    cpu_s: float
    first_file_s: float | None = None
    first_request_s: float | None = None  # start to the replica's first grid request
    note: str = ""


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except OSError:
            pass
    return pids


def _cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(method: str, cmd: list[str], experiments: int, watch: Path | None = None, note: str = "",
            timed_by_child: bool = False, server: ReplicaProcess | None = None) -> Result:
    """Run ``cmd`` to completion, sampling its process tree's memory and CPU time
    (per process, from /proc: pool workers are not reaped by the measured process); with
    ``server``, also the time from the start to its first grid request."""
    if server is not None:
        server.reset()
    started_at = time.time()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, first = 0, None
    ticks: dict[int, int] = {}
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, first
        while not done.is_set():
            tree = _tree(proc.pid)
            peak = max(peak, sum(_rss_kb(p) for p in tree))
            for p in tree:
                ticks[p] = max(ticks.get(p, 0), _cpu_ticks(p))
            if watch is not None and first is None and any(watch.rglob("*.mnc")):
                first = time.perf_counter() - start
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed (exit {proc.returncode}):\n{err[-3000:]}")
    if timed_by_child:  # the floor times only its conversions
        wall = float(out.split()[0])
    cpu = sum(ticks.values()) / os.sysconf("SC_CLK_TCK")
    first_request = server.stats()["first_grid_request"] if server is not None else None
    return Result(method, experiments, round(wall, 3), round(experiments / wall, 2), round(peak / 1024, 1),
                  round(cpu, 2), None if first is None else round(first, 3),
                  None if first_request is None else round(first_request - started_at, 3), note)


def ambasync_cmd(url: str, out: Path, n: int, concurrency: int, *extra: str) -> list[str]:
    return [PY, "-m", "ambasync", "run", "--base-url", url, "--out", str(out), "--limit", str(n),
            "--concurrency", str(concurrency), "-q", *extra]


def scenario_compare(args: argparse.Namespace, work: Path) -> dict:
    n = args.experiments
    rep_args = ["--experiments", str(n), "--sagittal", "0", "--latency-ms", str(args.latency_ms),
                "--bandwidth-kbps", str(args.bandwidth_kbps), "--prebuild"]
    server = ReplicaProcess(*rep_args)
    results: list[Result] = []
    try:
        ids = [r["experiment_id"] for r in Replica(ReplicaConfig(n_coronal=n, n_sagittal=0)).rows][:n]
        if "notebook" in args.methods:
            k = min(n, args.notebook_limit)
            results.append(measure("notebook", [PY, "-m", "bench.notebook", server.url, str(work / "notebook"), str(k)],
                                   k, work / "notebook", note=f"first {k} experiments, one at a time"))
        if "aria2c" in args.methods:
            if shutil.which("aria2c") is None:
                print("aria2c not installed (scripts/install.sh --with-bench): skipped", file=sys.stderr)
            else:
                urls = work / "urls.txt"
                urls.write_text("".join(f"{server.url}/grid_data/download/{i}\n  out={i}.zip\n" for i in ids))
                results.append(measure(
                    "aria2c", ["aria2c", f"-j{args.concurrency}", "-x1", "-s1", "--console-log-level=warn",
                               "--summary-interval=0", "--allow-overwrite=true", "--auto-file-renaming=false",
                               "-d", str(work / "aria2c"), "-i", str(urls)],
                    n, note=f"-j{args.concurrency}, download only, no conversion"))
        if "ambasync" in args.methods:
            if args.scenario == "loopback":  # a short run too: the marginal rate is the slope between them
                small = max(50, n // 8)
                results.append(measure("ambasync (short)", ambasync_cmd(server.url, work / "short", small,
                                                                       args.concurrency), small, work / "short",
                                       note="for the marginal rate", server=server))
            results.append(measure("ambasync", ambasync_cmd(server.url, work / "ambasync", n, args.concurrency),
                                   n, work / "ambasync", note=f"concurrency {args.concurrency}, workers = CPUs",
                                   server=server))
    finally:
        server.close()
    if "floor" in args.methods:
        zips = work / "zips"
        zips.mkdir(exist_ok=True)
        local = Replica(ReplicaConfig(n_coronal=n, n_sagittal=0))
        for i in ids:
            (zips / f"{i}.zip").write_bytes(local.zip_for(i))
        results.append(measure("cpu floor", [PY, "-m", "bench.floor", str(zips), str(work / "floor")], n,
                               note="conversion only, zips in memory, all cores", timed_by_child=True))
    by = {r.method: r for r in results}
    ratios = {}
    if "ambasync" in by:
        for other in ("notebook", "aria2c", "cpu floor"):
            if other in by:
                ratios[f"ambasync / {other} (experiments/s)"] = round(by["ambasync"].per_s / by[other].per_s, 2)
    if "ambasync (short)" in by:
        short, full = by["ambasync (short)"], by["ambasync"]
        marginal = (full.experiments - short.experiments) / (full.wall_s - short.wall_s)
        ratios["ambasync marginal (experiments/s)"] = round(marginal, 1)
        ratios["ambasync fixed cost (s)"] = round(short.wall_s - short.experiments / marginal, 2)
        if "cpu floor" in by:
            ratios["ambasync marginal / cpu floor"] = round(marginal / by["cpu floor"].per_s, 2)
    return {"scenario": args.scenario, "settings": {"experiments": n, "latency_ms": args.latency_ms,
            "bandwidth_kbps": args.bandwidth_kbps, "concurrency": args.concurrency, "cpus": os.cpu_count()},
            "results": [asdict(r) for r in results], "ratios": ratios}


def scenario_memory(args: argparse.Namespace, work: Path) -> dict:
    results = []
    for n in (200, 2000):
        server = ReplicaProcess("--experiments", str(n), "--sagittal", "0", "--variants", "256")
        try:
            results.append(measure(f"ambasync {n}", ambasync_cmd(server.url, work / f"m{n}", n, args.concurrency),
                                   n, note="loopback"))
        finally:
            server.close()
    growth = results[1].peak_rss_mb / results[0].peak_rss_mb
    return {"scenario": "memory", "results": [asdict(r) for r in results],
            "ratios": {"peak RSS at 2000 / at 200": round(growth, 3)}}


def scenario_atlas(args: argparse.Namespace, work: Path) -> dict:
    server = ReplicaProcess("--experiments", "4343", "--sagittal", "21733", "--variants", "256")
    try:
        out = work / "atlas"
        full = measure("atlas: full mirror", [PY, "-m", "ambasync", "run", "--base-url", server.url, "--out", str(out),
                                              "--plane", "all", "--concurrency", str(args.concurrency), "-q"],
                       26078, out)
        requests_before = sum(server.stats()["grid_requests"].values())
        nightly = measure("atlas: no-op nightly", [PY, "-m", "ambasync", "run", "--base-url", server.url, "--out",
                                                   str(out), "--plane", "all", "-q"], 26078)
        requests_after = sum(server.stats()["grid_requests"].values())
    finally:
        server.close()
    return {"scenario": "atlas", "results": [asdict(full), asdict(nightly)],
            "ratios": {"nightly grid requests": requests_after - requests_before,
                       "nightly wall s": nightly.wall_s}}


def scenario_cube(args: argparse.Namespace, work: Path) -> dict:
    """The cost of the cube: the same mirror with `--formats minc` and `--formats minc,cube`, in
    alternated pairs against one replica (loopback unless --latency-ms/--bandwidth-kbps), each
    from an empty folder; the ratio is taken pair by pair, so a drifting machine cancels out."""
    n = args.experiments
    server = ReplicaProcess("--experiments", str(n), "--sagittal", "0", "--variants", "256", "--prebuild",
                            "--latency-ms", str(args.latency_ms), "--bandwidth-kbps", str(args.bandwidth_kbps))
    results, ratios = [], []
    try:
        for pair in range(args.pairs):
            times = {}
            for formats in ("minc", "minc,cube"):
                out = work / f"{formats.replace(',', '-')}-{pair}"
                r = measure(f"ambasync --formats {formats}", ambasync_cmd(server.url, out, n, args.concurrency,
                                                                          "--formats", formats), n, note=f"pair {pair}")
                results.append(r)
                times[formats] = r.wall_s
                shutil.rmtree(out, ignore_errors=True)
            ratios.append(times["minc,cube"] / times["minc"])
    finally:
        server.close()
    ratios.sort()
    return {"scenario": "cube", "settings": {"experiments": n, "latency_ms": args.latency_ms,
                                             "bandwidth_kbps": args.bandwidth_kbps, "pairs": args.pairs},
            "results": [asdict(r) for r in results],
            "ratios": {"wall minc,cube / minc, per pair": [round(x, 3) for x in ratios],
                       "median": round(ratios[len(ratios) // 2], 3)}}


def print_table(report: dict) -> None:
    print(f"\nscenario: {report['scenario']}  {report.get('settings', '')}")
    print(f"{'method':<22} {'exps':>6} {'wall s':>9} {'exps/s':>9} {'peak RSS MB':>12} {'CPU s':>8} {'1st req s':>9} "
          f"{'1st file s':>10}  note")
    for r in report["results"]:
        first = "-" if r["first_file_s"] is None else f"{r['first_file_s']:.2f}"
        request = "-" if r.get("first_request_s") is None else f"{r['first_request_s']:.2f}"
        print(f"{r['method']:<22} {r['experiments']:>6} {r['wall_s']:>9.2f} {r['per_s']:>9.2f} {r['peak_rss_mb']:>12.1f} "
              f"{r['cpu_s']:>8.2f} {request:>9} {first:>10}  {r['note']}")
    for k, v in report["ratios"].items():
        print(f"  {k}: {v}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=("realistic", "loopback", "memory", "atlas", "cube"),
                   default="realistic")
    p.add_argument("--pairs", type=int, default=3, help="cube scenario: alternated pairs of runs")
    p.add_argument("--experiments", type=int, default=64)
    p.add_argument("--latency-ms", type=float, default=None, help="default 250 (realistic) or 0 (loopback)")
    p.add_argument("--bandwidth-kbps", type=float, default=None, help="per connection; default 600 or 0")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--methods", default="notebook,aria2c,ambasync,floor")
    p.add_argument("--notebook-limit", type=int, default=64, help="the notebook is slow: measure it on this many")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args(argv)
    realistic = args.scenario == "realistic"  # the cube scenario is loopback unless told otherwise
    args.latency_ms = args.latency_ms if args.latency_ms is not None else (250.0 if realistic else 0.0)
    args.bandwidth_kbps = args.bandwidth_kbps if args.bandwidth_kbps is not None else (600.0 if realistic else 0.0)
    args.methods = set(args.methods.split(","))
    work = Path(tempfile.mkdtemp(prefix="ambasync-bench-"))
    try:
        run = {"realistic": scenario_compare, "loopback": scenario_compare, "memory": scenario_memory,
               "atlas": scenario_atlas, "cube": scenario_cube}[args.scenario]
        report = run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0
