"""Where one output of an experiment goes: a value both processes share."""

from __future__ import annotations

from dataclasses import dataclass

# File formats: one file per experiment and volume, told apart by their suffix (the state
# records paths only, so a recorded path says which format made it).
FILE_SUFFIXES = {"minc": ".mnc", "nifti": ".nii.gz"}


def file_format(path: str) -> str:
    """The file format a recorded output path belongs to (MINC for anything else, as before)."""
    return next((name for name, suffix in FILE_SUFFIXES.items() if path.endswith(suffix)), "minc")


@dataclass(frozen=True, order=True)
class Target:
    volume: str  # energy, density or intensity
    path: str  # relative to the output folder
    format: str = "minc"  # the writer that makes it (ambasync.mirror.formats.writers.WRITERS)
    index: int | None = None  # a slot inside a shared store (the cube); None: one file per experiment
