"""`ambasync search` differential mode as the field computes it, and how images meet the cube's grid.

* Fold change against numpy, from the raw grids (the replica's, the real Nrp1 and Pdyn among them):
  a statistic map thresholded (target t > T, contrast t <= T'), and an explicit contrast that
  includes the target, used as given (it used to be silently reduced to contrast minus target).
* A map with the cube's shape and step but another origin (as MINC files on the Allen grid often
  carry): exit 2 and one line naming both origins and both --align choices; with --align voxel,
  the same table as the map written on the cube's grid.
* Each image's overlap with the mask is printed; the API has every new flag as a keyword.
"""

from __future__ import annotations

import csv
import inspect

import nibabel
import numpy as np
import pytest

from ambasync.cli import main
from helpers import notebook_ras
from cubes import SIZES, STARTS, STEP, replica_experiments, write_test_cube

pytestmark = pytest.mark.e2e  # real runs, servers or clusters: make test-fast leaves these out


def save_nifti(volume: np.ndarray, path, starts=STARTS) -> str:
    """A (zspace, yspace, xspace) volume as NIfTI on the cube's step, first voxel at ``starts``."""
    affine = np.diag([STEP, STEP, STEP, 1.0])
    affine[:3, 3] = [starts[2], starts[1], starts[0]]
    nibabel.save(nibabel.Nifti1Image(np.transpose(volume, (2, 1, 0)).astype(np.float32), affine), str(path))
    return str(path)


def rows_of(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def number(text: str) -> float:
    return float(text) if text != "" else float("nan")


def run(args: list[str], capsys, quiet: bool = True) -> tuple[int, str]:
    code = main(["search", *(["-q"] if quiet else []), *args])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def cube(tmp_path_factory):
    folder = tmp_path_factory.mktemp("regions")
    experiments = replica_experiments(4, 2)
    write_test_cube(folder, experiments)
    arrays = np.stack([notebook_ras(e.grid) for e in experiments]).astype(np.float64)
    return folder, experiments, arrays


def smooth_tmap(seed: int) -> np.ndarray:
    from scipy import ndimage

    field = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(SIZES), 2.5)
    return 3 * field / field.std()


def expected(ras: np.ndarray, target: np.ndarray, contrast: np.ndarray) -> tuple[float, float, int, int]:
    valid = ras != -1
    t, c = valid & target, valid & contrast
    return (ras[t].mean() if t.any() else np.nan, ras[c].mean() if c.any() else np.nan, int(t.sum()), int(c.sum()))


def check_against_numpy(to, experiments, arrays, target: np.ndarray, contrast: np.ndarray) -> list[dict]:
    rows = {int(r["experiment_id"]): r for r in rows_of(to)}
    assert len(rows) == len(experiments)
    for e, ras in zip(experiments, arrays):
        t_mean, c_mean, n_t, n_c = expected(ras, target, contrast)
        row = rows[e.experiment_id]
        assert (int(row["n_target"]), int(row["n_contrast"])) == (n_t, n_c)
        assert number(row["target_mean"]) == pytest.approx(t_mean, rel=1e-9, nan_ok=True)
        assert number(row["contrast_mean"]) == pytest.approx(c_mean, rel=1e-9, nan_ok=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            assert number(row["log2_fold_change"]) == pytest.approx(np.log2(t_mean / c_mean), rel=1e-9, nan_ok=True)
    return list(rows.values())


def test_thresholded_statistic_map_matches_numpy(cube, tmp_path, capsys):
    """--target T.nii --target-above 2 --contrast-at-most 0.5: target t > 2, contrast t <= 0.5 of the
    same map (MICe labs' thresholds); both within the mask (default brain: data in any experiment)."""
    folder, experiments, arrays = cube
    brain = (arrays != -1).any(axis=0)
    tmap = smooth_tmap(4)
    path = save_nifti(tmap, tmp_path / "t.nii")
    to = tmp_path / "fold.csv"
    code, err = run(["--target", path, "--target-above", "2", "--contrast-at-most", "0.5", "--out", str(folder),
                     "--to", str(to)], capsys)
    assert code == 0, err
    rows = check_against_numpy(to, experiments, arrays, brain & (tmap > 2), brain & (tmap <= 0.5))
    assert {r["target"] for r in rows} == {"t.nii > 2"} and {r["contrast"] for r in rows} == {"t.nii <= 0.5"}
    # a separate contrast image thresholded the same way
    other = smooth_tmap(5)
    code, err = run(["--target", path, "--target-above", "1.5", "--contrast", save_nifti(other, tmp_path / "u.nii"),
                     "--contrast-at-most", "0", "--out", str(folder), "--to", str(to)], capsys)
    assert code == 0, err
    check_against_numpy(to, experiments, arrays, brain & (tmap > 1.5), brain & (other <= 0))


def test_explicit_contrast_is_used_as_given_including_the_target(cube, tmp_path, capsys):
    """"Fold change in the target against the whole brain": --contrast brain.nii keeps the target's
    voxels in the contrast. Without --contrast it is the rest of the mask, and the table says so."""
    folder, experiments, arrays = cube
    brain = (arrays != -1).any(axis=0)
    target = np.zeros(SIZES)
    target[15:25, 30:40, 10:25] = 1
    t_path = save_nifti(target, tmp_path / "t.nii.gz")
    whole = save_nifti(brain.astype(float), tmp_path / "brain.nii.gz")
    to = tmp_path / "fold.csv"
    code, err = run(["--target", t_path, "--contrast", whole, "--out", str(folder), "--to", str(to)], capsys)
    assert code == 0, err
    rows = check_against_numpy(to, experiments, arrays, brain & (target == 1), brain)
    assert {r["contrast"] for r in rows} == {"brain.nii.gz != 0"}
    methods = (tmp_path / "fold.csv.methods.md").read_text()  # the methods text names it too
    assert "contrast region (brain.nii.gz != 0)" in methods and "used as given" in methods
    code, err = run(["--target", t_path, "--out", str(folder), "--to", str(to)], capsys)
    assert code == 0, err
    rows = check_against_numpy(to, experiments, arrays, brain & (target == 1), brain & (target == 0))
    assert {r["contrast"] for r in rows} == {"rest of the mask brain (mask minus target)"}
    methods = (tmp_path / "fold.csv.methods.md").read_text()
    assert "(rest of the mask brain (mask minus target))" in methods and "used as given" not in methods


def test_ambiguous_origin_stops_and_align_voxel_takes_it_index_for_index(cube, tmp_path, capsys):
    """The same array written with the cube's origin and with one off by (-1.6, +1.6, +0.3) mm (8, 8 and
    1.5 voxels): the second stops with exit 2 and one line naming both origins and both flags; with
    --align voxel it gives the first's table exactly; --align world resamples it (shifted), as asked."""
    folder, experiments, arrays = cube
    volume = np.where((arrays != -1).any(axis=0), np.maximum(arrays[0], 0) + smooth_tmap(6), 0.0)
    on_grid = save_nifti(volume, tmp_path / "on.nii")
    shifted_starts = (STARTS[0] + 0.3, STARTS[1] + 1.6, STARTS[2] - 1.6)  # (z, y, x)
    off = save_nifti(volume, tmp_path / "off.nii", starts=shifted_starts)
    base = ["--out", str(folder), "--nulls", "0"]
    code, err = run([off, *base, "--to", str(tmp_path / "x.csv")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in ("off.nii", "--align voxel", "--align world", "(-7.30, -6.30, -2.40)", "(-5.70, -7.90, -2.70)"):
        assert word in lines[0], (word, lines[0])
    assert not (tmp_path / "x.csv").exists()
    code, err = run([on_grid, *base, "--to", str(tmp_path / "a.csv")], capsys)
    assert code == 0, err
    code, err = run([off, *base, "--align", "voxel", "--to", str(tmp_path / "b.csv")], capsys)
    assert code == 0, err
    assert rows_of(tmp_path / "a.csv") == rows_of(tmp_path / "b.csv")
    assert "index for index onto the cube's grid (--align voxel)" in (tmp_path / "b.csv.methods.md").read_text()
    code, err = run([off, *base, "--align", "world", "--to", str(tmp_path / "c.csv")], capsys)
    assert code == 0, err
    assert rows_of(tmp_path / "c.csv") != rows_of(tmp_path / "a.csv")
    # a region is held to the same rule
    target = save_nifti((volume > np.percentile(volume, 90)).astype(float), tmp_path / "roi.nii",
                        starts=shifted_starts)
    code, err = run(["--target", target, "--out", str(folder), "--to", str(tmp_path / "d.csv")], capsys)
    assert code == 2 and "--target" in err and "--align voxel" in err and len(err.strip().splitlines()) == 1
    # --align voxel needs the cube's shape
    small = save_nifti(volume[:-1], tmp_path / "small.nii")
    code, err = run([small, *base, "--align", "voxel", "--to", str(tmp_path / "e.csv")], capsys)
    assert code == 2 and "cube's shape" in err


def test_overlap_with_the_mask_is_printed(cube, tmp_path, capsys):
    """A map covering half the grid says so: its voxels in the mask, of how many, and the share."""
    folder, _, arrays = cube
    brain = (arrays != -1).any(axis=0)
    volume = smooth_tmap(7)
    volume[:, :, SIZES[2] // 2:] = np.nan
    code, err = run([save_nifti(volume, tmp_path / "half.nii"), "--out", str(folder), "--nulls", "0", "--to",
                     str(tmp_path / "h.csv")], capsys, quiet=False)
    assert code == 0, err
    inside = int((brain & np.isfinite(volume)).sum())
    want = f"MAP {tmp_path / 'half.nii'}: {inside:,} of {int(brain.sum()):,} voxels of the mask brain " \
           f"({100 * inside / brain.sum():.1f} %)"
    assert want in err, err
    target = np.zeros(SIZES)
    target[15:25, 30:40, 10:25] = 1
    code, err = run(["--target", save_nifti(target, tmp_path / "t.nii"), "--out", str(folder), "--to",
                     str(tmp_path / "f.csv")], capsys, quiet=False)
    assert code == 0, err
    assert f"--target {tmp_path / 't.nii'}: {int((brain & (target == 1)).sum()):,} of {int(target.sum()):,}" in err


def test_every_new_flag_is_an_api_keyword_with_the_same_default():
    """--tail, --align, --target-above, --contrast-at-most: keywords of search/run_search (and the
    differential ones of fold_change) with the command line's defaults."""
    import argparse

    from ambasync.analysis.search.api import fold_change, run_search, search
    from ambasync.cli.search import add_parser

    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    defaults = {a.dest: a.default for a in parser._actions}
    for name in ("tail", "align", "target_above", "contrast_at_most"):
        for function in (search, run_search):
            assert inspect.signature(function).parameters[name].default == defaults[name], (function, name)
        if name != "tail":
            assert inspect.signature(fold_change).parameters[name].default == defaults[name], name
