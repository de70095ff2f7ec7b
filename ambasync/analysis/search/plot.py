"""The picture of a search (``--plot``): what people look at before they read the table.

Left, one row per volume: the user's map, then the top experiments, each cut by the same
three orthogonal slices (axial, coronal, sagittal) through the map's strongest voxel.
Right, the top experiments' correlations as a ranked bar chart. matplotlib's object API
(no pyplot state), the Agg canvas, written atomically. :func:`plot_result` picks the volumes
from a search's result and the cube; :func:`render` draws them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ambasync.files import atomic_path

if TYPE_CHECKING:
    from ambasync.analysis.search.correlate import SearchResult

FIGSIZE_IN = (16.0, 10.0)  # width, height in inches
DPI = 100  # so the PNG is 1600 × 1000 pixels
MAP_CMAP = "RdBu_r"  # diverging: maps are signed statistics
EXPRESSION_CMAP = "magma"
TOP_PLOTTED = 4  # experiments whose slices --plot shows beside the map
TOP_BARS = 20  # bars in --plot's ranked chart


def slice_point(values: np.ndarray, mask: np.ndarray) -> tuple[int, int, int]:
    """(z, y, x) index of the map's largest absolute value inside the mask."""
    scored = np.where(mask & np.isfinite(values), np.abs(values), -np.inf)
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(scored)), values.shape))  # type: ignore[return-value]


def orthogonal_slices(volume: np.ndarray, point: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial (y × x), coronal (z × x) and sagittal (z × y) slices through ``point`` of a
    (zspace, yspace, xspace) volume, rows first so ``origin="lower"`` puts up at the top."""
    z, y, x = point
    return [volume[z, :, :], volume[:, y, :], volume[:, :, x]]


def render(path: Path, map_values: np.ndarray, mask: np.ndarray, volumes: list[np.ndarray], titles: list[str],
           top, map_name: str) -> Path:
    """Write the picture to ``path`` (PNG, FIGSIZE_IN at DPI). ``volumes`` are the top
    experiments' expression (``-1`` = no data, left blank), ``titles`` their labels, ``top``
    the ranked table (columns gene, experiment_id, r) for the bar chart."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI)
    FigureCanvasAgg(fig)
    rows = 1 + len(volumes)
    # Columns: three slices, a gap for the bar labels, the bars.
    grid = fig.add_gridspec(rows, 5, width_ratios=[1, 1, 1, 0.5, 1.5], wspace=0.08, hspace=0.3,
                            left=0.02, right=0.98, top=0.95, bottom=0.06)
    point = slice_point(map_values, mask)
    shown = np.where(mask, map_values, np.nan)
    limit = float(np.nanmax(np.abs(shown))) or 1.0
    names = ("axial", "coronal", "sagittal")
    panels = [(shown, f"map: {map_name}", dict(cmap=MAP_CMAP, vmin=-limit, vmax=limit))]
    for volume, title in zip(volumes, titles):
        data = np.where(volume == -1, np.nan, volume)
        top_value = float(np.nanpercentile(data, 99)) if np.isfinite(data).any() else 1.0
        panels.append((data, title, dict(cmap=EXPRESSION_CMAP, vmin=0, vmax=top_value or 1.0)))
    for row, (volume, title, style) in enumerate(panels):
        for col, section in enumerate(orthogonal_slices(volume, point)):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(section, origin="lower", interpolation="nearest", aspect="equal", **style)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 1:
                ax.set_title(title, fontsize=10)
            if row == 0:
                ax.set_xlabel(names[col], fontsize=8)
    bars = fig.add_subplot(grid[:, 4])
    labels = [f"{g} ({i})" for g, i in zip(top["gene"], top["experiment_id"])]
    r = np.asarray(top["r"], dtype=float)
    positions = np.arange(len(r))[::-1]
    bars.barh(positions, r, color=["#b2182b" if v >= 0 else "#2166ac" for v in r])
    bars.set_yticks(positions, labels, fontsize=8)
    bars.set_xlabel("correlation r with the map")
    bars.set_title(f"top {len(r)} experiments", fontsize=10)
    bars.axvline(0, color="black", linewidth=0.5)
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return Path(path)


def plot_result(result: SearchResult, location: str, path: str | Path, map_name: str) -> Path:
    """``--plot``: the map's orthogonal slices beside the top experiments', and the top bars."""
    from ambasync.cube.read import open_cube

    top = result.experiments.dropna(subset=["r"]).head(TOP_PLOTTED)
    ds = open_cube(cube=location)
    volumes = [np.asarray(ds["expression"].sel(experiment=int(i)).values, dtype=np.float64)
               for i in top["experiment_id"]]
    return render(Path(path), result.map_values, result.mask, volumes,
                  [f"{g} ({i}, {p})" for g, i, p in zip(top["gene"], top["experiment_id"], top["plane"])],
                  result.experiments.dropna(subset=["r"]).head(TOP_BARS), map_name)
