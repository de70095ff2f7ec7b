"""The cube's layout: settings, variables, chunk shapes, codecs and file names. Pure, no I/O.

Every other cube module takes its names and numbers from here, so the contract
(docs/cube.md) is written down once. Chunk and codec choices were measured with
``python -m bench.cube`` (figures and reasons in docs/cube.md):

- ``expression`` (experiment, zspace, yspace, xspace) is volume-major, one experiment per
  chunk: a volume is one file, a writer owns whole chunks (one slot = one experiment), and an
  experiment is rewritten without touching any other. blosc zstd level 1 with byte shuffle.
- ``expression_by_voxel`` (zspace, yspace, xspace, experiment) is a voxel-major copy, chunked
  ``by_voxel_chunk`` voxels × ``block`` experiments: one voxel's profile over 26,078
  experiments is 51 chunk reads instead of 26,078, and a scan reads 11,000 chunks instead of
  26,078. It is rebuilt one block of slots at a time, only for blocks whose members changed.
  blosc lz4 with byte shuffle: decoded 4× faster than zstd, for scans.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ambasync.paths import CUBE_NAME

if TYPE_CHECKING:
    import numpy as np

    from ambasync.geometry import Geometry

FORMAT_VERSION = 1
STORE_NAME = CUBE_NAME  # inside the output folder (paths.py holds the layout)
DIMS = ("zspace", "yspace", "xspace")
VARIABLE_OF_VOLUME = {"energy": "expression", "density": "density", "intensity": "intensity"}
BY_VOXEL = "expression_by_voxel"  # the voxel-major copy of ``expression``
PLANES = ("coronal", "sagittal")
FILL = -1.0  # Allen's "no data"; also what an empty slot reads as
# Catalogue columns kept as coordinates along ``experiment``, with their stored types.
STRING_COLUMNS = ("gene", "plane", "gene_name")
FLOAT_COLUMNS = ("section_thickness",)
INT_COLUMNS = ("specimen_id", "chromosome_id", "entrez_id", "genomic_reference_update_id", "homologene_id",
               "organism_id")
CATALOGUE_COLUMNS = STRING_COLUMNS + FLOAT_COLUMNS + INT_COLUMNS
# Coordinates along ``experiment`` are chunked by this many entries whatever the cube's size, so
# a reader holding the previous metadata still decodes a freshly written chunk (see publish).
COORD_CHUNK = 1 << 16
META = ".ambasync"  # the store's own records (slots, members, blocks, lease), inside cube.zarr


@dataclass(frozen=True)
class Codec:
    """Blosc parameters of a variable's chunks (byte shuffle: float32 exponents together)."""

    cname: str = "zstd"
    clevel: int = 1  # zstd 1: 2 % larger than level 3 at 40 % of its encode time (docs/cube.md)
    shuffle: str = "shuffle"


# The voxel-major copy is read whole by scans: lz4 decodes 4× faster than zstd, for 12 % more bytes.
BY_VOXEL_CODEC = Codec("lz4", 5, "shuffle")


@dataclass(frozen=True)
class CubeSettings:
    """What a cube was written with. A store is only ever written with the settings it was made
    with (orientation, space, expansion, volumes, layout); anything else is refused."""

    orientation: str = "RAS"
    space: str = "MICe"
    expansion: float = 1.0
    volumes: tuple[str, ...] = ("energy",)
    source_url: str = ""
    by_voxel: bool = True  # keep the voxel-major copy (fast voxel profiles; doubles the size)
    block: int = 512  # experiments per voxel-major chunk (and per rebuild batch: block × 637 KB in memory)
    by_voxel_chunk: tuple[int, int, int] = (8, 8, 16)  # voxels per voxel-major chunk, (z, y, x)
    codec: Codec = Codec()  # the volume-major variables
    by_voxel_codec: Codec = BY_VOXEL_CODEC

    def identity(self) -> dict:
        """The settings that must match for two writes to go into one store."""
        return {
            "orientation": self.orientation, "space": self.space, "expansion": float(self.expansion),
            "volumes": list(self.volumes), "by_voxel": self.by_voxel, "block": self.block,
            "by_voxel_chunk": list(self.by_voxel_chunk),
            "codec": _codec_doc(self.codec), "by_voxel_codec": _codec_doc(self.by_voxel_codec),
        }

    def variables(self) -> tuple[str, ...]:
        return tuple(VARIABLE_OF_VOLUME[v] for v in self.volumes)


def _codec_doc(codec: Codec) -> dict:
    return {"cname": codec.cname, "clevel": codec.clevel, "shuffle": codec.shuffle}


def validate(settings: CubeSettings) -> None:
    from ambasync.geometry import ORIENTATIONS, SPACES

    if settings.orientation not in ORIENTATIONS or settings.space not in SPACES:
        raise ValueError(f"orientation/space must be in {ORIENTATIONS}/{SPACES}")
    unknown = [v for v in settings.volumes if v not in VARIABLE_OF_VOLUME]
    if unknown or "energy" not in settings.volumes:
        raise ValueError(f"volumes must include energy and be among {tuple(VARIABLE_OF_VOLUME)}, not {unknown}")
    if settings.block < 1 or min(settings.by_voxel_chunk) < 1:
        raise ValueError("block and by_voxel_chunk must be positive")


def blosc(codec: Codec):
    """The numcodecs compressor writing exactly what the arrays' BloscCodec declares."""
    from numcodecs import Blosc

    return Blosc(cname=codec.cname, clevel=codec.clevel,
                 shuffle={"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE,
                          "bitshuffle": Blosc.BITSHUFFLE}[codec.shuffle])


def chunk_key(variable: str, slot: int) -> str:
    """Store key of a volume-major chunk: zarr v3's default ``c/`` key encoding, one chunk per slot."""
    return f"{variable}/c/{slot}/0/0/0"


def block_of(slot: int, block: int) -> int:
    return slot // block


def values_sha256(data: np.ndarray) -> str:
    """Identity of a volume in the cube: sha256 of its float32 little-endian values as stored
    (reoriented, C order). Anyone can check it: ``sha256(ds.expression.sel(experiment=id).values)``;
    it does not depend on the zip's packaging, so a re-zipped identical grid is not rewritten."""
    import numpy as np  # here: the run's event-loop process uses this module without numpy

    return hashlib.sha256(np.ascontiguousarray(data, dtype="<f4").tobytes()).hexdigest()


def world_axis(start: float, step: float, size: int) -> np.ndarray:
    """World coordinate (mm) of every index along one dimension: start + step·i."""
    import numpy as np

    return start + step * np.arange(size, dtype=np.float64)


def catalogue_value(column: str, value) -> object:
    """A catalogue field as the coordinate stores it: ints -1 and floats NaN where null."""
    if column in STRING_COLUMNS:
        return "" if value is None else str(value)
    if column in FLOAT_COLUMNS:
        try:
            return float(value)
        except (TypeError, ValueError):
            return math.nan
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def geometry(settings: CubeSettings) -> Geometry:
    """The cube's grid: the MINC files' geometry of the 200 µm grid for these settings."""
    from ambasync.geometry import GRID_SHAPE_200UM, output_geometry

    return output_geometry(GRID_SHAPE_200UM, settings.orientation, settings.space, settings.expansion)
