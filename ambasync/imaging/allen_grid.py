"""Read an Allen expression-grid zip held in memory.

The zip's ``V.mhd`` header is parsed for the grid's size, element type and byte
order, and ``V.raw`` is checked against it before a single voxel is trusted.
The member sizes a zip declares are checked before inflating anything, so a
zip bomb costs nothing. Only Allen's own grid shapes are accepted (a permuted
``DimSize`` has the right voxel count and the wrong geometry), and a grid holding
NaN or Inf is refused: Allen grids never do, so such a download is corrupt and a
single NaN would turn a whole ``ushort`` volume into NaN. Pure functions: bytes in,
array out.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from ambasync.errors import PermanentError, TransientError
from ambasync.geometry import ALLEN_DIM_SIZES

# MetaImage element types -> numpy type codes (without byte order).
ELEMENT_TYPES = {
    "MET_FLOAT": "f4",
    "MET_DOUBLE": "f8",
    "MET_UCHAR": "u1",
    "MET_CHAR": "i1",
    "MET_USHORT": "u2",
    "MET_SHORT": "i2",
    "MET_UINT": "u4",
    "MET_INT": "i4",
}
MAX_HEADER_BYTES = 64 * 1024


@dataclass(frozen=True)
class MhdHeader:
    dim_size: tuple[int, int, int]  # (x, y, z) as written: x varies fastest
    element_type: str
    big_endian: bool
    data_file: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype((">" if self.big_endian else "<") + ELEMENT_TYPES[self.element_type])

    @property
    def shape(self) -> tuple[int, int, int]:
        """C-order numpy shape (z, y, x)."""
        x, y, z = self.dim_size
        return (z, y, x)

    @property
    def nbytes(self) -> int:
        x, y, z = self.dim_size
        return x * y * z * self.dtype.itemsize


def parse_mhd(text: str) -> MhdHeader:
    """Parse the fields ambasync needs from a MetaImage header; reject what it cannot read.

    The header's orientation fields are ignored on purpose: the Allen files say
    RAI with an identity matrix, which does not describe their PIR layout.
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    try:
        ndims = int(fields.get("NDims", "3"))
        dims = tuple(int(v) for v in fields["DimSize"].split())
        etype = fields["ElementType"]
    except (KeyError, ValueError) as exc:
        raise PermanentError(f"bad grid header: missing or unreadable {exc}") from None
    if ndims != 3 or len(dims) != 3 or min(dims) <= 0:
        raise PermanentError(f"bad grid header: expected 3 positive dimensions, got NDims={ndims} DimSize={dims}")
    if dims not in ALLEN_DIM_SIZES:
        known = "; ".join(f"{' '.join(map(str, shape))} at {res} µm" for shape, res in ALLEN_DIM_SIZES.items())
        raise PermanentError(
            f"bad grid header: DimSize = {fields['DimSize']} is not an Allen grid shape (x y z: {known})"
        )
    if etype not in ELEMENT_TYPES:
        raise PermanentError(f"bad grid header: unsupported ElementType {etype!r}")
    msb = fields.get("BinaryDataByteOrderMSB", fields.get("ElementByteOrderMSB", "False"))
    return MhdHeader(
        dim_size=dims,  # type: ignore[arg-type]
        element_type=etype,
        big_endian=msb.lower() == "true",
        data_file=fields.get("ElementDataFile", ""),
    )


def open_zip(body: bytes) -> zipfile.ZipFile:
    """Open a downloaded body as a zip, in memory. A non-zip (an HTML error page,
    a truncated transfer) is transient: the next request usually gets the real thing."""
    try:
        return zipfile.ZipFile(io.BytesIO(body))
    except zipfile.BadZipFile:
        start = body[:40].decode("latin-1", "replace").strip().replace("\n", " ")
        raise TransientError(f"body of {len(body)} bytes is not a valid zip (starts with {start!r})") from None


def _read_member(zf: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """Read one member, never inflating more than ``limit`` bytes."""
    try:
        info = zf.getinfo(name)
    except KeyError:
        members = ", ".join(zf.namelist()) or "none"
        raise PermanentError(f"zip has no {name} (members: {members})") from None
    if info.file_size > limit:
        raise PermanentError(f"{name} declares {info.file_size} bytes, expected at most {limit}: refusing to inflate")
    try:
        with zf.open(info) as fh:
            data = fh.read(limit + 1)  # zipfile stops at the declared size and checks the CRC
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise TransientError(f"zip member {name} is corrupt ({exc})") from None
    if len(data) > limit:
        raise PermanentError(f"{name} inflates past {limit} bytes: refusing it")
    return data


def read_grid(body: bytes, volume: str = "energy", max_raw_bytes: int = 64 * 1024 * 1024) -> np.ndarray:
    """Decode ``{volume}.raw`` of a grid zip to float32, C-order shape (z, y, x) as stored (PIR)."""
    zf = open_zip(body)
    header = parse_mhd(_read_member(zf, f"{volume}.mhd", MAX_HEADER_BYTES).decode("utf-8", "replace"))
    expected = header.nbytes
    if expected > max_raw_bytes:
        raise PermanentError(f"{volume}.mhd declares {expected} bytes of voxels, over the limit of {max_raw_bytes}")
    declared = zf.getinfo(f"{volume}.raw").file_size if f"{volume}.raw" in zf.namelist() else None
    if declared is not None and declared != expected:
        raise PermanentError(
            f"{volume}.raw is {declared} bytes but its header says {expected} "
            f"({'x'.join(map(str, header.dim_size))} {header.element_type})"
        )
    raw = _read_member(zf, f"{volume}.raw", expected)
    if len(raw) != expected:
        raise PermanentError(f"{volume}.raw holds {len(raw)} bytes but its header says {expected}")
    with np.errstate(over="ignore"):  # a double beyond float32's range becomes Inf, refused just below
        grid = np.frombuffer(raw, dtype=header.dtype).reshape(header.shape).astype(np.float32, copy=False)
    bad = grid.size - int(np.count_nonzero(np.isfinite(grid)))
    if bad:
        raise PermanentError(f"{volume}.raw: grid holds {bad} NaN/Inf values, which Allen grids never do: "
                             "refused as corrupt, no file written (--retry-failed tries it again)")
    return grid
