"""The reading layer of matrix and search: what a user gives (a mirror folder, a mask name or
file, a map on any grid) reaches the cube's voxels in the right place, or is refused in one line."""

from __future__ import annotations

import nibabel
import numpy as np
import pytest

from ambasync.errors import AnalysisError
from ambasync.analysis.cluster import compute_on
from ambasync.cube.read import cube_geometry, cube_location, open_cube
from ambasync.imaging.regrid import on_grid, read_image, same_grid, write_image
from ambasync.analysis.masks import resolve_mask
from helpers import FIXTURES, read_minc
from cubes import SIZES, STARTS, STEP, local_cluster, replica_experiments, write_test_cube


@pytest.fixture(scope="module")
def cube(tmp_path_factory):
    out = tmp_path_factory.mktemp("mirror")
    experiments = replica_experiments(6, 3)
    write_test_cube(out, experiments)
    return out, experiments


def world_centres(sizes=SIZES, starts=STARTS, step=STEP):
    """World (x, y, z) of every voxel of the notebook grid, arrays over (zspace, yspace, xspace)."""
    z, y, x = np.meshgrid(*[s + step * np.arange(n) for s, n in zip(starts, sizes)], indexing="ij")
    return x, y, z


def test_a_mirror_without_a_cube_is_told_how_to_make_one(tmp_path):
    with pytest.raises(AnalysisError, match="--formats minc,cube"):
        open_cube(tmp_path)
    assert cube_location("s3://bucket/mirror/") == "s3://bucket/mirror/cube.zarr"
    assert cube_location(tmp_path / "x.zarr") == str(tmp_path / "x.zarr")


def test_the_cube_grid_is_the_notebook_grid(cube):
    ds = open_cube(cube[0])
    geo = cube_geometry(ds)
    assert geo.sizes == SIZES and geo.starts == pytest.approx(STARTS) and geo.steps == pytest.approx((STEP,) * 3)
    mask, mask_geo = read_image(FIXTURES / "coronal_200um_coverage_bin0.8.mnc")
    assert same_grid(mask_geo, geo)  # the lab's masks line up voxel for voxel


def test_named_masks_are_the_coverage_rules_labs_use(cube):
    out, experiments = cube
    ds = open_cube(out)
    coronal = np.stack([np.rot90(np.rot90(e.grid, 1, (0, 2)), 1, (0, 1)) for e in experiments if e.plane == "coronal"])
    expected = (coronal != -1).mean(axis=0) >= 0.8
    np.testing.assert_array_equal(resolve_mask("coronal", ds), expected)
    everything = np.stack([np.rot90(np.rot90(e.grid, 1, (0, 2)), 1, (0, 1)) for e in experiments])
    np.testing.assert_array_equal(resolve_mask("brain", ds), (everything != -1).any(axis=0))


def test_a_mask_file_gives_its_voxels_and_another_grid_is_refused_naming_both(cube, tmp_path):
    ds = open_cube(cube[0])
    mask = resolve_mask(str(FIXTURES / "coronal_200um_coverage_bin0.8.mnc"), ds)
    assert mask.sum() == 61315  # the figure of the file's provenance note
    x, y, z = world_centres((82, 134, 116), STARTS, 0.1)
    other = tmp_path / "fine.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.ones((116, 134, 82), np.float32),
                                     np.diag([0.1, 0.1, 0.1, 1.0]) + np.array([[0, 0, 0, -5.7], [0, 0, 0, -7.9],
                                                                              [0, 0, 0, -2.7], [0, 0, 0, 0]])), other)
    with pytest.raises(AnalysisError, match=r"zspace 82.*zspace 41"):
        resolve_mask(str(other), ds)
    assert resolve_mask(str(other), ds, resample=True).all()
    with pytest.raises(AnalysisError, match="not one of coronal, sagittal, brain"):
        resolve_mask("cornal", ds)


def test_a_map_at_100_um_lands_on_the_200_um_grid_by_world_coordinates(cube, tmp_path):
    """A linear function of world position survives trilinear resampling exactly: any axis
    swapped, flipped or shifted by the reader would show."""
    geo = cube_geometry(open_cube(cube[0]))
    f = lambda x, y, z: 2 * x + 3 * y - z  # noqa: E731
    # A NIfTI image at 100 µm whose first index runs along x (nibabel's order), centred like the grid.
    fine = [(s - STEP / 4, 2 * n) for s, n in zip(STARTS, SIZES)]  # (start, size) along z, y, x
    (z0, nz), (y0, ny), (x0, nx) = fine
    i, j, k = np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij")
    data = f(x0 + 0.1 * i, y0 + 0.1 * j, z0 + 0.1 * k).astype(np.float64)
    aff = np.array([[0.1, 0, 0, x0], [0, 0.1, 0, y0], [0, 0, 0.1, z0], [0, 0, 0, 1.0]])
    path = tmp_path / "map.nii.gz"
    nibabel.save(nibabel.Nifti1Image(data, aff), path)
    values, src = read_image(path)
    assert src.dimnames == ("zspace", "yspace", "xspace") and values.shape == (nz, ny, nx)
    resampled = on_grid(values, src, geo, "linear")
    x, y, z = world_centres()
    np.testing.assert_allclose(resampled, f(x, y, z), atol=1e-5)  # NIfTI stores its affine as float32
    far = aff.copy()
    far[:3, 3] += 100.0
    nibabel.save(nibabel.Nifti1Image(data, far), tmp_path / "far.nii.gz")
    with pytest.raises(AnalysisError, match="does not overlap.*world extent.*world extent"):
        on_grid(*read_image(tmp_path / "far.nii.gz"), geo)


def test_a_volume_written_back_reads_the_same_with_pyminc_and_nibabel(cube, tmp_path):
    geo = cube_geometry(open_cube(cube[0]))
    data = np.random.default_rng(1).random(SIZES).astype(np.float32)
    write_image(data, geo, tmp_path / "v.mnc")
    back, info = read_minc(tmp_path / "v.mnc")
    np.testing.assert_array_equal(back.astype(np.float32), data)
    assert info["starts"] == pytest.approx(STARTS)
    with pytest.raises(AnalysisError, match=r"\.mnc, \.nii or \.nii\.gz"):
        write_image(data, geo, tmp_path / "v.png")


@pytest.mark.e2e
def test_a_cluster_computes_what_the_local_scheduler_computes(cube):
    ds = open_cube(cube[0])
    with compute_on(None) as client:
        assert client is None
        local = ds.expression.where(ds.expression != -1).mean(("zspace", "yspace", "xspace")).values
    with local_cluster() as cluster:
        with compute_on(cluster.scheduler_address) as client:
            assert client is not None
            remote = ds.expression.where(ds.expression != -1).mean(("zspace", "yspace", "xspace")).values
    np.testing.assert_array_equal(local, remote)
    with pytest.raises(AnalysisError, match="cannot reach the dask scheduler"):
        with compute_on("tcp://127.0.0.1:9", connect_timeout=1):
            pass
