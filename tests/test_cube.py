"""The exact expression cube ({out}/cube.zarr), read back the way users read it: xarray.open_zarr.

Expected values are computed here from the raw grids with plain numpy (helpers.notebook_ras),
never by the code under test. Stores are small (a block of 8 experiments) so the voxel-major
copy's blocks are exercised with few experiments.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from ambasync.cube import (Cube, CubeSettings, CubeSettingsError, CubeWriter, ZipSource, build_from_zips, cube_summary, slot_sha256)
from ambasync.replica import Replica, ReplicaConfig
from ambasync.settings import ConvertSettings
from ambasync.target import Target

from helpers import REAL_ZIPS, notebook_ras, raw_from_zip, require_reference

pytestmark = pytest.mark.e2e  # real runs, servers or clusters: make test-fast leaves these out

# Small voxel-major blocks and chunks: several blocks with few experiments, and a fast suite.
SETTINGS = CubeSettings(block=8, by_voxel_chunk=(16, 32, 32))
REAL_FIELDS = {74272479: {"gene": "Nrp1", "plane": "coronal", "gene_name": "neuropilin 1", "entrez_id": 18186},
               71717084: {"gene": "Pdyn", "plane": "coronal", "gene_name": "prodynorphin", "entrez_id": None}}


def replica_sources(folder: Path, n_coronal: int, n_sagittal: int = 0, seed: int = 0) -> list[ZipSource]:
    """Replica zips on disk (exactly what the replica serves) and their catalogue rows."""
    replica = Replica(ReplicaConfig(n_coronal=n_coronal, n_sagittal=n_sagittal, seed=seed, real_dir="/nonexistent"))
    folder.mkdir(parents=True, exist_ok=True)
    sources = []
    for row in replica.rows:
        path = folder / f"{row['experiment_id']}-{seed}.zip"
        path.write_bytes(replica.zip_for(row["experiment_id"]))
        sources.append(ZipSource(row["experiment_id"], str(path), row))
    return sources


def real_sources() -> list[ZipSource]:
    require_reference()
    return [ZipSource(eid, str(path), REAL_FIELDS[eid]) for eid, path in REAL_ZIPS.items()]


def expected(source: ZipSource) -> np.ndarray:
    """The notebook's reorientation of the zip's energy.raw (the MINC files' voxel order)."""
    return notebook_ras(raw_from_zip(Path(source.path)))


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype="<f4").view("<u4")


def assert_exact(ds: xr.Dataset, sources: list[ZipSource]) -> None:
    ids = [int(e) for e in ds.experiment.values]
    assert sorted(ids) == sorted(s.experiment_id for s in sources)
    by_voxel = ds.expression_by_voxel.values  # read once: (z, y, x, experiment)
    for s in sources:
        want = expected(s)
        got = ds.expression.sel(experiment=s.experiment_id).values
        assert np.array_equal(bits(got), bits(want)), f"experiment {s.experiment_id} differs from its energy.raw"
        profile = by_voxel[..., ids.index(s.experiment_id)]
        assert np.array_equal(bits(profile), bits(want)), f"voxel-major copy of {s.experiment_id} differs"


def snapshot(store: Path) -> dict[str, tuple[int, str]]:
    """Every file of the store: (mtime_ns, sha256)."""
    out = {}
    for root, _, files in os.walk(store):
        for name in files:
            p = Path(root) / name
            out[str(p.relative_to(store))] = (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def slot_of(store: Path, experiment_id: int) -> int:
    """The experiment's published slot, from the store's member table."""
    from ambasync.cube.kv import KV
    from ambasync.cube.slots import read_members

    for slot, member in read_members(KV.open(store)).items():
        if member.experiment_id == experiment_id:
            return slot
    raise AssertionError(f"{experiment_id} has no slot")


def test_cube_holds_the_exact_allen_values_bit_for_bit(tmp_path):
    """A user's `ds.expression.sel(experiment=id)` is exactly the Allen grid, -1 and measured 0 included."""
    sources = real_sources() + replica_sources(tmp_path / "zips", 5, 3)
    result = build_from_zips(tmp_path / "out" / "cube.zarr", SETTINGS, sources, workers=2, quiet=True)
    assert result.failed == () and result.written == len(sources)
    ds = xr.open_zarr(tmp_path / "out" / "cube.zarr")
    assert_exact(ds, sources)
    nrp1 = expected(sources[0])
    assert (nrp1 == 0).any() and (nrp1 == -1).any()  # the values that ushort files lose or keep
    assert ds.expression.dtype == np.float32 and ds.expression.dims == ("experiment", "zspace", "yspace", "xspace")
    # the state's record: sha256 of exactly the values a user reads
    by_id = {m.experiment_id: m for m in result.members}
    assert by_id[74272479].sha256 == hashlib.sha256(nrp1.astype("<f4").tobytes()).hexdigest()
    # catalogue coordinates (null -> -1), world coordinates in mm, attributes
    assert str(ds.gene.sel(experiment=74272479).values) == "Nrp1"
    assert int(ds.entrez_id.sel(experiment=71717084).values) == -1
    assert str(ds.plane.sel(experiment=sources[-1].experiment_id).values) == "sagittal"
    assert np.allclose(ds.zspace.values, -2.7 + 0.2 * np.arange(41))
    assert np.allclose(ds.xspace.values, -5.7 + 0.2 * np.arange(58))
    assert ds.yspace.attrs["units"] == "mm" and ds.yspace.attrs["direction_cosines"] == [0.0, 1.0, 0.0]
    assert (ds.attrs["orientation"], ds.attrs["space"], ds.attrs["format_version"]) == ("RAS", "MICe", 1)


def test_coverage_is_the_fraction_of_each_planes_experiments_with_data(tmp_path):
    """The "bin 0.8" masks labs make from coverage_coronal/sagittal match the raw grids."""
    sources = real_sources() + replica_sources(tmp_path / "zips", 4, 3)
    build_from_zips(tmp_path / "cube.zarr", SETTINGS, sources, workers=1, quiet=True)
    ds = xr.open_zarr(tmp_path / "cube.zarr")
    for plane in ("coronal", "sagittal"):
        grids = [expected(s) for s in sources if s.fields["plane"] == plane]
        want = np.mean([g != -1 for g in grids], axis=0)
        assert np.allclose(ds[f"coverage_{plane}"].values, want, rtol=0, atol=1e-6), plane


def test_output_writer_and_record_put_an_experiment_in_the_cube(tmp_path):
    """The run's path: slot before submit, CubeWriter in the worker, record after the Done."""
    Cube.open(tmp_path / "x" / "cube.zarr", CubeSettings())  # made once (with zarr), then opened by the run
    numpy_free = subprocess.run([sys.executable, "-c", (
        "import sys; from ambasync.cube import Cube, CubeSettings; "
        f"c = Cube.open({str(tmp_path / 'x' / 'cube.zarr')!r}, CubeSettings()); c.record(5, c.slot_for(5), "
        "{'energy': 'a' * 64}); print('numpy' in sys.modules)")], capture_output=True, text=True, check=True)
    assert numpy_free.stdout.strip() == "False"  # the run's event loop never imports numpy
    out = tmp_path / "out"
    cube = Cube.open(out / "cube.zarr", SETTINGS)
    writer = CubeWriter(ConvertSettings("RAS", "MICe", 1.0, "float"))
    source = real_sources()[0]
    slot = cube.slot_for(source.experiment_id)
    written = writer.write(expected(source), None, Target("energy", "cube.zarr", "cube", slot), out)
    assert written.sha256 == hashlib.sha256(expected(source).astype("<f4").tobytes()).hexdigest()
    cube.record(source.experiment_id, slot, {"energy": written.sha256}, source.fields)
    assert xr.open_zarr(out / "cube.zarr").sizes["experiment"] == 0  # nothing published yet: still opens
    cube.publish()
    assert_exact(xr.open_zarr(out / "cube.zarr"), [source])
    published = slot_of(out / "cube.zarr", source.experiment_id)
    assert slot_sha256(out / "cube.zarr", published, "energy") == written.sha256  # what verify checks
    shard = out / "cube.zarr" / "expression" / "c" / "0" / "0" / "0" / "0"  # the shard of slots 0-7
    shard.write_bytes(shard.read_bytes()[:1000])  # a damaged shard is noticed by verify
    assert slot_sha256(out / "cube.zarr", published, "energy") is None


def test_nightly_update_adds_changes_and_prunes_without_touching_the_rest(tmp_path):
    """A night with one new, one changed and one vanished experiment rewrites only those; a
    night with nothing new leaves every byte (and mtime) of the store as it was."""
    store = tmp_path / "cube.zarr"
    first = replica_sources(tmp_path / "a", 20)
    build_from_zips(store, SETTINGS, first, workers=1, quiet=True)
    before = snapshot(store)

    changed = replica_sources(tmp_path / "b", 20, seed=1)[12]  # same id, other grid
    added = replica_sources(tmp_path / "c", 21)[-1]
    vanished = first[17]
    night = [s for s in first if s.experiment_id not in (changed.experiment_id, vanished.experiment_id)]
    night += [changed, added]
    result = build_from_zips(store, SETTINGS, night, workers=1, prune=True, quiet=True)
    assert result.written == 2 and result.unchanged == len(night) - 2
    ds = xr.open_zarr(store)
    assert_exact(ds, night)
    assert vanished.experiment_id not in set(ds.experiment.values)

    after = snapshot(store)
    changed_slot = slot_of(store, changed.experiment_id)
    # Store layout 2 (sharded): the first block (slots 0-7: its volume-major shard and its
    # voxel-major shards) held neither the changed, the added nor the vanished experiment (slots 12
    # and 17): not one of its objects was rewritten.
    untouched_block = ["expression/c/0/0/0/0", ".ambasync/blocks/000000.npz"] + [
        k for k in before if k.startswith("expression_by_voxel/c/") and k.endswith("/0")]
    assert changed_slot == 12 and slot_of(store, added.experiment_id) == 17
    assert all(k in before and after[k] == before[k] for k in untouched_block)
    for s in night:  # untouched experiments kept their slots
        if s.experiment_id not in (changed.experiment_id, added.experiment_id):
            assert slot_of(store, s.experiment_id) == first.index(s)

    # a no-op night
    build_from_zips(store, SETTINGS, night, workers=1, prune=True, quiet=True)
    assert snapshot(store) == after


CHILD = """
import json, sys
from ambasync.cube import CubeSettings, ZipSource, build_from_zips
args = json.loads(sys.argv[1])
sources = [ZipSource(s[0], s[1], s[2]) for s in args["sources"]]
r = build_from_zips(args["store"], CubeSettings(block=8, by_voxel_chunk=(16, 32, 32)), sources, workers=1, writer=args["writer"], quiet=True, stage=args["stage"])
print(json.dumps({"members": len(r.members), "failed": r.failed}))
"""


def child(store: Path | str, sources: list[ZipSource], writer: str, stage: str | None = None) -> subprocess.Popen:
    args = {"store": str(store), "writer": writer, "stage": stage,
            "sources": [(s.experiment_id, s.path, s.fields) for s in sources]}
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def members_on_disk(store: Path) -> int:
    """Experiments staged by the workers so far (staged/{id}.{volume})."""
    staged = store / ".ambasync" / "staged"
    return sum(1 for _ in staged.glob("*.energy")) if staged.is_dir() else 0


@pytest.mark.parametrize("moment", ["writing", "publishing"])
def test_kill_9_leaves_a_cube_that_opens_and_the_next_build_completes_it(tmp_path, moment):
    """kill -9 while experiments are written, or while the shared parts are published: the store
    still opens, and the next build makes it complete and exact."""
    store = tmp_path / "cube.zarr"
    sources = replica_sources(tmp_path / "zips", 40)
    proc = child(store, sources, "killed")
    deadline = time.monotonic() + 120
    lease = store / ".ambasync" / "publish.lease"
    while time.monotonic() < deadline and proc.poll() is None:
        if (moment == "writing" and members_on_disk(store) >= 10) or (moment == "publishing" and lease.exists()):
            break
        time.sleep(0.002)
    assert proc.poll() is None, f"the build ended before the {moment} moment: {proc.communicate()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ds = xr.open_zarr(store)  # opens, whatever was happening
    assert ds.expression.shape[0] <= len(sources)
    result = build_from_zips(store, SETTINGS, sources, workers=1, quiet=True)
    assert result.failed == () and result.publish.empty_slots == 0
    assert_exact(xr.open_zarr(store), sources)


def test_two_shards_on_one_folder_make_one_complete_cube(tmp_path):
    """`--shard 0/2` and `--shard 1/2` writing one store at once give every experiment exactly once."""
    store = tmp_path / "cube.zarr"
    sources = replica_sources(tmp_path / "zips", 24, 8)
    shards = [child(store, [s for s in sources if s.experiment_id % 2 == k], f"shard {k}/2") for k in (0, 1)]
    for proc in shards:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    ds = xr.open_zarr(store)
    assert ds.sizes["experiment"] == len(sources)  # no empty or duplicate slot
    assert_exact(ds, sources)


@pytest.mark.filterwarnings("ignore:Consolidated metadata")  # the foreign store, written by plain xarray
def test_a_damaged_or_foreign_store_is_set_aside_and_rebuilt(tmp_path):
    """Whatever sits at cube.zarr is kept (renamed cube.zarr.damaged-…), never deleted or mixed in."""
    sources = real_sources()
    foreign = tmp_path / "a" / "cube.zarr"
    xr.Dataset({"x": ("i", np.arange(3))}).to_zarr(foreign, zarr_format=3)
    garbage = tmp_path / "b" / "cube.zarr"
    build_from_zips(garbage, SETTINGS, sources, workers=1, quiet=True)
    (garbage / "zarr.json").write_text("{not json")
    a_file = tmp_path / "c" / "cube.zarr"
    a_file.parent.mkdir()
    a_file.write_text("not a store")
    for store in (foreign, garbage, a_file):
        kept = snapshot(store) if store.is_dir() else {"": store.read_text()}
        result = build_from_zips(store, SETTINGS, sources, workers=1, quiet=True)
        aside = Path(result.set_aside_to)
        assert aside.name.startswith("cube.zarr.damaged-") and aside.parent == store.parent
        assert (snapshot(aside) if aside.is_dir() else {"": aside.read_text()}) == kept
        assert_exact(xr.open_zarr(store), sources)


def test_a_cube_written_with_other_settings_is_refused_or_replaced_with_force(tmp_path):
    """Never a mix of orientations: one line naming the store and --force (exit 2); --force keeps the old one."""
    store = tmp_path / "cube.zarr"
    sources = real_sources()
    build_from_zips(store, SETTINGS, sources, workers=1, quiet=True)
    before = snapshot(store)
    pir = CubeSettings(orientation="PIR", block=8)
    with pytest.raises(CubeSettingsError) as err:
        Cube.open(store, pir)
    assert err.value.exit_code == 2 and str(store) in str(err.value) and "--force" in str(err.value)
    assert "\n" not in str(err.value) and snapshot(store) == before
    result = build_from_zips(store, pir, sources, workers=1, force=True, quiet=True)
    assert Path(result.set_aside_to).name.startswith("cube.zarr.replaced-")
    assert snapshot(Path(result.set_aside_to)) == before
    ds = xr.open_zarr(store)
    assert ds.attrs["orientation"] == "PIR"
    raw = raw_from_zip(Path(sources[0].path))
    assert np.array_equal(bits(ds.expression.sel(experiment=sources[0].experiment_id).values), bits(raw))


def test_a_cube_made_with_previous_tuning_stays_writable_and_keeps_it(tmp_path):
    """A lab's cube made before the codec's 1 MiB blocks and the inner chunks of 16 is not refused
    (no --force, no rebuild of 16 GB): the next night adds to it with the codec and chunks it was
    made with; a new cube gets the new ones, and is smaller for the same grids."""
    import zarr

    from ambasync.cube import Codec

    sources = replica_sources(tmp_path / "zips", 12)
    before = CubeSettings(block=16, by_voxel_chunk=(16, 32, 32), codec=Codec("zstd", 1, "shuffle"), volume_chunk=8)
    now = CubeSettings(block=16, by_voxel_chunk=(16, 32, 32))
    old, new = tmp_path / "old" / "cube.zarr", tmp_path / "new" / "cube.zarr"
    build_from_zips(old, before, sources[:8], workers=1, quiet=True)
    build_from_zips(old, now, sources[8:], workers=1, quiet=True)  # tonight's version: not refused
    build_from_zips(new, now, sources, workers=1, quiet=True)

    def blosc_config(store):
        inner = json.loads((store / "expression" / "zarr.json").read_text())["codecs"][0]["configuration"]["codecs"]
        return next(c["configuration"] for c in inner if c["name"] == "blosc")

    assert blosc_config(old)["blocksize"] == 0 and blosc_config(new)["blocksize"] == 1 << 20
    assert zarr.open_array(str(old / "expression")).chunks[0] == 8
    assert zarr.open_array(str(new / "expression")).chunks[0] == 16
    recorded = json.loads((old / ".ambasync" / "settings.json").read_text())
    assert "blocksize" not in recorded["codec"] and recorded["volume_chunk"] == 8
    for store in (old, new):
        assert_exact(xr.open_zarr(store), sources)
    shard_bytes = [sum(f.stat().st_size for f in (s / "expression" / "c").rglob("*") if f.is_file()) for s in (old, new)]
    assert shard_bytes[1] < shard_bytes[0]


def test_a_publish_leaves_nothing_staged_behind_not_even_folders(tmp_path):
    """The store's own records stay small: after a publish no staged grid is left, nor the empty
    per-experiment folders older versions left behind (26,078 of them after an atlas build)."""
    store = tmp_path / "cube.zarr"
    sources = replica_sources(tmp_path / "zips", 6)
    build_from_zips(store, SETTINGS, sources[:3], workers=1, quiet=True)
    staged = store / ".ambasync" / "staged"
    (staged / "123456").mkdir(parents=True)  # what a publish of an older version left
    build_from_zips(store, SETTINGS, sources[3:], workers=1, quiet=True)
    assert not staged.exists() or sorted(staged.iterdir()) == []
    assert_exact(xr.open_zarr(store), sources)


def test_a_bad_zip_fails_that_experiment_only(tmp_path):
    """A truncated zip is reported for its experiment; the others are in the cube, with no empty slot."""
    sources = replica_sources(tmp_path / "zips", 4)
    bad = Path(sources[1].path)
    bad.write_bytes(bad.read_bytes()[:5000])
    result = build_from_zips(tmp_path / "cube.zarr", SETTINGS, sources, workers=2, quiet=True)
    assert [eid for eid, _ in result.failed] == [sources[1].experiment_id]
    ds = xr.open_zarr(tmp_path / "cube.zarr")
    assert_exact(ds, [s for s in sources if s is not sources[1]])


def test_status_summary_shows_experiments_size_and_last_update(tmp_path):
    """`status` reports how many experiments the cube holds, its size on disk and when it was updated."""
    store = tmp_path / "cube.zarr"
    assert not cube_summary(store).exists
    sources = replica_sources(tmp_path / "zips", 3)
    build_from_zips(store, SETTINGS, sources, workers=1, quiet=True)
    summary = cube_summary(store)
    total = sum((Path(r) / f).stat().st_size for r, _, fs in os.walk(store) for f in fs)
    assert (summary.exists, summary.experiments, summary.size_bytes) == (True, 3, total)
    assert summary.updated == xr.open_zarr(store).attrs["updated"] and summary.updated.endswith("+00:00")


def test_zip_member_order_does_not_matter_for_exactness(tmp_path):
    """Values come from energy.raw as its header says, whatever else the zip holds."""
    require_reference()
    src = REAL_ZIPS[71717084]
    repacked = tmp_path / "repacked.zip"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(repacked, "w", zipfile.ZIP_STORED) as zout:
        for name in reversed(zin.namelist()):
            zout.writestr(name, zin.read(name))
    build_from_zips(tmp_path / "cube.zarr", SETTINGS, [ZipSource(71717084, str(repacked), REAL_FIELDS[71717084])],
                    workers=1, quiet=True)
    assert_exact(xr.open_zarr(tmp_path / "cube.zarr"), [ZipSource(71717084, str(src), {})])


def test_a_shards_prune_never_removes_another_shards_experiments(tmp_path):
    """`--shard 0/2 --prune` drops shard 0's vanished experiment only; shard 1's all stay. The
    freed slot, which shard 0 cannot fill with shard 1's experiments, reads as an empty slot
    (negative id, only -1) until a new experiment takes it."""
    store = tmp_path / "cube.zarr"
    sources = replica_sources(tmp_path / "zips", 8)
    shard = {k: [s for s in sources if s.experiment_id % 2 == k] for k in (0, 1)}
    for k in (0, 1):
        build_from_zips(store, SETTINGS, shard[k], workers=1, writer=f"shard {k}/2", quiet=True)
    vanished = shard[0][0]
    kept = [s for s in sources if s is not vanished]
    cube = Cube.open(store, SETTINGS, writer="shard 0/2")
    assert cube.prune({s.experiment_id for s in shard[0] if s is not vanished}, shard=(0, 2)) == [
        vanished.experiment_id]
    result = cube.publish(workers=1)
    assert (result.experiments, result.empty_slots) == (len(kept), 1)
    ds = xr.open_zarr(store)
    empty = ds.experiment.values < 0
    assert empty.sum() == 1 and (ds.expression.values[empty] == -1).all()
    assert_exact(ds.isel(experiment=~empty), kept)
    # the next new experiment takes the free slot: no empty slot left
    new = replica_sources(tmp_path / "more", 9)[-1]
    result = build_from_zips(store, SETTINGS, [*shard[0][1:], new], workers=1, writer="shard 0/2", quiet=True)
    assert result.publish.empty_slots == 0
    assert_exact(xr.open_zarr(store), [*kept, new])


def test_density_and_intensity_are_further_exact_variables(tmp_path):
    """With volumes energy,density,intensity the cube holds all three, each exact, in one slot."""
    replica = Replica(ReplicaConfig(n_coronal=3, n_sagittal=0, real_dir="/nonexistent"))
    volumes = ("energy", "density", "intensity")
    sources = []
    for row in replica.rows:
        path = tmp_path / f"{row['experiment_id']}.zip"
        path.write_bytes(replica.zip_for(row["experiment_id"], include=volumes))
        sources.append(ZipSource(row["experiment_id"], str(path), row))
    settings = CubeSettings(volumes=volumes, block=8, by_voxel_chunk=(16, 32, 32))
    build_from_zips(tmp_path / "cube.zarr", settings, sources, workers=1, quiet=True)
    ds = xr.open_zarr(tmp_path / "cube.zarr")
    for s in sources:
        for volume, variable in zip(volumes, ("expression", "density", "intensity")):
            want = notebook_ras(raw_from_zip(Path(s.path), f"{volume}.raw"))
            got = ds[variable].sel(experiment=s.experiment_id).values
            assert np.array_equal(bits(got), bits(want)), (s.experiment_id, volume)
    assert not np.array_equal(ds.density.values, ds.expression.values)
