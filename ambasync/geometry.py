"""Where each voxel of an Allen grid lies in the user's template space.

Pure functions that reproduce the reference notebook's ``transform_space``:
the voxel reorientation (RAS = two ``rot90``; PIR = as stored) and the MINC
world geometry (dimension names, starts, steps, direction cosines) for the
MICe and CCFv3 world spaces. No I/O here, so the numbers are easy to test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

ORIENTATIONS = ("RAS", "PIR")
SPACES = ("MICe", "CCFv3")

# Allen grid resolutions (µm), keyed by the number of voxels, as the notebook does.
RESOLUTION_BY_SIZE = {
    1320 * 800 * 1140: 10,
    528 * 320 * 456: 25,
    264 * 160 * 228: 50,
    132 * 80 * 114: 100,
    58 * 41 * 67: 200,
}

# The Allen grid shapes as their MetaImage headers write them (DimSize = x y z, x fastest:
# x = A-P, y = S-I, z = L-R), with their resolution in µm. Only these, in this axis order,
# are Allen grids: a permutation has the right voxel count and the wrong geometry.
ALLEN_DIM_SIZES = {
    (1320, 800, 1140): 10,
    (528, 320, 456): 25,
    (264, 160, 228): 50,
    (132, 80, 114): 100,
    (67, 41, 58): 200,
}

# The 200 µm grid as stored (PIR), as a C-order numpy shape (z, y, x): DimSize 67 41 58 reversed.
GRID_SHAPE_200UM = (58, 41, 67)

# Centres (x, y, z) in µm and direction cosines, verbatim from the notebook.
_CENTERS = {
    "RAS": {"MICe": (5700, 7900, 2700), "CCFv3": (0, 13200, 8000)},
    "PIR": {"MICe": (5300, 5300, 5700), "CCFv3": (0, 0, 0)},
}
_COSINES = {
    "RAS": {
        "MICe": ((1, 0, 0), (0, 1, 0), (0, 0, 1)),
        "CCFv3": ((0, 0, 1), (-1, 0, 0), (0, -1, 0)),
    },
    "PIR": {
        "MICe": ((0, -1, 0), (0, 0, -1), (1, 0, 0)),
        "CCFv3": ((1, 0, 0), (0, 1, 0), (0, 0, 1)),
    },
}

DIMNAMES = ("zspace", "yspace", "xspace")
NO_DATA = -1.0  # the Allen grids' "no data" value, kept as it is in every output (a measured 0 is data)


@dataclass(frozen=True)
class Geometry:
    """MINC geometry of an output volume, dimensions slowest to fastest."""

    dimnames: tuple[str, str, str]
    sizes: tuple[int, int, int]
    starts: tuple[float, float, float]
    steps: tuple[float, float, float]
    x_cosines: tuple[float, float, float]
    y_cosines: tuple[float, float, float]
    z_cosines: tuple[float, float, float]


def resolution_um(n_voxels: int) -> int:
    """Grid resolution from its voxel count; unknown sizes are an error, not a guess."""
    try:
        return RESOLUTION_BY_SIZE[n_voxels]
    except KeyError:
        known = ", ".join(str(k) for k in sorted(RESOLUTION_BY_SIZE))
        raise ValueError(f"grid has {n_voxels} voxels, not one of the Allen grid sizes ({known})") from None


def reorient(pir: np.ndarray, orientation: str) -> np.ndarray:
    """Reorder a grid stored PIR (C-order shape (z=L-R, y=S-I, x=A-P)) for the output.

    RAS applies the notebook's two quarter turns; PIR keeps the stored order.
    Returns a C-contiguous array (pyminc writes the buffer as is).
    """
    import numpy as np  # here: the event-loop process imports this module, never numpy

    if orientation == "RAS":
        out = np.rot90(pir, k=1, axes=(0, 2))
        out = np.rot90(out, k=1, axes=(0, 1))
    elif orientation == "PIR":
        out = pir
    else:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, not {orientation!r}")
    return np.ascontiguousarray(out)


def output_geometry(
    grid_shape: tuple[int, int, int], orientation: str, space: str, expansion: float
) -> Geometry:
    """The notebook's world geometry for a grid of ``grid_shape`` (as stored, PIR)."""
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, not {space!r}")
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, not {orientation!r}")
    z, y, x = grid_shape
    sizes = (y, x, z) if orientation == "RAS" else (z, y, x)  # shape after the two rot90s
    res = resolution_um(z * y * x)
    centers = [expansion * c / 1000 for c in _CENTERS[orientation][space]]
    step = expansion * res / 1000
    xdc, ydc, zdc = _COSINES[orientation][space]
    return Geometry(
        dimnames=DIMNAMES,
        sizes=sizes,
        starts=tuple(-c for c in reversed(centers)),
        steps=(step, step, step),
        x_cosines=tuple(float(v) for v in xdc),
        y_cosines=tuple(float(v) for v in ydc),
        z_cosines=tuple(float(v) for v in zdc),
    )


def affine(geometry: Geometry) -> np.ndarray:
    """4×4 matrix from a voxel index in array order (slowest→fastest, as ``geometry.dimnames``)
    to world (x, y, z) in mm: the MINC rule, world = Σ cosines_d · (start_d + step_d · i_d).

    The one place where MINC geometry becomes an affine: NIfTI output, the cube's world
    coordinates and the resampling of user maps all use it.
    """
    import numpy as np  # here: the event-loop process imports this module, never numpy

    cosines = {"xspace": geometry.x_cosines, "yspace": geometry.y_cosines, "zspace": geometry.z_cosines}
    out = np.eye(4)
    for d, name in enumerate(geometry.dimnames):
        cos = np.asarray(cosines[name], dtype=float)
        out[:3, d] = cos * geometry.steps[d]
        out[:3, 3] += cos * geometry.starts[d]
    return out
