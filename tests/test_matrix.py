"""`ambasync matrix`: the gene-by-voxel and gene-by-region matrices labs build by hand.

Every expected matrix is computed here, step by step, from the raw Allen grids the test cube
holds (the replica's synthetic grids with exact zeros, plus the real Nrp1 and Pdyn grids), with
plain numpy and pandas as MouseHumanTranscriptomicSimilarity's scripts do: never with the code
under test. Masks and labels are the real MHTS files in tests/fixtures, read back with pyminc.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from ambasync.cli import main
from helpers import FIXTURES, MHTS, ambasync_cmd, notebook_ras, read_minc
from cubes import replica_experiments, write_test_cube

pytestmark = pytest.mark.e2e  # real runs, servers or clusters: make test-fast leaves these out

CORONAL_MASK = FIXTURES / "coronal_200um_coverage_bin0.8.mnc"
LABELS = MHTS / "DSURQE_CCFv3_labels_200um.mnc"
LABEL_TABLE = MHTS / "DSURQE_40micron_R_mapping_long.csv"
TOL = 1e-9  # both sides are float64 from the same float32 grids: only summation order differs


# ---------------------------------------------------------------------------------------------
# The test cube and masks
# ---------------------------------------------------------------------------------------------

def _experiments():
    """16 synthetic coronal experiments over 9 genes, the real Nrp1 and Pdyn, 8 sagittal
    experiments covering the left hemisphere only (as sagittal ISH does), 6 of them of genes
    that also have coronal experiments and 2 of a sagittal-only gene, and an empty slot
    (negative id, no gene, only -1: docs/cube.md), which is no experiment."""
    exps = replica_experiments(16, 8, seed=3)
    out = []
    for i, e in enumerate(x for x in exps if x.plane == "sagittal"):
        grid = np.array(e.grid)
        grid[29:] = -1  # the raw grid's first axis is left-right (58 voxels): keep one hemisphere
        gene = ("Gene1", "Gene2", "Gene4")[i % 3] if i < 6 else "Sonly"
        out.append(dataclasses.replace(e, gene=gene, grid=grid, catalogue={**e.catalogue, "gene": gene}))
    empty = dataclasses.replace(exps[0], experiment_id=-5, gene="", plane="", grid=np.full_like(exps[0].grid, -1),
                                catalogue={**exps[0].catalogue, "gene": "", "plane": ""})
    return [e for e in exps if e.plane == "coronal"] + out + [empty]  # an empty slot, as a pruned cube has


@pytest.fixture(scope="module")
def exps():
    return _experiments()


@pytest.fixture(scope="module")
def cube(tmp_path_factory, exps):
    out = tmp_path_factory.mktemp("mirror")
    write_test_cube(out, exps)
    return out


def _mask_file(path: Path, mask: np.ndarray, like: Path = CORONAL_MASK, shift_mm: float = 0.0) -> Path:
    """A mask image written with pyminc on the fixture's grid (or shifted, for a grid mismatch)."""
    from pyminc.volumes.factory import volumeFromDescription, volumeFromFile

    ref = volumeFromFile(str(like))
    try:
        vol = volumeFromDescription(str(path), list(ref.dimnames), [int(s) for s in ref.sizes[:3]],
                                    [float(s) + shift_mm for s in ref.starts], list(ref.separations),
                                    volumeType="ubyte", dtype="float")
    finally:
        ref.closeVolume()
    vol.data = mask.astype(np.float64)
    vol.writeFile()
    vol.closeVolume()
    return path


@pytest.fixture(scope="module")
def coronal_mask():
    data, _ = read_minc(CORONAL_MASK)
    return data == 1  # MHTS: maskArray == 1


@pytest.fixture(scope="module")
def box(tmp_path_factory, coronal_mask):
    """A few hundred voxels of the coronal mask: KNN is quadratic in voxels, tests stay fast."""
    sub = np.zeros_like(coronal_mask)
    sub[18:23, 28:38, 22:32] = True
    mask = coronal_mask & sub
    path = _mask_file(tmp_path_factory.mktemp("masks") / "box.mnc", mask)
    return path, mask


@pytest.fixture(scope="module")
def slabs(tmp_path_factory, coronal_mask, exps):
    """Coronal slices 30-32 of the coronal mask and of the cube's sagittal coverage >= 0.8 (computed
    here from the raw grids): a few thousand voxels, so the option tests take a second each."""
    slab = np.zeros_like(coronal_mask)
    slab[:, 30:33, :] = True
    sagittal = (np.stack([notebook_ras(e.grid) for e in exps if e.plane == "sagittal"]) != -1).mean(axis=0) >= 0.8
    folder = tmp_path_factory.mktemp("slabs")
    return {plane: (_mask_file(folder / f"{plane}.mnc", mask & slab), mask & slab)
            for plane, mask in (("coronal", coronal_mask), ("sagittal", sagittal))}


def run(*args, capsys=None) -> tuple[int, str]:
    code = main(["matrix", "-q", *map(str, args)])
    err = capsys.readouterr().err if capsys else ""
    return code, err


# ---------------------------------------------------------------------------------------------
# The independent implementation (numpy + pandas, MHTS's steps)
# ---------------------------------------------------------------------------------------------

def expected(exps, mask, *, plane="coronal", genes_in_coronal=True, genes=(), ids=(), zero_is_missing=True,
             log2=True, group_by="gene", combine="mean", max_missing=0.2, mirror=False, normalise="none",
             homologs=None) -> pd.DataFrame:
    chosen = [e for e in exps if e.experiment_id >= 0 and (plane == "both" or e.plane == plane)]
    if plane == "sagittal" and genes_in_coronal:
        coronal = {e.gene for e in exps if e.plane == "coronal"}
        chosen = [e for e in chosen if e.gene in coronal]
    if genes:
        chosen = [e for e in chosen if e.gene in genes]
    if ids:
        chosen = [e for e in chosen if e.experiment_id in ids]
    chosen.sort(key=lambda e: (e.gene, e.experiment_id))
    rows = []
    for e in chosen:
        raw = np.array(e.grid, dtype=np.float32)
        if mirror and e.plane == "sagittal":
            raw = np.where(raw == -1, raw[::-1], raw)  # raw axis 0 is left-right
        v = notebook_ras(raw)[mask].astype(np.float64)
        v[v == -1] = np.nan
        if zero_is_missing:
            v[v == 0] = np.nan
        if log2:
            with np.errstate(divide="ignore"):
                v = np.log2(v)
            v[np.isinf(v)] = np.nan
        rows.append(v)
    df = pd.DataFrame(np.array(rows), index=[e.gene for e in chosen])
    if group_by == "experiment":
        df.index = [str(e.experiment_id) for e in chosen]
    else:
        if plane == "both" and combine == "zscore-mean":
            df = df.sub(df.mean(axis=1), axis=0).div(df.std(axis=1, ddof=1), axis=0)
        if plane == "both" and combine == "prefer-coronal":
            has_coronal = {e.gene for e in chosen if e.plane == "coronal"}
            keep = [e.plane == "coronal" or e.gene not in has_coronal for e in chosen]
            df = df[np.array(keep)]
        df = df.groupby(level=0).mean()
    df = df[df.isna().sum(axis=1) / df.shape[1] < max_missing]
    if homologs is not None:
        gene_of = {str(e.experiment_id): e.gene for e in chosen}
        df = df[[(g if group_by == "gene" else gene_of[g]) in homologs for g in df.index]]
    if normalise == "mhts":
        z = (df - df.mean(axis=0)) / df.std(axis=0, ddof=1)
        df = z.sub(z.mean(axis=1), axis=0)
    elif normalise == "zscore":
        df = df.sub(df.mean(axis=1), axis=0).div(df.std(axis=1, ddof=1), axis=0)
    elif normalise == "srs":
        out = {}
        for g, row in df.iterrows():
            x = row.to_numpy()
            iqr = scipy.stats.iqr(x, scale="normal", nan_policy="omit")
            s = 1 / (1 + np.exp(-(x - np.nanmedian(x)) / iqr))
            out[g] = (s - np.nanmin(s)) / (np.nanmax(s) - np.nanmin(s))
        df = pd.DataFrame(out, index=df.columns).T
    df.columns = [str(c) for c in range(df.shape[1])]
    return df


def read_csv(path: Path, label: str = "Gene") -> pd.DataFrame:
    df = pd.read_csv(path, index_col=label, dtype={label: str}, float_precision="round_trip")
    df.index = df.index.astype(str)
    return df


def assert_same(got: pd.DataFrame, want: pd.DataFrame, tol: float = TOL) -> None:
    assert list(got.index) == list(want.index)
    assert list(got.columns) == list(want.columns)
    g, w = got.to_numpy(dtype=float), want.to_numpy(dtype=float)
    assert np.array_equal(np.isnan(g), np.isnan(w)), "NaN in different cells"
    np.testing.assert_allclose(g, w, rtol=0, atol=tol, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# The contract: MHTS's CSV, numbers and NaN
# ---------------------------------------------------------------------------------------------

def test_contract_csv_is_mhts_format_and_numbers(tmp_path, cube, exps, coronal_mask):
    """The exact command other tools run gives MHTS's CSV: `Gene` index sorted, columns 0..V-1 in
    the MINC files' flattened voxel order, the same NaN cells and values. If this broke, every
    downstream MHTS analysis would silently use other numbers."""
    to = tmp_path / "coronal_matrix.csv"
    proc = subprocess.run(ambasync_cmd("matrix", "--out", str(cube), "--recipe", "mhts", "--plane", "coronal",
                                       "--mask", str(CORONAL_MASK), "--max-missing", "0.5", "--impute", "none",
                                       "--to", str(to)), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    header = to.read_text().split("\n", 1)[0].split(",")
    assert header[0] == "Gene" and header[1:] == [str(i) for i in range(int(coronal_mask.sum()))]
    got = read_csv(to)
    want = expected(exps, coronal_mask, max_missing=0.5)
    assert {"Nrp1", "Pdyn"} <= set(got.index) and len(got) >= 5
    assert list(got.index) == sorted(got.index)
    assert_same(got, want)
    assert np.isnan(got.to_numpy()).any()  # zeros and no-data voxels really are NaN


def test_contract_matches_mhts_script_on_float_minc_files(tmp_path, cube, exps, coronal_mask):
    """The same genes, NaN cells and values (within 1e-4) as MHTS's build_voxel_matrix.py (the
    faithful baseline in bench/) run on float MINC files of the same experiments, which it groups
    by file name up to the first `_`."""
    from ambasync.geometry import output_geometry
    from ambasync.imaging.minc import write_volume
    from bench.mhts_baseline import build_expression_matrix

    folder = tmp_path / "expression" / "coronal"
    folder.mkdir(parents=True)
    geometry = output_geometry((58, 41, 67), "RAS", "MICe", 1.0)
    files = []
    for e in exps:
        if e.plane == "coronal":
            files.append(folder / f"{e.gene}_{e.experiment_id}.mnc")
            write_volume(notebook_ras(np.asarray(e.grid)).astype(np.float32), geometry, files[-1], "float")
    theirs = build_expression_matrix([str(f) for f in files], str(CORONAL_MASK), threshold=0.5, nproc=1)
    to = tmp_path / "ours.csv"
    assert run("--out", cube, "--mask", CORONAL_MASK, "--max-missing", "0.5", "--impute", "none", "--to", to)[0] == 0
    ours = read_csv(to)
    theirs.columns = [str(c) for c in theirs.columns]
    assert_same(ours, theirs, tol=1e-4)


def test_a_cube_written_by_the_run_gives_the_same_matrix(tmp_path, slabs):
    """The cube the run writes (ambasync.cube, from the served zips) gives byte for byte the matrix
    of the contract's reference cube (tests/cubes.py) of the same experiments, both planes."""
    from ambasync.cube import CubeSettings, ZipSource, build_from_zips
    from ambasync.replica import Replica, ReplicaConfig
    from helpers import GRIDS

    rep = Replica(ReplicaConfig(n_coronal=8, n_sagittal=4, seed=5, real_dir=str(GRIDS)))
    sources = []
    for row in rep.rows:
        zip_path = tmp_path / f"{row['experiment_id']}.zip"
        zip_path.write_bytes(rep.zip_for(int(row["experiment_id"])))
        sources.append(ZipSource(int(row["experiment_id"]), str(zip_path), dict(row)))
    build_from_zips(tmp_path / "run" / "cube.zarr", CubeSettings(), sources, workers=1, quiet=True)
    write_test_cube(tmp_path / "reference", replica_experiments(8, 4, seed=5))
    path, _ = slabs["coronal"]
    for name in ("run", "reference"):
        assert run("--out", tmp_path / name, "--plane", "both", "--mask", path, "--max-missing", "0.5",
                   "--impute", "none", "--to", tmp_path / f"{name}.csv")[0] == 0
    assert (tmp_path / "run.csv").read_bytes() == (tmp_path / "reference.csv").read_bytes()


# ---------------------------------------------------------------------------------------------
# Every option against the independent implementation
# ---------------------------------------------------------------------------------------------

OPTIONS = {
    "no-zero-missing": (["--no-zero-is-missing"], dict(zero_is_missing=False)),
    "no-log2": (["--no-log2"], dict(log2=False)),
    "by-experiment": (["--group-by", "experiment"], dict(group_by="experiment")),
    "genes": (["--genes", "Gene1,Nrp1"], dict(genes=("Gene1", "Nrp1"))),
    "ids": (["--ids", "74272479,100013"], dict(ids=(74272479, 100013))),
    "sagittal": (["--plane", "sagittal", "--mask", "sagittal"], dict(plane="sagittal")),
    "sagittal-all-genes": (["--plane", "sagittal", "--mask", "sagittal", "--no-genes-in-coronal"],
                           dict(plane="sagittal", genes_in_coronal=False)),
    "both-mean": (["--plane", "both", "--combine", "mean"], dict(plane="both")),
    "both-prefer-coronal": (["--plane", "both", "--combine", "prefer-coronal"], dict(plane="both",
                                                                                    combine="prefer-coronal")),
    "both-zscore-mean": (["--plane", "both", "--combine", "zscore-mean"], dict(plane="both",
                                                                              combine="zscore-mean")),
    "mirror": (["--plane", "sagittal", "--mirror-hemisphere"], dict(plane="sagittal", mirror=True)),
    "normalise-mhts": (["--normalise", "mhts"], dict(normalise="mhts")),
    "normalise-srs": (["--normalise", "srs"], dict(normalise="srs")),
    "normalise-zscore": (["--normalise", "zscore"], dict(normalise="zscore")),
    "max-missing": (["--max-missing", "0.3"], dict(max_missing=0.3)),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_matches_numpy(name, tmp_path, cube, exps, slabs):
    """Each step's flag does what docs/matrix.md says, checked against numpy on the raw grids
    (mask: a slab of the coronal coverage file, or of the sagittal coverage; no imputation)."""
    flags, params = OPTIONS[name]
    params = {"max_missing": 0.5, **params}
    if "--max-missing" not in flags:
        flags = [*flags, "--max-missing", "0.5"]
    plane = "coronal"
    if "--mask" in flags:  # the named mask, replaced by its slab
        at = flags.index("--mask")
        plane, flags = flags[at + 1], flags[:at] + flags[at + 2:]
    path, mask = slabs[plane]
    to = tmp_path / "m.csv"
    code = run("--out", cube, "--impute", "none", *flags, "--mask", path, "--to", to)[0]
    assert code == 0
    label = "Experiment" if params.get("group_by") == "experiment" else "Gene"
    got, want = read_csv(to, label), expected(exps, mask, **params)
    assert len(want) > 0
    assert_same(got, want)


def test_mirror_fills_the_other_hemisphere(tmp_path, cube, exps, slabs):
    """Sagittal maps cover one hemisphere; mirrored across the midline, they cover the bilateral
    coronal mask (without the flag the coronal mask is refused for sagittal data: see below)."""
    path, mask = slabs["coronal"]
    to = tmp_path / "m.csv"
    assert run("--out", cube, "--plane", "sagittal", "--mirror-hemisphere", "--mask", path, "--impute", "none",
               "--max-missing", "0.5", "--to", to)[0] == 0
    want = expected(exps, mask, plane="sagittal", mirror=True, max_missing=0.5)
    assert list(want.index) == ["Gene1", "Gene2", "Gene4"]  # the sagittal genes with coronal experiments
    assert expected(exps, mask, plane="sagittal", max_missing=0.5).empty  # unmirrored: half the mask missing
    assert_same(read_csv(to), want)


def test_homologs_keep_only_genes_with_a_human_homolog(tmp_path, cube, exps, slabs):
    path, mask = slabs["coronal"]
    table = tmp_path / "homologs.csv"
    pd.DataFrame({"Mouse": ["Nrp1", "Gene3", "Absent"], "Human": ["NRP1", "GENE3", "ABSENT"]}).to_csv(table,
                                                                                                      index=False)
    to = tmp_path / "m.csv"
    assert run("--out", cube, "--mask", path, "--impute", "none", "--max-missing", "0.5",
               "--homologs", table, "--to", to)[0] == 0
    want = expected(exps, mask, max_missing=0.5, homologs={"Nrp1", "Gene3", "Absent"})
    assert list(want.index) == ["Gene3", "Nrp1"]
    assert_same(read_csv(to), want)


def test_region_means_match_mhts_build_region_matrix(tmp_path, cube, exps, coronal_mask):
    """Gene x region: the mean skipping NaN over each DSURQE region's masked voxels, regions
    named and sorted as MHTS's build_region_matrix.py (label 0 = none)."""
    to = tmp_path / "regions.csv"
    assert run("--out", cube, "--mask", CORONAL_MASK, "--impute", "none", "--max-missing", "0.5",
               "--labels", LABELS, "--label-table", LABEL_TABLE, "--to", to)[0] == 0
    voxels = expected(exps, coronal_mask, max_missing=0.5)
    labels, _ = read_minc(LABELS)
    table = pd.read_csv(LABEL_TABLE)
    names = dict(zip(table["Label"].astype(int), table["Structure"]))
    region = pd.Series([names.get(int(round(v)), None) if round(v) != 0 else None
                        for v in labels[coronal_mask]])
    t = voxels.T.reset_index(drop=True)
    t["Region"] = region
    want = t.dropna(subset=["Region"]).groupby("Region").mean().T
    want.index.name = "Gene"
    got = read_csv(to)
    assert got.shape[1] > 100  # DSURQE has 336 labels; most lie in the coronal mask
    assert list(got.columns) == list(want.columns)
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=0, atol=TOL)


def test_voxels_named_by_region_without_region_means(tmp_path, cube, box):
    """--no-region-means keeps the voxel matrix and names each voxel's DSURQE region in the
    AnnData's var (label 0 and unnamed labels: empty)."""
    import anndata

    path, mask = box
    to = tmp_path / "m.h5ad"
    assert run("--out", cube, "--mask", path, "--max-missing", "0.5", "--impute", "none", "--labels", LABELS,
               "--label-table", LABEL_TABLE, "--no-region-means", "--to", to)[0] == 0
    adata = anndata.read_h5ad(to)
    labels, _ = read_minc(LABELS)
    table = pd.read_csv(LABEL_TABLE)
    names = dict(zip(table["Label"].astype(int), table["Structure"]))
    want = [names.get(int(round(v)), "") if round(v) != 0 else "" for v in labels[mask]]
    assert adata.n_vars == int(mask.sum()) and list(adata.var["region"]) == want
    assert len(set(want) - {""}) >= 3


# ---------------------------------------------------------------------------------------------
# Imputation
# ---------------------------------------------------------------------------------------------

def test_knn_is_sklearn_knnimputer_on_the_same_matrix(tmp_path, cube, exps, box):
    """--impute knn gives exactly scikit-learn's KNNImputer (defaults, voxels as samples) on the
    matrix without imputation, which itself is the numpy matrix: MHTS's imputed numbers."""
    from sklearn.impute import KNNImputer

    path, mask = box
    common = ["--out", cube, "--mask", path, "--max-missing", "0.5"]
    assert run(*common, "--impute", "none", "--to", tmp_path / "none.csv")[0] == 0
    assert run(*common, "--to", tmp_path / "knn.csv")[0] == 0  # mhts: impute knn
    before, after = read_csv(tmp_path / "none.csv"), read_csv(tmp_path / "knn.csv")
    assert np.isnan(before.to_numpy()).any()
    sk = KNNImputer(missing_values=np.nan).fit_transform(before.to_numpy().T).T
    np.testing.assert_array_equal(after.to_numpy(), sk)
    want = KNNImputer().fit_transform(expected(exps, mask, max_missing=0.5).to_numpy().T).T
    np.testing.assert_allclose(after.to_numpy(), want, rtol=0, atol=1e-9)


def test_knn_chunks_over_dask_give_identical_numbers():
    """Parallel KNN (the voxels split into scikit-learn's own distance chunks, run as dask tasks
    on threads or on a real cluster) equals one KNNImputer call bit for bit."""
    import sklearn
    from cubes import local_cluster
    from sklearn.impute import KNNImputer

    from ambasync.analysis.cluster import compute_on
    from ambasync.analysis.matrix.impute import knn_impute

    rng = np.random.default_rng(1)
    x = rng.gamma(2.0, 1.0, (12, 900))
    x[rng.random(x.shape) < 0.15] = np.nan
    with sklearn.config_context(working_memory=0.5):  # ~70 voxels per chunk: 13 dask tasks
        want = KNNImputer().fit_transform(x.T).T
        np.testing.assert_array_equal(knn_impute(x), want)
        with local_cluster() as cluster, compute_on(cluster.scheduler_address) as client:
            assert client is not None
            np.testing.assert_array_equal(knn_impute(x), want)  # the chunks on a dask.distributed worker


def test_knn_on_a_distributed_cluster_is_the_same(tmp_path, cube, box):
    """--scheduler ADDRESS computes on a real dask.distributed cluster with the same result."""
    from cubes import local_cluster

    path, _ = box
    common = ["--out", cube, "--mask", path, "--max-missing", "0.5"]
    assert run(*common, "--to", tmp_path / "local.csv")[0] == 0
    with local_cluster() as cluster:
        assert run(*common, "--scheduler", cluster.scheduler_address, "--to", tmp_path / "dist.csv")[0] == 0
    assert (tmp_path / "local.csv").read_bytes() == (tmp_path / "dist.csv").read_bytes()


def test_spatial_imputation_is_the_mean_of_the_nearest_voxels_with_data(tmp_path, cube, exps, box):
    """--impute spatial: each missing voxel gets the mean of the row's voxels with data at the
    smallest distance (all ties), brute force here."""
    path, mask = box
    to = tmp_path / "s.csv"
    assert run("--out", cube, "--mask", path, "--max-missing", "0.5", "--impute", "spatial", "--to", to)[0] == 0
    base = expected(exps, mask, max_missing=0.5)
    ijk = np.argwhere(mask) * 0.2
    want = base.to_numpy().copy()
    for r in range(want.shape[0]):
        row = base.to_numpy()[r]
        have = np.flatnonzero(~np.isnan(row))
        for v in np.flatnonzero(np.isnan(row)):
            d = np.sqrt(((ijk[have] - ijk[v]) ** 2).sum(axis=1))
            want[r, v] = row[have][d <= d.min() + 1e-9].mean()
    got = read_csv(to)
    assert not np.isnan(got.to_numpy()).any()
    np.testing.assert_allclose(got.to_numpy(), want, rtol=0, atol=TOL)


# ---------------------------------------------------------------------------------------------
# Outputs, recipe and methods
# ---------------------------------------------------------------------------------------------

def test_anndata_parquet_and_zarr_read_back(tmp_path, cube, exps, box):
    """.h5ad (obs = genes with catalogue columns, var = voxels with i/j/k and world x/y/z, uns =
    recipe), .parquet and .zarr hold the same numbers as the CSV."""
    import anndata
    import xarray as xr

    path, mask = box
    common = ["--out", cube, "--mask", path, "--max-missing", "0.5", "--impute", "none"]
    for ext in ("csv", "h5ad", "parquet", "zarr"):
        assert run(*common, "--to", tmp_path / f"m.{ext}")[0] == 0
    csv = read_csv(tmp_path / "m.csv")
    assert_same(csv, expected(exps, mask, max_missing=0.5))
    adata = anndata.read_h5ad(tmp_path / "m.h5ad")
    assert list(adata.obs_names) == list(csv.index)
    np.testing.assert_array_equal(adata.X, csv.to_numpy())
    ijk = np.argwhere(mask)
    np.testing.assert_array_equal(adata.var[["i", "j", "k"]].to_numpy(), ijk)
    world = np.array([-2.7, -7.9, -5.7]) + 0.2 * ijk  # (z, y, x) starts of the notebook's grid
    np.testing.assert_allclose(adata.var[["z", "y", "x"]].to_numpy(), world, atol=1e-9)
    nrp1 = adata.obs.loc["Nrp1"]
    assert nrp1["experiment_ids"] == "74272479" and nrp1["n_experiments"] == 1
    assert adata.uns["recipe"]["impute"] == "none" and adata.uns["recipe"]["max_missing"] == 0.5
    parquet = pd.read_parquet(tmp_path / "m.parquet")
    assert_same(parquet, csv)
    z = xr.open_zarr(tmp_path / "m.zarr")
    np.testing.assert_array_equal(z["matrix"].values, csv.to_numpy())
    assert list(z["gene"].values) == list(csv.index)


def test_recipe_file_round_trips_exactly(tmp_path, cube, box):
    """`--recipe {to}.recipe.toml` redoes a matrix exactly: same file, byte for byte."""
    path, _ = box
    first = tmp_path / "first.csv"
    assert run("--out", cube, "--mask", path, "--max-missing", "0.4", "--normalise", "srs", "--no-log2",
               "--plane", "both", "--combine", "zscore-mean", "--genes", "Gene1,Gene2,Nrp1,Pdyn", "--to", first)[0] == 0
    recipe = tomllib.loads(Path(f"{first}.recipe.toml").read_text())
    assert recipe["normalise"] == "srs" and recipe["log2"] is False and recipe["genes"] == ["Gene1", "Gene2",
                                                                                             "Nrp1", "Pdyn"]
    again = tmp_path / "again.csv"
    assert run("--out", cube, "--recipe", f"{first}.recipe.toml", "--to", again)[0] == 0
    assert first.read_bytes() == again.read_bytes()
    assert Path(f"{again}.recipe.toml").read_text() == Path(f"{first}.recipe.toml").read_text()


def test_methods_text_names_every_parameter_and_the_counts(tmp_path, cube, box):
    """The methods paragraph names every step's parameter with its value, the ambasync version,
    the numbers of experiments, genes and voxels, and the cube slice's hash."""
    import ambasync
    from ambasync.analysis.matrix.recipe import Recipe

    path, mask = box
    to = tmp_path / "m.h5ad"
    assert run("--out", cube, "--mask", path, "--max-missing", "0.5", "--normalise", "zscore", "--plane", "both",
               "--to", to)[0] == 0
    text = Path(f"{to}.methods.md").read_text()
    for f in dataclasses.fields(Recipe):
        assert f"{f.name} = " in text, f.name
    import anndata

    adata = anndata.read_h5ad(to)
    n_experiments = sum(1 for e in _experiments() if e.experiment_id >= 0)  # not the cube's empty slot
    assert f"ambasync {ambasync.__version__}" in text
    assert f"{n_experiments} experiments of both planes" in text
    assert f"{int(mask.sum())} voxels" in text and f"{adata.n_obs} rows" in text
    assert "KNNImputer" in text and "z-score" in text
    digest = adata.uns["ambasync"]["cube_hash"]
    assert len(digest) == 64 and digest in text


def test_volume_writes_one_gene_map_back_on_the_grid(tmp_path, cube, box):
    """--volume GENE writes that gene's imputed map as a MINC image on the mirror's grid: the
    masked voxels hold the matrix row, the rest NaN."""
    path, mask = box
    common = ["--out", cube, "--mask", path, "--max-missing", "0.5"]
    assert run(*common, "--to", tmp_path / "m.csv")[0] == 0
    assert run(*common, "--volume", "Nrp1", "--to", tmp_path / "nrp1.mnc")[0] == 0
    data, geo = read_minc(tmp_path / "nrp1.mnc")
    assert geo["dimnames"] == ("zspace", "yspace", "xspace") and geo["sizes"] == (41, 67, 58)
    row = read_csv(tmp_path / "m.csv").loc["Nrp1"].to_numpy()
    np.testing.assert_allclose(data[mask], row, atol=1e-6)
    assert np.isnan(data[~mask]).all()


def test_volume_as_nifti_keeps_every_voxel_at_its_world_position(tmp_path, cube, box):
    """--volume GENE --to .nii.gz: read with nibabel, each masked voxel's value sits at the
    world position (x, y, z mm) of that voxel on the mirror's grid."""
    import nibabel

    path, mask = box
    common = ["--out", cube, "--mask", path, "--max-missing", "0.5"]
    assert run(*common, "--to", tmp_path / "m.csv")[0] == 0
    assert run(*common, "--volume", "Pdyn", "--to", tmp_path / "pdyn.nii.gz")[0] == 0
    img = nibabel.load(tmp_path / "pdyn.nii.gz")
    ijk = np.argwhere(mask)  # (zspace, yspace, xspace) indices
    world = np.c_[-5.7 + 0.2 * ijk[:, 2], -7.9 + 0.2 * ijk[:, 1], -2.7 + 0.2 * ijk[:, 0], np.ones(len(ijk))]
    vox = np.rint(np.linalg.inv(img.affine) @ world.T)[:3].astype(int)
    values = np.asarray(img.dataobj)[tuple(vox)]
    np.testing.assert_allclose(values, read_csv(tmp_path / "m.csv").loc["Pdyn"].to_numpy(), atol=1e-6)
    assert np.isnan(np.asarray(img.dataobj)).sum() == np.prod(img.shape) - len(ijk)


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing under the final name
# ---------------------------------------------------------------------------------------------

def _write_recipe(path: Path) -> Path:
    path.write_text('plane = "coronal"\nmax_missng = 0.3\n')
    return path


BAD = {
    "unknown gene": (lambda cube, tmp: ["--out", cube, "--genes", "Gene1,Nosuch"], "Nosuch"),
    "unknown id": (lambda cube, tmp: ["--out", cube, "--ids", "123"], "123"),
    "mask on another grid": (lambda cube, tmp: ["--out", cube, "--mask", _mask_file(
        tmp / "shifted.mnc", np.ones((41, 67, 58), bool), shift_mm=0.5)], "another grid"),
    "filter leaves no rows": (lambda cube, tmp: ["--out", cube, "--mask", "brain", "--max-missing", "0.01"],
                              "leaves no rows"),
    "recipe with unknown key": (lambda cube, tmp: ["--out", cube, "--recipe", _write_recipe(tmp / "r.toml")],
                                "max_missng"),
    "unknown extension": (lambda cube, tmp: ["--out", cube, "--to", tmp / "m.xlsx"], ".xlsx"),
    "missing cube": (lambda cube, tmp: ["--out", tmp / "nothing"], "--formats minc,cube"),
    "sagittal with coronal mask": (lambda cube, tmp: ["--out", cube, "--plane", "sagittal", "--mask", "coronal"],
                                   "sagittal"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, cube, capsys):
    """Each mistake a user can make is one line naming the culprit, exit 2, no traceback and no
    output left under the final name."""
    make, needle = BAD[case]
    args = make(cube, tmp_path)
    if "--to" not in args:
        args += ["--to", tmp_path / "m.csv"]
    code, err = run(*args, capsys=capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ambasync: ") and needle in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "m.csv").exists() and not (tmp_path / "m.xlsx").exists()


@pytest.mark.parametrize("orjson_installed", [True, False])
def test_csv_numbers_read_back_to_the_same_doubles(orjson_installed, monkeypatch):
    """Every CSV cell reads back (pandas, round_trip) to the exact double written, NaN as an empty
    field, with orjson's formatter or, without it, Arrow's."""
    import io

    from ambasync.analysis.matrix.write import _csv_rows

    if not orjson_installed:
        monkeypatch.setitem(sys.modules, "orjson", None)  # what `import orjson` sees when it is absent
    rng = np.random.default_rng(2)
    block = rng.normal(size=(5, 400)) * 10.0 ** rng.integers(-12, 12, (5, 400))
    block[rng.random(block.shape) < 0.2] = np.nan
    block[0, :3] = [0.1 + 0.2, 1.0, -0.0]
    text = bytes(_csv_rows(block, ["a", "b", "c", "d", "e"]))
    back = pd.read_csv(io.BytesIO(text), header=None, index_col=0, float_precision="round_trip")
    assert list(back.index) == ["a", "b", "c", "d", "e"]
    np.testing.assert_array_equal(back.to_numpy(), block)
