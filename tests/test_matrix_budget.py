"""The memory budget of ``matrix`` (``--memory``, ``[analysis] memory``), its refusal (one line,
exit 2, nothing written), interrupted writes (no partial output), progress lines, and the steps
that now work in place or in blocks giving the same numbers."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ambasync.cli import main
from ambasync.errors import AnalysisError
from cubes import replica_experiments, write_test_cube

pytestmark = pytest.mark.e2e  # real runs, servers or clusters: make test-fast leaves these out


@pytest.fixture(scope="module")
def cube(tmp_path_factory):
    out = tmp_path_factory.mktemp("mirror")
    write_test_cube(out, replica_experiments(6, 0, seed=5))
    return out


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------ parsing and the default


@pytest.mark.parametrize("text, want", [("4GB", 4 * 10**9), ("4GiB", 4 * 2**30), ("4G", 4 * 2**30),
                                        ("512MB", 512 * 10**6), ("1.5e9", 1_500_000_000), (123456, 123456),
                                        (" 2 gb ", 2 * 10**9)])
def test_sizes_parse(text, want):
    from ambasync.analysis.matrix.budget import parse_memory

    assert parse_memory(text) == want


@pytest.mark.parametrize("text", ["lots", "4XB", "-1GB", "0", True])
def test_bad_sizes_are_one_line_naming_the_flag(text):
    from ambasync.analysis.matrix.budget import parse_memory

    with pytest.raises(AnalysisError, match="^--memory: "):
        parse_memory(text)


def test_the_default_is_a_safe_share_of_ram(monkeypatch):
    from ambasync.analysis.matrix import budget

    monkeypatch.setattr(budget, "machine_memory", lambda: (16 * 2**30, 10 * 2**30))
    assert budget.default_budget() == 8 * 2**30  # half of RAM
    monkeypatch.setattr(budget, "machine_memory", lambda: (16 * 2**30, 2 * 2**30))
    assert budget.default_budget() == int(0.8 * 2 * 2**30)  # never more than 80% of what is free
    monkeypatch.delenv("AMBASYNC_ANALYSIS_MEMORY", raising=False)
    assert budget.resolve_budget("3GB") == (3 * 10**9, "--memory")
    monkeypatch.setenv("AMBASYNC_ANALYSIS_MEMORY", "2GB")
    assert budget.resolve_budget(None) == (2 * 10**9, "[analysis] memory")


# ------------------------------------------------------------------ refusal


def test_a_request_beyond_the_budget_is_one_line_exit_2_and_writes_nothing(tmp_path, cube, capsys):
    to = tmp_path / "m.csv"
    code = main(["matrix", "-q", "--out", str(cube), "--memory", "50MB", "--to", str(to)])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "needs about" in lines[0] and "memory budget is 50 MB (--memory)" in lines[0]
    assert _files(tmp_path) == []  # no output, no recipe, no methods, no temporary


def test_the_config_budget_is_used_and_named(tmp_path, cube, capsys, monkeypatch):
    monkeypatch.setenv("AMBASYNC_ANALYSIS_MEMORY", "40MB")
    code = main(["matrix", "-q", "--out", str(cube), "--to", str(tmp_path / "m.parquet")])
    err = capsys.readouterr().err
    assert code == 2 and "([analysis] memory)" in err and len(err.strip().splitlines()) == 1
    assert _files(tmp_path) == []


def test_the_api_has_the_same_keyword(tmp_path, cube):
    import ambasync

    with pytest.raises(AnalysisError, match="memory budget is 50 MB"):
        ambasync.matrix(cube, memory="50MB", to=tmp_path / "m.csv")
    assert _files(tmp_path) == []
    m = ambasync.matrix(cube, memory="2GB", impute="none")
    assert m.attrs["ambasync"]["memory_budget"] == 2 * 10**9
    assert 0 < m.attrs["ambasync"]["memory_estimate"] <= 2 * 10**9


def test_a_budget_that_fits_gives_the_same_matrix(tmp_path, cube):
    """A small budget (small read blocks, small normalisation blocks) changes no number."""
    import ambasync

    big = ambasync.matrix(cube, memory="4GB", impute="none", normalise="mhts", max_missing=0.5)
    small = ambasync.matrix(cube, memory="500MB", impute="none", normalise="mhts", max_missing=0.5)
    assert list(big.index) == list(small.index) and list(big.columns) == list(small.columns)
    np.testing.assert_allclose(small.to_numpy(), big.to_numpy(), rtol=0, atol=1e-12)


# ------------------------------------------------------------------ interrupted writes


@pytest.mark.parametrize("ext", ["csv", "parquet", "h5ad"])
def test_an_interrupted_write_leaves_no_partial_output(tmp_path, cube, monkeypatch, ext):
    import ambasync
    from ambasync.analysis.matrix import write

    def interrupted(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")  # the writer got as far as its temporary file
        raise KeyboardInterrupt

    name = {"csv": "_write_csv", "parquet": "_write_parquet", "h5ad": "_write_h5ad"}[ext]
    monkeypatch.setattr(write, name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        ambasync.matrix(cube, impute="none", to=tmp_path / f"m.{ext}")
    assert _files(tmp_path) == []


def test_parquet_is_what_pandas_writes(tmp_path):
    from ambasync.analysis.matrix.build import Matrix
    from ambasync.analysis.matrix.write import _write_parquet, as_frame

    rng = np.random.default_rng(4)
    values = rng.random((7, 300))
    values[2, 5] = np.nan
    m = Matrix(values, np.array([f"G{i}" for i in range(7)]), "Gene", None, None,
               np.array([str(i) for i in range(300)], dtype=object), None, None, None, {})
    _write_parquet(m, tmp_path / "ours.parquet")
    as_frame(m).to_parquet(tmp_path / "pandas.parquet")
    back, want = pd.read_parquet(tmp_path / "ours.parquet"), pd.read_parquet(tmp_path / "pandas.parquet")
    pd.testing.assert_frame_equal(back, want)
    assert back.index.name == "Gene" and list(back.columns[:2]) == ["0", "1"]


# ------------------------------------------------------------------ progress and blockwise steps


def test_progress_lines_say_the_share_and_eta(caplog):
    from ambasync.progress import Progress

    caplog.set_level(logging.INFO, logger="ambasync.progress")
    bar = Progress("reading the cube", 400, "experiments", enabled=True, interval=0.0)
    bar.update(100)
    bar.update(300)
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("reading the cube: 100/400 experiments (25%), ") and "ETA" in lines[0]
    assert lines[-1].startswith("reading the cube: 400/400 experiments (100%), ") and "ETA" not in lines[-1]
    quiet = Progress("x", 3, enabled=False)
    quiet.update(3)
    quiet.close()
    assert len(caplog.records) == len(lines)


@pytest.mark.parametrize("method", ["mhts", "zscore", "srs"])
def test_blockwise_normalisation_equals_the_whole_matrix(method):
    from ambasync.analysis.matrix.steps import normalise

    rng = np.random.default_rng(2)
    x = rng.gamma(2.0, 1.0, (57, 1301))
    x[rng.random(x.shape) < 0.1] = np.nan
    want = normalise(x.copy(), method)
    got = normalise(x.copy(), method, column_block=97)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert np.array_equal(np.isnan(got), np.isnan(want))


def test_spatial_imputation_in_place_equals_the_copy():
    from ambasync.analysis.matrix.impute import spatial_impute

    rng = np.random.default_rng(3)
    coords = np.argwhere(np.ones((6, 7, 8))) * 0.2
    x = rng.random((9, len(coords)))
    x[rng.random(x.shape) < 0.2] = np.nan
    x[4] = x[3]  # rows missing the same voxels share one tree
    want = spatial_impute(x, coords)
    y = x.copy()
    out = spatial_impute(y, coords, inplace=True)
    assert out is y
    np.testing.assert_array_equal(out, want)


def test_read_blocks_shrink_with_the_budget():
    from ambasync.analysis.matrix.budget import READ_MAX_EXPERIMENTS, READ_MIN_EXPERIMENTS, read_block_size

    assert read_block_size(10 * 2**30, 159_326, 61_315) == READ_MAX_EXPERIMENTS
    assert read_block_size(0, 159_326, 61_315) == READ_MIN_EXPERIMENTS
    assert READ_MIN_EXPERIMENTS < read_block_size(400 * 2**20, 159_326, 61_315) < READ_MAX_EXPERIMENTS
