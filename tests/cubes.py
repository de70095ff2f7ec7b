"""Cubes for the analysis tests, written with plain xarray from raw grids.

Independent of the production cube writer on purpose: the matrix and search tests then hold
their commands to the cube contract (docs/cube.md), not to whatever the writer happens to do.
Only the default output (RAS voxel order, MICe world space, expansion 1) is built, with the
notebook's reorientation and geometry copied from allen-api.md §4.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from helpers import notebook_ras

CATALOGUE_COLUMNS = ("section_thickness", "specimen_id", "plane", "gene", "gene_name", "chromosome_id",
                     "entrez_id", "genomic_reference_update_id", "homologene_id", "organism_id")
STRINGS = ("gene", "plane", "gene_name")
# The notebook's output grid: (zspace, yspace, xspace) sizes, starts and step, identity cosines.
SIZES = (41, 67, 58)
STARTS = (-2.7, -7.9, -5.7)
STEP = 0.2


@dataclass(frozen=True)
class TestExperiment:
    """One experiment as served: ``grid`` is the raw Allen array, C-order (58, 41, 67), PIR."""

    __test__ = False  # not a pytest class

    experiment_id: int
    gene: str
    plane: str
    grid: np.ndarray
    catalogue: dict | None = None  # the other catalogue columns; made up when None


def replica_experiments(n_coronal: int, n_sagittal: int, seed: int = 0, real: bool = True) -> list[TestExperiment]:
    """The replica's catalogue and exact grids (synthetic, plus the two real ones when ``real``),
    without starting a server."""
    from ambasync.replica import Replica, ReplicaConfig

    from helpers import GRIDS

    rep = Replica(ReplicaConfig(n_coronal=n_coronal, n_sagittal=n_sagittal, seed=seed,
                                real_dir=str(GRIDS) if real else "/nonexistent"))
    return [TestExperiment(int(r["experiment_id"]), r["gene"], r["plane"], rep.raw_grid(int(r["experiment_id"])),
                           dict(r)) for r in rep.rows]


def _column(experiments: list[TestExperiment], name: str) -> np.ndarray:
    values = []
    for i, e in enumerate(experiments):
        row = e.catalogue or {}
        if name in ("gene", "plane"):
            values.append(getattr(e, name))
        elif name == "gene_name":
            values.append(row.get(name) or f"{e.gene} gene")
        elif name == "section_thickness":
            values.append(float(row.get(name) or 25.0))
        else:
            value = row.get(name, 1000 + i)
            values.append(-1 if value is None else int(value))
    if name in STRINGS:
        return np.array(values, dtype=object)
    return np.array(values, dtype=np.float64 if name == "section_thickness" else np.int64)


def write_test_cube(path: Path, experiments: list[TestExperiment]) -> Path:
    """A contract-conforming ``cube.zarr`` at ``path`` (a folder ending in .zarr, or a mirror
    folder, in which case the store is ``path/cube.zarr``)."""
    import xarray as xr

    store = Path(path) if str(path).endswith(".zarr") else Path(path) / "cube.zarr"
    expression = np.stack([notebook_ras(np.asarray(e.grid, dtype=np.float32)) for e in experiments])
    assert expression.shape[1:] == SIZES, expression.shape
    planes = np.array([e.plane for e in experiments])
    coverage = {}
    for plane in ("coronal", "sagittal"):
        chosen = expression[planes == plane]
        coverage[f"coverage_{plane}"] = (
            ("zspace", "yspace", "xspace"),
            (chosen != -1).mean(axis=0).astype(np.float32) if len(chosen) else np.zeros(SIZES, np.float32))
    coords = {"experiment": np.array([e.experiment_id for e in experiments], dtype=np.int64)}
    coords.update({name: ("experiment", _column(experiments, name)) for name in CATALOGUE_COLUMNS})
    for d, (name, size, start) in enumerate(zip(("zspace", "yspace", "xspace"), SIZES, STARTS)):
        cos = [float(name == axis) for axis in ("xspace", "yspace", "zspace")]
        coords[name] = xr.Variable(name, start + STEP * np.arange(size),
                                   attrs={"units": "mm", "start": start, "step": STEP, "direction_cosines": cos})
    ds = xr.Dataset({"expression": (("experiment", "zspace", "yspace", "xspace"), expression), **coverage},
                    coords=coords,
                    attrs={"ambasync_version": "test", "format_version": 1, "orientation": "RAS", "space": "MICe",
                           "expansion": 1.0, "source_url": "test", "updated": "2026-01-01T00:00:00Z"})
    encoding = {"expression": {"chunks": (8, *SIZES)}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata")
        ds.to_zarr(store, mode="w", zarr_format=3, consolidated=True, encoding=encoding)
    return store


def local_cluster():
    """A real ``distributed`` cluster on 127.0.0.1 (TCP, one worker thread in this process):
    what ``--scheduler tcp://…`` talks to, at test size. Use as a context manager."""
    from distributed import LocalCluster

    return LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp://", host="127.0.0.1",
                        dashboard_address=None)
