"""`ambasync search`: which experiments are expressed like a user's map, with p-values that hold.

Cubes are written by tests/cubes.py (plain xarray, the contract). Expected numbers are computed
here with numpy/scipy from the arrays the cube was built from; maps and regions are written with
nibabel, as a user's tools would. Realistic calibration needs smooth experiments and smooth maps:
``smooth_cube`` holds Gaussian-filtered noise inside the real template brain mask.
"""

from __future__ import annotations

import csv
import struct

import nibabel
import numpy as np
import pytest
from scipy import ndimage, stats

from ambasync.cli import main
from helpers import FIXTURES, notebook_ras, read_minc
from cubes import SIZES, STARTS, STEP, TestExperiment, local_cluster, replica_experiments, write_test_cube

pytestmark = pytest.mark.e2e  # real runs, servers or clusters: make test-fast leaves these out

SIGMA_VOXELS = 2.5  # smoothness of the test experiments and maps (0.5 mm), like ISH energy at 200 µm
SMOOTH_EXPERIMENTS = 10
CALIBRATION_MAPS = 50
CALIBRATION_NULLS = 20  # p = (1 + exceed) / 21 < 0.05 only when no null is as extreme: 1/21 under the null


def ras_to_pir(ras: np.ndarray) -> np.ndarray:
    """Undo the notebook's two rot90s: the raw Allen layout the cube writer expects."""
    out = np.rot90(ras, k=-1, axes=(0, 1))
    return np.ascontiguousarray(np.rot90(out, k=-1, axes=(0, 2)))


def smooth_field(rng: np.random.Generator, sigma: float = SIGMA_VOXELS) -> np.ndarray:
    """Gaussian-filtered white noise, cut from a box padded by 4 sigma (filtering the grid itself
    would reflect the noise at its faces, making every field smoother and more alike there)."""
    pad = int(np.ceil(4 * sigma))
    field = ndimage.gaussian_filter(rng.standard_normal(tuple(s + 2 * pad for s in SIZES)), sigma)
    field = field[pad:-pad, pad:-pad, pad:-pad]
    return field / field.std()


@pytest.fixture(scope="module")
def brain() -> np.ndarray:
    return read_minc(FIXTURES / "average_template_200um_mask.mnc")[0] > 0.5


@pytest.fixture(scope="module")
def smooth_cube(tmp_path_factory, brain):
    """10 smooth experiments inside the brain (RAS arrays kept for the expected values);
    the last two are 'sagittal', with data in the left hemisphere only; Gene0 has two."""
    rng = np.random.default_rng(7)
    arrays, experiments = [], []
    for i in range(SMOOTH_EXPERIMENTS):
        ras = np.where(brain, 3.0 + smooth_field(rng), -1.0).astype(np.float32)
        plane = "sagittal" if i >= SMOOTH_EXPERIMENTS - 2 else "coronal"
        if plane == "sagittal":
            ras[:, :, SIZES[2] // 2:] = -1.0
        assert np.array_equal(notebook_ras(ras_to_pir(ras)), ras)
        arrays.append(ras)
        experiments.append(TestExperiment(500 + i, f"Gene{max(0, i - 1)}", plane, ras_to_pir(ras)))
    folder = tmp_path_factory.mktemp("smooth")
    write_test_cube(folder, experiments)
    return folder, experiments, np.stack(arrays)


def save_nifti(volume: np.ndarray, path, step: float = STEP) -> str:
    """A (zspace, yspace, xspace) volume as NIfTI with nibabel, voxel centres on the world grid of
    the given step covering the cube's extent (x, y, z order on disk as NIfTI wants)."""
    starts = [s - STEP / 2 + step / 2 for s in STARTS]  # same world extent, finer voxels
    affine = np.diag([step, step, step, 1.0])
    affine[:3, 3] = [starts[2], starts[1], starts[0]]
    nibabel.save(nibabel.Nifti1Image(np.transpose(volume, (2, 1, 0)).astype(np.float32), affine), str(path))
    return str(path)


def read_rows(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def number(text: str) -> float:
    """A CSV cell as a float: empty is NaN (pandas writes NaN as an empty cell)."""
    return float(text) if text != "" else float("nan")


def expected_r(map_volume: np.ndarray, ras: np.ndarray, mask: np.ndarray, method: str = "pearson") -> tuple[float, int]:
    use = mask & (ras != -1) & np.isfinite(map_volume)
    a, b = map_volume[use], ras[use]
    r = stats.spearmanr(a, b)[0] if method == "spearman" else np.corrcoef(a, b)[0, 1]
    return float(r), int(use.sum())


def search(args: list[str], capsys) -> tuple[int, str]:
    code = main(["search", "-q", *args])
    return code, capsys.readouterr().err


def test_planted_map_ranks_its_experiment_first_with_exact_r(smooth_cube, brain, tmp_path, capsys):
    """A map made from one experiment (an affine function of its grid plus smooth noise) finds that
    experiment first with r >= 0.9 and q < 0.05; every r and n_voxels is the numpy value over the
    voxels both have data (the half-brain 'sagittal' ones included)."""
    folder, experiments, arrays = smooth_cube
    k = 4
    rng = np.random.default_rng(1)
    planted = np.where(brain, 2.0 * arrays[k] - 5.0 + 0.3 * smooth_field(rng), 0.0)
    to = tmp_path / "results.csv"
    code, err = search([save_nifti(planted, tmp_path / "map.nii.gz"), "--out", str(folder), "--to", str(to),
                        "--nulls", "200"], capsys)
    assert code == 0, err
    rows = read_rows(to)
    assert list(rows[0])[:7] == ["experiment_id", "gene", "plane", "r", "p_spatial", "q", "n_voxels"]
    assert int(rows[0]["experiment_id"]) == experiments[k].experiment_id
    assert float(rows[0]["r"]) >= 0.9 and float(rows[0]["q"]) < 0.05
    r = [float(row["r"]) for row in rows]
    assert r == sorted(r, reverse=True)
    brain_mask = (arrays != -1).any(axis=0)  # the default mask: data in any experiment
    for row in rows:
        i = [e.experiment_id for e in experiments].index(int(row["experiment_id"]))
        want, n = expected_r(planted, arrays[i], brain_mask)
        assert float(row["r"]) == pytest.approx(want, abs=2e-5)
        assert int(row["n_voxels"]) == n


def test_smooth_noise_map_finds_no_gene(smooth_cube, tmp_path, capsys):
    """A smooth random map unrelated to every experiment: no q < 0.05 (naive p-values would call
    most of them significant), and the gene table combines Gene0's two experiments."""
    folder, experiments, arrays = smooth_cube
    noise = smooth_field(np.random.default_rng(99))
    to = tmp_path / "noise.csv"
    code, err = search([save_nifti(noise, tmp_path / "noise.nii"), "--out", str(folder), "--to", str(to),
                        "--nulls", "100", "--by", "gene"], capsys)
    assert code == 0, err
    rows = read_rows(to)
    assert len(rows) == SMOOTH_EXPERIMENTS
    assert min(float(row["q"]) for row in rows) >= 0.05
    genes = {row["gene"]: row for row in read_rows(tmp_path / "noise_genes.csv")}
    assert set(genes) == {e.gene for e in experiments}
    assert genes["Gene0"]["experiment_ids"] == "500;501" and genes["Gene0"]["n_experiments"] == "2"
    brain_mask = (arrays != -1).any(axis=0)
    z = [np.arctanh(expected_r(noise, arrays[i], brain_mask)[0]) for i in (0, 1)]
    assert float(genes["Gene0"]["r"]) == pytest.approx(np.tanh(np.mean(z)), abs=2e-5)


def test_calibration_over_smooth_random_maps(smooth_cube, brain, tmp_path):
    """Over 50 smooth random maps, about 5 % of experiments get p_spatial < 0.05 (the spatial nulls
    hold); the textbook p-value, which takes voxels as independent, calls far more significant."""
    from ambasync.analysis.search.correlate import correlate

    folder, experiments, arrays = smooth_cube
    rng = np.random.default_rng(2024)
    spatial, naive = [], []
    brain_mask = (arrays != -1).any(axis=0)
    for m in range(CALIBRATION_MAPS):
        volume = smooth_field(rng)
        path = save_nifti(volume, tmp_path / f"map{m}.nii")
        result = correlate(str(folder / "cube.zarr"), path, nulls=CALIBRATION_NULLS, seed=m, progress=False)
        spatial.extend(result.experiments["p_spatial"].tolist())
        for ras in arrays:
            use = brain_mask & (ras != -1)
            naive.append(stats.pearsonr(volume[use], ras[use])[1])
    spatial_rate = float(np.mean(np.asarray(spatial) < 0.05))
    naive_rate = float(np.mean(np.asarray(naive) < 0.05))
    print(f"p < 0.05: spatial nulls {spatial_rate:.3f}, parametric {naive_rate:.3f}")
    assert 0.02 <= spatial_rate <= 0.09
    assert naive_rate > 0.5


def test_spearman_is_scipys_where_the_experiment_covers_the_mask(smooth_cube, brain, tmp_path):
    """--method spearman gives scipy's rho for experiments with data in every voxel of the mask."""
    from ambasync.analysis.search.correlate import correlate

    folder, experiments, arrays = smooth_cube
    volume = np.exp(smooth_field(np.random.default_rng(5)))
    result = correlate(str(folder / "cube.zarr"), save_nifti(volume, tmp_path / "map.nii"), method="spearman", nulls=0,
                       progress=False)
    brain_mask = (arrays != -1).any(axis=0)
    table = result.experiments.set_index("experiment_id")
    for e, ras in zip(experiments[:-2], arrays[:-2]):  # the coronal ones cover the whole brain
        assert table.loc[e.experiment_id, "r"] == pytest.approx(expected_r(volume, ras, brain_mask, "spearman")[0],
                                                                abs=1e-5)
    assert table["p_spatial"].isna().all()  # no nulls asked: no spatial p-values, not made-up ones


def test_map_at_100um_gives_the_same_ranking_as_at_200um(smooth_cube, tmp_path):
    """A map given on a finer grid over the same world extent is resampled by world coordinates:
    same ranking and the same r as the 200 µm map."""
    from ambasync.analysis.search.correlate import correlate

    folder, _, _ = smooth_cube
    volume = smooth_field(np.random.default_rng(11))
    fine = volume.repeat(2, axis=0).repeat(2, axis=1).repeat(2, axis=2)
    coarse = correlate(str(folder / "cube.zarr"), save_nifti(volume, tmp_path / "c.nii"), nulls=0, progress=False).experiments
    finer = correlate(str(folder / "cube.zarr"), save_nifti(fine, tmp_path / "f.nii", step=STEP / 2), nulls=0,
                      progress=False).experiments
    assert finer["experiment_id"].tolist() == coarse["experiment_id"].tolist()
    np.testing.assert_allclose(finer["r"], coarse["r"], atol=1e-6)


def test_local_and_cluster_give_identical_results(smooth_cube, tmp_path, monkeypatch):
    """--scheduler spreads the work over a dask cluster; the table is the same, number for number."""
    import logging

    from ambasync.analysis.search.correlate import correlate

    # distributed logs while closing; earlier CLI tests left the root handler on a closed capture
    monkeypatch.setattr(logging.getLogger("distributed"), "propagate", False)

    folder, _, _ = smooth_cube
    path = save_nifti(smooth_field(np.random.default_rng(3)), tmp_path / "map.nii")
    local = correlate(str(folder / "cube.zarr"), path, nulls=30, by_gene=True, progress=False)
    with local_cluster() as cluster:
        remote = correlate(str(folder / "cube.zarr"), path, nulls=30, by_gene=True, scheduler=cluster.scheduler_address,
                           progress=False)
    assert local.experiments.equals(remote.experiments)
    assert local.genes.equals(remote.genes)


def test_fold_change_matches_numpy(tmp_path, capsys):
    """--target/--contrast: per experiment, mean energy over the voxels with data in each region,
    their quotient and log2, and the voxel counts, as numpy computes them from the raw grids (real
    Nrp1 and Pdyn grids among them, with their -1 voxels); the contrast defaults to the rest of the brain."""
    experiments = replica_experiments(4, 2)
    write_test_cube(tmp_path, experiments)
    arrays = np.stack([notebook_ras(e.grid) for e in experiments]).astype(np.float64)
    brain_mask = (arrays != -1).any(axis=0)
    target = np.zeros(SIZES)
    target[15:25, 30:40, 10:25] = 1
    contrast = np.zeros(SIZES)
    contrast[15:25, 30:40, 33:48] = 1
    t_path, c_path = save_nifti(target, tmp_path / "t.nii.gz"), save_nifti(contrast, tmp_path / "c.nii.gz")
    for extra, other in (([], brain_mask & (target == 0)), (["--contrast", c_path], brain_mask & (contrast == 1))):
        to = tmp_path / "fold.csv"
        code, err = search(["--target", t_path, *extra, "--out", str(tmp_path), "--to", str(to)], capsys)
        assert code == 0, err
        rows = {int(row["experiment_id"]): row for row in read_rows(to)}
        assert len(rows) == len(experiments)
        for e, ras in zip(experiments, arrays):
            valid = ras != -1
            t_use, c_use = valid & brain_mask & (target == 1), valid & other
            # No voxel with data in a region: its mean is NaN (written empty), and so is the fold change.
            t_mean = ras[t_use].mean() if t_use.any() else np.nan
            c_mean = ras[c_use].mean() if c_use.any() else np.nan
            row = rows[e.experiment_id]
            assert (int(row["n_target"]), int(row["n_contrast"])) == (t_use.sum(), c_use.sum())
            assert number(row["target_mean"]) == pytest.approx(t_mean, rel=1e-9, nan_ok=True)
            assert number(row["contrast_mean"]) == pytest.approx(c_mean, rel=1e-9, nan_ok=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                want = np.log2(t_mean / c_mean)
            assert number(row["log2_fold_change"]) == pytest.approx(want, rel=1e-9, nan_ok=True)
        folds = [number(row["log2_fold_change"]) for row in read_rows(to)]
        known = [f for f in folds if not np.isnan(f)]
        assert known == sorted(known, reverse=True) and folds[:len(known)] == known  # NaN last


def test_plot_is_a_png_of_the_expected_size(smooth_cube, brain, tmp_path, capsys):
    """--plot writes a real PNG (1600 x 1000 px: the map and top four experiments' slices, and the
    top bars) that matplotlib reads back."""
    import matplotlib.image

    folder, _, arrays = smooth_cube
    planted = np.where(brain, arrays[2], 0.0)
    png = tmp_path / "top.png"
    code, err = search([save_nifti(planted, tmp_path / "map.nii"), "--out", str(folder), "--to",
                        str(tmp_path / "r.csv"), "--nulls", "0", "--plot", str(png)], capsys)
    assert code == 0, err
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    assert struct.unpack(">II", head[16:24]) == (1600, 1000)
    image = matplotlib.image.imread(png)
    assert image.shape[:2] == (1000, 1600) and image[..., :3].std() > 0.05  # drawn, not blank


def test_bad_input_is_one_line_and_exit_2(smooth_cube, brain, tmp_path, capsys):
    """A map off the grid, an all-NaN or constant map, an ROI with no voxels in the mask and a
    missing cube each give one line naming the problem, exit 2, no traceback, no results file."""
    folder, _, _ = smooth_cube
    to = tmp_path / "r.csv"
    far = tmp_path / "far.nii"
    affine = np.diag([0.2, 0.2, 0.2, 1.0])
    affine[:3, 3] = 500.0  # half a metre away: no overlap with the brain
    nibabel.save(nibabel.Nifti1Image(np.ones((10, 10, 10), np.float32), affine), str(far))
    constant = save_nifti(np.full(SIZES, 4.0), tmp_path / "const.nii")
    nan = save_nifti(np.full(SIZES, np.nan), tmp_path / "nan.nii")
    empty_roi = save_nifti(np.zeros(SIZES), tmp_path / "empty.nii")
    cases = [
        ([str(far), "--out", str(folder)], ["does not overlap", "far.nii", "world extent"]),
        ([constant, "--out", str(folder)], ["constant", "const.nii"]),
        ([nan, "--out", str(folder)], ["no values", "nan.nii"]),
        (["--target", empty_roi, "--out", str(folder)], ["--target", "no voxels"]),
        ([constant, "--out", str(tmp_path / "nothing")], ["no cube", "ambasync run"]),
    ]
    for args, words in cases:
        code, err = search([*args, "--to", str(to)], capsys)
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ambasync: ") and "Traceback" not in err, err
        for word in words:
            assert word in lines[0], (word, lines[0])
        assert not to.exists()


def test_cube_with_voxel_major_copy_gives_the_volume_major_table(tmp_path):
    """A cube written by the run (ambasync.cube, with its voxel-major copy) is scored from that copy:
    the same ranking, n_voxels, p_spatial and q as reading it experiment by experiment, and r within
    1e-9 of numpy's over the raw grids (real Nrp1 and Pdyn among them, half-brain sagittal ones too).
    If it broke, a user would get a different table depending on how the cube was written."""
    from ambasync.cube import CubeSettings, ZipSource, build_from_zips
    from ambasync.replica import Replica, ReplicaConfig
    from ambasync.analysis.search.correlate import correlate
    from helpers import GRIDS

    rep = Replica(ReplicaConfig(n_coronal=9, n_sagittal=4, seed=3, real_dir=str(GRIDS)))
    sources, arrays = [], []
    for row in rep.rows:
        eid = int(row["experiment_id"])
        zip_path = tmp_path / f"{eid}.zip"
        zip_path.write_bytes(rep.zip_for(eid))
        sources.append(ZipSource(eid, str(zip_path), dict(row)))
        arrays.append(notebook_ras(np.asarray(rep.raw_grid(eid), dtype=np.float32)).astype(np.float64))
    # 8 experiments per voxel-major chunk: two spans, the last one partial; chunks cut the grid unevenly
    build_from_zips(tmp_path / "cube.zarr", CubeSettings(block=8, by_voxel_chunk=(8, 16, 16)), sources, workers=1,
                    quiet=True)
    ids = [s.experiment_id for s in sources]
    arrays = np.stack(arrays)
    brain_mask = (arrays != -1).any(axis=0)
    k = 2
    volume = np.where(brain_mask, np.maximum(arrays[k], 0) + 0.5 * smooth_field(np.random.default_rng(8)), 0.0)
    path = save_nifti(volume, tmp_path / "map.nii")
    fast = correlate(str(tmp_path / "cube.zarr"), path, nulls=40, by_gene=True, progress=False)
    slow = correlate(str(tmp_path / "cube.zarr"), path, nulls=40, by_gene=True, progress=False, voxel_major=False)
    a, b = fast.experiments, slow.experiments
    assert a["experiment_id"].tolist() == b["experiment_id"].tolist()
    assert int(a["experiment_id"].iloc[0]) == ids[k]
    for column in ("n_voxels", "p_spatial", "q", "gene", "plane"):
        assert a[column].equals(b[column]), column
    np.testing.assert_allclose(a["r"], b["r"], atol=2e-5)  # the volume-major path multiplies in float32
    np.testing.assert_allclose(a["p_naive"], b["p_naive"], rtol=1e-3)
    saved = np.asarray(nibabel.load(path).dataobj, dtype=np.float64).transpose(2, 1, 0)
    for _, row in a.iterrows():
        want, n = expected_r(saved, arrays[ids.index(int(row["experiment_id"]))], brain_mask)
        assert abs(row["r"] - want) <= 1e-9 and row["n_voxels"] == n
    assert fast.genes["gene"].tolist() == slow.genes["gene"].tolist()
    assert fast.genes["p_spatial"].equals(slow.genes["p_spatial"])
