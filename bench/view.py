"""Benchmark of ``ambasync view`` on an atlas-sized coronal cube.

    python -m bench.view [--experiments 4345] [--work DIR] [--keep] [--json out.json]

The bench cube: ``--experiments`` coronal experiments (4,345, the atlas's coronal set) from the
replica's grids cycled over 64 variants (each scaled by a random factor, so no two columns are
equal) plus the real Nrp1 and Pdyn grids, written with xarray in the contract's layout (one
experiment per chunk, as the production writer stores them; no voxel-major copy: the viewer
does not read it). Its ``coverage_coronal`` is the real Allen coronal "bin 0.8" mask from
tests/fixtures, so the co-expression matrix has the atlas's 61,315 voxels.

Measured from a fresh ``python -m ambasync view`` process:

* start: process start to the printed URL (the app answers from then on); its RSS then;
* co-expression load: until ``/api/coexpression`` says ready, and the process's RSS and peak
  RSS after it;
* first page: every request the page makes for ``/?gene=Nrp1`` (the page, its script and style,
  info, gene, three slices), one after the other; and, when Debian's Chromium is installed, in a
  real headless browser: navigation start to the three slices drawn;
* slice change: the server's own time (``Server-Timing``) and the round trip, for volumes not
  yet read (one zarr chunk each) and read before (cached);
* seed co-expression: ``/api/seed`` at 20 seeds in the mask, the server's time for the map.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
CORONAL_MASK = REPO / "tests" / "fixtures" / "coronal_200um_coverage_bin0.8.mnc"
VARIANTS = 64
NRP1 = 74272479


def write_bench_cube(out: Path, n: int, batch: int = 128) -> Path:
    """The bench cube (see the module's docstring), appended in batches: never more than one
    batch in memory. One experiment per chunk, as the production writer stores them."""
    from ambasync.imaging.regrid import read_image
    from bench.matrix import _experiments, write_cube

    coverage, _ = read_image(CORONAL_MASK)
    rng = np.random.default_rng(0)

    def scaled(e, ras: np.ndarray) -> np.ndarray:  # no two columns equal (the variants repeat)
        ras = ras.copy()
        if e.experiment_id != NRP1:
            ras[ras != -1] *= np.float32(rng.uniform(0.5, 2.0))
        return ras

    write_cube(out, _experiments(n, VARIANTS), batch=batch, per_chunk=1, volume=scaled, coverage=coverage)
    return out / "cube.zarr"


def _rss_mb(pid: int) -> tuple[float, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def _get(url: str) -> tuple[float, dict | bytes, dict]:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as r:
        body = r.read()
        headers = dict(r.headers)
    ms = (time.perf_counter() - start) * 1000
    if headers.get("Content-Type", "").startswith("application/json"):
        return ms, json.loads(body), headers
    return ms, body, headers


def _server_ms(headers: dict) -> float:
    return float(headers.get("Server-Timing", "slice;dur=nan").split("dur=")[1])


def browser_first_page(url: str) -> float | None:
    """Navigation start to the slices drawn, in Debian's headless Chromium (None without it)."""
    if not (os.path.exists("/usr/bin/chromium") and os.path.exists("/usr/bin/chromedriver")):
        return None
    os.environ.setdefault("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="ambasync-bench-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1500,1100", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        times = []
        for _ in range(3):  # the first load also starts the browser's own caches
            driver.get(url)
            end = time.monotonic() + 60
            while time.monotonic() < end and driver.execute_script("return document.body.dataset.ready") != "1":
                time.sleep(0.02)
            times.append(float(driver.execute_script("return document.body.dataset.readyMs")))
        return times
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def bench(n: int, work: Path) -> dict:
    report: dict = {"experiments": n, "load_average_before": os.getloadavg()}
    t = time.perf_counter()
    store = work / "cube.zarr"
    if not (store / "zarr.json").is_file():
        store = write_bench_cube(work, n)
        report["cube_write_s"] = round(time.perf_counter() - t, 1)
    proc = subprocess.Popen([sys.executable, "-m", "ambasync", "view", "--cube", str(store), "--port", "0", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        start = time.perf_counter()
        line = proc.stdout.readline()
        report["start_s"] = round(time.perf_counter() - start, 2)
        if not line.startswith("ambasync view: http"):
            raise SystemExit(f"view did not start: {line}{proc.stderr.read()}")
        base = line.split()[2].rstrip("/")
        report["rss_at_start_mb"] = round(_rss_mb(proc.pid)[0])
        _, info, _ = _get(base + "/api/info")  # waits for the cube to be open
        report["cube_open_s"] = round(time.perf_counter() - start, 2)
        report["experiments_in_cube"] = info["experiments"]

        # first page, request by request, once the cube is open (while the co-expression load runs)
        total = 0.0
        for path in ("/", "/static/app.js", "/static/style.css", "/api/info", "/api/gene?gene=Nrp1",
                     *(f"/api/slice?layer=experiment:{NRP1}&axis={a}&index={i}" for a, i in (("z", 20), ("y", 33), ("x", 29)))):
            total += _get(base + path)[0]
        report["first_page_requests_ms"] = round(total, 1)

        _, status, _ = _get(base + "/api/coexpression")
        while status["state"] in ("waiting", "loading"):
            time.sleep(0.5)
            _, status, _ = _get(base + "/api/coexpression")
        report["coexpression"] = status
        rss, peak = _rss_mb(proc.pid)
        report["rss_after_load_mb"], report["peak_rss_mb"] = round(rss), round(peak)

        # slice changes: new volumes (one zarr chunk read), then the same volumes again (cached)
        _, info, _ = _get(base + "/api/info")
        ids = [m["experiment_id"] for m in _get(base + "/api/find?q=1000&limit=40")[1]["matches"]
               if m["kind"] == "experiment"][:20]
        fresh, cached, trip = [], [], []
        for eid in ids:
            for axis, index in (("z", 20), ("y", 33), ("x", 29)):
                ms, _, headers = _get(f"{base}/api/slice?layer=experiment:{eid}&axis={axis}&index={index}")
                (fresh if axis == "z" else cached).append(_server_ms(headers))
                trip.append(ms)
        for eid in ids:
            for index in range(10, 30):
                ms, _, headers = _get(f"{base}/api/slice?layer=experiment:{eid}&axis=z&index={index}")
                cached.append(_server_ms(headers))
                trip.append(ms)
        report["slice_server_ms"] = {"new_volume_median": round(statistics.median(fresh), 1),
                                     "new_volume_max": round(max(fresh), 1),
                                     "cached_median": round(statistics.median(cached), 2),
                                     "cached_max": round(max(cached), 1),
                                     "round_trip_median": round(statistics.median(trip), 1)}

        # seed co-expression at 20 voxels of the mask
        from ambasync.imaging.regrid import read_image

        mask, _ = read_image(CORONAL_MASK)
        voxels = np.argwhere(mask >= 0.8)
        rng = np.random.default_rng(1)
        seeds = voxels[rng.choice(len(voxels), 20, replace=False)]
        server, trips = [], []
        for z, y, x in seeds:
            ms, body, _ = _get(f"{base}/api/seed?z={z}&y={y}&x={x}")
            server.append(body["ms"])
            trips.append(ms)
        report["seed_ms"] = {"map_median": round(statistics.median(server), 1), "map_max": round(max(server), 1),
                             "request_median": round(statistics.median(trips), 1),
                             "request_max": round(max(trips), 1), "experiments": body["experiments"],
                             "voxels": body["voxels"]}
        report["rss_end_mb"], report["peak_rss_end_mb"] = (round(v) for v in _rss_mb(proc.pid))
        report["browser_first_page_ms"] = browser_first_page(f"{base}/?gene=Nrp1")
        report["load_average_after"] = os.getloadavg()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.view", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiments", type=int, default=4345)
    p.add_argument("--work", type=Path, help="folder for the bench cube (default: a temporary one); a cube "
                                            "already there is reused")
    p.add_argument("--keep", action="store_true", help="keep the bench cube")
    p.add_argument("--json", type=Path, help="also write the figures there")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="ambasync-bench-view-"))
    try:
        report = bench(args.experiments, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
