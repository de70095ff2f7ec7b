"""Reading grid zips: what a user would get if this broke is a silently wrong or
truncated volume, or a run that inflates a zip bomb until the machine dies."""

import io
import struct
import zipfile

import numpy as np
import pytest

from ambasync.errors import PermanentError, TransientError
from ambasync.imaging.allen_grid import parse_mhd, read_grid
from helpers import REAL_ZIPS, raw_from_zip, require_reference

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


def grid_zip(values: np.ndarray, etype: str, msb_key: str = "BinaryDataByteOrderMSB", dims: str = "67 41 58") -> bytes:
    """A zip like Allen's holding ``values`` (C order (z, y, x), already in the stored dtype)."""
    text = header(dims, etype, "True" if values.dtype.byteorder == ">" else "False").decode()
    if msb_key != "BinaryDataByteOrderMSB":
        text = text.replace("BinaryDataByteOrderMSB", msb_key)
    return make_zip({"energy.raw": values.tobytes(), "energy.mhd": text.encode()})


def nrp1() -> np.ndarray:
    require_reference()
    return raw_from_zip(REAL_ZIPS[74272479])


@pytest.mark.parametrize("stored, etype, msb_key", [
    (">f4", "MET_FLOAT", "BinaryDataByteOrderMSB"),
    ("<f8", "MET_DOUBLE", "BinaryDataByteOrderMSB"),
    (">f8", "MET_DOUBLE", "BinaryDataByteOrderMSB"),
    (">f4", "MET_FLOAT", "ElementByteOrderMSB"),
    (">f8", "MET_DOUBLE", "ElementByteOrderMSB"),
])
def test_big_endian_and_double_grids_decode_to_the_same_values_as_allens_floats(stored, etype, msb_key):
    """A grid re-encoded big-endian or as doubles (either byte-order key) gives exactly Allen's voxels."""
    raw = nrp1()
    grid = read_grid(grid_zip(raw.astype(stored), etype, msb_key))
    assert grid.dtype == np.float32 and grid.shape == (58, 41, 67)
    np.testing.assert_array_equal(grid, raw)


@pytest.mark.parametrize("stored, etype", [("u1", "MET_UCHAR"), (">i2", "MET_SHORT"), (">u2", "MET_USHORT"),
                                           ("<i4", "MET_INT")])
def test_integer_grids_decode_to_their_values_in_the_header_shape_and_byte_order(stored, etype):
    """x varies fastest, y next, z slowest, whatever the element type and byte order."""
    z, y, x = np.indices((58, 41, 67))
    values = ((x + 3 * y + 7 * z) % 200).astype(stored)  # every axis changes the value: a transpose shows
    grid = read_grid(grid_zip(values, etype))
    assert grid.shape == (58, 41, 67)
    np.testing.assert_array_equal(grid, ((x + 3 * y + 7 * z) % 200).astype(np.float32))
    assert grid[0, 0, 1] == 1 and grid[0, 1, 0] == 3 and grid[1, 0, 0] == 7


@pytest.mark.parametrize("stored, etype", [("<f4", "MET_FLOAT"), (">f4", "MET_FLOAT"), ("<f8", "MET_DOUBLE"),
                                           (">f8", "MET_DOUBLE")])
def test_a_grid_holding_nan_or_inf_is_refused_with_the_count(stored, etype):
    """Today one NaN voxel turns a whole ushort volume into NaN (-1 included) and it is marked done.
    The conversion decodes every volume before writing any, so a refusal here writes no file."""
    raw = nrp1().astype(stored)
    raw[10, 20, 30] = np.nan
    raw[11, 20, 30] = np.inf
    raw[12, 20, 30] = -np.inf
    with pytest.raises(PermanentError, match="energy.raw: grid holds 3 NaN/Inf values"):
        read_grid(grid_zip(raw, etype))


def test_a_double_beyond_float32_range_is_refused_not_stored_as_inf():
    raw = nrp1().astype(">f8")
    raw[0, 0, 0] = 1e300
    with pytest.raises(PermanentError, match="grid holds 1 NaN/Inf values"):
        read_grid(grid_zip(raw, "MET_DOUBLE"))


@pytest.mark.parametrize("dims", ["58 41 67", "41 67 58", "67 58 41", "58 67 41", "41 58 67"])
def test_a_permuted_dimsize_is_refused_quoting_the_header(dims):
    """Same voxel count, wrong axes: written today with the wrong geometry."""
    body = make_zip({"energy.raw": nrp1().tobytes(), "energy.mhd": header(dims)})
    with pytest.raises(PermanentError, match=f"DimSize = {dims} is not an Allen grid shape"):
        read_grid(body)


def test_every_allen_resolution_is_accepted_in_allens_axis_order():
    # CCFv3 grids: x = A-P, y = S-I, z = L-R (the ISH 200 µm grid is one voxel larger on each axis)
    for dims in ("67 41 58", "132 80 114", "264 160 228", "528 320 456", "1320 800 1140"):
        assert parse_mhd(header(dims).decode()).dim_size == tuple(int(d) for d in dims.split())
    for dims in ("66 40 57", "4 3 2", "114 80 132"):
        with pytest.raises(PermanentError, match="not an Allen grid shape"):
            parse_mhd(header(dims).decode())


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
    huge_header = make_zip({"energy.raw": b"", "energy.mhd": header("1320 800 1140")})  # 10 µm: 4.8 GB
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
