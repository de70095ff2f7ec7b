"""The cube in an object store: a real S3 API server (moto's server mode) on 127.0.0.1, started
here on a free port and stopped at the end; reached the way users reach theirs, through the
standard environment (AWS_ENDPOINT_URL, credentials, region). What a lab sharing one cube with
its Dask workers would notice if this broke: a cube that plain xarray cannot read, values that
differ from the local cube's, a night that writes or downloads anything, a kill that leaves a
cube nobody can open, a message that does not say which store is wrong."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
import pytest
import xarray as xr

from ambasync.replica import ReplicaConfig, serve
from helpers import ambasync_cmd, mirror, notebook_ras
from s3_process import S3Process, free_port

pytestmark = pytest.mark.e2e  # real runs, servers or clusters: make test-fast leaves these out

BUCKET = "labcube"


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server in its own process on 127.0.0.1; the environment points boto at it."""
    server = S3Process(start_seconds=30)
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    try:
        yield server.endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.close()


def objects(prefix: str) -> dict[str, str]:
    """Every object under the prefix and its ETag: what 'nothing written' means on S3."""
    import boto3

    out = {}
    for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        out.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
    return out


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype="<f4").view("<u4")


def assert_exact(cube: xr.Dataset, replica) -> None:
    ids = sorted(int(r["experiment_id"]) for r in replica.rows)
    assert sorted(int(e) for e in cube.experiment.values) == ids
    expression = cube.expression.values
    for pos, eid in enumerate(int(e) for e in cube.experiment.values):
        assert np.array_equal(bits(expression[pos]), bits(notebook_ras(replica.raw_grid(eid)))), eid


async def test_a_run_keeps_a_cube_in_s3_that_plain_xarray_reads_exactly_and_a_second_night_writes_nothing(
        s3, tmp_path):
    url = f"s3://{BUCKET}/night/cube.zarr"
    async with serve(ReplicaConfig(n_coronal=4, n_sagittal=2)) as (rep, base):
        first = await mirror(base, tmp_path / "m", output__formats=["minc", "cube"], output__cube=url,
                             source__plane="all")
        assert first.exit_code == 0
        before = objects("night/")
        requests = sum(rep.stats.grid_requests.values())
        second = await mirror(base, tmp_path / "m", output__formats=["minc", "cube"], output__cube=url,
                              source__plane="all")
        assert second.exit_code == 0 and sum(rep.stats.grid_requests.values()) == requests  # 0 grid requests
        assert objects("night/") == before  # a no-op night: not one object written or removed
        assert not (tmp_path / "m" / "cube.zarr").exists()  # nothing of the cube on local disk but its stage
        assert not any(p.is_file() and "staged" in str(p) for p in (tmp_path / "m" / ".ambasync").rglob("*"))
        cube = xr.open_zarr(url)  # the user's first line, plain xarray with the standard environment
        assert_exact(cube, rep)
        version = cube.attrs["cube_version"]
        assert version and any(k.startswith("night/cube.zarr/expression/c/") for k in before)
        from ambasync.cube.read import open_cube
        from ambasync.errors import AnalysisError

        assert open_cube(None, url, at=version).attrs["cube_version"] == version  # --at the current version
        with pytest.raises(AnalysisError, match="keeps no snapshots"):
            open_cube(None, url, at="0123456789abcdef")
        # status names the store, its experiments and its version
        done = subprocess.run(ambasync_cmd("status", "--out", str(tmp_path / "m")), capture_output=True, text=True,
                              timeout=120, env={**os.environ, "AMBASYNC_OUTPUT_CUBE": url})
        line = next(x for x in done.stdout.splitlines() if x.startswith("cube "))
        assert url in line and ": 8 experiments," in line and cube.attrs["cube_version"] in line


def test_search_and_matrix_on_a_cluster_read_the_s3_cube_as_the_local_one(s3, tmp_path):
    from ambasync.analysis.matrix.api import matrix
    from ambasync.analysis.search.api import search
    from ambasync.cube import build_from_zips
    from cubes import local_cluster
    from test_cube import SETTINGS, replica_sources

    url = f"s3://{BUCKET}/shared/cube.zarr"
    sources = replica_sources(tmp_path / "zips", 6)
    build_from_zips(tmp_path / "cube.zarr", SETTINGS, sources, workers=1, quiet=True)
    build_from_zips(url, SETTINGS, sources, workers=1, quiet=True, stage=tmp_path / "stage")
    local = xr.open_zarr(tmp_path / "cube.zarr")
    remote = xr.open_zarr(url)
    assert local.attrs["cube_version"] == remote.attrs["cube_version"]  # the same content, the same version
    the_map = np.where(local.expression.values[0] == -1, np.nan, local.expression.values[0] * 2 + 1)
    with local_cluster() as cluster:
        address = cluster.scheduler_address
        on_disk = search(tmp_path / "cube.zarr", the_map, nulls=8, seed=3)
        on_s3 = search(url, the_map, nulls=8, seed=3, scheduler=address)
        m_disk = matrix(tmp_path / "cube.zarr", "mhts", impute="none")
        m_s3 = matrix(url, "mhts", impute="none", scheduler=address)
    assert len(on_disk) == len(sources) and on_s3.equals(on_disk)
    assert m_s3.shape == m_disk.shape and m_s3.equals(m_disk)


def test_kill_9_while_publishing_to_s3_leaves_a_cube_that_opens_and_the_next_build_completes_it(s3, tmp_path):
    """kill -9 while the publisher writes shards to the bucket: plain xarray still opens the cube,
    and the next build makes it complete and exact (shards and the root are whole objects)."""
    from test_cube import SETTINGS, assert_exact as assert_exact_zips, child, replica_sources
    from ambasync.cube import build_from_zips

    url = f"s3://{BUCKET}/killed/cube.zarr"
    sources = replica_sources(tmp_path / "zips", 24)
    build_from_zips(url, SETTINGS, sources[:8], workers=1, quiet=True, stage=tmp_path / "stage0")
    proc = child(url, sources, "killed", stage=str(tmp_path / "stage1"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any(k.endswith(".ambasync/publishing.json") for k in objects("killed/")):
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"the build ended before its publish: {proc.communicate()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ds = xr.open_zarr(url)  # opens, whatever was being written
    assert ds.sizes["experiment"] in (8, 24)
    result = build_from_zips(url, SETTINGS, sources, workers=1, quiet=True, stage=tmp_path / "stage2")
    assert result.failed == () and result.publish.empty_slots == 0
    assert_exact_zips(xr.open_zarr(url), sources)


def test_two_writers_on_one_s3_cube_make_one_complete_cube(s3, tmp_path):
    """Two shards of the catalogue (two processes, each its own stage, as on two machines) write
    one cube in the bucket at once: every experiment exactly once, exact."""
    from test_cube import assert_exact as assert_exact_zips, child, replica_sources

    url = f"s3://{BUCKET}/shards/cube.zarr"
    sources = replica_sources(tmp_path / "zips", 12, 4)
    procs = [child(url, [s for s in sources if s.experiment_id % 2 == k], f"shard {k}/2",
                   stage=str(tmp_path / f"stage{k}")) for k in (0, 1)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    ds = xr.open_zarr(url)
    assert ds.sizes["experiment"] == len(sources)
    assert_exact_zips(ds, sources)


def test_an_unreachable_or_unknown_store_is_one_line_naming_it(s3, tmp_path):
    """run: exit 4; matrix/search (the analysis layer): exit 2; a scheme without its fsspec
    package names the package. The local mirror is left as it was."""
    from ambasync.cube.read import open_cube
    from ambasync.errors import AnalysisError

    dead = f"http://127.0.0.1:{free_port()}"
    url = f"s3://{BUCKET}/gone/cube.zarr"
    env = {**os.environ, "AWS_ENDPOINT_URL": dead, "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard",
           "AMBASYNC_OUTPUT_CUBE": url, "AMBASYNC_OUTPUT_FORMATS": "minc,cube"}
    done = subprocess.run(ambasync_cmd("run", "--base-url", "http://127.0.0.1:9", "--out", str(tmp_path / "m"),
                                       "-q"), capture_output=True, text=True, timeout=120, env=env)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 4 and len(err) == 1 and url in err[0], done.stderr
    assert not (tmp_path / "m" / "manifest.csv").exists() and not (tmp_path / "m" / ".ambasync" / "state.sqlite").exists()
    with pytest.raises(AnalysisError) as caught:
        open_cube(None, f"s3://no-such-bucket-{os.getpid()}/cube.zarr")
    assert f"no-such-bucket-{os.getpid()}" in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.exit_code == 2
    with pytest.raises(AnalysisError) as caught:
        open_cube(None, "gs://bucket/cube.zarr")
    assert "gcsfs" in str(caught.value) and "gs://bucket/cube.zarr" in str(caught.value)
