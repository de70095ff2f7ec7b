"""The exact expression cube: every mirrored experiment's float32 grids in one Zarr v3 store
(``{out}/cube.zarr``) that xarray and Dask open lazily. The contract is docs/cube.md.

- :mod:`.layout`: settings, variables, chunks, shards, codecs, object names (pure);
- :mod:`.kv`: where the objects live: a folder or any fsspec URL (``s3://…``);
- :mod:`.slots`: the store's own membership records (member table, writers' record batches) and
  the publish lease;
- :mod:`.writer`: one volume staged (conversion workers);
- :mod:`.store`: open/check/set aside, records for the run, publish, summary (main process);
- :mod:`.publish`: the plan and the block rebuilds of a publish; :mod:`.shards`: Zarr shards;
- :mod:`.build`: the cube from zips on disk, on every core;
- :mod:`.read`: the analysis layer's one way in.
"""

from ambasync.cube.layout import Codec, CubeSettings
from ambasync.cube.slots import CubeBusyError, Member
from ambasync.cube.kv import CubeStoreError
from ambasync.cube.store import Cube, CubeSettingsError, CubeSummary, PublishResult, cube_summary

# The worker-side parts need numpy: imported on first use, so the run's event-loop process can
# open the cube and record members without numpy (as it imports nothing of it).
_LAZY = {"BuildResult": "build", "ZipSource": "build", "build_from_zips": "build", "CubeWrite": "writer",
         "CubeWriter": "writer", "slot_sha256": "writer", "write_slot": "writer", "values_sha256": "layout"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BuildResult", "Codec", "Cube", "CubeBusyError", "CubeSettings", "CubeSettingsError", "CubeStoreError", "CubeSummary",
    "CubeWrite", "CubeWriter", "Member", "PublishResult", "ZipSource", "build_from_zips", "cube_summary",
    "slot_sha256", "values_sha256", "write_slot",
]
