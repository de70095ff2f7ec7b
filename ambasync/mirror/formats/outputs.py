"""The run's output formats, main-process side: where each experiment's outputs go, and the
hooks a format that keeps shared state (the cube) needs around the run.

Each format named in ``[output] formats`` has two halves: a writer that runs in the
conversion worker (:mod:`ambasync.mirror.formats.writers`) and an :class:`OutputFormat` here. MINC and
NIfTI need no hook; the cube opens its store once the run holds the lock, gives an
experiment its slot before its job is submitted, records it once its Done is recorded, and
publishes its coordinates, coverage and voxel-major copy at the end.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

from ambasync.mirror.catalog import Row
from ambasync.config import Config
from ambasync.errors import ConfigError
from ambasync.names import output_name
from ambasync.paths import CUBE_NAME, Paths
from ambasync.settings import output_formats
from ambasync.target import FILE_SUFFIXES, Target

if TYPE_CHECKING:
    from ambasync.cube import Cube, CubeSettings
    from ambasync.mirror.outcome import Done, Job
    from ambasync.mirror.state import State

log = logging.getLogger("ambasync")


class OutputFormat(Protocol):
    name: str

    def begin(self, force: bool) -> None:
        """Called once the run holds the output folder's lock, before the catalogue is read
        (e.g. open the store; refuse one written with other settings unless ``force``)."""

    def peek(self) -> None:
        """Instead of :meth:`begin`, for a dry run: learn what the format holds, writing nothing."""

    def holds(self, experiment_id: int) -> bool:
        """Whether this format already has the experiment, beyond the files the state records
        (a store: its own membership). False makes a done experiment converted again."""

    def targets(self, row: Row, plane: str) -> tuple[Target, ...]:
        """Where this format puts the experiment's outputs (pure: names only)."""

    def before_submit(self, job: Job) -> Job:
        """Called in the event loop before the job's download starts; may return the job with
        its targets completed (e.g. the slot the cube gives the experiment)."""

    def after_done(self, done: Done) -> None:
        """Called once the Done is recorded in the state."""

    def at_end(self, state: State, complete: bool, prune: bool) -> None:
        """Called once, after the last outcome; ``complete``: the whole catalogue was seen and
        the run was not stopped; with ``prune`` too, experiments the state no longer holds
        (pruned) are dropped."""


@dataclass(frozen=True)
class FileOutput:
    """One file per experiment and volume, ``{plane}/{name_template}`` with the format's suffix
    (MINC ``.mnc``, NIfTI ``.nii.gz``): the same name, so both formats sort side by side. Needs
    no hook: the state records each file."""

    name: str  # the format, a key of target.FILE_SUFFIXES
    name_template: str  # validated to end in .mnc (config)
    volumes: tuple[str, ...]

    @classmethod
    def for_format(cls, name: str) -> Callable[[Config, Paths], "FileOutput"]:
        return lambda cfg, paths: cls(name, cfg.convert.name_template, tuple(cfg.convert.volumes))

    def begin(self, force: bool) -> None:
        return None

    def peek(self) -> None:
        return None

    def holds(self, experiment_id: int) -> bool:
        return True  # the state records each file: decide() compares them

    def targets(self, row: Row, plane: str) -> tuple[Target, ...]:
        suffix = FILE_SUFFIXES[self.name]
        return tuple(
            Target(volume, f"{plane}/{output_name(self.name_template, row.gene, row.experiment_id, plane, volume)[:-4]}"
                           f"{suffix}", self.name)
            for volume in self.volumes)

    def before_submit(self, job: Job) -> Job:
        return job

    def after_done(self, done: Done) -> None:
        return None

    def at_end(self, state: State, complete: bool, prune: bool) -> None:
        return None


class CubeOutput:
    """The cube (``[output] cube``: default ``{out}/cube.zarr``, or any fsspec URL such as
    ``s3://bucket/cube.zarr``): every experiment's exact grids in one Zarr store (docs/cube.md).

    The store keeps its own membership (records inside it), so the state records no cube output.
    The worker stages each converted experiment (:class:`ambasync.cube.CubeWriter`: into the
    store's own stage when it is a folder, else into ``{out}/.ambasync/cube-stage``); once the
    Done is recorded, the experiment is recorded for the cube (in memory, written in batches from
    a thread: no I/O per experiment in the event loop); at the end the store is published.
    """

    name = "cube"

    def __init__(self, path: Path | str, settings: CubeSettings, workers: int, shard: tuple[int, int] | None,
                 stage: Path | None = None, out: Path | None = None):
        self.path = path  # a folder or a URL
        self.settings = settings
        self.workers = workers
        self.shard = shard
        self.stage = stage  # where a store at a URL is staged locally
        self.out = out
        self._cube: Cube | None = None
        self._peeked: set[int] = set()  # a dry run's view of the members
        self._target_path = CUBE_NAME

    @classmethod
    def from_config(cls, cfg: Config, paths: Paths) -> "CubeOutput":
        from ambasync.cube import CubeSettings

        c = cfg.convert
        settings = CubeSettings(orientation=c.orientation, space=c.space, expansion=c.expansion,
                                volumes=tuple(c.volumes), source_url=cfg.source.base_url,
                                by_voxel=cfg.output.cube_voxel_major)
        return cls(cube_location(cfg, paths), settings, cfg.workers, cfg.shard,
                   paths.meta / f"cube-stage{paths.suffix}", paths.out)

    @property
    def cube(self) -> Cube:
        if self._cube is None:
            raise RuntimeError("CubeOutput.begin() was not called")  # a bug of the run, not of the input
        return self._cube

    def begin(self, force: bool) -> None:
        from ambasync.cube import Cube
        from ambasync.cube.kv import is_remote

        # The writer is the shard, not the machine: a shard's next run (a Kubernetes pod on
        # another node) continues what its earlier runs recorded. Records name the host.
        writer = f"shard {self.shard[0]}/{self.shard[1]}" if self.shard else "unsharded"
        self._cube = Cube.open(self.path, self.settings, writer=writer, force=force, stage=self.stage)
        if self._cube.set_aside_to is not None:
            log.warning("the cube at %s could not be used as it was: kept as %s; building a new one",
                        self.path, self._cube.set_aside_to)
        # What the workers get as the target's path: the stage, relative to the output folder if inside it.
        stage = self._cube.stage
        if self.out is not None and not is_remote(str(self.path)) and stage == Path(self.out) / CUBE_NAME:
            self._target_path = CUBE_NAME
        elif self.out is not None and stage.is_relative_to(self.out):
            self._target_path = str(stage.relative_to(self.out))
        else:
            self._target_path = str(stage)

    def peek(self) -> None:
        from ambasync.cube.kv import KV, is_remote, local_path
        from ambasync.cube.slots import apply_records, read_members, read_records

        if not is_remote(str(self.path)) and not local_path(str(self.path)).is_dir():
            return
        kv = KV.open(self.path)
        published = {m.experiment_id: m for m in read_members(kv).values()}
        self._peeked = set(apply_records(published, read_records(kv)))

    def holds(self, experiment_id: int) -> bool:
        if self._cube is None:
            return experiment_id in self._peeked
        return self.cube.holds(experiment_id)

    def targets(self, row: Row, plane: str) -> tuple[Target, ...]:
        return ()  # only experiments that are converted get a cube target (before_submit)

    def before_submit(self, job: Job) -> Job:
        key = self.cube.slot_for(job.row.experiment_id)
        # The stage's path is relative to the output folder, like every target's.
        extra = tuple(Target(volume, self._target_path, self.name, key) for volume in self.settings.volumes)
        return dataclasses.replace(job, targets=tuple(sorted((*job.targets, *extra))))

    def after_done(self, done: Done) -> None:
        shas = {t.volume: w.sha256 for t, w in done.written if t.format == self.name}
        key = next(t.index for t, _ in done.written if t.format == self.name)
        self.cube.record(done.job.row.experiment_id, key, shas, done.job.row.fields)

    def at_end(self, state: State, complete: bool, prune: bool) -> None:
        if complete and prune:
            gone = self.cube.prune(state.experiment_ids(), self.shard)
            if gone:
                log.info("removed %d experiments the catalogue no longer lists from the cube", len(gone))
        log.info("publishing the cube %s (shards, coverage, voxel-major copy)", self.path)
        result = self.cube.publish(workers=self.workers)
        if result.changed:
            log.info("cube: %d experiments, %d blocks rebuilt, version %s", result.experiments,
                     result.blocks_rebuilt, result.version)


def cube_location(cfg: Config, paths: Paths) -> str:
    """Where the run's cube lives: ``[output] cube`` (a folder or an fsspec URL), else ``{out}/cube.zarr``."""
    return str(getattr(cfg.output, "cube", "") or paths.cube)


# Format name -> its main-process side, made from the run's settings.
OUTPUTS: dict[str, Callable[[Config, Paths], OutputFormat]] = {
    "minc": FileOutput.for_format("minc"), "nifti": FileOutput.for_format("nifti"), "cube": CubeOutput.from_config}


class Outputs:
    """Every format of the run, called in the order the config lists them."""

    def __init__(self, formats: tuple[OutputFormat, ...]):
        self.formats = formats

    @classmethod
    def for_config(cls, cfg: Config, paths: Paths) -> "Outputs":
        names = output_formats(cfg)
        unknown = [n for n in names if n not in OUTPUTS]
        if unknown:
            raise ConfigError(f"output.formats: {', '.join(unknown)} unknown; use any of {', '.join(OUTPUTS)}")
        return cls(tuple(OUTPUTS[n](cfg, paths) for n in names))

    def begin(self, force: bool) -> None:
        for f in self.formats:
            f.begin(force)

    def peek(self) -> None:
        for f in self.formats:
            f.peek()

    def holds(self, experiment_id: int) -> bool:
        return all(f.holds(experiment_id) for f in self.formats)

    def targets(self, row: Row, plane: str) -> tuple[Target, ...]:
        return tuple(sorted(t for f in self.formats for t in f.targets(row, plane)))

    def before_submit(self, job: Job) -> Job:
        for f in self.formats:
            job = f.before_submit(job)
        return job

    def after_done(self, done: Done) -> None:
        for f in self.formats:
            f.after_done(done)

    def at_end(self, state: State, complete: bool, prune: bool) -> None:
        for f in self.formats:
            f.at_end(state, complete, prune)
