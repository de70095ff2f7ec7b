"""The replica's grid zips: synthetic deterministic grids, or the two real ones, laid out like
real downloads (data_set.xml, energy.raw, energy.mhd; deflated)."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np

from ambasync.geometry import GRID_SHAPE_200UM

from ambasync.config import VOLUMES

REAL_IDS = {74272479: "Nrp1", 71717084: "Pdyn"}
REAL_FILES = {74272479: "Nrp1_P56_coronal_74272479_200um.zip", 71717084: "Pdyn_P56_coronal_71717084_200um.zip"}
GRID_SHAPE = GRID_SHAPE_200UM  # C order (z, y, x): PIR, x fastest
# energy.mhd of a real Allen download, verbatim (allen-api.md §2).
MHD_TEMPLATE = (
    "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
    "TransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = 0 0 0\nCenterOfRotation = 0 0 0\n"
    "AnatomicalOrientation = RAI\nElementSpacing = 200 200 200\nDimSize = 67 41 58\n"
    "ElementType = MET_FLOAT\nElementDataFile = {volume}.raw\n"
)
BOMB_BYTES = 200 * 1024 * 1024  # what a "bomb" zip's raw member inflates to


def find_real_dir(configured: str | None) -> Path | None:
    """The folder of the real Nrp1 and Pdyn zips: ``configured``, else
    ``$AMBASYNC_REFERENCE_DIR/allen-grids`` (the tests point it at their fixtures); without
    either the replica serves synthetic grids only."""
    env = os.environ.get("AMBASYNC_REFERENCE_DIR")
    candidates = [configured] if configured else [os.path.join(env, "allen-grids") if env else None]
    for c in candidates:
        if c and all((Path(c) / name).is_file() for name in REAL_FILES.values()):
            return Path(c)
    return None


def synthetic_grid(seed: int, experiment_id: int, volume: str = "energy") -> np.ndarray:
    """Deterministic grid: -1 outside an off-centre ellipsoid, inside non-negative values with
    exact zeros and a gradient along every axis, so any flip or transpose changes it."""
    z, y, x = np.ogrid[: GRID_SHAPE[0], : GRID_SHAPE[1], : GRID_SHAPE[2]]
    inside = ((z - 30) / 32.0) ** 2 + ((y - 18) / 23.0) ** 2 + ((x - 35) / 38.0) ** 2 <= 1.0  # ~1/3 outside
    rng = np.random.default_rng([seed, experiment_id, VOLUMES.index(volume) if volume in VOLUMES else 9])
    values = rng.gamma(1.5, 1.0, GRID_SHAPE).astype(np.float32)
    values += (0.01 * z + 0.02 * y + 0.03 * x).astype(np.float32)
    values[rng.random(GRID_SHAPE) < 0.05] = 0.0
    return np.where(inside, values, np.float32(-1.0)).astype("<f4")


def real_grid(real_dir: Path, experiment_id: int) -> np.ndarray:
    """The energy voxels of one of the real zips, exactly as served."""
    with zipfile.ZipFile(real_dir / REAL_FILES[experiment_id]) as zf:
        return np.frombuffer(zf.read("energy.raw"), "<f4").reshape(GRID_SHAPE)


def data_set_xml(experiment_id: int, specimen_id: int) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<section-data-set>\n'
        f"  <failed>false</failed>\n  <id>{experiment_id}</id>\n  <reference-space-id>9</reference-space-id>\n"
        f"  <section-thickness>25.0</section-thickness>\n  <specimen-id>{specimen_id}</specimen-id>\n"
        "  <products>\n    <product>\n      <abbreviation>Mouse</abbreviation>\n    </product>\n  </products>\n"
        "</section-data-set>\n"
    ).encode()


def zip_members(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def grid_zip(raws: dict[str, bytes], bad: str | None, xml: bytes | None) -> bytes:
    """A zip of ``{volume: raw bytes}`` in the real order (data_set.xml, V.raw, V.mhd), spoiled
    as the ``bad`` kind says (see faults.BAD_KINDS)."""
    members: list[tuple[str, bytes]] = [("data_set.xml", xml)] if xml is not None else []
    for volume, raw in raws.items():
        if bad == "short_raw":
            raw = raw[:-1000]
        elif bad == "bomb":
            raw = bytes(BOMB_BYTES)
        if not (bad == "no_energy" and volume == "energy"):
            members.append((f"{volume}.raw", raw))
        members.append((f"{volume}.mhd", MHD_TEMPLATE.format(volume=volume).encode()))
    return zip_members(members)
