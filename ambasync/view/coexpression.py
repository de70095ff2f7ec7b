"""Co-expression from a seed voxel (AGEA's question): the correlation of every voxel's
expression profile with the seed's, across the cube's coronal experiments.

The profiles are read once, in a background thread after the app starts, into one matrix held
in memory: rows are the voxels of the coronal coverage mask (``coverage_coronal >= 0.8``, the
"bin 0.8" mask), columns the coronal experiments. Each row is centred on its mean over the
experiments with data there and scaled to unit length, a missing value (``-1``) counting as
that mean (0 after centring). A seed map is then one matrix-vector product: ``rows @ row[seed]``
(Pearson's r where both voxels have data in every experiment; over the ``<= 20 %`` of
experiments a mask voxel can lack, the missing value is imputed by the voxel's mean).

Memory: ``voxels x experiments x 4`` bytes as float32; when that exceeds the budget the rows
are held as int8 with one scale per row (a quarter of the memory; r within ~1e-3; the cube is then
read twice, sums first), converted block by block for the product. At 4,345 coronal experiments
and 61,315 mask voxels: 1.07 GB float32 within the default 1.5 GB budget, plus a bitmask of
missing values (1 bit each, 33 MB) and the per-voxel mean and norm, to give back the raw values
at a seed for "the genes most expressed there".
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from ambasync.view.data import CubeData, Layer, ViewError

log = logging.getLogger("ambasync.view")

COVERAGE_MIN = 0.8  # the coronal "bin 0.8" mask
DEFAULT_BUDGET_MB = 1536
READ_BLOCK = 64  # experiments per read (64 x 637 KB = 41 MB of float32 in flight; bounds the peak RSS)
PRODUCT_ROWS = 8192  # rows converted at once when held as int8
MIN_STD = 1e-5  # below this standard deviation across experiments a voxel counts as constant
NORM_ROWS = 1024  # rows centred and scaled at once, in place


class Coexpression:
    """The in-memory profile matrix and the seed maps computed from it."""

    def __init__(self, data: CubeData, budget_mb: int = DEFAULT_BUDGET_MB, plane: str = "coronal") -> None:
        self.data = data
        self.plane = plane
        self.budget_mb = budget_mb
        self.state = "waiting"  # waiting | loading | ready | failed
        self.error: str | None = None
        self.progress = 0.0
        self.load_seconds: float | None = None
        self.ids = np.array(sorted(i for i, r in data.catalogue.items() if r.get("plane") == plane), dtype=np.int64)
        self.n_experiments = int(self.ids.size)
        coverage = np.asarray(data.ds[f"coverage_{plane}"].values, dtype=np.float32)
        self.mask = coverage >= COVERAGE_MIN
        self.voxels = np.flatnonzero(self.mask.ravel())
        self.row_of = np.full(self.mask.size, -1, dtype=np.int64)
        self.row_of[self.voxels] = np.arange(self.voxels.size)
        self.n_voxels = int(self.voxels.size)
        nbytes = self.n_voxels * self.n_experiments * 4
        self.dtype = np.float32 if nbytes <= budget_mb * 1e6 else np.int8
        self.memory_mb = (self.n_voxels * self.n_experiments * np.dtype(self.dtype).itemsize
                          + self.n_voxels * ((self.n_experiments + 7) // 8)) / 1e6
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        if self.n_voxels * self.n_experiments > budget_mb * 1e6:
            self.state = "failed"
            self.error = (f"{self.n_experiments} {plane} experiments x {self.n_voxels} voxels need "
                          f"{self.n_voxels * self.n_experiments / 1e6:.0f} MB even as int8, over the "
                          f"{budget_mb} MB budget: start the viewer with a larger --memory-budget")
            self._ready.set()

    # ---------------------------------------------------------------- loading
    def start(self) -> None:
        """Load in a daemon thread (the app answers meanwhile; seed requests say how far it got)."""
        if self._thread is None and self.state == "waiting":
            self._thread = threading.Thread(target=self._load_safely, name="ambasync-view-coexpression", daemon=True)
            self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def _load_safely(self) -> None:
        try:
            self.load()
        except Exception as exc:  # the page says why; the rest of the app works without it
            log.exception("co-expression: loading failed")
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            self._ready.set()

    def _blocks(self):
        """(columns, values (voxels x experiments of the block), absent) for every block of the
        plane's experiments, read in storage order (one zarr call per run of slots)."""
        from ambasync.cube.read import read_experiments

        positions = np.array([self.data.position[int(i)] for i in self.ids])
        order = np.argsort(positions, kind="stable")
        for b in range(0, self.n_experiments, READ_BLOCK):
            cols = order[b:b + READ_BLOCK]
            pos = positions[cols]
            lo, hi = int(pos.min()), int(pos.max()) + 1
            if hi - lo <= 2 * len(pos):
                block = read_experiments(self.data.location, lo, hi)[pos - lo]
            else:
                block = np.stack([read_experiments(self.data.location, int(p), int(p) + 1)[0] for p in pos])
            values = block.reshape(len(cols), -1)[:, self.voxels].T
            yield cols, values, values == -1

    def load(self) -> None:
        """float32: one pass (raw values less a per-voxel reference, then centred and scaled in
        place). int8: two passes over the cube (sums, then the scaled values quantised with one scale
        per row), so that memory never holds more than the int8 matrix."""
        start = time.monotonic()
        self.state = "loading"
        n_vox, n_exp = self.n_voxels, self.n_experiments
        if n_vox < 2 or n_exp < 3:
            raise ViewError(f"co-expression needs >= 3 {self.plane} experiments and a coverage mask; the cube has "
                            f"{n_exp} experiments and {n_vox} mask voxels")
        quantised = self.dtype == np.int8
        passes = 2 if quantised else 1
        rows = np.empty((n_vox, n_exp), dtype=self.dtype)
        packed = np.zeros((n_vox, (n_exp + 7) // 8), dtype=np.uint8)
        s1 = np.zeros(n_vox, dtype=np.float64)  # sums of (value - ref) where present
        s2 = np.zeros(n_vox, dtype=np.float64)
        lo_d = np.full(n_vox, np.inf)
        hi_d = np.full(n_vox, -np.inf)
        counts = np.zeros(n_vox, dtype=np.int64)
        self.brain_mean = np.full(n_exp, np.nan)
        ref = None
        done = 0
        for cols, values, absent in self._blocks():
            present = ~absent
            if ref is None:  # values less a per-voxel reference: the spread, not the level, is stored
                ref = (np.where(present, values, 0).sum(axis=1) / np.maximum(present.sum(axis=1), 1)).astype(np.float32)
            self.brain_mean[cols] = [float(values[present[:, j], j].mean()) if present[:, j].any() else np.nan
                                     for j in range(len(cols))]
            d = np.where(present, values - ref[:, None], 0).astype(np.float64)
            s1 += d.sum(axis=1)
            s2 += (d * d).sum(axis=1)
            counts += present.sum(axis=1)
            if quantised:
                lo_d = np.minimum(lo_d, np.where(present, d, np.inf).min(axis=1))
                hi_d = np.maximum(hi_d, np.where(present, d, -np.inf).max(axis=1))
            else:
                rows[:, cols] = np.where(absent, np.nan, values - ref[:, None])
            for j, c in enumerate(cols):
                packed[:, c // 8] |= absent[:, j].astype(np.uint8) * np.uint8(1 << (7 - c % 8))
            done += len(cols)
            self.progress = done / n_exp / passes
        mean_d = s1 / np.maximum(counts, 1)
        norm = np.sqrt(np.maximum(s2 - counts * mean_d ** 2, 0))
        # a voxel that varies by less than 1e-5 (energy units; Allen's values run 0..~30) is
        # constant: its r would be rounding noise
        norm[norm < MIN_STD * np.sqrt(np.maximum(counts, 1))] = 0
        self.mean = (ref + mean_d).astype(np.float32)
        self.norm = norm.astype(np.float32)
        safe = np.where(norm > 0, norm, 1)
        if quantised:
            amplitude = np.maximum(np.abs(hi_d - mean_d), np.abs(lo_d - mean_d)) / safe
            self.scale = np.where(np.isfinite(amplitude) & (amplitude > 0), amplitude / 127, 1).astype(np.float32)
            done = 0
            for cols, values, absent in self._blocks():
                z = (values - ref[:, None] - mean_d[:, None]) / (safe * self.scale)[:, None]
                z[absent] = 0
                z[norm == 0] = 0
                rows[:, cols] = np.clip(np.rint(z), -127, 127).astype(np.int8)
                done += len(cols)
                self.progress = 0.5 + done / n_exp / 2
        else:
            self.scale = np.ones(n_vox, dtype=np.float32)
            for r in range(0, n_vox, NORM_ROWS):
                part = rows[r:r + NORM_ROWS]
                part -= mean_d[r:r + NORM_ROWS, None].astype(np.float32)
                np.nan_to_num(part, copy=False, nan=0.0)
                part /= safe[r:r + NORM_ROWS, None].astype(np.float32)
                part[norm[r:r + NORM_ROWS] == 0] = 0
        self.rows, self.missing_bits = rows, packed
        _release_free_memory()
        self.progress = 1.0
        self.load_seconds = time.monotonic() - start
        self.state = "ready"
        log.info("co-expression: %d %s experiments x %d voxels in memory (%.0f MB, %s) in %.1f s", n_exp, self.plane,
                 n_vox, self.memory_mb, np.dtype(self.dtype).name, self.load_seconds)

    # ---------------------------------------------------------------- queries
    def status(self) -> dict:
        return {"state": self.state, "progress": round(self.progress, 3), "error": self.error,
                "experiments": self.n_experiments, "voxels": self.n_voxels, "plane": self.plane,
                "memory_mb": round(self.memory_mb, 1), "budget_mb": self.budget_mb,
                "dtype": np.dtype(self.dtype).name, "coverage_min": COVERAGE_MIN,
                "load_seconds": None if self.load_seconds is None else round(self.load_seconds, 2)}

    def _row(self, z: int, y: int, x: int) -> int:
        if self.state != "ready":
            if self.state == "failed":
                raise ViewError(f"co-expression is unavailable: {self.error}", 503)
            raise ViewError(f"co-expression is still loading ({self.progress:.0%} of {self.n_experiments} "
                            f"{self.plane} experiments read); try again in a moment", 503)
        shape = self.data.shape
        for v, n, name in zip((z, y, x), shape, "zyx"):
            if not 0 <= v < n:
                raise ViewError(f"{name}={v}: outside 0..{n - 1}")
        row = int(self.row_of[np.ravel_multi_index((z, y, x), shape)])
        if row < 0:
            raise ViewError(f"voxel ({z}, {y}, {x}) is outside the {self.plane} coverage mask (coverage < "
                            f"{COVERAGE_MIN}): pick a voxel inside the brain", 422)
        if self.norm[row] == 0:
            raise ViewError(f"voxel ({z}, {y}, {x}) has the same value in every {self.plane} experiment", 422)
        return row

    def correlation(self, z: int, y: int, x: int) -> np.ndarray:
        """Every voxel's correlation with the seed, on the cube's grid (NaN outside the mask)."""
        row = self._row(z, y, x)
        seed = self.rows[row].astype(np.float32) * self.scale[row]
        r = np.empty(self.n_voxels, dtype=np.float32)
        for a in range(0, self.n_voxels, PRODUCT_ROWS):
            r[a:a + PRODUCT_ROWS] = self.rows[a:a + PRODUCT_ROWS].astype(np.float32, copy=False) @ seed
            if self.dtype == np.int8:
                r[a:a + PRODUCT_ROWS] *= self.scale[a:a + PRODUCT_ROWS]
        r[self.norm == 0] = np.nan
        out = np.full(self.mask.size, np.nan, dtype=np.float32)
        out[self.voxels] = np.clip(r, -1, 1)
        return out.reshape(self.data.shape)

    def seed_values(self, z: int, y: int, x: int) -> np.ndarray:
        """The raw expression at the seed in each experiment (NaN where it has no data)."""
        row = self._row(z, y, x)
        raw = self.rows[row].astype(np.float64) * float(self.scale[row] * self.norm[row]) + float(self.mean[row])
        absent = np.unpackbits(self.missing_bits[row], count=self.n_experiments).astype(bool)
        raw[absent] = np.nan
        return raw

    def top_genes(self, z: int, y: int, x: int, n: int = 20) -> list[dict]:
        """The genes most expressed at the seed relative to the brain: the seed's value over the
        experiment's mean over the mask, best experiment per gene."""
        raw = self.seed_values(z, y, x)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = raw / self.brain_mean
        ok = np.isfinite(ratio) & (self.brain_mean > 0)
        order = np.argsort(-np.where(ok, ratio, -np.inf), kind="stable")
        out, seen = [], set()
        for j in order:
            if not ok[j] or len(out) >= n:
                break
            row = self.data.catalogue[int(self.ids[j])]
            if row.get("gene") in seen:
                continue
            seen.add(row.get("gene"))
            out.append({"gene": row.get("gene"), "experiment_id": int(self.ids[j]), "plane": row.get("plane"),
                        "value": round(float(raw[j]), 4), "brain_mean": round(float(self.brain_mean[j]), 4),
                        "ratio": round(float(ratio[j]), 3)})
        return out

    def layer(self, z: int, y: int, x: int) -> Layer:
        values = self.correlation(z, y, x)
        w = {d[0]: float(self.data.coords[d][i]) for d, i in zip(("zspace", "yspace", "xspace"), (z, y, x))}
        title = (f"co-expression with seed ({w['x']:.1f}, {w['y']:.1f}, {w['z']:.1f}) mm, "
                 f"{self.n_experiments} {self.plane}")
        key = f"seed:{z},{y},{x}" + ("" if self.plane == "coronal" else f":{self.plane}")
        return Layer(key, title, "correlation", values, -1.0, 1.0, "coolwarm")


def _release_free_memory() -> None:
    """Give the load's freed blocks back to the system (glibc keeps them in the loading thread's
    arena otherwise: ~180 MB of RSS at 4,345 experiments); a no-op elsewhere."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def parse_seed(arg: str) -> tuple[int, int, int]:
    from ambasync.view.data import parse_int

    parts = arg.split(",")
    if len(parts) != 3:
        raise ViewError(f"seed {arg!r}: expected Z,Y,X voxel indices")
    return tuple(parse_int(p, "seed") for p in parts)  # type: ignore[return-value]


__all__ = ["COVERAGE_MIN", "DEFAULT_BUDGET_MB", "Coexpression", "parse_seed"]
