"""Where one output of an experiment goes: a value both processes share."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Target:
    volume: str  # energy, density or intensity
    path: str  # relative to the output folder
    format: str = "minc"  # the writer that makes it (ambasync.writers.WRITERS)
    index: int | None = None  # a slot inside a shared store (the cube); None: one file per experiment
