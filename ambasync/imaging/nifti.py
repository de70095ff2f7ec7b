"""Write a volume as NIfTI-1 (``.nii.gz``) with nibabel, atomically: the same voxels as the MINC
file, in the same world (mm, RAS), for ANTs, FSL, ITK-SNAP and nibabel users.

MINC's array is stored slowest→fastest as ``geometry.dimnames``; NIfTI's first index varies
fastest. So the NIfTI array is the MINC array transposed, and its affine is
:func:`ambasync.geometry.affine` with the index columns reversed: each voxel keeps its world
position. ``ushort`` is quantised as the MINC file is (uint16 over the volume's real range,
with ``scl_slope``/``scl_inter``), so ``-1`` (the minimum) stays exactly ``-1``.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from ambasync.errors import DiskFullError, disk_full
from ambasync.files import atomic_path, sha256_file
from ambasync.geometry import Geometry, affine
from ambasync.imaging.minc import DTYPES, Written

USHORT_MAX = 65535
GZIP_LEVEL = 6  # zlib's default: the size of MINC's own deflate, at a fraction of level 9's time


def nifti_affine(geometry: Geometry) -> np.ndarray:
    """Voxel (i fastest, j, k) -> world (x, y, z) mm: the MINC affine with its index order reversed."""
    return affine(geometry)[:, [2, 1, 0, 3]]


def quantise_ushort(data: np.ndarray) -> tuple[np.ndarray, float, float]:
    """uint16 values, slope and intercept with value = slope·u + inter over [min, max], as MINC
    stores ``ushort`` (rounded to the nearest step); a constant volume gets slope 1."""
    lo, hi = float(data.min()), float(data.max())
    slope = (hi - lo) / USHORT_MAX if hi > lo else 1.0
    u = np.rint((data.astype(np.float64) - lo) / slope)
    return np.clip(u, 0, USHORT_MAX).astype(np.uint16), slope, lo


def write_nifti(data: np.ndarray, geometry: Geometry, path: Path, dtype: str) -> Written:
    """Write ``data`` (reoriented, shape == geometry.sizes) to ``path`` (``.nii.gz``) atomically.
    ``dtype``: ``float`` (exact float32) or ``ushort`` (quantised like the MINC file)."""
    import nibabel as nib

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    if tuple(data.shape) != tuple(geometry.sizes):
        raise ValueError(f"data shape {data.shape} does not match geometry {geometry.sizes}")
    voxels = np.asarray(data, dtype=np.float32).transpose(2, 1, 0)  # NIfTI: first index fastest
    if dtype == "float":
        img = nib.Nifti1Image(voxels, nifti_affine(geometry), dtype=np.float32)
    else:
        quantised, slope, inter = quantise_ushort(voxels)
        img = nib.Nifti1Image(quantised, nifti_affine(geometry), dtype=np.uint16)
        img.header.set_slope_inter(slope, inter)
    img.header.set_xyzt_units("mm")
    img.set_qform(nifti_affine(geometry), code=1)  # scanner-anatomical: MINC world coordinates
    img.set_sform(nifti_affine(geometry), code=1)
    body = gzip.compress(img.to_bytes(), compresslevel=GZIP_LEVEL, mtime=0)
    path = Path(path)
    try:
        with atomic_path(path, durable=True) as tmp:
            tmp.write_bytes(body)
            digest = sha256_file(tmp)
    except OSError as exc:
        if disk_full(exc):
            raise DiskFullError(f"no space left on the device holding {path.parent}: free space, then run again") \
                from exc
        raise
    return Written(str(path), digest, len(body))
