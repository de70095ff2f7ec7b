"""The conversion settings that make a file what it is, as one typed value.

The state stores :meth:`ConvertSettings.key` beside every experiment; a different key
means the files must be converted again. The key's text format (``RAS/MICe/x1/ushort``)
is what existing state files hold: :meth:`parse` reads it back, so it never changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ambasync.config import Config
from ambasync.errors import ConfigError
from ambasync.geometry import Geometry, output_geometry


@dataclass(frozen=True)
class ConvertSettings:
    orientation: str  # RAS or PIR (geometry.ORIENTATIONS)
    space: str  # MICe or CCFv3 (geometry.SPACES)
    expansion: float
    dtype: str  # ushort or float (minc.DTYPES)

    def key(self) -> str:
        return f"{self.orientation}/{self.space}/x{self.expansion:g}/{self.dtype}"

    @classmethod
    def parse(cls, key: str) -> "ConvertSettings":
        try:
            orientation, space, expansion, dtype = key.split("/")
            if not expansion.startswith("x"):
                raise ValueError(expansion)
            return cls(orientation, space, float(expansion[1:]), dtype)
        except ValueError:
            raise ConfigError(f"settings {key!r} are not orientation/space/xEXPANSION/dtype") from None

    @classmethod
    def from_config(cls, cfg: Config) -> "ConvertSettings":
        c = cfg.convert
        return cls(c.orientation, c.space, c.expansion, c.dtype)

    def geometry(self, grid_shape: tuple[int, int, int]) -> Geometry:
        """The output geometry of a grid of ``grid_shape`` (as stored, PIR)."""
        return output_geometry(grid_shape, self.orientation, self.space, self.expansion)

    def grid_shape(self, output_sizes: tuple[int, int, int]) -> tuple[int, int, int]:
        """The stored (PIR) grid shape that gives an output of ``output_sizes``."""
        a, b, c = output_sizes
        return (c, a, b) if self.orientation == "RAS" else (a, b, c)


def output_formats(cfg: Config) -> tuple[str, ...]:
    """The run's output formats (config ``[output] formats``, default MINC alone)."""
    return tuple(cfg.output.formats)
