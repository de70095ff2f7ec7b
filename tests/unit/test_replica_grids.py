"""The replica's synthetic grids look like real ISH energy (replica/grids.py): region-structured
and smooth over the real P56 annotation, log-normal with measured zeros, covering what a coronal
or a sagittal experiment covers, alike between two experiments of one gene, and zipping to the
size of a real download."""

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage, stats

from ambasync.replica.grids import GRID_SHAPE, MIDLINE, data_set_xml, grid_zip, read_annotation, synthetic_grid

REPO = Path(__file__).resolve().parents[2]
FIXTURE_ANNOTATION = REPO / "tests/fixtures/allen-grids/P56_Mouse_gridAnnotation.zip"
CORONAL = [(100000 + 13 * i, f"Gene{i}") for i in range(12)]  # ids as catalogue.build_rows numbers them
SAGITTAL = [(5000000 + 11 * i, f"Sgene{i}") for i in range(8)]


@pytest.fixture(scope="module")
def brain() -> np.ndarray:
    return read_annotation() > 0


def coronal(eid: int, gene: str) -> np.ndarray:
    return synthetic_grid(0, eid, plane="coronal", gene=gene)


def neighbour_correlation(grid: np.ndarray, mask: np.ndarray) -> float:
    """Mean over the three axes of the correlation of log values between neighbouring voxels
    that are both in ``mask`` and both > 0."""
    logs = np.where(grid > 0, np.log(np.where(grid > 0, grid, 1.0)), np.nan)
    rs = []
    for axis in range(3):
        a, m = np.moveaxis(logs, axis, 0), np.moveaxis(mask, axis, 0)
        u, v = a[:-1].ravel(), a[1:].ravel()
        keep = m[:-1].ravel() & m[1:].ravel() & np.isfinite(u) & np.isfinite(v)
        rs.append(np.corrcoef(u[keep], v[keep])[0, 1])
    return float(np.mean(rs))


def old_noise_grid(experiment_id: int) -> np.ndarray:
    """What synthetic_grid served before: independent gamma noise per voxel in an ellipsoid."""
    z, y, x = np.ogrid[: GRID_SHAPE[0], : GRID_SHAPE[1], : GRID_SHAPE[2]]
    inside = ((z - 30) / 32.0) ** 2 + ((y - 18) / 23.0) ** 2 + ((x - 35) / 38.0) ** 2 <= 1.0
    rng = np.random.default_rng([0, experiment_id, 0])
    values = rng.gamma(1.5, 1.0, GRID_SHAPE).astype(np.float32)
    values += (0.01 * z + 0.02 * y + 0.03 * x).astype(np.float32)
    values[rng.random(GRID_SHAPE) < 0.05] = 0.0
    return np.where(inside, values, np.float32(-1.0))


def test_annotation_is_the_fixture_shipped_as_package_data(brain):
    shipped = REPO / "ambasync/replica/data/P56_Mouse_gridAnnotation.zip"
    assert shipped.read_bytes() == FIXTURE_ANNOTATION.read_bytes()
    assert "citation" in (REPO / "ambasync/replica/data/README.md").read_text().lower()
    with zipfile.ZipFile(FIXTURE_ANNOTATION) as zf:
        ids = np.frombuffer(zf.read("gridAnnotation.raw"), "<u4").reshape(GRID_SHAPE)
    np.testing.assert_array_equal(read_annotation(), ids)
    assert brain.sum() == 62529


def test_coronal_covers_the_brain_less_lost_sections_plus_a_rim_of_tissue(brain):
    depth = ndimage.distance_transform_edt(~brain)
    for eid, gene in CORONAL:
        grid = coronal(eid, gene)
        data = grid != -1
        assert ((grid >= 0) | (grid == -1)).all() and np.isfinite(grid).all()
        assert 55_000 <= (data & brain).sum() <= 68_000  # real Nrp1 / Pdyn: 60,405 / 60,556
        lost = brain & ~data  # in the brain, only whole coronal sections (anterior-posterior slabs) are lost
        np.testing.assert_array_equal(lost, brain & lost.any(axis=(0, 1)))
        # Outside the annotation real grids carry ~40,000 voxels of tissue rim, far dimmer: so here
        assert (depth[data] <= 16).all() and 85_000 <= data.sum() <= 120_000  # real: 104,344 / 99,019
        assert np.median(grid[data & ~brain]) < 0.05 * np.median(grid[data & brain])


def test_sagittal_covers_the_left_hemisphere_only(brain):
    for eid, gene in SAGITTAL:
        grid = synthetic_grid(0, eid, gene=gene)  # the plane from the catalogue's numbering
        np.testing.assert_array_equal(grid, synthetic_grid(0, eid, plane="sagittal", gene=gene))
        data = grid != -1
        assert not data[MIDLINE:].any()  # axis 0 runs left to right; the other hemisphere is -1
        assert 22_000 <= (data[:MIDLINE] & brain[:MIDLINE]).sum() <= brain[:MIDLINE].sum() == 31_346
    whole = coronal(*CORONAL[0]) != -1
    assert whole[:MIDLINE].sum() > 40_000 and whole[MIDLINE:].sum() > 40_000


def test_values_are_smooth_in_space_unlike_the_old_noise(brain):
    old = [neighbour_correlation(old_noise_grid(eid), brain) for eid, _ in CORONAL[:4]]
    new = [neighbour_correlation(coronal(eid, gene), brain) for eid, gene in CORONAL[:4]]
    assert max(old) < 0.3  # independent noise per voxel (plus a gentle gradient)
    assert min(new) > 0.75 and min(new) > max(old) + 0.5  # real Nrp1 / Pdyn: ~0.93


def test_log_normal_with_measured_zeros_in_the_tissue(brain):
    for eid, gene in CORONAL[:6]:
        grid = coronal(eid, gene)
        inside = grid[brain & (grid != -1)]
        zeros = (inside == 0).mean()
        assert 0.005 < zeros < 0.15  # where the gene is not expressed
        logs = np.log(inside[inside > 0])
        assert 1.0 < logs.std() < 4.0 and abs(stats.skew(logs)) < 1.5  # log-normal-ish, decades wide
        assert np.unique(inside).size > 0.9 * inside.size  # full float32 mantissas, like real energy


def test_experiments_of_one_gene_correlate_more_than_experiments_of_two_genes(brain):
    genes = [f"Gene{k}" for k in range(10)]
    first = {g: coronal(100000 + 13 * k, g) for k, g in enumerate(genes)}
    second = {g: coronal(200000 + 13 * k, g) for k, g in enumerate(genes)}

    def rho(a: np.ndarray, b: np.ndarray) -> float:
        both = brain & (a != -1) & (b != -1)
        return float(stats.spearmanr(a[both], b[both])[0])

    same = [rho(first[g], second[g]) for g in genes]
    other = [rho(first[g], second[h]) for g in genes for h in genes if g != h][::3]
    assert np.mean(same) > 0.5 and min(same) > 0.3
    assert abs(np.mean(other)) < 0.1
    assert np.mean(same) > np.mean(other) + 0.4


def test_deterministic_in_and_across_processes():
    grid = synthetic_grid(3, 100013, plane="coronal", gene="Gene7")
    np.testing.assert_array_equal(grid, synthetic_grid(3, 100013, plane="coronal", gene="Gene7"))
    assert grid.dtype == np.dtype("<f4") and grid.shape == GRID_SHAPE and grid.flags.writeable
    assert not np.array_equal(grid, synthetic_grid(4, 100013, plane="coronal", gene="Gene7"))  # the seed
    assert not np.array_equal(grid, synthetic_grid(3, 100013, plane="coronal", gene="Gene8"))  # the gene
    code = ("import hashlib; from ambasync.replica.grids import synthetic_grid; "
            "print(hashlib.sha256(synthetic_grid(3, 100013, plane='coronal', gene='Gene7').tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == hashlib.sha256(grid.tobytes()).hexdigest()


def test_volumes_are_one_measurement(brain):
    energy, density, intensity = (synthetic_grid(0, 100000, v, gene="Gene0")
                                  for v in ("energy", "density", "intensity"))
    for other in (density, intensity):
        np.testing.assert_array_equal(other == -1, energy == -1)
        np.testing.assert_array_equal(other == 0, energy == 0)
    positive = energy > 0
    assert (density[positive] < 1).all()
    np.testing.assert_allclose(density[positive] * intensity[positive], energy[positive], rtol=1e-5)


def test_zips_are_the_size_of_real_downloads():
    """Real coronal zips are 372-386 KB (deflate level 6): float32 values with full-mantissa noise
    over ~100,000 voxels do not compress."""
    sizes = []
    for eid, gene in CORONAL:
        raw = coronal(eid, gene).tobytes()
        sizes.append(len(grid_zip({"energy": raw}, None, data_set_xml(eid, 700000))) / 1024)
    assert all(340 <= s <= 420 for s in sizes), sizes
    eid, gene = SAGITTAL[0]  # one hemisphere: less than half
    assert 100 < len(grid_zip({"energy": synthetic_grid(0, eid, gene=gene).tobytes()}, None, None)) / 1024 < 200


def test_any_flip_or_transpose_changes_it():
    grid = coronal(*CORONAL[1])
    for axes in ((0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)):
        assert not np.array_equal(np.flip(grid, axes), grid), axes
    assert not np.array_equal(np.ascontiguousarray(grid.T).reshape(GRID_SHAPE), grid)
    sagittal = synthetic_grid(0, *SAGITTAL[0][:1], gene=SAGITTAL[0][1])
    assert not np.array_equal(np.flip(sagittal, 0), sagittal)


def test_an_unknown_plane_is_refused():
    with pytest.raises(ValueError, match="plane"):
        synthetic_grid(0, 1, plane="axial")


def test_shared_variants_keep_each_rows_plane_and_serve_what_raw_grid_says():
    """Atlas benchmarks serve K shared grids (--variants): a sagittal row must still get a
    one-hemisphere grid, and the zip served must hold exactly raw_grid's voxels."""
    import io
    import zipfile

    from ambasync.replica import Replica, ReplicaConfig

    rep = Replica(ReplicaConfig(n_coronal=6, n_sagittal=6, variants=3, real_dir="/nonexistent"))
    for row in rep.rows:
        eid = int(row["experiment_id"])
        served = np.frombuffer(zipfile.ZipFile(io.BytesIO(rep.zip_for(eid))).read("energy.raw"), "<f4")
        grid = rep.raw_grid(eid)
        np.testing.assert_array_equal(served.reshape(grid.shape), grid)
        has_data = (grid >= 0).any(axis=(1, 2))  # along the first axis of the raw (58, 41, 67) grid: left-right
        if row["plane"] == "sagittal":
            assert not has_data[: has_data.size // 2].any() or not has_data[has_data.size // 2 + 1:].any(), eid
        else:
            assert has_data[: has_data.size // 2].any() and has_data[has_data.size // 2 + 1:].any(), eid
