"""Gene reproducibility (ambasync/analysis/search/reproducibility.py) against scipy.

Every expected value is scipy.stats.spearmanr over the voxels both experiments have data on,
computed here pair by pair, over many random genes with different no-data patterns (scattered
NaN, the Allen grids' -1, one hemisphere only, an explicit ``valid`` mask), ties (exact zeros,
rounded values), negative values and -0.0.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ambasync.analysis.search.reproducibility import gene_reproducibility

N_VOXELS = 400


def _random_genes(rng: np.random.Generator, n_genes: int = 150):
    """values (float32, NaN or -1 where no data), genes, and the validity they imply."""
    sizes = rng.integers(1, 6, n_genes)
    genes = np.repeat([f"gene{g:03d}" for g in range(n_genes)], sizes)
    pattern = rng.gamma(0.8, 1.0, (n_genes, N_VOXELS))  # each gene's own spatial pattern
    strength = rng.uniform(0, 2, n_genes)  # from unrelated experiments to near copies
    gene_of = np.repeat(np.arange(n_genes), sizes)
    values = pattern[gene_of] * strength[gene_of, None] + rng.gamma(0.8, 1.0, (genes.size, N_VOXELS))
    values[values < np.quantile(values, 0.3)] = 0.0  # exact zeros: big ties
    rounded = rng.random(genes.size) < 0.3
    values[rounded] = np.round(values[rounded], 1)  # more ties
    values = values.astype(np.float32)
    kind = rng.integers(0, 4, genes.size)
    missing = np.zeros(values.shape, dtype=bool)
    missing[kind == 0] = rng.random(((kind == 0).sum(), N_VOXELS)) < rng.uniform(0.05, 0.5)
    hemisphere = np.arange(N_VOXELS) < N_VOXELS // 2
    missing[kind == 1] = hemisphere[None, :] | (rng.random(((kind == 1).sum(), N_VOXELS)) < 0.05)
    missing[kind == 2] = ~hemisphere[None, :]
    nan_rows = rng.random(genes.size) < 0.5
    values[missing & nan_rows[:, None]] = np.nan
    values[missing & ~nan_rows[:, None]] = -1.0
    return values, genes, ~missing


def _expected(values: np.ndarray, genes: np.ndarray, valid: np.ndarray, min_shared: int = 10) -> pd.DataFrame:
    rows = []
    for gene in np.unique(genes):
        idx = np.flatnonzero(genes == gene)
        rhos = []
        for i in range(idx.size):
            for j in range(i + 1, idx.size):
                both = valid[idx[i]] & valid[idx[j]]
                a, b = values[idx[i], both], values[idx[j], both]
                if both.sum() < min_shared or np.ptp(a) == 0 or np.ptp(b) == 0:
                    continue
                rhos.append(stats.spearmanr(a, b).statistic)
        rows.append((gene, idx.size, len(rhos), np.mean(rhos) if rhos else np.nan))
    return pd.DataFrame(rows, columns=["gene", "n_experiments", "n_pairs", "reproducibility"]).set_index("gene")


def _check(result: pd.DataFrame, expected: pd.DataFrame, threshold: float = 0.5) -> None:
    assert list(result.columns) == ["n_experiments", "n_pairs", "reproducibility", "replicated"]
    assert result.index.name == "gene"
    assert list(result.index) == list(expected.index)
    np.testing.assert_array_equal(result["n_experiments"], expected["n_experiments"])
    np.testing.assert_array_equal(result["n_pairs"], expected["n_pairs"])
    np.testing.assert_allclose(result["reproducibility"], expected["reproducibility"], rtol=0, atol=1e-12)
    known = expected["reproducibility"].notna()
    assert result["replicated"].dtype == "boolean"
    assert result["replicated"][~known].isna().all()
    np.testing.assert_array_equal(result["replicated"][known].astype(bool),
                                  expected["reproducibility"][known] > threshold)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scipy_spearman_over_shared_voxels(seed):
    rng = np.random.default_rng(seed)
    values, genes, valid = _random_genes(rng)
    expected = _expected(values, genes, valid)
    result = gene_reproducibility(values, genes)
    _check(result, expected)
    # a spread of answers, not all one kind
    assert (expected["n_experiments"] == 1).any() and (expected["n_experiments"] >= 3).any()
    known = expected["reproducibility"].dropna()
    assert (known > 0.5).any() and (known < 0.5).any()


def test_an_explicit_valid_mask_ignores_the_values_outside_it():
    rng = np.random.default_rng(3)
    values, genes, valid = _random_genes(rng)
    garbage = np.where(valid, values, rng.normal(0, 100, values.shape).astype(np.float32))
    expected = _expected(values, genes, valid)
    _check(gene_reproducibility(garbage, genes, valid=valid, no_data=None), expected)
    # the threshold is a parameter
    _check(gene_reproducibility(values, genes, threshold=0.2), expected, threshold=0.2)


def test_negative_values_and_signed_zero_without_a_no_data_value():
    rng = np.random.default_rng(4)
    n_genes = 60
    genes = np.repeat([f"g{i:02d}" for i in range(n_genes)], 3)
    values = np.round(rng.normal(0, 1, (genes.size, N_VOXELS)), 1).astype(np.float32)
    values[values == 0] = np.where(rng.random((values == 0).sum()) < 0.5, -0.0, 0.0)
    values[:, :5] = -1.0  # data here: no_data=None
    values[rng.random(values.shape) < 0.1] = np.nan
    valid = np.isfinite(values)
    _check(gene_reproducibility(values, genes, no_data=None), _expected(values, genes, valid))


def test_pairs_without_enough_shared_voxels():
    rng = np.random.default_rng(5)
    x = rng.gamma(1.0, 1.0, (7, N_VOXELS)).astype(np.float32)
    x[1] = x[0] + 0.1 * x[1]  # a good copy of experiment 0
    x[0, N_VOXELS // 2:] = np.nan  # 0 and 2 share nothing
    x[2, : N_VOXELS // 2] = np.nan
    x[3, 5:] = -1.0  # 3 shares 5 voxels with anything
    x[4] = 2.0  # constant
    genes = np.array(["a", "a", "a", "b", "b", "c", "d"])
    result = gene_reproducibility(x, genes)
    both = np.isfinite(x[0]) & np.isfinite(x[1])
    assert result.loc["a", "n_pairs"] == 2  # (0, 1) and (1, 2); (0, 2) shares no voxel
    want = np.mean([stats.spearmanr(x[0][both], x[1][both]).statistic,
                    stats.spearmanr(x[1][N_VOXELS // 2:], x[2][N_VOXELS // 2:]).statistic])
    assert result.loc["a", "reproducibility"] == pytest.approx(want, abs=1e-12)
    assert result.loc["b", "n_pairs"] == 0 and np.isnan(result.loc["b", "reproducibility"])
    assert result.loc["b", "replicated"] is pd.NA
    assert result.loc["c", "n_experiments"] == 1 and result.loc["c", "replicated"] is pd.NA


def test_reads_only_the_rows_it_needs_and_threads_do_not_change_the_answer():
    rng = np.random.default_rng(6)
    values, genes, _ = _random_genes(rng, 80)

    class Rows:  # a lazily read store (memmap, zarr): rows on demand
        shape = values.shape

        def __init__(self):
            self.read = set()

        def __getitem__(self, i):
            self.read.add(int(i))
            return values[i]

    rows = Rows()
    threaded = gene_reproducibility(rows, genes, workers=4)
    single = gene_reproducibility(values, genes, workers=1)
    pd.testing.assert_frame_equal(threaded, single)
    _, counts = np.unique(genes, return_counts=True)
    several = np.isin(genes, np.unique(genes)[counts >= 2])
    assert rows.read == set(np.flatnonzero(several).tolist())


def test_rejects_misshapen_input():
    with pytest.raises(ValueError):
        gene_reproducibility(np.zeros((3, 10)), ["a", "a"])
    with pytest.raises(ValueError):
        gene_reproducibility(np.zeros((2, 10)), ["a", "a"], valid=np.ones((2, 9), dtype=bool))
