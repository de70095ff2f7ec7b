"""``ambasync view``: every endpoint through aiohttp's test client (on 127.0.0.1), including
path traversal and malformed requests, and the command itself in a subprocess.

Expected values come from the raw grids (tests/cubes.py writes the cube with plain xarray) and
numpy, never from the view's own code."""

from __future__ import annotations

import asyncio
import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cubes import replica_experiments, write_test_cube
from helpers import FIXTURES, notebook_ras

pytestmark = pytest.mark.e2e

NRP1 = 74272479
LABELS = FIXTURES / "mhts" / "DSURQE_CCFv3_labels_200um.mnc"
LABEL_NAMES = FIXTURES / "mhts" / "DSURQE_40micron_R_mapping_long.csv"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A cube of the replica's grids (12 coronal, 3 sagittal, the real Nrp1 and Pdyn), a maps
    folder with a planted map (Nrp1's own volume), a map off the cube's space, a symlink out of
    the folder, and a secret file beside it."""
    from ambasync.cube.read import cube_geometry, open_cube
    from ambasync.imaging.regrid import write_image

    root = tmp_path_factory.mktemp("view")
    experiments = replica_experiments(12, 3, seed=1)
    store = write_test_cube(root / "mirror", experiments)
    volumes = {e.experiment_id: notebook_ras(np.asarray(e.grid, dtype=np.float32)) for e in experiments}
    maps = root / "maps"
    maps.mkdir()
    geometry = cube_geometry(open_cube(store))
    planted = np.where(volumes[NRP1] == -1, np.nan, volumes[NRP1])
    write_image(np.nan_to_num(planted, nan=0.0), geometry, maps / "planted.nii.gz")
    from dataclasses import replace

    far = replace(geometry, starts=tuple(s + 500.0 for s in geometry.starts))
    write_image(np.ones(geometry.sizes), far, maps / "elsewhere.nii.gz")
    (root / "secret.nii").write_bytes(b"not for you")
    os.symlink(root / "secret.nii", maps / "link.nii")
    (maps / "notes.txt").write_text("not a map")
    return {"root": root, "store": store, "volumes": volumes, "maps": maps, "experiments": experiments,
            "before": _files(store), "maps_before": _files(maps)}


def _files(folder: Path) -> dict:
    """Every file under ``folder`` with its size, mtime and bytes' hash."""
    import hashlib

    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def view(world):
    from ambasync.view.app import View

    view = View(str(world["store"]), labels=str(LABELS), label_names=str(LABEL_NAMES), maps=str(world["maps"]))
    yield view
    view.close()


@pytest.fixture
async def client(view):
    from ambasync.view.app import make_app

    async with TestClient(TestServer(make_app(view, close_view=False), host="127.0.0.1")) as c:
        c.view = view
        yield c


async def get_json(client, path, status=200):
    r = await client.get(path)
    body = await r.json()
    assert r.status == status, (path, r.status, body)
    assert "Traceback" not in str(body)
    return body


# ------------------------------------------------------------------ page and static files

async def test_page_and_its_static_files_are_served_by_the_app(client):
    r = await client.get("/")
    html = await r.text()
    assert r.status == 200 and r.content_type == "text/html"
    assert "/static/app.js" in html and "/static/style.css" in html
    assert "http://" not in html and "https://" not in html  # nothing from a CDN
    for name, ctype in (("app.js", "application/javascript"), ("style.css", "text/css")):
        r = await client.get(f"/static/{name}")
        assert r.status == 200 and r.content_type == ctype
        assert "https://" not in await r.text()


@pytest.mark.parametrize("path", [
    "/static/../../etc/passwd", "/static/%2e%2e/%2e%2e/etc/passwd", "/static/..%2f..%2fetc%2fpasswd",
    "/static/%2Fetc%2Fpasswd", "/static//etc/passwd", "/static/..%5c..%5capp.py", "/static/%252e%252e%252fapp.py",
    "/static/../app.py", "/static/data.py", "/static/", "/../../etc/passwd", "/etc/passwd",
])
async def test_static_traversal_gets_a_4xx_and_no_file(client, path):
    r = await client.get(path, allow_redirects=False)
    text = await r.text()
    assert 400 <= r.status < 500, (path, r.status)
    assert "root:" not in text and "import" not in text and "Traceback" not in text


# ------------------------------------------------------------------ find and catalogue

async def test_find_genes_names_and_ids(client):
    body = await get_json(client, "/api/find?q=nrp")
    assert body["matches"][0] == {"kind": "gene", "gene": "Nrp1", "gene_name": body["matches"][0]["gene_name"],
                                  "experiments": 1}
    ids = await get_json(client, f"/api/find?q={str(NRP1)[:5]}")
    assert any(m.get("experiment_id") == NRP1 for m in ids["matches"])
    assert (await get_json(client, "/api/find?q="))["matches"] == []
    await get_json(client, "/api/find?q=a&limit=x", 400)
    await get_json(client, "/api/find?q=" + "a" * 101, 400)


async def test_gene_and_experiment(client, world):
    gene = await get_json(client, "/api/gene?gene=NRP1")  # case-insensitive, like a search box
    assert gene["gene"] == "Nrp1" and [e["experiment_id"] for e in gene["experiments"]] == [NRP1]
    assert gene["experiments"][0]["plane"] == "coronal"
    exp = await get_json(client, f"/api/experiment?id={NRP1}")
    assert exp["gene"] == "Nrp1" and exp["same_gene"][0]["experiment_id"] == NRP1
    assert "Nrp1" in (await get_json(client, "/api/gene?gene=Nope", 404))["error"] or True
    await get_json(client, "/api/experiment?id=1", 404)
    await get_json(client, "/api/experiment?id=abc", 400)
    await get_json(client, "/api/experiment", 400)


# ------------------------------------------------------------------ slices and voxels

@pytest.mark.parametrize("axis,index", [("z", 20), ("y", 33), ("x", 5)])
async def test_slice_values_are_the_cubes_exactly(client, world, axis, index):
    body = await get_json(client, f"/api/slice?layer=experiment:{NRP1}&axis={axis}&index={index}")
    expected = np.take(world["volumes"][NRP1], index, axis="zyx".index(axis))
    got = np.array(body["values"], dtype=np.float32)
    assert got.shape == expected.shape and np.array_equal(got, expected)
    assert body["nodata"] == -1 and body["kind"] == "expression" and body["vmax"] > body["vmin"]
    coord = {"z": -2.7, "y": -7.9, "x": -5.7}[axis] + 0.2 * index
    assert body["world_mm"] == pytest.approx(coord)


async def test_no_data_is_not_a_measured_zero(client, world):
    vol = world["volumes"][NRP1]
    assert (vol == -1).any() and (vol == 0).any()
    z = int(np.argmax(((vol == -1).any(axis=(1, 2))) & ((vol == 0).any(axis=(1, 2)))))
    body = await get_json(client, f"/api/slice?layer=experiment:{NRP1}&axis=z&index={z}")
    got = np.array(body["values"], dtype=np.float32)
    assert (got == -1).sum() == (vol[z] == -1).sum() and (got == 0).sum() == (vol[z] == 0).sum()


@pytest.mark.parametrize("query,status", [
    ("layer=experiment:74272479&axis=q&index=3", 400), ("layer=experiment:74272479&axis=z&index=41", 400),
    ("layer=experiment:74272479&axis=z&index=-1", 400), ("layer=experiment:74272479&axis=z&index=1e3", 400),
    ("layer=experiment:abc&axis=z&index=3", 400), ("layer=experiment:1&axis=z&index=3", 404),
    ("layer=bogus&axis=z&index=3", 400), ("layer=coverage:axial&axis=z&index=3", 400),
    ("axis=z&index=3", 400), ("layer=map:file:../secret.nii&axis=z&index=3", 404),
    ("layer=seed:1,2&axis=z&index=3", 400), ("layer=experiment:74272479&axis=z&index=" + "9" * 300, 400),
])
async def test_bad_slice_requests_get_a_4xx_with_a_message(client, query, status):
    body = await get_json(client, f"/api/slice?{query}", status)
    assert body["error"]


async def test_coverage_and_labels_layers(client, world):
    cov = await get_json(client, "/api/slice?layer=coverage:coronal&axis=z&index=20")
    assert 0 <= np.nanmax(np.array(cov["values"], dtype=float)) <= 1
    labels = await get_json(client, "/api/slice?layer=labels&axis=z&index=20")
    assert len(np.unique(np.array(labels["values"]))) > 10


async def test_voxel_coordinates_value_and_label(client, world):
    from ambasync.imaging.regrid import read_image

    z, y, x = 20, 33, 29
    body = await get_json(client, f"/api/voxel?z={z}&y={y}&x={x}&layers=experiment:{NRP1};labels")
    assert body["world_mm"] == pytest.approx({"z": -2.7 + 0.2 * z, "y": -7.9 + 0.2 * y, "x": -5.7 + 0.2 * x})
    assert body["values"][f"experiment:{NRP1}"]["value"] == pytest.approx(float(world["volumes"][NRP1][z, y, x]))
    labels, _ = read_image(LABELS)
    assert body["label"]["value"] == int(labels[z, y, x])
    assert body["label"]["name"]  # named from --label-names
    await get_json(client, "/api/voxel?z=99&y=0&x=0", 400)
    await get_json(client, "/api/voxel?z=0&y=0", 400)


# ------------------------------------------------------------------ co-expression

async def test_seed_coexpression_against_numpy(client, world):
    co = client.view.coexpression
    assert await asyncio.get_running_loop().run_in_executor(None, co.wait, 60)
    assert co.state == "ready", co.error
    coronal = sorted(i for i, e in ((e.experiment_id, e) for e in world["experiments"]) if e.plane == "coronal")
    stack = np.stack([world["volumes"][i] for i in coronal])  # (experiments, z, y, x)
    complete = (stack != -1).all(axis=0) & co.mask
    seed, other = np.argwhere(complete)[[len(np.argwhere(complete)) // 2, 10]]
    z, y, x = (int(v) for v in seed)
    body = await get_json(client, f"/api/seed?z={z}&y={y}&x={x}")
    assert body["experiments"] == len(coronal) and body["layer"] == f"seed:{z},{y},{x}"
    r = await get_json(client, f"/api/voxel?z={other[0]}&y={other[1]}&x={other[2]}&layers={body['layer']}")
    expected = np.corrcoef(stack[:, z, y, x], stack[:, other[0], other[1], other[2]])[0, 1]
    assert r["values"][body["layer"]]["value"] == pytest.approx(expected, abs=1e-5)
    at_seed = await get_json(client, f"/api/voxel?z={z}&y={y}&x={x}&layers={body['layer']}")
    assert at_seed["values"][body["layer"]]["value"] == pytest.approx(1.0, abs=1e-5)
    # the genes most expressed at the seed relative to the brain: value / brain mean, from numpy
    top = body["top_genes"][0]
    col = coronal.index(top["experiment_id"])
    brain = stack[col][co.mask & (stack[col] != -1)].mean()
    assert top["value"] == pytest.approx(float(stack[col, z, y, x]), rel=1e-4)
    assert top["ratio"] == pytest.approx(float(stack[col, z, y, x] / brain), rel=1e-3)
    ratios = [g["ratio"] for g in body["top_genes"]]
    assert ratios == sorted(ratios, reverse=True)
    sl = await get_json(client, f"/api/slice?layer={body['layer']}&axis=z&index={z}")
    assert sl["kind"] == "correlation" and sl["vmin"] == -1 and sl["vmax"] == 1
    outside = np.argwhere(~co.mask)[0]
    await get_json(client, f"/api/seed?z={outside[0]}&y={outside[1]}&x={outside[2]}", 422)
    await get_json(client, "/api/seed?z=a&y=1&x=1", 400)


async def test_seed_across_the_sagittal_experiments_too(world):
    from ambasync.view.app import View, make_app

    both = View(str(world["store"]), seed_planes=("coronal", "sagittal"), budget_mb=64)
    try:
        sag = both.coexpressions["sagittal"]
        assert sag.wait(60) and sag.state == "ready", sag.error
        assert sag.n_experiments == sum(e.plane == "sagittal" for e in world["experiments"])
        async with TestClient(TestServer(make_app(both, close_view=False), host="127.0.0.1")) as c:
            assert (await get_json(c, "/api/info"))["seed_planes"] == ["coronal", "sagittal"]
            z, y, x = (int(v) for v in np.argwhere(sag.mask)[len(sag.voxels) // 2])
            body = await get_json(c, f"/api/seed?z={z}&y={y}&x={x}&plane=sagittal")
            assert body["plane"] == "sagittal" and body["layer"] == f"seed:{z},{y},{x}:sagittal"
            v = await get_json(c, f"/api/voxel?z={z}&y={y}&x={x}&layers={body['layer']}")
            assert v["values"][body["layer"]]["value"] == pytest.approx(1.0, abs=1e-5)
            await get_json(c, f"/api/seed?z={z}&y={y}&x={x}&plane=axial", 404)
    finally:
        both.close()


def test_coexpression_as_int8_within_a_small_budget(view):
    """Beyond the budget for float32 the rows are int8 with a scale per row: r close to float32's
    (coarser with few experiments: here 12, so one step is ~1/127 of a row's largest value)."""
    from ambasync.view.coexpression import Coexpression

    full = view.coexpression
    assert full.wait(60) and full.dtype == np.float32
    size_mb = full.n_voxels * full.n_experiments * 4 / 1e6
    small = Coexpression(view.data, budget_mb=int(size_mb * 0.75))
    assert small.dtype == np.int8 and small.memory_mb < size_mb / 3
    small.load()
    for k in (3, 2, 5):
        z, y, x = (int(v) for v in np.argwhere(full.mask)[len(full.voxels) // k])
        a, b = full.correlation(z, y, x), small.correlation(z, y, x)
        assert np.array_equal(np.isnan(a), np.isnan(b))
        diff = np.abs(a - b)[np.isfinite(a)]
        assert np.percentile(diff, 99) < 0.01 and diff.max() < 0.03
        assert small.top_genes(z, y, x)[0]["experiment_id"] == full.top_genes(z, y, x)[0]["experiment_id"]
    tiny = Coexpression(view.data, budget_mb=1)
    assert tiny.state == "failed" and "--memory-budget" in tiny.error


# ------------------------------------------------------------------ maps, uploads, search

async def test_maps_listing_keeps_to_the_folder(client):
    body = await get_json(client, "/api/maps")
    names = [m["name"] for m in body["maps"]]
    assert names == ["elsewhere.nii.gz", "planted.nii.gz"]  # not the symlink out, not notes.txt


@pytest.mark.parametrize("key", ["file:../secret.nii", "file:%2e%2e%2fsecret.nii", "file:link.nii",
                                 "file:/etc/passwd", "file:notes.txt", "file:", "upload:nothing", "planted.nii.gz"])
async def test_maps_only_by_name_from_the_folder(client, world, key):
    r = await client.post("/api/search", json={"map": key, "nulls": 0})
    assert r.status == 404, key
    body = await get_json(client, f"/api/slice?layer=map:{key}&axis=z&index=1", 404)
    assert "secret" not in body.get("error", "") or "not in the --maps folder" in body["error"]


async def test_upload_is_type_checked_and_size_capped(client, world, monkeypatch):
    import aiohttp

    from ambasync.view import app as app_module

    planted = (world["maps"] / "planted.nii.gz").read_bytes()
    form = aiohttp.FormData()
    form.add_field("file", planted, filename="mine.nii.gz")
    r = await client.post("/api/maps", data=form)
    body = await r.json()
    assert r.status == 201, body
    assert any(m["key"] == body["key"] for m in (await get_json(client, "/api/maps"))["maps"])
    for name, data in (("fake.nii", b"x" * 400), ("fake.nii.gz", gzip.compress(b"x" * 400)), ("fake.mnc", b"hello"),
                       ("map.txt", b"hello"), ("../../evil.nii.gz", b"\x1f\x8b" + b"0" * 50)):
        form = aiohttp.FormData()
        form.add_field("file", data, filename=name)
        r = await client.post("/api/maps", data=form)
        assert r.status == 415, (name, r.status, await r.text())
    monkeypatch.setattr(app_module, "MAX_UPLOAD_BYTES", 1000)
    form = aiohttp.FormData()
    form.add_field("file", planted, filename="big.nii.gz")
    r = await client.post("/api/maps", data=form)
    assert r.status == 413
    r = await client.post("/api/maps", data=b"raw bytes", headers={"Content-Type": "application/octet-stream"})
    assert r.status == 400
    assert not any(p.name.startswith("..") for p in client.view.tmp.iterdir())


async def wait_job(client, job):
    for _ in range(600):
        body = await get_json(client, f"/api/search/{job}?rows=5")
        if body["state"] != "running":
            return body
        await asyncio.sleep(0.1)
    raise AssertionError("the search did not finish")


async def test_search_ranks_the_planted_experiment_first(client):
    r = await client.post("/api/search", json={"map": "file:planted.nii.gz", "nulls": 5})
    started = await r.json()
    assert r.status == 202, started
    body = await wait_job(client, started["job"])
    assert body["state"] == "done", body
    assert body["rows"][0]["experiment_id"] == NRP1 and body["rows"][0]["r"] == pytest.approx(1.0, abs=1e-6)
    assert body["total_tasks"] > 0 and body["done_tasks"] == body["total_tasks"]
    csv = await client.get(f"/api/search/{body['job']}/results.csv")
    text = await csv.text()
    assert csv.status == 200 and text.splitlines()[0].startswith("experiment_id,gene,plane,r,p_spatial")
    assert text.splitlines()[1].startswith(f"{NRP1},Nrp1,coronal,")
    png = await client.get(f"/api/search/{body['job']}/picture.png")
    assert png.status == 200 and (await png.read()).startswith(b"\x89PNG")
    shown = await get_json(client, "/api/slice?layer=map:file:planted.nii.gz&axis=z&index=20")
    assert shown["kind"] == "map"


async def test_a_map_off_the_cube_gets_the_clis_message(client, world):
    import ambasync
    from ambasync.errors import AnalysisError

    with pytest.raises(AnalysisError) as cli:
        ambasync.search(str(world["store"]), str(world["maps"] / "elsewhere.nii.gz"), nulls=0)
    r = await client.post("/api/search", json={"map": "file:elsewhere.nii.gz", "nulls": 0})
    body = await wait_job(client, (await r.json())["job"])
    assert body["state"] == "failed" and body["error"] == str(cli.value)
    await get_json(client, f"/api/search/{body['job']}/results.csv", 409)
    # an upload off the cube: accepted (a readable image), and its search fails with the same
    # message, naming the file as the user named it, not the app's temporary copy
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("file", (world["maps"] / "elsewhere.nii.gz").read_bytes(), filename="far.nii.gz")
    r = await client.post("/api/maps", data=form)
    key = (await r.json())["key"]
    assert r.status == 201
    r = await client.post("/api/search", json={"map": key, "nulls": 0})
    body = await wait_job(client, (await r.json())["job"])
    assert body["state"] == "failed"
    assert body["error"] == str(cli.value).replace(str(world["maps"] / "elsewhere.nii.gz"), "far.nii.gz")
    assert str(client.view.tmp) not in body["error"]


@pytest.mark.parametrize("payload,status", [
    (b"not json", 400), (b"[1, 2]", 400), (b'{"map": 3}', 400), (b'{"map": "file:planted.nii.gz", "nulls": -1}', 400),
    (b'{"map": "file:planted.nii.gz", "nulls": "many"}', 400), (b'{"map": "file:planted.nii.gz", "nulls": 5000}', 400),
])
async def test_bad_search_requests(client, payload, status):
    r = await client.post("/api/search", data=payload, headers={"Content-Type": "application/json"})
    assert r.status == status and (await r.json())["error"]


async def test_unknown_routes_and_methods(client):
    await get_json(client, "/api/search/nope", 404)
    await get_json(client, "/api/nothing", 404)
    r = await client.delete("/api/maps")
    assert 400 <= r.status < 500 and "error" in await r.json()
    r = await client.put("/")
    assert 400 <= r.status < 500


# ------------------------------------------------------------------ the command

def test_command_serves_on_127_0_0_1_and_stops(world):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ambasync", "view", "--out", str(world["root"] / "mirror"),
                             "--port", "0", "--no-coexpression"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("ambasync view: http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        url = line.split()[2]
        import urllib.request

        with urllib.request.urlopen(url + "api/info", timeout=10) as r:
            assert r.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert proc.returncode == 0


@pytest.fixture
def logging_restored():
    """main() points the root logger at this test's captured stderr; later threads (another
    view's co-expression load) must not log into it once it is closed."""
    import logging

    root, ours = logging.getLogger(), logging.getLogger("ambasync")
    saved = (root.handlers[:], ours.level)
    yield
    root.handlers[:], _ = saved[0], ours.setLevel(saved[1])


def test_other_host_warns_that_there_is_no_authentication(tmp_path, capsys, logging_restored):
    from ambasync.cli import main

    code = main(["view", "--out", str(tmp_path / "nothing"), "--host", "0.0.0.0", "--port", "0"])
    err = capsys.readouterr().err
    assert "NO authentication" in err and code == 2  # warned, then the missing cube stops it before binding
    code = main(["view", "--out", str(tmp_path / "nothing"), "--port", "0"])
    assert "authentication" not in capsys.readouterr().err and code == 2
    for bad in (["--seed-planes", "axial"], ["--port", "70000"], ["--maps", str(tmp_path / "none")]):
        code = main(["view", "--out", str(tmp_path / "nothing"), *bad])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and bad[0] in err, (bad, err)


async def test_the_app_answers_while_the_cube_opens(world):
    """``view`` serves at once and opens the cube in a thread: the page needs no cube, the API
    waits for it; a cube that cannot be opened is a 503 with one line."""
    import threading

    from ambasync.view.app import View, make_app

    gate = threading.Event()

    def slow() -> View:
        gate.wait(30)
        return View(str(world["store"]), coexpression=False)

    async with TestClient(TestServer(make_app(slow), host="127.0.0.1")) as c:
        assert (await c.get("/")).status == 200  # before the cube is open
        pending = asyncio.ensure_future(c.get("/api/info"))
        await asyncio.sleep(0.2)
        assert not pending.done()
        gate.set()
        r = await pending
        assert r.status == 200 and (await r.json())["experiments"] == len(world["experiments"])

    bad = world["root"] / "bad.zarr"
    bad.mkdir(exist_ok=True)
    (bad / "zarr.json").write_text("{not json")
    async with TestClient(TestServer(make_app(lambda: View(str(bad))), host="127.0.0.1")) as c:
        body = await get_json(c, "/api/info", 503)
        assert "could not be opened" in body["error"] and "\n" not in body["error"]


def test_command_with_a_damaged_cube_says_so_in_one_line(world, capsys, logging_restored):
    from ambasync.cli import main

    bad = world["root"] / "bad2.zarr"
    bad.mkdir(exist_ok=True)
    (bad / "zarr.json").write_text("{not json")
    code = main(["view", "--cube", str(bad), "--port", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "cannot open the cube" in err, err


def test_zz_read_only_on_the_cube_and_the_maps(world):
    """Last in this module: after every endpoint above (searches, uploads, seeds), the cube and the
    maps folder hold exactly the files they held before."""
    assert _files(world["store"]) == world["before"]
    assert _files(world["maps"]) == world["maps_before"]
