"""Where a mirror keeps things: the output layout, in one place.

Sharded runs share the output folder but keep their own state, lock and manifest
(suffix ``-shard{k}of{n}``). ``status`` and ``verify`` read the layout from here
without importing the run.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from ambasync.config import Config

CUBE_NAME = "cube.zarr"  # the cube store, inside the output folder (docs/cube.md)


@dataclass(frozen=True)
class Paths:
    out: Path
    suffix: str = ""
    cache_dir: str = ""  # kept zips; empty: {out}/.ambasync/zips

    @property
    def meta(self) -> Path:
        return self.out / ".ambasync"

    @property
    def state(self) -> Path:
        return self.meta / f"state{self.suffix}.sqlite"

    @property
    def manifest(self) -> Path:
        return self.out / f"manifest{self.suffix}.csv"

    @property
    def lock(self) -> Path:
        return self.meta / f"lock{self.suffix}"

    @property
    def reports(self) -> Path:
        return self.out / "reports"

    @property
    def cube(self) -> Path:
        """The expression cube, shared by every shard (it keeps its own membership)."""
        return self.out / CUBE_NAME

    @property
    def zips(self) -> Path:
        """The content-addressed zip cache (``keep_zips``)."""
        return Path(self.cache_dir) if self.cache_dir else self.meta / "zips"

    def report(self, started: float) -> Path:
        """The JSON summary of the run that started at ``started`` (epoch seconds, local time)."""
        return self.reports / f"run-{time.strftime('%Y%m%dT%H%M%S', time.localtime(started))}{self.suffix}.json"

    @classmethod
    def for_config(cls, cfg: Config) -> "Paths":
        shard = cfg.shard
        return cls(Path(cfg.output.out), f"-shard{shard[0]}of{shard[1]}" if shard else "", cfg.output.cache_dir)


def cached_zip_path(cache_dir: str | os.PathLike, sha256: str) -> Path:
    """Where the zip cache keeps a zip: by content, in 256 folders."""
    return Path(cache_dir) / sha256[:2] / f"{sha256}.zip"
