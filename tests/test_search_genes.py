"""The gene table at atlas scale: reproducibility of a gene's experiments beside its score, the fitted
tail's p-values there too, and the same tables from a dask cluster.

Expected reproducibility: scipy's Spearman rho between each pair of a gene's experiments over the
voxels of the mask both have data in, averaged over pairs; replicated when above 0.5.
"""

from __future__ import annotations

from itertools import combinations

import nibabel
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage, stats

from cubes import SIZES, STARTS, STEP, TestExperiment, local_cluster, write_test_cube

pytestmark = pytest.mark.e2e  # real runs, servers or clusters: make test-fast leaves these out

# gene -> how its experiments are made from a shared smooth pattern: the noise added to each
GENES = {"Same": (0.2, 0.2, 0.3), "Loose": (1.5, 1.5), "Alone": (0.1,), "Half": (0.3, 0.3)}


def ras_to_pir(ras: np.ndarray) -> np.ndarray:
    out = np.rot90(ras, k=-1, axes=(0, 1))
    return np.ascontiguousarray(np.rot90(out, k=-1, axes=(0, 2)))


def field(rng: np.random.Generator) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.standard_normal(SIZES), 2.0)
    return f / f.std()


@pytest.fixture(scope="module")
def gene_cube(tmp_path_factory):
    rng = np.random.default_rng(5)
    inside = np.zeros(SIZES, dtype=bool)
    inside[5:36, 8:60, 6:52] = True
    experiments, arrays, eid = [], [], 900
    for gene, noises in GENES.items():
        pattern = field(rng)
        for k, noise in enumerate(noises):
            ras = np.where(inside, 3 + pattern + noise * field(rng), -1.0).astype(np.float32)
            plane = "coronal"
            if gene == "Half" and k == 1:  # a sagittal experiment with one hemisphere only
                ras[:, :, SIZES[2] // 2:] = -1
                plane = "sagittal"
            experiments.append(TestExperiment(eid, gene, plane, ras_to_pir(ras)))
            arrays.append(ras)
            eid += 1
    for i in range(6):  # genes with one experiment
        ras = np.where(inside, 3 + field(rng), -1.0).astype(np.float32)
        experiments.append(TestExperiment(eid, f"Single{i}", "coronal", ras_to_pir(ras)))
        arrays.append(ras)
        eid += 1
    folder = tmp_path_factory.mktemp("genes")
    write_test_cube(folder, experiments)
    return folder, experiments, np.stack(arrays)


def save_map(volume: np.ndarray, path) -> str:
    affine = np.diag([STEP, STEP, STEP, 1.0])
    affine[:3, 3] = [STARTS[2], STARTS[1], STARTS[0]]
    nibabel.save(nibabel.Nifti1Image(np.transpose(volume, (2, 1, 0)).astype(np.float32), affine), str(path))
    return str(path)


def test_gene_table_reports_reproducibility_as_scipy_computes_it(gene_cube, tmp_path):
    from ambasync.analysis.search.correlate import GENE_COLUMNS, correlate

    folder, experiments, arrays = gene_cube
    mask = (arrays != -1).any(axis=0)
    volume = field(np.random.default_rng(9))
    result = correlate(str(folder / "cube.zarr"), save_map(volume, tmp_path / "m.nii"), nulls=150, by_gene=True, progress=False)
    genes = result.genes.set_index("gene")
    assert list(result.genes.columns) == list(GENE_COLUMNS)
    assert list(GENE_COLUMNS)[:6] == ["gene", "r", "p_spatial", "q", "n_experiments", "experiment_ids"]
    for gene in GENES:
        rows = [i for i, e in enumerate(experiments) if e.gene == gene]
        rhos = []
        for a, b in combinations(rows, 2):
            shared = mask & (arrays[a] != -1) & (arrays[b] != -1)
            rhos.append(stats.spearmanr(arrays[a][shared], arrays[b][shared])[0])
        row = genes.loc[gene]
        assert row["n_experiments"] == len(rows)
        if len(rows) < 2:
            assert np.isnan(row["reproducibility"]) and pd.isna(row["replicated"])
            continue
        assert row["reproducibility"] == pytest.approx(np.mean(rhos), abs=1e-6)
        assert bool(row["replicated"]) == (np.mean(rhos) > 0.5)
    assert genes.loc["Same", "replicated"] and not genes.loc["Loose", "replicated"]
    assert set(result.genes["p_method"]) <= {"gpd", "empirical"}
    assert set(result.experiments["p_method"]) <= {"gpd", "empirical"}


@pytest.mark.e2e
def test_local_and_cluster_give_identical_tables_with_tail_and_reproducibility(gene_cube, tmp_path, monkeypatch):
    """--scheduler: the same tables, number for number, with fitted tails (150 nulls) and the gene
    table's reproducibility (experiments read by the cluster's workers)."""
    import logging

    from ambasync.analysis.search.correlate import correlate

    monkeypatch.setattr(logging.getLogger("distributed"), "propagate", False)
    folder, _, arrays = gene_cube
    planted = np.where((arrays != -1).any(axis=0), arrays[0] + 0.5 * field(np.random.default_rng(4)), 0.0)
    path = save_map(planted, tmp_path / "m.nii")
    local = correlate(str(folder / "cube.zarr"), path, nulls=150, by_gene=True, progress=False)
    with local_cluster() as cluster:
        remote = correlate(str(folder / "cube.zarr"), path, nulls=150, by_gene=True, scheduler=cluster.scheduler_address,
                           progress=False)
    assert (local.experiments["p_method"] == "gpd").any()
    assert local.experiments.equals(remote.experiments)
    assert local.genes.equals(remote.genes)


def test_reproducibility_is_kept_beside_the_cube_and_read_back_unchanged(gene_cube):
    """It depends on the cube and the mask, not the map: the second search reads it from
    .ambasync/search/ beside the cube, the same table; another mask is another entry."""
    import xarray as xr

    from ambasync.analysis.search.replication import cache_path, cube_gene_reproducibility

    folder, experiments, arrays = gene_cube
    location = str(folder / "cube.zarr")
    ds = xr.open_zarr(location)
    genes = np.array([e.gene for e in experiments])
    mask = (arrays != -1).any(axis=0)
    fresh = cube_gene_reproducibility(location, ds, genes, mask, cache=False)
    first = cube_gene_reproducibility(location, ds, genes, mask)
    path = cache_path(location, ds, genes, mask)
    assert path is not None and path.is_file() and path.parent == folder / ".ambasync" / "search"
    again = cube_gene_reproducibility(location, ds, genes, mask)
    for table in (first, again):
        pd.testing.assert_frame_equal(table[["reproducibility", "replicated"]], fresh[["reproducibility", "replicated"]],
                                      check_exact=True)
    other = mask.copy()
    other[:, :, : SIZES[2] // 2] = False
    assert cache_path(location, ds, genes, other) != path
