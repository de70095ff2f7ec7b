"""A wheel installed (not editable) into a fresh venv, run from a folder outside the checkout,
has every part: what a Docker image or a lab's `pip install` gets.

Every other test imports ambasync from the checkout, so a subpackage or a data file missing
from the wheel would go unnoticed there (a wheel once shipped no replica and no cube).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _source_copy(dest: Path) -> Path:
    """The files git tracks (or would), copied: building a wheel writes build/ and egg-info,
    which must not land in the checkout."""
    if (REPO / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout.split()
    else:
        listed = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() or p.is_symlink()]
    for rel in listed:
        if not (rel.startswith("ambasync/") or rel in ("pyproject.toml", "README.md", "config.toml")):
            continue
        src, dst = REPO / rel, dest / rel
        if not (src.exists() or src.is_symlink()):
            continue  # deleted in the work tree
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)
    return dest


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> dict:
    """A fresh venv with the wheel installed into it. Its dependencies come from this
    interpreter's site-packages through a path entry (no download; the editable install's
    import hook there is not run, so `import ambasync` can only find the wheel's copy)."""
    root = tmp_path_factory.mktemp("wheel")
    src = _source_copy(root / "src")
    dist = root / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(dist), str(src)], check=True)
    wheel = next(dist.glob("ambasync-*.whl"))
    env_dir = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    (purelib / "_base_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--disable-pip-version-check", "--target", str(purelib), str(wheel)], check=True)
    work = root / "work"  # outside the checkout: nothing can come from the source tree
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "AMBASYNC_", "DASK_"))}
    return {"python": str(python), "cwd": work, "env": env, "wheel": wheel}


def _run(venv: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([venv["python"], *args], cwd=venv["cwd"], env=venv["env"], capture_output=True,
                          text=True, timeout=timeout)


def test_the_wheel_ships_every_subpackage_and_its_data(venv):
    import zipfile

    names = zipfile.ZipFile(venv["wheel"]).namelist()
    for part in ("ambasync/mirror/run.py", "ambasync/mirror/formats/outputs.py", "ambasync/cube/store.py",
                 "ambasync/analysis/matrix/build.py", "ambasync/analysis/search/correlate.py",
                 "ambasync/imaging/minc.py", "ambasync/replica/server.py", "ambasync/cli/__init__.py",
                 "ambasync/default_config.toml"):
        assert part in names, f"{part} missing from the wheel"
    found = _run(venv, "-c", "import ambasync, ambasync.cube, ambasync.replica; print(ambasync.__file__)")
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip().startswith(str(Path(venv["python"]).parents[1])), found.stdout  # not the checkout


def test_an_installed_wheel_mirrors_builds_the_cube_and_analyses_it_from_any_folder(venv, tmp_path):
    demo = _run(venv, "-m", "ambasync", "demo", "--out", "demo", "--experiments", "6", "-q")
    assert demo.returncode == 0, demo.stderr
    assert len(list((venv["cwd"] / "demo" / "coronal").glob("*.mnc"))) == 6

    replica = subprocess.Popen([venv["python"], "-m", "ambasync", "replica", "--port", "0", "--experiments", "24",
                                "--sagittal", "6"], cwd=venv["cwd"], env=venv["env"], stdout=subprocess.PIPE, text=True)
    try:
        url = replica.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        run = _run(venv, "-m", "ambasync", "run", "--base-url", url, "--out", "data", "--plane", "all",
                   "--formats", "minc,cube,nifti", "-q")
        assert run.returncode == 0, run.stderr
    finally:
        replica.terminate()
        replica.wait(timeout=30)
    data = venv["cwd"] / "data"
    assert len(list(data.rglob("*.mnc"))) == 30 and len(list(data.rglob("*.nii*"))) == 30
    assert (data / "cube.zarr").is_dir()

    status = _run(venv, "-m", "ambasync", "status", "--out", "data")
    assert status.returncode == 0, status.stderr
    counts = {tuple(line.split()[:2]): int(line.split()[2]) for line in status.stdout.splitlines()
              if line.split()[:2] in (["coronal", "done"], ["sagittal", "done"])}
    assert counts == {("coronal", "done"): 24, ("sagittal", "done"): 6}, status.stdout
    assert "cube" in status.stdout and "30 experiments" in status.stdout, status.stdout

    m = _run(venv, "-m", "ambasync", "matrix", "--out", "data", "--to", "m.csv", "--plane", "coronal",
             "--mask", "coronal", "--max-missing", "0.5", "--impute", "none", "-q")
    assert m.returncode == 0, m.stderr
    s = _run(venv, "-m", "ambasync", "search", str(next((data / "coronal").glob("*.mnc"))), "--out", "data",
             "--to", "hits.csv", "--nulls", "20", "-q")
    assert s.returncode == 0, s.stderr

    # Both outputs name the cube version they read, so a paper's table can be traced to its cube.
    import xarray as xr

    version = xr.open_zarr(data / "cube.zarr").attrs.get("cube_version")
    assert version
    for methods in ("m.csv.methods.md", "hits.csv.methods.md"):
        assert f"version {version}" in (venv["cwd"] / methods).read_text(), methods

    # The Python API in the installed package gives the same tables as its command line.
    script = textwrap.dedent("""
        import sys, ambasync, pandas as pd
        m = ambasync.matrix("data", plane="coronal", mask="coronal", max_missing=0.5, impute="none")
        m.to_pickle("api_matrix.pkl")
        mnc = sys.argv[1]
        ambasync.search("data", mnc, nulls=20).to_pickle("api_hits.pkl")
        print(ambasync.open_cube("data").sizes["experiment"])
    """)
    api = _run(venv, "-c", script, str(next((data / "coronal").glob("*.mnc"))))
    assert api.returncode == 0, api.stderr
    assert api.stdout.strip() == "30"
    cli_matrix = pd.read_csv(venv["cwd"] / "m.csv", index_col=0, float_precision="round_trip")
    api_matrix = pd.read_pickle(venv["cwd"] / "api_matrix.pkl")
    assert cli_matrix.shape == api_matrix.shape and cli_matrix.shape[0] > 0
    np.testing.assert_allclose(cli_matrix.to_numpy(), api_matrix.to_numpy(), rtol=0, atol=0, equal_nan=True)
    cli_hits = pd.read_csv(venv["cwd"] / "hits.csv", float_precision="round_trip")
    api_hits = pd.read_pickle(venv["cwd"] / "api_hits.pkl")
    assert list(cli_hits["experiment_id"]) == list(api_hits["experiment_id"])
    np.testing.assert_allclose(cli_hits["r"], api_hits["r"], rtol=1e-12)
    np.testing.assert_array_equal(cli_hits["p_spatial"], api_hits["p_spatial"])
