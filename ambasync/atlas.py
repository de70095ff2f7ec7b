"""Reading the cube: the one place the analysis commands open it and bring masks and maps onto its grid.

``matrix`` and ``search`` read the cube only through here (never the mirror's MINC files,
never the run's internals), so a remote store, another layout or another grid changes this
module alone. Images (MINC or NIfTI) are brought onto the cube's grid by world coordinates,
with :func:`ambasync.geometry.affine` as the one voxel-to-world rule.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .errors import ConfigError
from .geometry import Geometry, affine
from .paths import CUBE_NAME

if TYPE_CHECKING:
    import xarray as xr

VOLUME_DIMS = ("zspace", "yspace", "xspace")
COVERAGE_THRESHOLD = 0.8  # the "bin 0.8" coverage masks labs use
NAMED_MASKS = ("coronal", "sagittal", "brain")
RESAMPLING = ("linear", "nearest")
_ATOL_MM = 1e-4  # two grids whose voxel centres agree to 0.1 µm are the same grid


class AnalysisError(ConfigError):
    """Bad input to an analysis command: one line naming the file and what to do; exit 2."""


def mirror_folder(out: str | None) -> str:
    """``--out`` if given, else the mirror folder ``run`` would use (``[output] out`` from the
    config file or the environment)."""
    if out:
        return out
    from .config import load_config

    return str(load_config(None, {}).output.out)


def cube_location(out: str | os.PathLike) -> str:
    """``{out}/cube.zarr``; ``out`` may be a folder or an fsspec URL, or name the store itself."""
    text = str(out).rstrip("/")
    return text if text.endswith(".zarr") else f"{text}/{CUBE_NAME}"


def _run_first(out: str | os.PathLike) -> str:
    return f"run `python -m ambasync run --out {out} --formats minc,cube` first"


def open_cube(out: str | os.PathLike) -> xr.Dataset:
    """The cube as a lazy xarray Dataset (dask arrays; nothing is read until computed)."""
    import xarray as xr

    location = cube_location(out)
    if "://" not in location and not Path(location).is_dir():
        raise AnalysisError(f"no cube at {location}: {_run_first(out)}")
    try:
        ds = xr.open_zarr(location, consolidated=None)
    except Exception as exc:  # zarr says many things about a damaged store; the user needs one line
        raise AnalysisError(f"cannot open the cube at {location} ({type(exc).__name__}: {exc}); "
                            f"{_run_first(out)} to rebuild it") from None
    if "expression" not in ds or tuple(ds["expression"].dims[1:]) != VOLUME_DIMS:
        raise AnalysisError(f"{location} is not an ambasync cube (no expression variable over "
                            f"experiment, {', '.join(VOLUME_DIMS)}); {_run_first(out)}")
    return ds


@functools.lru_cache(maxsize=4)
def _plain_cube(location: str) -> xr.Dataset:
    """The cube at ``location`` opened without dask, once per process (a worker's too)."""
    import xarray as xr

    return xr.open_zarr(location, chunks=None, consolidated=None)


def read_experiments(out_or_location: str | os.PathLike, start: int, stop: int,
                     variable: str = "expression") -> np.ndarray:
    """Experiments ``start:stop`` (storage positions) of the cube's ``variable`` as one array,
    read in one call: zarr then fetches all their chunks at once. Reading them through the dask
    array instead costs a task and a synchronous read per stored chunk, which doubled the time of
    a cube stored one experiment per chunk. Check the cube with :func:`open_cube` first."""
    return np.asarray(_plain_cube(cube_location(out_or_location))[variable]
                      .isel(experiment=slice(start, stop)).values)


def read_voxels(out_or_location: str | os.PathLike, where: tuple[slice, slice, slice], start: int, stop: int,
                variable: str = "expression_by_voxel") -> np.ndarray:
    """A box of voxels ``where`` (zspace, yspace, xspace slices) of experiments ``start:stop`` from
    the cube's voxel-major copy, as one (z, y, x, experiment) array read in one call."""
    z, y, x = where
    return np.asarray(_plain_cube(cube_location(out_or_location))[variable]
                      .isel(zspace=z, yspace=y, xspace=x, experiment=slice(start, stop)).values)


def cube_geometry(ds: xr.Dataset) -> Geometry:
    """The cube's grid, from its world-coordinate variables (and their attrs, which carry the
    direction cosines; without them the cosines are the axes' own)."""
    sizes, starts, steps, cosines = [], [], [], {}
    for name in VOLUME_DIMS:
        coord = ds[name]
        values = np.asarray(coord.values, dtype=float)
        sizes.append(values.size)
        starts.append(float(coord.attrs.get("start", values[0])))
        steps.append(float(coord.attrs.get("step", values[1] - values[0] if values.size > 1 else 1.0)))
        default = tuple(float(name == axis) for axis in ("xspace", "yspace", "zspace"))
        cosines[name] = tuple(float(c) for c in coord.attrs.get("direction_cosines", default))
    return Geometry(VOLUME_DIMS, tuple(sizes), tuple(starts), tuple(steps),  # type: ignore[arg-type]
                    cosines["xspace"], cosines["yspace"], cosines["zspace"])


def _canonical(data: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, Geometry]:
    """The same image with its axes in (zspace, yspace, xspace) order, when it has those three."""
    if tuple(geometry.dimnames) == VOLUME_DIMS or sorted(geometry.dimnames) != sorted(VOLUME_DIMS):
        return data, geometry
    order = [list(geometry.dimnames).index(d) for d in VOLUME_DIMS]
    pick = lambda values: tuple(values[i] for i in order)  # noqa: E731
    return np.transpose(data, order), Geometry(VOLUME_DIMS, pick(geometry.sizes), pick(geometry.starts),
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
            from .minc import read_volume

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


def resolve_mask(spec: str, ds: xr.Dataset, resample: bool = False) -> np.ndarray:
    """Voxels to use, as a bool array over (zspace, yspace, xspace): a named mask of the cube
    (``coronal``/``sagittal``: coverage ≥ 0.8; ``brain``: data in any experiment) or an image
    file's nonzero voxels on the cube's grid."""
    if spec in ("coronal", "sagittal"):
        coverage = ds.get(f"coverage_{spec}")
        if coverage is None:
            raise AnalysisError(f"mask {spec}: the cube has no coverage_{spec} variable; rebuild it with `run`")
        mask = np.asarray(coverage.values) >= COVERAGE_THRESHOLD
    elif spec == "brain":
        mask = np.zeros(tuple(ds.sizes[d] for d in VOLUME_DIMS), dtype=bool)
        for plane in ("coronal", "sagittal"):
            if f"coverage_{plane}" in ds:
                mask |= np.asarray(ds[f"coverage_{plane}"].values) > 0
    elif Path(spec).is_file():
        data, geometry = read_image(spec)
        grid = cube_geometry(ds)
        if not same_grid(geometry, grid):
            if not resample:
                raise AnalysisError(f"mask {spec} is on another grid ({describe(geometry)}) than the cube "
                                    f"({describe(grid)}); resample it onto the cube's grid first")
            data = on_grid(data, geometry, grid, "nearest")
        mask = np.isfinite(data) & (data != 0)
    else:
        raise AnalysisError(f"mask {spec!r}: not one of {', '.join(NAMED_MASKS)} and no such image file")
    if not mask.any():
        raise AnalysisError(f"mask {spec}: no voxels (does the cube hold experiments of that plane?)")
    return mask


def write_image(data: np.ndarray, geometry: Geometry, path: str | os.PathLike) -> None:
    """One volume on ``geometry`` to a MINC (float, exact) or NIfTI file, atomically."""
    name = str(path)
    volume = np.ascontiguousarray(data, dtype=np.float32)
    if name.endswith(".mnc"):
        from .minc import write_volume

        write_volume(volume, geometry, Path(name), "float")
    elif name.endswith((".nii", ".nii.gz")):
        from .nifti import write_nifti

        write_nifti(volume, geometry, Path(name), "float")
    else:
        raise AnalysisError(f"{name}: an image is written as .mnc, .nii or .nii.gz")


@contextlib.contextmanager
def compute_on(address: str | None = None, connect_timeout: float = 10.0) -> Iterator[object | None]:
    """Where dask computes inside the block: an existing ``dask.distributed`` scheduler at
    ``address`` (or ``$DASK_SCHEDULER_ADDRESS``), else the local threaded scheduler.
    Yields the distributed Client, or None when computing locally. ``connect_timeout``
    (seconds) bounds the wait for a scheduler that is not there."""
    address = address or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
    if address is None:
        import dask

        with dask.config.set(scheduler="threads"):
            yield None
        return
    from distributed import Client

    try:
        client = Client(address, timeout=f"{connect_timeout}s", set_as_default=True)
    except (OSError, TimeoutError, ValueError) as exc:
        raise AnalysisError(f"cannot reach the dask scheduler at {address} ({exc}); start it, "
                            "or leave out --scheduler to compute on this machine") from None
    try:
        yield client
    finally:
        client.close()
