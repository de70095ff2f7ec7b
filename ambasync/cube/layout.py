"""The cube's layout: settings, variables, chunk shapes, codecs and file names. Pure, no I/O.

Every other cube module takes its names and numbers from here, so the contract
(docs/cube.md) is written down once. Chunk and codec choices were measured with
``python -m bench.cube`` (figures and reasons in docs/cube.md):

- ``expression`` (experiment, zspace, yspace, xspace) is volume-major, sharded: one shard (one
  object) per ``block`` experiments, holding inner chunks of ``volume_chunk`` experiments. xarray
  makes its Dask chunks of the inner chunks, so a plain ``xr.open_zarr(path)`` builds a graph of
  26,078 / 16 chunks, not 26,078, and a volume read decodes one inner chunk. blosc zstd level 1
  with byte shuffle, in blocks of 1 MiB.
- ``expression_by_voxel`` (zspace, yspace, xspace, experiment) is a voxel-major copy, chunked
  ``by_voxel_chunk`` voxels × ``block`` experiments, sharded by ``by_voxel_shard_z`` planes × the
  whole plane × ``block`` experiments: one voxel's profile over 26,078 experiments is 51 inner
  chunk reads, a scan reads each inner chunk once. blosc lz4 with byte shuffle: decoded 4× faster
  than zstd, for scans.
- Both are written only by the publisher, one block (``block`` slots) at a time and only for
  blocks whose members changed; conversion workers write each experiment's grid once, as a staged
  object (``staged/{experiment}.{volume}``, blosc lz4: cheap to write and to read back).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ambasync.paths import CUBE_NAME

if TYPE_CHECKING:
    import numpy as np

    from ambasync.geometry import Geometry

FORMAT_VERSION = 1  # what readers see (docs/cube.md); unchanged by the storage layout below
LAYOUT_VERSION = 2  # the store's own layout: 2 sharded, members in one table; 1 (no key): one file per slot
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
META = ".ambasync"  # the store's own records (members, staged grids, blocks, lease), inside cube.zarr
SETTINGS_KEY = f"{META}/settings.json"
MEMBERS_KEY = f"{META}/members.json.gz"  # the published member table (written by the publisher only)
INTENT_KEY = f"{META}/publishing.json"  # blocks a publish is rewriting (a killed one's are redone)
LEASE_KEY = f"{META}/publish.lease"
STAGED = f"{META}/staged"  # staged/{experiment}.{volume}: a converted grid waiting for the publish
RECORDS = f"{META}/records"  # records/{name}.json: a writer's batch of members added or removed
BLOCKS = f"{META}/blocks"  # blocks/{block}.npz: per-plane counts of experiments with data


@dataclass(frozen=True)
class Codec:
    """Blosc parameters of a variable's chunks (byte shuffle: float32 exponents together)."""

    cname: str = "zstd"
    clevel: int = 1  # zstd 1: 2 % larger than level 3 at 40 % of its encode time (docs/cube.md)
    shuffle: str = "shuffle"
    blocksize: int = 0  # bytes per blosc block; 0: blosc's own choice (recorded in every chunk's header)


# The volume-major variables: zstd 1 in blocks of 1 MiB. Blosc's own block for zstd 1 is far
# smaller; 1 MiB blocks make the chunks 5 % smaller and the encode 40 % faster (docs/cube.md).
VOLUME_CODEC = Codec("zstd", 1, "shuffle", 1 << 20)


# The voxel-major copy is read whole by scans: lz4 decodes 4× faster than zstd, for 12 % more bytes.
BY_VOXEL_CODEC = Codec("lz4", 5, "shuffle")
# A staged grid is written once by a worker and read once by the publisher: the fastest codec.
STAGED_CODEC = Codec("lz4", 5, "shuffle")


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
    block: int = 512  # experiments per shard and per voxel-major chunk (one publish task: one block)
    volume_chunk: int = 16  # experiments per inner chunk of expression (a volume read decodes this many;
    # 8 made a plain open_zarr's graph 3,260 chunks at 26,078, and building it set off a full garbage
    # collection in most fresh processes: 112-133 ms for one volume against 47-60 ms with 16, docs/cube.md)
    by_voxel_chunk: tuple[int, int, int] = (8, 8, 16)  # voxels per voxel-major chunk, (z, y, x)
    by_voxel_shard_z: int = 8  # planes per voxel-major shard: a scan's read of 8 planes is one whole shard (one GET)
    codec: Codec = VOLUME_CODEC  # the volume-major variables
    by_voxel_codec: Codec = BY_VOXEL_CODEC

    def identity(self) -> dict:
        """The settings that must match for two writes to go into one store."""
        return {
            "layout": LAYOUT_VERSION, "orientation": self.orientation, "space": self.space, "expansion": float(self.expansion),
            "volumes": list(self.volumes), "by_voxel": self.by_voxel, "block": self.block,
            "volume_chunk": self.volume_chunk, "by_voxel_chunk": list(self.by_voxel_chunk),
            "by_voxel_shard_z": self.by_voxel_shard_z,
            "codec": _codec_doc(self.codec), "by_voxel_codec": _codec_doc(self.by_voxel_codec),
        }

    def variables(self) -> tuple[str, ...]:
        return tuple(VARIABLE_OF_VOLUME[v] for v in self.volumes)

    @property
    def inner(self) -> int:
        """Experiments per inner chunk of the volume-major arrays (divides ``block``)."""
        return math.gcd(self.block, self.volume_chunk)

    @property
    def zshard(self) -> int:
        """Planes per voxel-major shard (a whole number of voxel-major chunks)."""
        cz = self.by_voxel_chunk[0]
        return -(-self.by_voxel_shard_z // cz) * cz


def _codec_doc(codec: Codec) -> dict:
    doc = {"cname": codec.cname, "clevel": codec.clevel, "shuffle": codec.shuffle}
    if codec.blocksize:  # absent for blosc's own block size, as stores made before the key existed
        doc["blocksize"] = codec.blocksize
    return doc


# How a store encodes and groups its values, not what they are: a store keeps its own for life.
TUNING_KEYS = ("codec", "by_voxel_codec", "volume_chunk")


def with_recorded_tuning(settings: CubeSettings, recorded: dict | None) -> CubeSettings:
    """``settings`` with the codecs and inner chunk a store was made with, when everything else
    matches: a better default applies to new stores only and never refuses an old one (which
    readers read the same). Anything else is returned unchanged, for the caller to refuse."""
    if not recorded or any(k not in recorded for k in TUNING_KEYS):
        return settings
    mine = settings.identity()
    if {k: v for k, v in recorded.items() if k not in TUNING_KEYS} != {k: v for k, v in mine.items()
                                                                      if k not in TUNING_KEYS}:
        return settings
    return replace(settings, codec=Codec(**recorded["codec"]),
                   by_voxel_codec=Codec(**recorded["by_voxel_codec"]), volume_chunk=int(recorded["volume_chunk"]))


def validate(settings: CubeSettings) -> None:
    from ambasync.geometry import ORIENTATIONS, SPACES

    if settings.orientation not in ORIENTATIONS or settings.space not in SPACES:
        raise ValueError(f"orientation/space must be in {ORIENTATIONS}/{SPACES}")
    unknown = [v for v in settings.volumes if v not in VARIABLE_OF_VOLUME]
    if unknown or "energy" not in settings.volumes:
        raise ValueError(f"volumes must include energy and be among {tuple(VARIABLE_OF_VOLUME)}, not {unknown}")
    if settings.block < 1 or min(settings.by_voxel_chunk) < 1 or settings.volume_chunk < 1:
        raise ValueError("block, volume_chunk and by_voxel_chunk must be positive")


def blosc(codec: Codec):
    """The numcodecs compressor writing exactly what the arrays' BloscCodec declares."""
    from numcodecs import Blosc

    return Blosc(cname=codec.cname, clevel=codec.clevel,
                 shuffle={"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE,
                          "bitshuffle": Blosc.BITSHUFFLE}[codec.shuffle], blocksize=codec.blocksize)


def shard_key(variable: str, block: int) -> str:
    """Store key of a volume-major shard (``block`` slots): zarr v3's default ``c/`` key encoding."""
    return f"{variable}/c/{block}/0/0/0"


def by_voxel_shard_key(z_shard: int, block: int) -> str:
    return f"{BY_VOXEL}/c/{z_shard}/0/0/{block}"


def by_voxel_shard_shape(settings: CubeSettings) -> tuple[int, int, int, int]:
    """A voxel-major shard: ``by_voxel_shard_z`` planes, every row and column (rounded up to whole
    inner chunks), ``block`` experiments."""
    sizes = geometry(settings).sizes
    cz, cy, cx = settings.by_voxel_chunk
    return (settings.zshard, -(-sizes[1] // cy) * cy, -(-sizes[2] // cx) * cx, settings.block)


def staged_key(experiment_id: int, volume: str) -> str:
    """One flat folder: a folder per experiment cost a mkdir in every conversion, and the deletes
    after a publish left the 26,078 empty folders behind."""
    return f"{STAGED}/{experiment_id}.{volume}"


def staged_experiment(key: str) -> int | None:
    """The experiment a staged object holds, from its key (``staged/{id}.{volume}``, or the
    ``staged/{id}/{volume}`` of stores written before); None for anything else."""
    head = key[len(STAGED) + 1:].split("/")[0].split(".")[0] if key.startswith(STAGED + "/") else ""
    return int(head) if head.isdigit() else None


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
