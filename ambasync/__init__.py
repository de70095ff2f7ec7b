"""ambasync: the Allen Mouse Brain Atlas ISH grids mirrored into your template space, and the
analyses labs run on them.

The Python API (numpydoc in each function; the command line calls the same functions):

- :func:`open_cube` — the cube of every mirrored experiment as a lazy ``xarray.Dataset``;
- :func:`matrix` — a gene × voxel (or × region) matrix by a recipe, as a DataFrame or AnnData;
- :func:`search` — which experiments or genes are expressed like a map;
- :func:`fold_change` — which are enriched in a region (``search --target``).

Nothing heavy is imported until one of them is used: ``python -m ambasync run`` keeps its
event-loop process free of numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ambasync.version import __version__

# public name -> module that defines it (imported on first use, PEP 562)
_API = {
    "open_cube": "ambasync.cube.read",
    "matrix": "ambasync.analysis.matrix.api",
    "search": "ambasync.analysis.search.api",
    "fold_change": "ambasync.analysis.search.api",
    "AnalysisError": "ambasync.errors",
}

if TYPE_CHECKING:
    from ambasync.analysis.matrix.api import matrix
    from ambasync.analysis.search.api import fold_change, search
    from ambasync.cube.read import open_cube
    from ambasync.errors import AnalysisError


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'ambasync' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["AnalysisError", "__version__", "fold_change", "matrix", "open_cube", "search"]
