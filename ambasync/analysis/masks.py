"""Which voxels an analysis uses: a named mask (``coronal``, ``sagittal``, ``brain``
from the cube's coverage) or an image brought onto the cube's grid.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ambasync.cube.read import cube_geometry
from ambasync.errors import AnalysisError
from ambasync.geometry import DIMNAMES
from ambasync.imaging.regrid import align_image, describe, read_image, same_grid

if TYPE_CHECKING:
    import xarray as xr
COVERAGE_THRESHOLD = 0.8  # the "bin 0.8" coverage masks labs use
NAMED_MASKS = ("coronal", "sagittal", "brain")


def resolve_mask(spec: str, ds: xr.Dataset, resample: bool = False, *, align: str | None = "world") -> np.ndarray:
    """Voxels to use, as a bool array over (zspace, yspace, xspace): a named mask of the cube
    (``coronal``/``sagittal``: coverage ≥ 0.8; ``brain``: data in any experiment) or an image
    file's nonzero voxels on the cube's grid.

    ``align`` (an image's): ``"voxel"`` takes it index for index (it must have the cube's shape);
    ``"world"`` (the default, as ``matrix`` has always done) or ``None`` resample it by world
    coordinates when ``resample`` (nearest voxel), and ``None`` (``search`` without ``--align``)
    stops on a grid with the cube's shape and step but an origin more than half a voxel away
    (:func:`ambasync.imaging.regrid.align_image`)."""
    if spec in ("coronal", "sagittal"):
        coverage = ds.get(f"coverage_{spec}")
        if coverage is None:
            raise AnalysisError(f"mask {spec}: the cube has no coverage_{spec} variable; rebuild it with `run`")
        mask = np.asarray(coverage.values) >= COVERAGE_THRESHOLD
    elif spec == "brain":
        mask = np.zeros(tuple(ds.sizes[d] for d in DIMNAMES), dtype=bool)
        for plane in ("coronal", "sagittal"):
            if f"coverage_{plane}" in ds:
                mask |= np.asarray(ds[f"coverage_{plane}"].values) > 0
    elif Path(spec).is_file():
        data, geometry = read_image(spec)
        grid = cube_geometry(ds)
        if align == "voxel" or not same_grid(geometry, grid):
            if align != "voxel" and not resample:
                raise AnalysisError(f"mask {spec} is on another grid ({describe(geometry)}) than the cube "
                                    f"({describe(grid)}); resample it onto the cube's grid first")
            data = align_image(data, geometry, grid, "nearest", align, name=f"--mask {spec}")
        mask = np.isfinite(data) & (data != 0)
    else:
        raise AnalysisError(f"mask {spec!r}: not one of {', '.join(NAMED_MASKS)} and no such image file")
    if not mask.any():
        raise AnalysisError(f"mask {spec}: no voxels (does the cube hold experiments of that plane?)")
    return mask

