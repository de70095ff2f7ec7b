"""The output extension point: a second format gets the very array MINC gets. What the next
formats (NIfTI, the cube) would notice if this broke: a re-decoded, differently oriented or
partial volume, or a run that accepts a format nobody can write."""

import ast
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ambasync.mirror.formats import writers
from ambasync.mirror.catalog import Row
from ambasync.config import Config
from ambasync.mirror.convert import ConvertJob, convert
from ambasync.errors import ConfigError
from ambasync.imaging.minc import Written
from ambasync.mirror.formats.outputs import Outputs
from ambasync.paths import Paths
from ambasync.settings import ConvertSettings
from ambasync.target import Target
from helpers import REAL_ZIPS, notebook_ras, raw_from_zip, read_minc, require_reference

pytestmark = pytest.mark.e2e  # real runs, servers or clusters: make test-fast leaves these out


@dataclass(frozen=True)
class NpyWriter:
    """A stand-in for the next formats: the array exactly as handed over, and its geometry."""

    settings: ConvertSettings

    def write(self, data, geometry, target: Target, out: Path) -> Written:
        path = out / target.path
        np.save(path, data)
        (out / f"{target.path}.starts").write_text(repr(geometry.starts))
        return Written(str(path), "-", path.stat().st_size)


@pytest.fixture
def npy_format(monkeypatch):
    monkeypatch.setitem(writers.WRITERS, "npy", NpyWriter)


def test_every_format_of_an_experiment_gets_the_same_reoriented_array_as_minc(tmp_path, npy_format):
    require_reference()
    eid = 74272479
    targets = (Target("energy", "a.mnc"), Target("energy", "a.npy", format="npy"))
    result = convert(ConvertJob(eid, REAL_ZIPS[eid].read_bytes(), str(tmp_path), targets,
                                ConvertSettings("RAS", "MICe", 1.0, "float")))
    expected = notebook_ras(raw_from_zip(REAL_ZIPS[eid]))
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), expected)
    minc, geo = read_minc(tmp_path / "a.mnc")
    np.testing.assert_array_equal(minc.astype(np.float32), expected)
    assert ast.literal_eval((tmp_path / "a.npy.starts").read_text()) == pytest.approx(geo["starts"])
    assert sorted(t.format for t, _ in result.outputs) == ["minc", "npy"]


def test_a_failing_format_leaves_no_output_of_the_experiment(tmp_path, npy_format):
    require_reference()
    eid = 74272479
    # the npy target's folder does not exist, so its write fails after the MINC file was written
    targets = (Target("energy", "a.mnc"), Target("energy", "missing-folder/a.npy", format="npy"))
    with pytest.raises(FileNotFoundError):
        convert(ConvertJob(eid, REAL_ZIPS[eid].read_bytes(), str(tmp_path), targets,
                           ConvertSettings("RAS", "MICe", 1.0, "float")))
    assert not (tmp_path / "a.mnc").exists()


def test_the_default_is_minc_alone_and_an_unknown_format_is_one_clear_error(tmp_path):
    cfg = Config()
    row = Row(7, "Nrp1", "coronal", {})
    assert Outputs.for_config(cfg, Paths(tmp_path)).targets(row, "coronal") == (
        Target("energy", "coronal/Nrp1_7.mnc"),)
    cfg.output.formats = ["minc", "nifti-typo"]  # what [output] formats will set
    with pytest.raises(ConfigError, match="output.formats: nifti-typo unknown; use any of minc"):
        Outputs.for_config(cfg, Paths(tmp_path))


async def test_a_run_writes_nifti_beside_minc_with_the_same_world_and_the_next_night_fetches_nothing(tmp_path):
    """ANTs/FSL users get `{gene}_{id}.nii.gz`: a voxel's world position and value must be the
    MINC file's, and asking for NIfTI must not make every night a full download."""
    import nibabel

    from ambasync.replica import ReplicaConfig, serve
    from helpers import manifest, mirror

    async with serve(ReplicaConfig(n_coronal=3, n_sagittal=0)) as (rep, url):
        first = await mirror(url, tmp_path, output__formats=["minc", "nifti"], convert__dtype="float")
        second = await mirror(url, tmp_path, output__formats=["minc", "nifti"], convert__dtype="float")
    assert first.exit_code == 0 and first.done == 5 and second.done == 0 and second.skipped == 5
    table = manifest(tmp_path)
    stems = table.path.str.replace(r"\.(mnc|nii\.gz)$", "", regex=True).value_counts()
    assert len(stems) == 5 and set(stems) == {2}  # every experiment: one .mnc and one .nii.gz
    eid = 74272479
    minc, geo = read_minc(tmp_path / f"coronal/Nrp1_{eid}.mnc")
    img = nibabel.load(tmp_path / f"coronal/Nrp1_{eid}.nii.gz")
    voxels = np.asarray(img.dataobj)
    exact = notebook_ras(raw_from_zip(REAL_ZIPS[eid]))
    for k, j, i in [(0, 0, 0), (20, 33, 29), (40, 66, 57), (5, 60, 3)]:  # (zspace, yspace, xspace) indices
        world_minc = np.array([geo["starts"][2] + 0.2 * i, geo["starts"][1] + 0.2 * j, geo["starts"][0] + 0.2 * k])
        world_nifti = img.affine @ np.array([i, j, k, 1.0])
        np.testing.assert_allclose(world_nifti[:3], world_minc, atol=1e-5)
        assert voxels[i, j, k] == minc[k, j, i] == exact[k, j, i]  # float: exact in both


async def test_verify_holds_nifti_files_to_their_record_and_geometry(tmp_path):
    """verify must not call good NIfTI files broken (it read them as MINC), and must catch an
    altered one."""
    import subprocess

    from ambasync.replica import ReplicaConfig, serve
    from helpers import ambasync_cmd, mirror

    async with serve(ReplicaConfig(n_coronal=2, n_sagittal=0, real_dir="/nonexistent")) as (_, url):
        await mirror(url, tmp_path, output__formats=["minc", "nifti"])
    env = {"AMBASYNC_OUTPUT_FORMATS": "minc,nifti"}
    import os

    ok = subprocess.run(ambasync_cmd("verify", "--out", str(tmp_path)), capture_output=True, text=True,
                        env={**os.environ, **env}, timeout=120)
    assert ok.returncode == 0 and "4 files checked, 0 experiments broken" in ok.stdout, ok.stdout + ok.stderr
    victim = next(tmp_path.glob("coronal/*.nii.gz"))
    victim.write_bytes(victim.read_bytes()[:-3] + b"abc")
    bad = subprocess.run(ambasync_cmd("verify", "--out", str(tmp_path)), capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=120)
    assert bad.returncode == 1 and "1 experiments broken" in bad.stdout and victim.name in bad.stderr
