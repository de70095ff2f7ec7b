"""`run --formats minc,cube`: the exact cube as a second output of every run. What a lab would
notice if this broke: values that are not Allen's (quantised, flipped), a nightly run that
rewrites or re-downloads what it has, a cube mixed from two settings."""

from __future__ import annotations

import hashlib

import numpy as np
import xarray as xr

from ambasync.replica import ReplicaConfig, serve
from helpers import ambasync_cmd, manifest, mirror, notebook_ras

import pytest

pytestmark = pytest.mark.e2e  # real runs, servers or clusters: make test-fast leaves these out

N_CORONAL, N_SAGITTAL = 4, 2


def store_digest(store) -> dict[str, str]:
    """Every file of the store and its sha256: what 'untouched' means on disk."""
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*")) if p.is_file()}


def assert_exact(cube: xr.Dataset, replica) -> None:
    ids = [int(r["experiment_id"]) for r in replica.rows]
    assert sorted(int(e) for e in cube.experiment.values) == sorted(ids)
    for eid in ids:
        want = notebook_ras(replica.raw_grid(eid))
        got = cube.expression.sel(experiment=eid).values
        assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32)), eid


async def test_a_ushort_mirror_gets_an_exact_cube_and_the_next_night_touches_nothing(tmp_path):
    async with serve(ReplicaConfig(n_coronal=N_CORONAL, n_sagittal=N_SAGITTAL)) as (rep, url):
        first = await mirror(url, tmp_path, output__formats=["minc", "cube"], source__plane="all")
        store = tmp_path / "cube.zarr"
        before = store_digest(store)
        requests = sum(rep.stats.grid_requests.values())
        second = await mirror(url, tmp_path, output__formats=["minc", "cube"], source__plane="all")
        assert sum(rep.stats.grid_requests.values()) == requests  # a no-op night: no grid request
        cube = xr.open_zarr(store)
        assert_exact(cube, rep)  # ushort MINC files, yet every measured 0 and -1 is exact here
        planes = np.array([r["plane"] for r in sorted(rep.rows, key=lambda r: r["experiment_id"])])
        by_id = {int(r["experiment_id"]): r for r in rep.rows}
        for plane in ("coronal", "sagittal"):
            raws = np.stack([notebook_ras(rep.raw_grid(e)) for e in sorted(by_id) if by_id[e]["plane"] == plane])
            np.testing.assert_allclose(cube[f"coverage_{plane}"].values, (raws != -1).mean(axis=0), atol=1e-6)
        assert (planes == "coronal").sum() == N_CORONAL + 2  # the two real grids are coronal
        genes = dict(zip(cube.experiment.values.tolist(), cube.gene.values.tolist()))
        table = manifest(tmp_path)
        assert all(genes[int(r.experiment_id)] == r.gene for r in table.itertuples())
    assert first.exit_code == 0 and second.exit_code == 0 and second.skipped == first.done
    assert store_digest(store) == before  # not one byte of the store rewritten


async def test_a_minc_mirror_builds_its_cube_from_kept_zips_without_downloading(tmp_path):
    async with serve(ReplicaConfig(n_coronal=N_CORONAL, n_sagittal=0)) as (rep, url):
        await mirror(url, tmp_path, output__keep_zips=True)
        requests = sum(rep.stats.grid_requests.values())
        summary = await mirror(url, tmp_path, output__keep_zips=True, output__formats=["minc", "cube"])
        assert sum(rep.stats.grid_requests.values()) == requests  # every grid came from the kept zips
        assert summary.exit_code == 0
        assert_exact(xr.open_zarr(tmp_path / "cube.zarr"), rep)
        # Without kept zips, only what the cube lacks is fetched: here nothing, it is complete.
        again = await mirror(url, tmp_path, output__formats=["minc", "cube"])
        assert again.exit_code == 0 and sum(rep.stats.grid_requests.values()) == requests


async def test_a_cube_of_other_settings_is_never_mixed(tmp_path):
    async with serve(ReplicaConfig(n_coronal=2, n_sagittal=0, real_dir="/nonexistent")) as (rep, url):
        await mirror(url, tmp_path, output__formats=["cube"])
        args = ["run", "--base-url", url, "--out", str(tmp_path), "--formats", "cube", "--orientation", "PIR",
                "--workers", "1", "-q"]
        done = await _cli(*args)
        err = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(err) == 1, done.stderr
        assert "cube.zarr was written with" in err[0] and "--force" in err[0]
        assert_exact(xr.open_zarr(tmp_path / "cube.zarr"), rep)  # the RAS cube is still whole
        done = await _cli(*args, "--force")
        assert done.returncode == 0, done.stderr
        cube = xr.open_zarr(tmp_path / "cube.zarr")
        assert cube.attrs["orientation"] == "PIR" and cube.expression.shape[1:] == (58, 41, 67)
        assert list(tmp_path.glob("cube.zarr.replaced-*")), "the old cube is kept beside the new one"


async def _cli(*args: str, env: dict | None = None):
    """The command as a user runs it (its own process), while this loop serves the replica."""
    import asyncio
    import os
    import subprocess

    return await asyncio.to_thread(subprocess.run, ambasync_cmd(*args), capture_output=True, text=True, timeout=120,
                                   env={**os.environ, **(env or {})})


async def test_status_shows_the_cube(tmp_path):
    async with serve(ReplicaConfig(n_coronal=3, n_sagittal=0, real_dir="/nonexistent")) as (_, url):
        await mirror(url, tmp_path, output__formats=["minc", "cube"])
    done = await _cli("status", "--out", str(tmp_path))
    line = next(x for x in done.stdout.splitlines() if x.startswith("cube "))
    size = sum(p.stat().st_size for p in (tmp_path / "cube.zarr").rglob("*") if p.is_file())
    assert done.returncode == 0 and ": 3 experiments," in line and f"{size / 1e6:.1f} MB" in line
    assert "last update 20" in line


async def test_two_shards_running_together_give_one_complete_exact_cube(tmp_path):
    import asyncio

    async with serve(ReplicaConfig(n_coronal=5, n_sagittal=3)) as (rep, url):
        results = await asyncio.gather(*(mirror(url, tmp_path, output__formats=["minc", "cube"], source__plane="all",
                                                source__shard=f"{k}/2", convert__workers=1) for k in (0, 1)))
        assert [r.exit_code for r in results] == [0, 0]
        # the shard that publishes last sees every member: each shard records before it publishes
        cube = xr.open_zarr(tmp_path / "cube.zarr")
        assert (cube.experiment.values >= 0).all()  # no empty slot left
        assert_exact(cube, rep)


async def test_verify_finds_a_damaged_cube_chunk_and_repair_restores_it(tmp_path):
    """A cube chunk altered on disk must not be trusted for ever: verify names it, exits 1, and
    --repair converts it again (the MINC files were fine: only the cube is redone)."""
    async with serve(ReplicaConfig(n_coronal=3, n_sagittal=0, real_dir="/nonexistent")) as (rep, url):
        await mirror(url, tmp_path, output__formats=["minc", "cube"])
        cube = xr.open_zarr(tmp_path / "cube.zarr")
        victim = int(cube.experiment.values[1])
        chunk = tmp_path / "cube.zarr" / "expression" / "c" / "0" / "0" / "0" / "0"  # the shard of slots 0-511
        chunk.write_bytes(chunk.read_bytes()[:-7] + b"garbage")
        args = ("verify", "--out", str(tmp_path))
        env_formats = {"AMBASYNC_OUTPUT_FORMATS": "minc,cube", "AMBASYNC_SOURCE_BASE_URL": url}
        done = await _cli(*args, env=env_formats)
        assert done.returncode == 1 and f"experiment {victim}: cube slot 1" in done.stderr, done.stderr
        done = await _cli(*args, "--repair", env=env_formats)
        assert done.returncode == 0, done.stderr
        assert_exact(xr.open_zarr(tmp_path / "cube.zarr"), rep)


async def test_a_dry_run_counts_what_the_cube_lacks_and_writes_nothing(tmp_path):
    """`run --dry-run --formats minc,cube` on a MINC-only mirror must say every experiment would
    be converted for the cube, and must not create the store."""
    from ambasync.mirror.options import RunOptions

    async with serve(ReplicaConfig(n_coronal=3, n_sagittal=0, real_dir="/nonexistent")) as (_, url):
        await mirror(url, tmp_path)
        dry = await mirror(url, tmp_path, RunOptions(dry_run=True, quiet=True), output__formats=["minc", "cube"])
        plain = await mirror(url, tmp_path, RunOptions(dry_run=True, quiet=True))
    assert dry.would_fetch == 3 and plain.would_fetch == 0 and plain.skipped == 3
    assert not (tmp_path / "cube.zarr").exists()


async def test_a_cube_without_its_voxel_major_copy_is_half_the_size_and_still_exact(tmp_path):
    """`cube_voxel_major = false` is for labs short of disk: the values must stay exact."""
    async with serve(ReplicaConfig(n_coronal=3, n_sagittal=0, real_dir="/nonexistent")) as (rep, url):
        await mirror(url, tmp_path / "one", output__formats=["cube"], output__cube_voxel_major=False)
        await mirror(url, tmp_path / "two", output__formats=["cube"])
        one, two = xr.open_zarr(tmp_path / "one" / "cube.zarr"), xr.open_zarr(tmp_path / "two" / "cube.zarr")
        assert "expression_by_voxel" not in one and "expression_by_voxel" in two
        assert_exact(one, rep)
