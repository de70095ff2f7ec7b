"""Images (MINC or NIfTI) read, compared and brought onto another grid by world coordinates.

:func:`ambasync.geometry.affine` is the one voxel-to-world rule; :func:`on_grid` resamples
by it, so a user's map, mask or label image lands on the cube's grid wherever its own
grid lies.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ambasync.errors import AnalysisError
from ambasync.geometry import DIMNAMES, Geometry, affine

if TYPE_CHECKING:
    pass
RESAMPLING = ("linear", "nearest")
ALIGN = ("world", "voxel")  # how an image meets the cube's grid: by world coordinates, or index for index
_ATOL_MM = 1e-4  # two grids whose voxel centres agree to 0.1 µm are the same grid


def _canonical(data: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, Geometry]:
    """The same image with its axes in (zspace, yspace, xspace) order, when it has those three."""
    if tuple(geometry.dimnames) == DIMNAMES or sorted(geometry.dimnames) != sorted(DIMNAMES):
        return data, geometry
    order = [list(geometry.dimnames).index(d) for d in DIMNAMES]
    pick = lambda values: tuple(values[i] for i in order)  # noqa: E731
    return np.transpose(data, order), Geometry(DIMNAMES, pick(geometry.sizes), pick(geometry.starts),
                                               pick(geometry.steps), geometry.x_cosines, geometry.y_cosines,
                                               geometry.z_cosines)


def _geometry_from_affine(matrix: np.ndarray, shape: tuple[int, ...]) -> Geometry:
    """MINC-style geometry of a NIfTI image (first index fastest on disk, as nibabel indexes it):
    each array axis is named after the world axis it runs along most."""
    names, steps, starts, cosines = [], [], [], {}
    columns = matrix[:3, :3]
    for d in range(3):
        step = float(np.linalg.norm(columns[:, d]))
        if step == 0:
            raise ValueError("degenerate affine (an axis of length 0)")
        cos = columns[:, d] / step
        name = ("xspace", "yspace", "zspace")[int(np.argmax(np.abs(cos)))]
        names.append(name)
        steps.append(step)
        cosines[name] = tuple(float(c) for c in cos)
    if len(set(names)) != 3:
        raise ValueError("the affine is too oblique to name its axes")
    # MINC starts are along each axis' own direction: solve translation = Σ cos_d · start_d.
    starts = np.linalg.solve(np.stack([cosines[n] for n in names], axis=1), matrix[:3, 3])
    return Geometry(tuple(names), tuple(int(s) for s in shape), tuple(float(s) for s in starts),  # type: ignore[arg-type]
                    tuple(steps), cosines["xspace"], cosines["yspace"], cosines["zspace"])


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """A MINC (.mnc) or NIfTI (.nii, .nii.gz) volume as float64, axes in (zspace, yspace, xspace)
    order where the image has those three, with its geometry."""
    name = str(path)
    if not Path(name).is_file():
        raise AnalysisError(f"{name}: no such image file")
    try:
        if name.endswith(".mnc"):
            from ambasync.imaging.minc import read_volume

            data, geometry = read_volume(name)
        elif name.endswith((".nii", ".nii.gz")):
            import nibabel

            img = nibabel.load(name)
            if len(img.shape) != 3:
                raise ValueError(f"{len(img.shape)} dimensions, expected a 3-D volume")
            data = np.asarray(img.dataobj, dtype=np.float64)
            geometry = _geometry_from_affine(np.asarray(img.affine, dtype=float), img.shape)
        else:
            raise AnalysisError(f"{name}: not a MINC (.mnc) or NIfTI (.nii, .nii.gz) image")
    except AnalysisError:
        raise
    except Exception as exc:  # libminc and nibabel each fail in their own way; one line says which file
        raise AnalysisError(f"{name}: cannot read the image ({type(exc).__name__}: {exc})") from None
    if data.ndim != 3:
        raise AnalysisError(f"{name}: {data.ndim} dimensions, expected a 3-D volume")
    data, geometry = _canonical(np.asarray(data, dtype=np.float64), geometry)
    return data, geometry


def same_grid(a: Geometry, b: Geometry) -> bool:
    """Whether two images share voxels one for one (sizes and voxel-to-world matrix)."""
    return tuple(a.sizes) == tuple(b.sizes) and bool(np.allclose(affine(a), affine(b), atol=_ATOL_MM))


def _corners(g: Geometry) -> np.ndarray:
    """World coordinates of the outer faces' centres: the min and max along x, y, z."""
    idx = np.array([[i, j, k, 1.0] for i in (-0.5, g.sizes[0] - 0.5) for j in (-0.5, g.sizes[1] - 0.5)
                    for k in (-0.5, g.sizes[2] - 0.5)])
    world = (affine(g) @ idx.T)[:3]
    return np.stack([world.min(axis=1), world.max(axis=1)])


def describe(g: Geometry) -> str:
    """A grid in one phrase, for error messages that name two geometries."""
    lo, hi = _corners(g)
    extent = ", ".join(f"{axis} {a:.2f}..{b:.2f}" for axis, a, b in zip("xyz", lo, hi))
    dims = " ".join(f"{n} {s}" for n, s in zip(g.dimnames, g.sizes))
    steps = "/".join(f"{s:g}" for s in g.steps)
    return f"{dims}, steps {steps} mm, world extent {extent} mm"


def on_grid(data: np.ndarray, src: Geometry, dst: Geometry, method: str = "linear") -> np.ndarray:
    """``data`` (on ``src``) at the voxel centres of ``dst``, matched by world coordinates:
    trilinear for values, nearest for masks and labels; NaN where ``dst`` lies outside ``src``."""
    from scipy.ndimage import map_coordinates

    if method not in RESAMPLING:
        raise ValueError(f"method must be one of {RESAMPLING}, not {method!r}")
    if same_grid(src, dst):
        return np.asarray(data, dtype=np.float64)
    index = np.indices(dst.sizes, dtype=float).reshape(3, -1)
    world = affine(dst) @ np.vstack([index, np.ones(index.shape[1])])
    coords = (np.linalg.inv(affine(src)) @ world)[:3]
    inside = np.all([(c >= -0.5) & (c <= n - 0.5) for c, n in zip(coords, src.sizes)], axis=0)
    if not inside.any():
        raise AnalysisError(f"the image does not overlap the cube's grid: image {describe(src)}; "
                            f"cube {describe(dst)}. Is it in the mirror's world space?")
    if method == "nearest":
        coords = np.rint(coords)
    values = map_coordinates(np.asarray(data, dtype=np.float64), coords, order=1 if method == "linear" else 0,
                             mode="nearest")
    values[~inside] = np.nan
    return values.reshape(dst.sizes)


def origin(g: Geometry) -> np.ndarray:
    """World (x, y, z) in mm of the centre of voxel (0, 0, 0)."""
    return affine(g)[:3, 3]


def ambiguous_origin(src: Geometry, dst: Geometry) -> bool:
    """Whether ``src`` has ``dst``'s shape, steps and directions but an origin more than half a
    voxel away along some axis: the same grid written with another world origin (common for MINC
    files on the Allen 200 µm grid), or a map really shifted. Only the user knows which."""
    if tuple(src.sizes) != tuple(dst.sizes):
        return False
    a, b = affine(src), affine(dst)
    if not np.allclose(a[:3, :3], b[:3, :3], atol=_ATOL_MM):
        return False
    shift = np.linalg.solve(b[:3, :3], a[:3, 3] - b[:3, 3])  # in voxels of dst, along its axes
    return bool(np.any(np.abs(shift) > 0.5))


def _triple(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.2f}" for v in values) + ")"


def align_image(data: np.ndarray, src: Geometry, dst: Geometry, method: str = "linear", align: str | None = None,
                name: str = "the image") -> np.ndarray:
    """``data`` (on ``src``) brought onto ``dst`` as ``align`` says.

    ``"voxel"``: taken index for index (it must have ``dst``'s shape, axes in ``dst``'s order);
    ``"world"``: resampled by world coordinates (:func:`on_grid`); ``None``: by world
    coordinates too, except that a grid with ``dst``'s shape and step but an origin more than
    half a voxel away (:func:`ambiguous_origin`) is an error naming both origins and both
    choices, since resampling would silently shift it by whole voxels."""
    if align not in (None, *ALIGN):
        raise AnalysisError(f"--align {align}: choose one of {', '.join(ALIGN)}")
    if align == "voxel":
        if tuple(np.shape(data)) != tuple(dst.sizes):
            dims = ", ".join(f"{n} {s}" for n, s in zip(dst.dimnames, dst.sizes))
            raise AnalysisError(f"{name}: --align voxel takes the image index for index and needs the cube's "
                                f"shape ({dims}), not {tuple(np.shape(data))}; use --align world to resample it")
        return np.asarray(data, dtype=np.float64)
    if align is None and ambiguous_origin(src, dst):
        shift = np.linalg.solve(affine(dst)[:3, :3], origin(src) - origin(dst))
        raise AnalysisError(
            f"{name} has the cube's shape and step but another origin: its first voxel is at (x, y, z) "
            f"{_triple(origin(src))} mm, the cube's at {_triple(origin(dst))} mm ({_triple(shift)} voxels apart); "
            "give --align voxel to take it index for index (the same grid, another origin written), or "
            "--align world to resample it by world coordinates (it really lies there)")
    return on_grid(data, src, dst, method)


def write_image(data: np.ndarray, geometry: Geometry, path: str | os.PathLike) -> None:
    """One volume on ``geometry`` to a MINC (float, exact) or NIfTI file, atomically."""
    name = str(path)
    volume = np.ascontiguousarray(data, dtype=np.float32)
    if name.endswith(".mnc"):
        from ambasync.imaging.minc import write_volume

        write_volume(volume, geometry, Path(name), "float")
    elif name.endswith((".nii", ".nii.gz")):
        from ambasync.imaging.nifti import write_nifti

        write_nifti(volume, geometry, Path(name), "float")
    else:
        raise AnalysisError(f"{name}: an image is written as .mnc, .nii or .nii.gz")

