"""The run's output formats, main-process side: where each experiment's outputs go, and the
hooks a format that keeps shared state (the cube) needs around the run.

Each format named in ``[output] formats`` has two halves: a writer that runs in the
conversion worker (:mod:`ambasync.writers`) and an :class:`OutputFormat` here. MINC needs
no hook; the cube will allocate an experiment's slot before its job is submitted, note the
experiment once its Done is recorded, and write its coordinates at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

from .catalog import Row
from .config import Config
from .errors import ConfigError
from .names import output_name
from .paths import Paths
from .settings import output_formats
from .target import FILE_SUFFIXES, Target

if TYPE_CHECKING:
    from .outcome import Done, Job
    from .state import State


class OutputFormat(Protocol):
    name: str

    def targets(self, row: Row, plane: str) -> tuple[Target, ...]:
        """Where this format puts the experiment's outputs (pure: names only)."""

    def before_submit(self, job: Job) -> Job:
        """Called in the event loop before the job's download starts; may return the job with
        its targets completed (e.g. the slot the cube gives the experiment)."""

    def after_done(self, done: Done) -> None:
        """Called once the Done is recorded in the state."""

    def at_end(self, state: State, complete: bool) -> None:
        """Called once, after the last outcome; ``complete``: the whole catalogue was seen and
        the run was not stopped (so experiments it no longer lists may be dropped)."""


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

    def at_end(self, state: State, complete: bool) -> None:
        return None


# Format name -> its main-process side, made from the run's settings.
OUTPUTS: dict[str, Callable[[Config, Paths], OutputFormat]] = {
    "minc": FileOutput.for_format("minc"), "nifti": FileOutput.for_format("nifti")}


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

    def targets(self, row: Row, plane: str) -> tuple[Target, ...]:
        return tuple(sorted(t for f in self.formats for t in f.targets(row, plane)))

    def before_submit(self, job: Job) -> Job:
        for f in self.formats:
            job = f.before_submit(job)
        return job

    def after_done(self, done: Done) -> None:
        for f in self.formats:
            f.after_done(done)

    def at_end(self, state: State, complete: bool) -> None:
        for f in self.formats:
            f.at_end(state, complete)
