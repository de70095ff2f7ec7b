"""The memory budget of ``matrix``: parsing ``--memory`` / ``[analysis] memory``, the default (a
safe share of this machine's RAM), and the estimate of a request's peak, step by step, checked
before any work starts.

Every step is sized from the budget (experiments read per block, KNN's distance tiles, the
normalisation's column blocks, the writers' row batches), so the estimate is the matrix itself
plus the largest step's working memory plus the interpreter. A request whose estimate exceeds
the budget stops with one line naming both (:class:`ambasync.errors.AnalysisError`, exit 2).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ambasync.errors import AnalysisError

BASE_BYTES = 400 * 2**20  # the interpreter with numpy, pandas, xarray, zarr, dask, scikit-learn imported
READ_MIN_EXPERIMENTS = 8  # experiments per read block at least
READ_MAX_EXPERIMENTS = 128  # ... and at most (more gains nothing: the decoder runs on every core already)
READ_SHARE = 0.25  # of the budget left beside the matrix, for the blocks being read
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_memory(value: str | int | float | None, where: str = "--memory") -> int | None:
    """Bytes from ``4GB``, ``4GiB``, ``4G`` (binary), ``512MB``, ``1.5e9`` or an integer; None or
    "" for the default. Anything else is an error naming ``where``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise AnalysisError(f"{where}: expected a size such as 4GB, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if m is None or m.group(2).lower() not in _UNITS:
            raise AnalysisError(f"{where}: {value!r} is not a size; write e.g. 4GB, 512MB or a number of bytes")
        number, unit = float(m.group(1)), m.group(2).lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise AnalysisError(f"{where}: the memory budget must be greater than 0, got {value!r}")
    return size


def machine_memory() -> tuple[int, int]:
    """(total, available now) bytes of RAM; available from /proc/meminfo where there is one."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = 8 * 2**30
    available = total
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return int(total), int(available)


def default_budget() -> int:
    """Half of the machine's RAM, at most 80% of what is available now: never into swap."""
    total, available = machine_memory()
    return int(min(total // 2, available * 0.8))


def resolve_budget(memory: str | int | None) -> tuple[int, str]:
    """(bytes, where it came from): ``memory`` if given, else ``[analysis] memory`` of the
    config file or environment, else :func:`default_budget`."""
    size = parse_memory(memory, "--memory")
    if size is not None:
        return size, "--memory"
    from ambasync.config import load_config

    configured = load_config(None, {}).analysis.memory
    size = parse_memory(configured, "[analysis] memory")
    if size is not None:
        return size, "[analysis] memory"
    return default_budget(), "the default, half of RAM"


def human(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale or unit == "MB":
            return f"{n / scale:.1f} {unit}" if n < 10 * scale else f"{n / scale:.0f} {unit}"
    return f"{n:.0f} B"


@dataclass(frozen=True)
class Plan:
    """How a request is cut to fit its budget, and its estimated peak per step (bytes)."""

    budget: int
    source: str
    matrix: int  # the float64 matrix at its largest (every selected row kept)
    read_block: int  # experiments per read block
    steps: dict  # step name -> working bytes beside the matrix
    knn_tiles: int = 0  # KNN's working memory for its distance tiles (knn_impute's memory_bytes)
    column_block: int = 4096  # voxels per block of the normalisation

    @property
    def peak(self) -> int:
        return BASE_BYTES + self.matrix + max(self.steps.values(), default=0)

    @property
    def step_budget(self) -> int:
        """What a step may use beside the matrix and the interpreter."""
        return max(0, self.budget - BASE_BYTES - self.matrix)

    def check(self, what: str) -> None:
        if self.peak <= self.budget:
            return
        worst = max(self.steps, key=self.steps.get) if self.steps else "reading"
        raise AnalysisError(
            f"{what} needs about {human(self.peak)} of memory ({human(self.matrix)} for the matrix, "
            f"{human(self.steps.get(worst, 0))} more while {worst}) but the memory budget is {human(self.budget)} "
            f"({self.source}); raise --memory, or ask for less (--genes, a smaller --mask, --plane, --impute none)")


def plan_matrix(recipe, n_rows: int, n_vox: int, grid_voxels: int, budget: int, source: str,
                voxel_labels=None) -> Plan:
    """Cut a request to its budget and estimate each step's peak, before anything is read.
    The matrix is counted at its largest (every selected row passing the missing-value filter);
    KNN's missing cells at knn_memory_estimate's generous default, checked again with the true
    counts once the matrix is read (:func:`check_knn`)."""
    matrix = 8 * n_rows * n_vox
    left = max(0, budget - BASE_BYTES - matrix)
    read_block = read_block_size(left, grid_voxels, n_vox)
    steps = {"reading": read_block * read_bytes_per_experiment(grid_voxels, n_vox)}
    knn_tiles = int(max(32 * 2**20, min(left // 3, 2**30)))
    if recipe.impute == "knn":
        steps["imputing (knn)"] = knn_working(n_rows, n_vox, n_vox, knn_tiles, None, recipe.knn_neighbors)
    elif recipe.impute == "spatial":
        steps["imputing (spatial)"] = 400 * n_vox
    column_block = int(max(64, min(n_vox, (min(left // 4, 256 * 2**20)) // max(1, 8 * n_rows))))
    if recipe.normalise != "none":
        steps["normalising"] = 4 * 8 * n_rows * column_block + 64 * n_vox
    if voxel_labels is not None and recipe.region_means:
        import numpy as np

        labelled = voxel_labels[voxel_labels != 0]
        largest = int(np.bincount(labelled).max()) if labelled.size else 0
        steps["region means"] = 8 * n_rows * (np.unique(labelled).size + largest)
    steps["writing"] = 3 * 8 * min(n_rows, 256) * n_vox + 64 * n_vox
    return Plan(budget, source, matrix, read_block, steps, knn_tiles, column_block)


def knn_working(n_genes: int, n_vox: int, n_receivers: int, tiles: int, n_missing: int | None,
                n_neighbors: int) -> int:
    """KNN imputation's memory beside its input matrix (its result is a second matrix)."""
    try:
        from ambasync.analysis.matrix.knn import _BASE_BYTES, knn_memory_estimate
    except ImportError:  # the scikit-learn chunks: a copy in and out, and its distance chunks
        return 3 * 8 * n_genes * n_vox + 2 * 2**30
    est = knn_memory_estimate(n_genes, n_vox, n_receivers, tiles, n_missing=n_missing, n_neighbors=n_neighbors)
    return max(0, est - 8 * n_genes * n_vox - _BASE_BYTES)


def check_knn(plan: Plan, values, n_neighbors: int) -> None:
    """Once the matrix is read: KNN's estimate with the true receivers and missing cells."""
    import numpy as np

    n_genes, n_vox = values.shape
    missing = np.zeros(n_vox, dtype=bool)
    n_missing = 0
    for row in values:
        nan = np.isnan(row)
        missing |= nan
        n_missing += int(nan.sum())
    work = knn_working(n_genes, n_vox, int(missing.sum()), plan.knn_tiles, n_missing, n_neighbors)
    exact = Plan(plan.budget, plan.source, 8 * n_genes * n_vox, plan.read_block, {"imputing (knn)": work})
    exact.check(f"KNN imputation of {n_missing} missing cells ({n_genes} rows x {n_vox} voxels)")


def read_block_size(budget_left: int, grid_voxels: int, n_vox: int) -> int:
    """Experiments per read block: the block being read and the one being processed (float32
    volumes, masked float32 and float64 copies), within READ_SHARE of what the matrix leaves."""
    per = read_bytes_per_experiment(grid_voxels, n_vox)
    n = int(READ_SHARE * budget_left // per) if per else READ_MAX_EXPERIMENTS
    return max(READ_MIN_EXPERIMENTS, min(READ_MAX_EXPERIMENTS, n))


def read_bytes_per_experiment(grid_voxels: int, n_vox: int) -> int:
    # three blocks in flight (two read ahead, one grouped): the raw float32 volumes (+ the gather's
    # concatenation), the masked float32 and its float64 transform; and the grouped float64 rows
    return 3 * (2 * 4 * grid_voxels + 4 * n_vox + 8 * n_vox) + 8 * n_vox


__all__ = ["BASE_BYTES", "Plan", "check_knn", "knn_working", "plan_matrix", "default_budget", "human", "machine_memory", "parse_memory",
           "read_block_size", "resolve_budget"]
