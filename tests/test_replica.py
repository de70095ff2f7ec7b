"""The replica must behave like the real API (allen-api.md), or tests against it prove nothing."""

import asyncio
import io
import json
import zipfile

import aiohttp
import numpy as np
import pandas as pd
import pytest

from ambasync.mirror.catalog import COLUMNS, grid_url, query_url
from ambasync.replica import REAL_IDS, ReplicaConfig, serve
from helpers import REAL_ZIPS, require_reference

pytestmark = pytest.mark.e2e  # real runs, servers or clusters: make test-fast leaves these out


async def get(url: str, **kw):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20, **kw)) as s:
        async with s.get(aiohttp.client.URL(url, encoded=True)) as r:
            return r.status, dict(r.headers), await r.read()


async def test_catalogue_envelope_paging_and_totals():
    async with serve(ReplicaConfig(n_coronal=30, n_sagittal=7)) as (_, url):
        status, _, body = await get(query_url(url, "coronal", 10, 8))
        doc = json.loads(body)
        assert status == 200 and doc["success"] is True
        assert doc["start_row"] == 10 and doc["num_rows"] == 8 and doc["total_rows"] == 32
        assert list(doc["msg"][0]) == list(COLUMNS)
        ids = [r["experiment_id"] for r in doc["msg"]]
        assert ids == sorted(ids)
        _, _, body = await get(query_url(url, "sagittal", 0, 50))
        assert {r["plane"] for r in json.loads(body)["msg"]} == {"sagittal"}
        _, _, body = await get(query_url(url, "coronal", 0, 50).replace("num_rows=50", "num_rows=all"))
        assert json.loads(body)["num_rows"] == 32
        _, _, body = await get(query_url(url, "coronal", 0, 50).replace("&num_rows=50", ""))
        assert json.loads(body)["num_rows"] == 32  # default page of 50
        assert any(r["entrez_id"] is None for r in json.loads(body)["msg"])  # nulls, as upstream


async def test_csv_has_the_header_and_empty_nulls():
    async with serve(ReplicaConfig(n_coronal=12, n_sagittal=0)) as (_, url):
        status, _, body = await get(query_url(url, "coronal", 0, 100, fmt="csv"))
    assert status == 200 and not body.startswith(b"\xef\xbb\xbf")
    frame = pd.read_csv(io.BytesIO(body))
    assert list(frame.columns) == list(COLUMNS) and len(frame) == 14
    assert frame["entrez_id"].isna().any()


async def test_failed_query_says_so_in_the_envelope_with_a_string_msg():
    async with serve(ReplicaConfig(catalog_fail=True)) as (_, url):
        status, _, body = await get(query_url(url, "coronal", 0, 5))
    doc = json.loads(body)
    assert status == 200 and doc["success"] is False and isinstance(doc["msg"], str)


async def test_grid_zip_is_laid_out_like_a_real_download():
    require_reference()
    async with serve(ReplicaConfig(n_coronal=3, n_sagittal=0)) as (rep, url):
        eid = rep.rows[0]["experiment_id"]
        status, _, body = await get(grid_url(url, eid))
        zf = zipfile.ZipFile(io.BytesIO(body))
        assert [i.filename for i in zf.infolist()] == ["data_set.xml", "energy.raw", "energy.mhd"]
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in zf.infolist())
        real = zipfile.ZipFile(REAL_ZIPS[74272479])
        assert zf.read("energy.mhd") == real.read("energy.mhd")
        assert len(zf.read("energy.raw")) == 637304
        np.testing.assert_array_equal(np.frombuffer(zf.read("energy.raw"), "<f4").reshape(58, 41, 67), rep.raw_grid(eid))
        grid = rep.raw_grid(eid)
        assert 0.2 < (grid == -1).mean() < 0.5 and (grid == 0).any()
        for real_id, path in REAL_ZIPS.items():
            _, _, body = await get(grid_url(url, real_id))
            assert body == path.read_bytes()
        _, _, body = await get(grid_url(url, eid, ("energy", "density", "intensity")))
        assert zipfile.ZipFile(io.BytesIO(body)).namelist() == [
            "energy.raw", "energy.mhd", "density.raw", "density.mhd", "intensity.raw", "intensity.mhd"]
        status, _, _ = await get(grid_url(url, 1))
        assert status == 404


async def test_faults_are_deterministic_and_each_kind_is_what_a_client_sees():
    cfg = dict(n_coronal=20, n_sagittal=0, seed=5, fault_rate=0.5, stall_seconds=2.0, retry_after=0.5)

    async def statuses():
        async with serve(ReplicaConfig(**cfg)) as (rep, url):
            seen = []
            for row in rep.rows[:12]:
                try:
                    status, headers, body = await get(grid_url(url, row["experiment_id"]), sock_read=0.5)
                    seen.append((status, headers.get("Retry-After"), len(body)))
                except (aiohttp.ClientPayloadError, asyncio.TimeoutError, aiohttp.ServerDisconnectedError) as exc:
                    seen.append(type(exc).__name__)
            return seen, dict(rep.stats.faults)

    first, faults = await statuses()
    second, _ = await statuses()
    assert first == second and sum(faults.values()) >= 3
    assert any(s[0] == 429 and s[1] == "0.5" for s in first if isinstance(s, tuple))


@pytest.mark.parametrize("kind, check", [
    ("drop", lambda r: r in ("ClientPayloadError", "ServerDisconnectedError")),
    ("stall", lambda r: r == "TimeoutError"),
    ("truncate", lambda r: isinstance(r, bytes) and not zipfile.is_zipfile(io.BytesIO(r))),
    ("503", lambda r: r == 503),
])
async def test_each_fault_kind(kind, check):
    async with serve(ReplicaConfig(n_coronal=1, n_sagittal=0, fault_rate=1.0, fault_kinds=(kind,),
                                   stall_seconds=2.0)) as (rep, url):
        try:
            status, _, body = await get(grid_url(url, rep.rows[0]["experiment_id"]), sock_read=0.5)
            result = body if status == 200 else status
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
            result = type(exc).__name__
        except asyncio.TimeoutError:
            result = "TimeoutError"
    assert check(result), result


async def test_connection_limit_answers_429_beyond_it_and_stats_are_served():
    async with serve(ReplicaConfig(n_coronal=2, n_sagittal=0, max_connections=1, latency_ms=200)) as (rep, url):
        ids = [r["experiment_id"] for r in rep.rows[:2]]
        results = await asyncio.gather(*(get(grid_url(url, i)) for i in ids))
        assert sorted(r[0] for r in results) == [200, 429]
        _, _, body = await get(f"{url}/replica/stats")
        stats = json.loads(body)
        assert stats["over_limit_429"] == 1 and sum(stats["grid_requests"].values()) == 2


def test_atlas_scale_catalogue_builds_fast_enough_to_serve():
    from ambasync.replica import Replica

    rep = Replica(ReplicaConfig(n_coronal=4343, n_sagittal=21733))
    assert len(rep.rows) == 26078 and len({r["experiment_id"] for r in rep.rows}) == 26078
    assert set(REAL_IDS) <= {r["experiment_id"] for r in rep.rows}
