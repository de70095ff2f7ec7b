"""The CPU floor: ambasync's conversion alone (unzip, parse, reorient, write MINC) on all
cores, for zips already in memory. Usage: python -m bench.floor ZIPDIR OUTDIR

Prints the conversion wall time (seconds) on stdout; loading the zips and
starting the pool are not timed.
"""

import concurrent.futures
import os
import sys
import time
from pathlib import Path

from ambasync.mirror.convert import ConvertJob, convert
from ambasync.workers import init_worker, start_forkserver
from ambasync.settings import ConvertSettings
from ambasync.target import Target


def main(zipdir: str, outdir: str) -> None:
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    settings = ConvertSettings("RAS", "MICe", 1.0, "ushort")  # ambasync's defaults
    jobs = [ConvertJob(i, p.read_bytes(), str(out), (Target("energy", f"{p.stem}.mnc"),), settings)
            for i, p in enumerate(sorted(Path(zipdir).glob("*")))]
    workers = os.cpu_count() or 1
    ctx = start_forkserver()  # workers with numpy and libminc already imported, as ambasync's
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker) as pool:
        list(pool.map(abs, range(workers * 4)))  # start and warm every worker
        start = time.perf_counter()
        results = list(pool.map(convert, jobs, chunksize=4))
        wall = time.perf_counter() - start
    assert len(results) == len(jobs)
    print(f"{wall:.6f} {len(jobs)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
