"""Output writers, run in the conversion worker: one decoded, reoriented volume in, one output out.

The worker decodes each volume of a zip once, reorients it once, computes its geometry
once, then hands the same array to the writer of every target (see
:func:`ambasync.mirror.convert.convert`). A new output format adds a writer here (registered in
:data:`WRITERS` under the name used in ``[output] formats`` and in :attr:`Target.format`)
and its main-process side in :mod:`ambasync.mirror.formats.outputs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

from ambasync.geometry import Geometry
from ambasync.imaging.minc import Written, write_volume
from ambasync.settings import ConvertSettings
from ambasync.target import Target

if TYPE_CHECKING:
    import numpy as np


class OutputWriter(Protocol):
    """Writes one target from the volume's voxels (float32, reoriented, shape == geometry.sizes).

    Must write atomically (:func:`ambasync.files.atomic_path`) and return what was written;
    the checksum and size go to the state."""

    def write(self, data: np.ndarray, geometry: Geometry, target: Target, out: Path) -> Written: ...


@dataclass(frozen=True)
class MincWriter:
    """``{out}/{target.path}``, a MINC2 file stored as ``settings.dtype``."""

    settings: ConvertSettings

    def write(self, data: np.ndarray, geometry: Geometry, target: Target, out: Path) -> Written:
        return write_volume(data, geometry, out / target.path, self.settings.dtype)


@dataclass(frozen=True)
class NiftiWriter:
    """``{out}/{target.path}``, NIfTI-1 (gzip) with the MINC file's voxels and world, as ``settings.dtype``."""

    settings: ConvertSettings

    def write(self, data: np.ndarray, geometry: Geometry, target: Target, out: Path) -> Written:
        from ambasync.imaging.nifti import write_nifti  # preloaded in workers (convert.PRELOAD)

        return write_nifti(data, geometry, out / target.path, self.settings.dtype)


def cube_writer(settings: ConvertSettings) -> OutputWriter:
    """The cube's slot writer (:class:`ambasync.cube.CubeWriter`), imported in the worker only:
    the event-loop process never imports numpy or zarr."""
    from ambasync.cube.writer import CubeWriter

    return CubeWriter(settings)


# Format name -> how the worker makes its writer from the run's settings.
WRITERS: dict[str, Callable[[ConvertSettings], OutputWriter]] = {
    "minc": MincWriter, "nifti": NiftiWriter, "cube": cube_writer}
