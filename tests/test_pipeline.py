"""End to end against the replica on 127.0.0.1: the files, names and manifest a user gets."""

import sqlite3

import numpy as np
import pytest

from ambasync.replica import REAL_IDS, ReplicaConfig, serve
from helpers import (
    NOTEBOOK_SIZES, NOTEBOOK_STARTS, manifest, mincinfo, mirror, notebook_ras, quantisation_step, read_minc, sha256,
)

pytestmark = pytest.mark.e2e  # real runs, servers or clusters: make test-fast leaves these out


async def test_sixty_experiments_with_page_size_7_give_sixty_correct_files_and_a_true_manifest(tmp_path):
    async with serve(ReplicaConfig(n_coronal=58, n_sagittal=5, duplicate_ids=())) as (rep, url):
        rows = [r for r in rep.rows if r["plane"] == "coronal"]
        assert len(rows) == 60 and set(REAL_IDS) <= {r["experiment_id"] for r in rows}
        summary = await mirror(url, tmp_path, source__page_size=7)
        assert summary.exit_code == 0 and summary.done == 60 and summary.failed == 0
        files = sorted((tmp_path / "coronal").iterdir())
        assert [f.name for f in files] == sorted(f"{r['gene']}_{r['experiment_id']}.mnc" for r in rows)
        assert not (tmp_path / "sagittal").exists()

        m = manifest(tmp_path)
        assert len(m) == 60 and m["experiment_id"].is_unique and set(m["status"]) == {"done"}
        assert sorted(m["experiment_id"]) == sorted(r["experiment_id"] for r in rows)
        for rec in m.itertuples():
            path = tmp_path / rec.path
            assert path.is_file() and sha256(path) == rec.sha256
        # catalogue columns come through (with nulls kept empty)
        by_id = {r["experiment_id"]: r for r in rows}
        for rec in m.itertuples():
            assert rec.gene == by_id[rec.experiment_id]["gene"]
            assert rec.specimen_id == by_id[rec.experiment_id]["specimen_id"]

        # voxels of a synthetic experiment equal the notebook's rot90s of what the replica served
        eid = rows[10]["experiment_id"]
        expected = notebook_ras(rep.raw_grid(eid))
        data, geo = read_minc(tmp_path / m.set_index("experiment_id").loc[eid, "path"])
        assert geo["sizes"] == NOTEBOOK_SIZES and geo["starts"] == pytest.approx(NOTEBOOK_STARTS)
        assert np.abs(data - expected).max() <= quantisation_step(expected)
        info = mincinfo(tmp_path / m.set_index("experiment_id").loc[eid, "path"])
        assert info["dims"]["yspace"] == pytest.approx((67, 0.2, -7.9))


async def test_downloads_start_before_the_catalogue_is_complete(tmp_path):
    async with serve(ReplicaConfig(n_coronal=40, n_sagittal=0, latency_ms=30)) as (rep, url):
        await mirror(url, tmp_path, source__page_size=5)
        kinds = [kind for kind, _ in rep.stats.events]
        assert kinds.count("catalog") >= 8
        last_catalogue = len(kinds) - 1 - kinds[::-1].index("catalog")
        assert kinds.index("grid") < last_catalogue


async def test_float_output_is_exact_and_limit_takes_the_first_ids(tmp_path):
    async with serve(ReplicaConfig(n_coronal=20, n_sagittal=0)) as (rep, url):
        summary = await mirror(url, tmp_path, source__limit=4, convert__dtype="float")
        assert summary.done == 4
        m = manifest(tmp_path)
        assert sorted(m["experiment_id"]) == sorted(r["experiment_id"] for r in rep.rows)[:4]
        for rec in m.itertuples():
            data, _ = read_minc(tmp_path / rec.path)
            np.testing.assert_array_equal(data.astype(np.float32), notebook_ras(rep.raw_grid(rec.experiment_id)))


async def test_limit_over_both_planes_takes_the_first_ids_of_the_whole_catalogue(tmp_path):
    extra = [{"experiment_id": 100001 + i, "gene": f"Sag{i}", "plane": "sagittal"} for i in range(2)]
    async with serve(ReplicaConfig(n_coronal=6, n_sagittal=3, extra_rows=extra)) as (rep, url):
        summary = await mirror(url, tmp_path, source__plane="all", source__limit=4, source__page_size=2)
        assert summary.done == 4
        first = sorted(r["experiment_id"] for r in rep.rows)[:4]
    assert first == [100000, 100001, 100002, 100013]  # the planes interleave by id
    assert sorted(manifest(tmp_path)["experiment_id"]) == first
    assert len(list((tmp_path / "sagittal").glob("*.mnc"))) == 2


async def test_proxies_come_from_the_environment(tmp_path, monkeypatch):
    """Labs behind a proxy set HTTP_PROXY, as for curl: here the only way to reach the (unresolvable)
    upstream host is through the replica acting as that proxy."""
    async with serve(ReplicaConfig(n_coronal=3, n_sagittal=0, real_dir="/nonexistent")) as (rep, proxy):
        monkeypatch.setenv("HTTP_PROXY", proxy)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        summary = await mirror("http://api.brain-map.invalid", tmp_path)
        assert summary.done == 3 and rep.stats.catalog_requests >= 1
        monkeypatch.setenv("NO_PROXY", "api.brain-map.invalid")  # bypassed: the host cannot be reached
        summary = await mirror("http://api.brain-map.invalid", tmp_path / "direct", download__attempts=1)
        assert summary.exit_code == 4 and "cannot reach" in summary.error


async def test_bad_experiments_fail_alone_with_clear_reasons_and_no_file(tmp_path):
    bad = {100000 + 13 * 1: "no_energy", 100000 + 13 * 2: "short_raw", 100000 + 13 * 3: "not_zip",
           100000 + 13 * 4: "404"}
    async with serve(ReplicaConfig(n_coronal=10, n_sagittal=0, bad=bad)) as (rep, url):
        ids = {r["experiment_id"] for r in rep.rows}
        assert set(bad) <= ids, "replica ids changed: update this test"
        summary = await mirror(url, tmp_path, download__attempts=2)
    assert summary.exit_code == 1 and summary.failed == 4 and summary.done == len(ids) - 4
    m = manifest(tmp_path).set_index("experiment_id")
    reasons = {eid: m.loc[eid, "error"] for eid in bad}
    assert "no energy.raw" in reasons[100013]
    assert "header says 637304" in reasons[100026]
    assert "not a valid zip" in reasons[100039]
    assert "HTTP 404" in reasons[100052] and "/grid_data/download/100052" in reasons[100052]
    for eid in bad:
        assert m.loc[eid, "status"] == "failed" and not isinstance(m.loc[eid, "path"], str)
        assert not list((tmp_path / "coronal").glob(f"*_{eid}.mnc"))


async def test_a_failed_catalogue_query_stops_the_run_with_exit_4_and_writes_nothing(tmp_path):
    async with serve(ReplicaConfig(n_coronal=5, catalog_fail=True)) as (rep, url):
        summary = await mirror(url, tmp_path)
        assert rep.stats.grid_requests == {} or sum(rep.stats.grid_requests.values()) == 0
    assert summary.exit_code == 4 and "catalogue query failed" in summary.error
    assert not (tmp_path / "coronal").exists() or not list((tmp_path / "coronal").iterdir())


async def test_duplicate_rows_are_merged_and_invalid_rows_reported(tmp_path):
    extra = [{"experiment_id": -7, "gene": "Gad1", "plane": "coronal"},
             {"experiment_id": 900002, "gene": "Avp", "plane": "coronal"}]
    async with serve(ReplicaConfig(n_coronal=6, n_sagittal=0, extra_rows=extra, duplicate_ids=(900002,))) as (rep, url):
        summary = await mirror(url, tmp_path)
        assert rep.stats.grid_requests[900002] == 1 and rep.stats.grid_requests.get(-7, 0) == 0
    assert summary.invalid == 1 and summary.exit_code == 0
    m = manifest(tmp_path).set_index("experiment_id")
    assert m.loc[-7, "status"] == "invalid" and "no valid experiment_id" in m.loc[-7, "error"]
    assert m.loc[900002, "status"] == "done"
    assert len(list((tmp_path / "coronal").glob("*_900002.mnc"))) == 1


async def test_state_records_what_produced_each_file(tmp_path):
    async with serve(ReplicaConfig(n_coronal=3, n_sagittal=0)) as (_, url):
        await mirror(url, tmp_path, convert__dtype="float")
    db = sqlite3.connect(tmp_path / ".ambasync" / "state.sqlite")
    rows = db.execute("SELECT status, settings, zip_sha256, zip_size FROM experiments").fetchall()
    assert {r[0] for r in rows} == {"done"} and {r[1] for r in rows} == {"RAS/MICe/x1/float"}
    assert all(len(r[2]) == 64 and r[3] > 100_000 for r in rows)
