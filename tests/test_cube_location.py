"""Which cube the analysis commands read, and ``--at``.

A lab keeps its cube where its run writes it: ``--cube`` / ``[output] cube`` may name any folder
or URL, with or without a ``.zarr`` suffix. ``matrix`` and ``search`` must read exactly that store
(not ``{cube}/cube.zarr``), and ``--at VERSION`` must refuse a cube at another version before
anything is written: a paper's table is rebuilt from the cube it names, or not at all.
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest

import ambasync
from ambasync.cli import main
from cubes import replica_experiments, write_test_cube

VERSION = "0123456789abcdef"


@pytest.fixture(scope="module")
def lab_cube(tmp_path_factory):
    """A small cube stored in a folder named ``lab-cube`` (no ``.zarr``), with a recorded version."""
    import zarr

    root = tmp_path_factory.mktemp("store")
    store = write_test_cube(root / "made.zarr", replica_experiments(4, 2, real=False))
    g = zarr.open_group(str(store), mode="r+")
    g.attrs["cube_version"] = VERSION
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(store))
    lab = root / "lab-cube"
    shutil.move(store, lab)
    return lab


def _means(cube):
    return ambasync.open_cube(cube=cube).expression.mean(dim=("zspace", "yspace", "xspace")).values


def test_a_cube_folder_without_zarr_suffix_is_read_where_it_is(lab_cube, tmp_path):
    """``matrix --cube /data/lab-cube`` reads that store: the rows are its experiments' genes."""
    m = ambasync.matrix(cube=str(lab_cube), plane="coronal", impute="none", max_missing=1.0, mask="coronal",
                        genes_in_coronal=False)
    genes = set(ambasync.open_cube(cube=str(lab_cube)).gene.values[
        ambasync.open_cube(cube=str(lab_cube)).plane.values == "coronal"])
    assert set(m.index) == genes and m.attrs["ambasync"]["cube"] == str(lab_cube)
    assert m.attrs["ambasync"]["cube_version"] == VERSION


def test_the_config_cube_is_the_default_of_the_analysis_commands(lab_cube, tmp_path, monkeypatch):
    """``[output] cube`` (here its environment form) tells ``search`` where the cube is, as it tells
    ``run`` where to write it: no ``--cube`` needed."""
    monkeypatch.setenv("AMBASYNC_OUTPUT_CUBE", str(lab_cube))
    monkeypatch.chdir(tmp_path)  # no config.toml here
    ds = ambasync.open_cube()
    the_map = np.where(ds.expression.isel(experiment=0).values == -1, np.nan, ds.expression.isel(experiment=0).values)
    hits = ambasync.search(map=the_map, nulls=0, mask="brain")
    assert hits.iloc[0]["experiment_id"] == int(ds.experiment[0])  # the map is experiment 0 itself
    assert len(hits) == ds.sizes["experiment"]
    np.testing.assert_allclose(_means(str(lab_cube)), _means(None))


@pytest.mark.parametrize("command", ["matrix", "search"])
def test_at_another_version_stops_before_writing(command, lab_cube, tmp_path, capsys):
    """``--at`` a version the cube is not at: one line naming both versions, exit 2, no table."""
    to = tmp_path / "out.csv"
    extra = ["--impute", "none"] if command == "matrix" else [str(_map_file(lab_cube, tmp_path)), "--nulls", "0"]
    code = main([command, "-q", "--cube", str(lab_cube), "--at", "fedcba9876543210", "--to", str(to), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "fedcba9876543210" in err[0] and VERSION in err[0], err
    assert not to.exists()
    code = main([command, "-q", "--cube", str(lab_cube), "--at", VERSION, "--to", str(to), *extra])
    assert code == 0 and to.exists()
    assert VERSION in (tmp_path / "out.csv.methods.md").read_text()


def _map_file(cube, folder):
    """A NIfTI map on the cube's grid (experiment 0), for the search command line."""
    import nibabel as nib

    from cubes import STARTS, STEP

    values = ambasync.open_cube(cube=str(cube)).expression.isel(experiment=0).values.astype(np.float32)
    aff = np.diag([STEP, STEP, STEP, 1.0])
    aff[:3, 3] = STARTS[::-1]  # NIfTI's order on disk is (x, y, z): the cube's (z, y, x) reversed
    path = folder / "map.nii.gz"
    nib.save(nib.Nifti1Image(values.transpose(2, 1, 0), aff), str(path))
    return path
