"""Test helpers shared by the tests and bench/ (a plain module: nothing imports conftest).

Everything here is independent of the code under test: expected values are computed from the raw grids with plain numpy and the
notebook's formulas, and MINC files are read with pyminc and `mincinfo`."""

from __future__ import annotations

import os
import re
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from replica_process import ReplicaProcess  # noqa: F401  (tests import it from here)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"  # real data carried by the repository (see its README.md)
REFERENCE = Path(os.environ.get("AMBASYNC_REFERENCE_DIR") or FIXTURES)  # the variable is only an override
# The replica (in this process and in the ones tests start) serves the real grids from here too.
os.environ["AMBASYNC_REFERENCE_DIR"] = str(REFERENCE)
GRIDS = REFERENCE / "allen-grids"
MHTS = REFERENCE / "mhts"
REAL_ZIPS = {
    74272479: GRIDS / "Nrp1_P56_coronal_74272479_200um.zip",
    71717084: GRIDS / "Pdyn_P56_coronal_71717084_200um.zip",
}

# The notebook's output for the 200 µm grid (RAS, MICe, expansion 1), from allen-api.md §4.
NOTEBOOK_DIMS = ("zspace", "yspace", "xspace")
NOTEBOOK_SIZES = (41, 67, 58)
NOTEBOOK_STARTS = (-2.7, -7.9, -5.7)
NOTEBOOK_STEPS = (0.2, 0.2, 0.2)


def require_reference() -> None:
    if not GRIDS.is_dir():
        pytest.fail(f"reference data missing: {GRIDS} (tests/fixtures is part of the repository; "
                    "AMBASYNC_REFERENCE_DIR, if set, must be laid out the same way)")


def raw_from_zip(path: Path, member: str = "energy.raw", dtype: str = "<f4") -> np.ndarray:
    """Decode a grid member the way allen-api.md describes it: little-endian, x fastest."""
    with zipfile.ZipFile(path) as zf:
        return np.frombuffer(zf.read(member), dtype=dtype).reshape(58, 41, 67)


def notebook_ras(raw: np.ndarray) -> np.ndarray:
    """The notebook's reorient_to_standard, verbatim."""
    dat = np.rot90(raw, k=1, axes=(0, 2))
    dat = np.rot90(dat, k=1, axes=(0, 1))
    return dat


def quantisation_step(values: np.ndarray) -> float:
    """One step of a 16-bit unsigned quantisation over the volume's real range."""
    return float(values.max() - values.min()) / 65535


def mincinfo(path: Path) -> dict:
    """Dimension table and direction cosines as `mincinfo` reports them (what users see)."""
    text = subprocess.run(["mincinfo", str(path)], check=True, capture_output=True, text=True).stdout
    dims = {}
    for m in re.finditer(r"^\s+(\w+space)\s+(\d+)\s+(\S+)\s+(\S+)\s*$", text, re.M):
        dims[m.group(1)] = (int(m.group(2)), float(m.group(3)), float(m.group(4)))
    order = subprocess.run(["mincinfo", "-vardims", "image", str(path)], check=True, capture_output=True,
                           text=True).stdout.split()
    cosines = {}
    for d in ("xspace", "yspace", "zspace"):
        out = subprocess.run(["mincinfo", "-attvalue", f"{d}:direction_cosines", str(path)],
                             capture_output=True, text=True).stdout.split()
        cosines[d] = tuple(float(v) for v in out) if out else (
            tuple(float(d == n) for n in ("xspace", "yspace", "zspace")))
    return {"order": tuple(order), "dims": dims, "cosines": cosines, "text": text}


def read_minc(path: Path) -> tuple[np.ndarray, dict]:
    """Voxels (float, file order) and geometry read back with pyminc."""
    from pyminc.volumes.factory import volumeFromFile

    vol = volumeFromFile(str(path), dtype="double")
    try:
        data = np.array(vol.data)
        geo = {
            "dimnames": tuple(vol.dimnames),
            "sizes": tuple(int(s) for s in vol.sizes[:3]),
            "starts": tuple(vol.starts),
            "steps": tuple(vol.separations),
            "cosines": {d: tuple(vol.get_direction_cosines(d)[:3]) for d in ("xspace", "yspace", "zspace")},
        }
    finally:
        vol.closeVolume()
    return data, geo


def world_axes(geo: dict) -> dict[str, np.ndarray]:
    """World coordinate of every index along each dimension (identity cosines)."""
    return {d: geo["starts"][i] + geo["steps"][i] * np.arange(geo["sizes"][i]) for i, d in enumerate(geo["dimnames"])}


def resample_like(data: np.ndarray, geo: dict, target: dict) -> np.ndarray:
    """Values of ``data`` at the voxel centres of ``target``, matched by world coordinates
    (nearest voxel); raises if a target voxel falls outside ``data``."""
    src_axes = world_axes(geo)
    index = []
    for d in target["dimnames"]:
        coords = world_axes(target)[d]
        i = geo["dimnames"].index(d)
        idx = np.rint((coords - geo["starts"][i]) / geo["steps"][i]).astype(int)
        assert idx.min() >= 0 and idx.max() < geo["sizes"][i], f"{d} out of range"
        assert np.allclose(src_axes[d][idx], coords, atol=1e-6)
        index.append(idx)
    order = [geo["dimnames"].index(d) for d in target["dimnames"]]
    return np.transpose(data, order)[np.ix_(*index)]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def mirror_config(base_url: str, out: Path, **settings):
    """A run's settings for tests: the shipped defaults, fast retries, plus ``section__key=value``."""
    from ambasync.config import DEFAULT_CONFIG_TEXT, load_config

    overrides = {
        ("source", "base_url"): base_url, ("output", "out"): str(out), ("source", "page_size"): 50,
        ("download", "backoff_base"): 0.01, ("download", "backoff_max"): 0.05, ("download", "read_timeout"): 3.0,
        ("convert", "workers"): 2, ("pipeline", "uvloop"): False,
    }
    for name, value in settings.items():
        section, key = name.split("__")
        overrides[(section, key)] = value
    return load_config(DEFAULT_CONFIG_TEXT, overrides, environ={})


async def mirror(base_url: str, out: Path, opts=None, **settings):
    """Run the real mirror in this event loop; returns its summary."""
    from ambasync.mirror.options import RunOptions
    from ambasync.mirror.run import mirror_async

    return await mirror_async(mirror_config(base_url, out, **settings), opts or RunOptions(quiet=True))


def manifest(out: Path):
    import pandas as pd

    return pd.read_csv(out / "manifest.csv", keep_default_na=False, na_values=[""])


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def ambasync_cmd(*args: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "ambasync", *args]


def state_rows(out: Path, sql: str) -> list[tuple]:
    import sqlite3

    db = sqlite3.connect(out / ".ambasync" / "state.sqlite")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()
