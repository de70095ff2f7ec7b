"""The exact expression cube: every mirrored experiment's float32 grids in one Zarr v3 store
(``{out}/cube.zarr``) that xarray and Dask open lazily. The contract is docs/cube.md.

- :mod:`.layout`: settings, variables, chunks, codec (pure);
- :mod:`.slots`: the store's own membership records, slot claims and publish lease;
- :mod:`.writer`: one volume into its slot (conversion workers);
- :mod:`.store`: open/check/set aside, slots for the run, publish, summary (main process);
- :mod:`.build`: the cube from zips on disk, on every core.
"""

from .build import BuildResult, ZipSource, build_from_zips
from .layout import Codec, CubeSettings, values_sha256
from .slots import CubeBusyError, Member
from .store import Cube, CubeSettingsError, CubeSummary, PublishResult, cube_summary
from .writer import CubeWrite, CubeWriter, slot_sha256, write_slot

__all__ = [
    "BuildResult", "Codec", "Cube", "CubeBusyError", "CubeSettings", "CubeSettingsError", "CubeSummary",
    "CubeWrite", "CubeWriter", "Member", "PublishResult", "ZipSource", "build_from_zips", "cube_summary",
    "slot_sha256", "values_sha256", "write_slot",
]
