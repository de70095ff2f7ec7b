"""NIfTI output: the same voxels at the same world positions as the MINC file, read back with
nibabel (what ANTs/FSL/ITK-SNAP users see) against pyminc and `mincinfo`."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ambasync.geometry import output_geometry, reorient
from ambasync.imaging.minc import write_volume
from ambasync.imaging.nifti import write_nifti

from helpers import REAL_ZIPS, mincinfo, notebook_ras, quantisation_step, raw_from_zip, read_minc, require_reference

# a few voxels in MINC array order (zspace, yspace, xspace indices for RAS; any order for PIR)
PROBES = [(0, 0, 0), (40, 66, 57), (20, 33, 29), (5, 60, 11), (37, 2, 50)]


def minc_world(info: dict, order: tuple[str, ...], index: tuple[int, int, int]) -> np.ndarray:
    """World (x, y, z) mm of a MINC voxel from `mincinfo`: Σ cosines_d · (start_d + step_d · i_d)."""
    world = np.zeros(3)
    for dim, i in zip(order, index):
        _, step, start = info["dims"][dim]
        world += np.asarray(info["cosines"][dim]) * (start + step * i)
    return world


def minc_index(info: dict, order: tuple[str, ...], world: np.ndarray) -> tuple[int, ...]:
    """The MINC voxel at a world point (direction cosines are orthonormal)."""
    out = []
    for dim in order:
        _, step, start = info["dims"][dim]
        out.append(int(round((float(np.dot(info["cosines"][dim], world)) - start) / step)))
    return tuple(out)


@pytest.mark.parametrize("orientation,space", [("RAS", "MICe"), ("PIR", "CCFv3"), ("RAS", "CCFv3")])
def test_nifti_voxels_sit_at_the_minc_files_world_coordinates(tmp_path, orientation, space):
    """A voxel of the .nii.gz and of the .mnc lie at the same point in mm, and hold the same value there."""
    require_reference()
    raw = raw_from_zip(REAL_ZIPS[74272479]).astype(np.float32)
    data = reorient(raw, orientation)
    geometry = output_geometry(raw.shape, orientation, space, 1.0)
    mnc = write_volume(data, geometry, tmp_path / "a.mnc", "float")
    nii = write_nifti(data, geometry, tmp_path / "a.nii.gz", "float")
    info = mincinfo(Path(mnc.path))
    order = info["order"]
    minc_values, _ = read_minc(Path(mnc.path))
    img = nib.load(nii.path)
    voxels = np.asanyarray(img.dataobj)
    for index in PROBES:
        index = tuple(min(i, n - 1) for i, n in zip(index, minc_values.shape))
        want = minc_world(info, order, index)
        nifti_index = index[::-1]  # NIfTI's first index is MINC's fastest (last) dimension
        got = img.affine @ np.array([*nifti_index, 1.0])
        assert np.allclose(got[:3], want, atol=1e-4), (index, got, want)
        # and the value at that world point is the same in both files
        back = np.rint(np.linalg.inv(img.affine) @ np.array([*want, 1.0]))[:3].astype(int)
        assert voxels[tuple(back)] == minc_values[minc_index(info, order, want)]


def test_float_nifti_holds_the_exact_allen_values(tmp_path):
    """--dtype float: every value, measured 0 and -1 included, is the grid's float32 bit for bit."""
    require_reference()
    raw = raw_from_zip(REAL_ZIPS[71717084])
    want = notebook_ras(raw)
    geometry = output_geometry(raw.shape, "RAS", "MICe", 1.0)
    written = write_nifti(want, geometry, tmp_path / "Pdyn_71717084.nii.gz", "float")
    img = nib.load(written.path)
    assert img.get_data_dtype() == np.float32 and img.header.get_xyzt_units()[0] == "mm"
    got = np.asanyarray(img.dataobj).transpose(2, 1, 0)
    assert np.array_equal(got.view(np.uint32), np.ascontiguousarray(want, dtype="<f4").view(np.uint32))
    assert Path(written.path).stat().st_size == written.size
    assert gzip.decompress(Path(written.path).read_bytes())[344:348] == b"n+1\x00"  # a NIfTI-1 single file


def test_ushort_nifti_is_quantised_like_the_minc_file(tmp_path):
    """--dtype ushort: uint16 with scl_slope/scl_inter over the real range, as the MINC file; -1 stays -1."""
    require_reference()
    raw = raw_from_zip(REAL_ZIPS[74272479])
    data = np.ascontiguousarray(notebook_ras(raw), dtype=np.float32)
    geometry = output_geometry(raw.shape, "RAS", "MICe", 1.0)
    mnc = write_volume(data, geometry, tmp_path / "a.mnc", "ushort")
    written = write_nifti(data, geometry, tmp_path / "a.nii.gz", "ushort")
    img = nib.load(written.path)
    assert img.get_data_dtype() == np.uint16
    step = quantisation_step(data)
    assert np.isclose(img.dataobj.slope, step, rtol=1e-9) and img.dataobj.inter == float(data.min()) == -1.0
    values = img.get_fdata().transpose(2, 1, 0)
    minc_values, _ = read_minc(Path(mnc.path))
    assert np.allclose(values, minc_values, rtol=0, atol=step * 0.01)  # the same quantum as the MINC file
    assert np.array_equal(values == -1, data == -1)  # no data stays no data
    assert np.abs(values - data).max() <= step * 0.51  # half a step (scl_slope is a float32 in the header)


def test_a_killed_write_leaves_no_partial_file(tmp_path):
    """An error while writing leaves nothing under the final name (atomic, like every output)."""
    geometry = output_geometry((58, 41, 67), "RAS", "MICe", 1.0)
    target = tmp_path / "x.nii.gz"
    with pytest.raises(ValueError):
        write_nifti(np.zeros((41, 67, 57), np.float32), geometry, target, "float")
    with pytest.raises(ValueError):
        write_nifti(np.zeros(geometry.sizes, np.float32), geometry, target, "double")
    assert list(tmp_path.iterdir()) == []
