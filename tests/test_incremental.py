"""Nightly runs cost only what changed: what a lab admin would notice if these broke
is a mirror that downloads the atlas again every night, or never retries."""

import sqlite3

from ambasync.mirror.options import RunOptions
from ambasync.replica import ReplicaConfig, serve
from helpers import manifest, mirror

import pytest

pytestmark = pytest.mark.e2e  # real runs, servers or clusters: make test-fast leaves these out


def grid_requests(rep) -> int:
    return sum(rep.stats.grid_requests.values())


async def test_second_run_after_a_complete_mirror_makes_zero_grid_requests(tmp_path):
    async with serve(ReplicaConfig(n_coronal=12, n_sagittal=0)) as (rep, url):
        first = await mirror(url, tmp_path)
        assert first.done == 14 and grid_requests(rep) == 14
        second = await mirror(url, tmp_path)
        assert grid_requests(rep) == 14, "a no-op night downloaded grids again"
        assert second.skipped == 14 and second.done == 0 and second.exit_code == 0
        # --verify re-hashes files but still needs no download
        third = await mirror(url, tmp_path, opts=RunOptions(verify=True, quiet=True))
        assert third.skipped == 14 and grid_requests(rep) == 14


async def test_a_deleted_or_altered_file_is_fetched_again(tmp_path):
    async with serve(ReplicaConfig(n_coronal=5, n_sagittal=0)) as (rep, url):
        await mirror(url, tmp_path)
        files = sorted((tmp_path / "coronal").glob("*.mnc"))
        files[0].unlink()
        with open(files[1], "r+b") as fh:  # same size, different bytes: only --verify sees it
            fh.seek(5000)
            fh.write(b"\xff" * 16)
        plain = await mirror(url, tmp_path)
        assert plain.done == 1 and files[0].is_file()
        verified = await mirror(url, tmp_path, opts=RunOptions(verify=True, quiet=True))
        assert verified.done == 1 and grid_requests(rep) == 9


async def test_force_redoes_everything(tmp_path):
    async with serve(ReplicaConfig(n_coronal=3, n_sagittal=0)) as (rep, url):
        await mirror(url, tmp_path)
        again = await mirror(url, tmp_path, opts=RunOptions(force=True, quiet=True))
        assert again.done == 5 and grid_requests(rep) == 10


async def test_changed_settings_reconvert_from_kept_zips_without_downloading(tmp_path):
    async with serve(ReplicaConfig(n_coronal=4, n_sagittal=0)) as (rep, url):
        await mirror(url, tmp_path, output__keep_zips=True)
        assert grid_requests(rep) == 6
        redo = await mirror(url, tmp_path, output__keep_zips=True, convert__dtype="float", convert__space="CCFv3")
        assert redo.done == 6 and grid_requests(rep) == 6, "a settings change downloaded the atlas again"
        db = sqlite3.connect(tmp_path / ".ambasync" / "state.sqlite")
        assert {r[0] for r in db.execute("SELECT settings FROM experiments")} == {"RAS/CCFv3/x1/float"}
        # without the cache, a settings change has to download again
        await mirror(url, tmp_path / "nocache")
        await mirror(url, tmp_path / "nocache", convert__orientation="PIR")
        assert grid_requests(rep) == 6 + 6 + 6


async def test_transient_failures_are_retried_next_night_permanent_ones_are_not(tmp_path):
    bad = {100013: "no_energy"}
    async with serve(ReplicaConfig(n_coronal=4, n_sagittal=0, bad=bad, fault_rate=1.0, fault_kinds=("503",),
                                   retry_after=0.0)) as (rep, url):
        first = await mirror(url, tmp_path, download__attempts=2)
        assert first.failed == 6 and first.exit_code == 1
    m = manifest(tmp_path).set_index("experiment_id")
    assert "HTTP 503" in m.loc[100000, "error"] and "gave up after 2 attempts" in m.loc[100000, "error"]
    async with serve(ReplicaConfig(n_coronal=4, n_sagittal=0, bad=bad)) as (rep, url):
        second = await mirror(url, tmp_path)
        # every experiment failed on 503s (transient), so all are fetched again; 100013 now fails permanently
        assert second.done == 5 and second.failed == 1
        third = await mirror(url, tmp_path)
        assert third.quarantined == 1 and third.done == 0 and third.exit_code == 0
        assert rep.stats.grid_requests[100013] == 1, "a permanent failure was retried in a later run"
        fourth = await mirror(url, tmp_path, opts=RunOptions(retry_failed=True, quiet=True))
        assert fourth.failed == 1 and rep.stats.grid_requests[100013] == 2


async def test_repeated_transient_failures_are_quarantined(tmp_path):
    async with serve(ReplicaConfig(n_coronal=1, n_sagittal=0, fault_rate=1.0, fault_kinds=("500",))) as (rep, url):
        for night in range(3):
            s = await mirror(url, tmp_path, download__attempts=1, download__quarantine_after=3)
            assert s.failed == 3
        s = await mirror(url, tmp_path, download__attempts=1, download__quarantine_after=3)
        assert s.quarantined == 3 and s.failed == 0 and sum(rep.stats.grid_requests.values()) == 9


async def test_vanished_experiments_are_reported_and_pruned_on_request(tmp_path):
    async with serve(ReplicaConfig(n_coronal=6, n_sagittal=0)) as (_, url):
        await mirror(url, tmp_path)
    async with serve(ReplicaConfig(n_coronal=4, n_sagittal=0)) as (_, url):
        s = await mirror(url, tmp_path)
        assert s.vanished == 2 and len(list((tmp_path / "coronal").glob("*.mnc"))) == 8
        s = await mirror(url, tmp_path, opts=RunOptions(prune=True, quiet=True))
        assert s.pruned == 2 and len(list((tmp_path / "coronal").glob("*.mnc"))) == 6
    assert len(manifest(tmp_path)) == 6


async def test_a_failed_refresh_keeps_the_good_files_from_before(tmp_path):
    async with serve(ReplicaConfig(n_coronal=3, n_sagittal=0)) as (_, url):
        await mirror(url, tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "coronal").iterdir()}
    async with serve(ReplicaConfig(n_coronal=3, n_sagittal=0, fault_rate=1.0, fault_kinds=("503",),
                                   retry_after=0.0)) as (_, url):
        s = await mirror(url, tmp_path, opts=RunOptions(force=True, quiet=True), download__attempts=2)
    assert s.failed == 5 and s.exit_code == 1
    assert {p.name: p.read_bytes() for p in (tmp_path / "coronal").iterdir()} == before
    m = manifest(tmp_path)
    assert set(m["status"]) == {"done"} and all("HTTP 503" in e for e in m["error"])
