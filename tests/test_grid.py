"""Reading grid zips: what a user would get if this broke is a silently wrong or
truncated volume, or a run that inflates a zip bomb until the machine dies."""

import io
import struct
import zipfile

import numpy as np
import pytest

from ambasync.errors import PermanentError, TransientError
from ambasync.grid import parse_mhd, read_grid
from conftest import REAL_ZIPS, raw_from_zip, require_reference

MHD = """ObjectType = Image
NDims = 3
BinaryData = True
BinaryDataByteOrderMSB = {msb}
TransformMatrix = 1 0 0 0 1 0 0 0 1
Offset = 0 0 0
CenterOfRotation = 0 0 0
AnatomicalOrientation = RAI
ElementSpacing = 200 200 200
DimSize = {dims}
ElementType = {etype}
ElementDataFile = energy.raw
"""


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def header(dims="67 41 58", etype="MET_FLOAT", msb="False") -> bytes:
    return MHD.format(dims=dims, etype=etype, msb=msb).encode()


def test_real_zip_decodes_to_the_raw_floats():
    require_reference()
    for eid, path in REAL_ZIPS.items():
        grid = read_grid(path.read_bytes())
        assert grid.dtype == np.float32 and grid.shape == (58, 41, 67)
        np.testing.assert_array_equal(grid, raw_from_zip(path))
        assert (grid == -1).mean() > 0.2, eid  # "no data" voxels survive untouched


def test_header_shape_type_and_byte_order_are_read_not_assumed():
    values = np.arange(4 * 3 * 2, dtype=">i2").reshape(2, 3, 4)  # z=2, y=3, x=4, big-endian int16
    body = make_zip({"energy.mhd": header("4 3 2", "MET_SHORT", "True"), "energy.raw": values.tobytes()})
    grid = read_grid(body)
    assert grid.shape == (2, 3, 4)
    np.testing.assert_array_equal(grid, values.astype(np.float32))


def test_parse_mhd_rejects_what_it_cannot_use():
    assert parse_mhd(header().decode()).dim_size == (67, 41, 58)
    for bad in (header(dims="67 41").decode(), header(etype="MET_LONG_LONG").decode(), "NDims = 3\n"):
        with pytest.raises(PermanentError, match="bad grid header"):
            parse_mhd(bad)


def test_zip_without_energy_raw_is_a_permanent_failure_naming_the_members():
    body = make_zip({"data_set.xml": b"<section-data-set/>", "energy.mhd": header()})
    with pytest.raises(PermanentError, match=r"no energy.raw \(members: data_set.xml, energy.mhd\)"):
        read_grid(body)


def test_raw_of_the_wrong_length_is_refused():
    short = np.zeros(58 * 41 * 67 - 250, dtype="<f4").tobytes()
    body = make_zip({"energy.raw": short, "energy.mhd": header()})
    with pytest.raises(PermanentError, match="636304 bytes but its header says 637304"):
        read_grid(body)


def test_non_zip_body_is_transient_and_quoted():
    with pytest.raises(TransientError, match="not a valid zip.*<html>"):
        read_grid(b"<html><body>502 Bad Gateway</body></html>")
    truncated = REAL_ZIPS[74272479].read_bytes()[:200_000] if REAL_ZIPS[74272479].exists() else make_zip({"a": b"x" * 1000})[:50]
    with pytest.raises(TransientError):
        read_grid(truncated)


def test_zip_bomb_is_refused_from_its_declared_size_without_inflating():
    bomb = make_zip({"energy.raw": bytes(200 * 1024 * 1024), "energy.mhd": header()})
    assert len(bomb) < 1_000_000
    with pytest.raises(PermanentError, match="209715200 bytes but its header says 637304"):
        read_grid(bomb)
    huge_header = make_zip({"energy.raw": b"", "energy.mhd": header("5000 5000 5000")})
    with pytest.raises(PermanentError, match="over the limit"):
        read_grid(huge_header)


def _lie_about_size(body: bytes, name: str, size: int) -> bytes:
    """Rewrite the uncompressed size a zip declares for ``name`` (local and central headers)."""
    data = bytearray(body)
    zf = zipfile.ZipFile(io.BytesIO(body))
    info = zf.getinfo(name)
    struct.pack_into("<I", data, info.header_offset + 22, size)  # local header: uncompressed size
    cd = data.find(b"PK\x01\x02")
    while cd != -1:
        n = struct.unpack_from("<H", data, cd + 28)[0]
        if data[cd + 46:cd + 46 + n] == name.encode():
            struct.pack_into("<I", data, cd + 24, size)
            break
        cd = data.find(b"PK\x01\x02", cd + 4)
    return bytes(data)


def test_zip_bomb_that_lies_about_its_size_never_inflates_past_the_header():
    bomb = make_zip({"energy.raw": bytes(50 * 1024 * 1024), "energy.mhd": header()})
    liar = _lie_about_size(bomb, "energy.raw", 637304)
    assert zipfile.ZipFile(io.BytesIO(liar)).getinfo("energy.raw").file_size == 637304
    with pytest.raises(TransientError, match="corrupt"):  # zipfile stops at 637304 bytes; the CRC then fails
        read_grid(liar)
