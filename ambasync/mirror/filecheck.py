"""Is this output file what the state recorded? The one check `verify` and the state's
rebuild (`recover`) both hold files to: present, same size and sha256, readable, and with
the geometry its conversion settings give (a MINC header, or a NIfTI affine)."""

from __future__ import annotations

import math
from pathlib import Path

from ambasync.files import sha256_file
from ambasync.mirror.record import Output
from ambasync.settings import ConvertSettings
from ambasync.target import file_format

_ATOL = 1e-6


def _minc_geometry_differs(path: Path, settings: ConvertSettings | None) -> bool:
    from ambasync.imaging.minc import read_volume

    _, geo = read_volume(path)
    if settings is None:
        return False
    want = settings.geometry(settings.grid_shape(geo.sizes))
    got = (geo.starts, geo.steps, geo.x_cosines, geo.y_cosines, geo.z_cosines)
    exp = (want.starts, want.steps, want.x_cosines, want.y_cosines, want.z_cosines)
    return geo.dimnames != want.dimnames or not all(
        math.isclose(g, e, abs_tol=_ATOL) for gs, es in zip(got, exp) for g, e in zip(gs, es))


def _nifti_geometry_differs(path: Path, settings: ConvertSettings | None) -> bool:
    import nibabel
    import numpy as np

    from ambasync.imaging.nifti import nifti_affine

    img = nibabel.load(path)
    np.asarray(img.dataobj)  # readable to the last voxel
    if settings is None:
        return False
    sizes = tuple(int(n) for n in reversed(img.shape))  # NIfTI's first index is the MINC array's last
    want = settings.geometry(settings.grid_shape(sizes))  # type: ignore[arg-type]
    return not np.allclose(img.affine, nifti_affine(want), atol=1e-4)  # the header keeps float32


def check_output(out: Path, o: Output, settings: str | None) -> str | None:
    """Why this file is not what the state says, or None when it is."""
    path = out / o.path
    if not path.is_file():
        return f"{o.path}: missing"
    if path.stat().st_size != o.size or sha256_file(path) != o.sha256:
        return f"{o.path}: contents changed (sha256 differs from the state)"
    kind = file_format(o.path)
    differs_from = _nifti_geometry_differs if kind == "nifti" else _minc_geometry_differs
    try:
        differs = differs_from(path, ConvertSettings.parse(settings) if settings else None)
    except Exception as exc:  # libminc or nibabel cannot read it at all
        return f"{o.path}: unreadable {'NIfTI' if kind == 'nifti' else 'MINC'} ({type(exc).__name__})"
    if differs:
        return f"{o.path}: header geometry differs from {settings}"
    return None
