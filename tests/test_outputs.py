"""The output extension point: a second format gets the very array MINC gets. What the next
formats (NIfTI, the cube) would notice if this broke: a re-decoded, differently oriented or
partial volume, or a run that accepts a format nobody can write."""

import ast
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ambasync import writers
from ambasync.catalog import Row
from ambasync.config import Config
from ambasync.convert import ConvertJob, convert
from ambasync.errors import ConfigError
from ambasync.minc import Written
from ambasync.outputs import Outputs
from ambasync.paths import Paths
from ambasync.settings import ConvertSettings
from ambasync.target import Target
from conftest import REAL_ZIPS, notebook_ras, raw_from_zip, read_minc, require_reference


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
