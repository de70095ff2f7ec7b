"""What the page needs computed from the cube: the catalogue, slices of volumes, a voxel's
values and label, user maps on the cube's grid.

Everything is read through the public API (:func:`ambasync.open_cube`) and
:mod:`ambasync.cube.read` (:func:`read_experiments` for one volume: a plain zarr read of one
chunk, ~2 ms, where a dask ``.sel`` on a big cube costs ~50 ms of graph handling); images
through :mod:`ambasync.imaging.regrid`. Nothing here writes to the cube or the mirror.

Layers: every picture the page draws is a *layer* named by a short key:

- ``experiment:ID``  an experiment's expression energy (``-1`` = no data);
- ``coverage:coronal`` / ``coverage:sagittal``  the cube's coverage;
- ``labels``  the ``--labels`` image on the cube's grid (nearest voxel);
- ``seed:Z,Y,X``  correlation of every voxel with that seed (:mod:`ambasync.view.coexpression`);
- ``map:KEY``  a user's map on the cube's grid (trilinear, as ``search`` resamples it).
"""

from __future__ import annotations

import collections
import csv
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ambasync.cube.layout import BY_VOXEL
from ambasync.errors import AnalysisError
from ambasync.geometry import DIMNAMES

AXES = {"z": 0, "y": 1, "x": 2}  # slice axis -> array axis of (zspace, yspace, xspace)
CATALOGUE = ("gene", "plane", "gene_name", "section_thickness", "specimen_id", "chromosome_id", "entrez_id",
             "genomic_reference_update_id", "homologene_id", "organism_id")
VOLUME_CACHE = 64  # volumes kept (64 x 637 KB = 41 MB on the 200 µm grid)
MAP_SUFFIXES = (".mnc", ".nii", ".nii.gz")
_INT = re.compile(r"-?\d{1,18}")


class ViewError(Exception):
    """A request the app cannot answer: a 4xx with this one-line message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _strings(values: Any) -> list[str]:
    return ["" if v is None else str(v) for v in np.asarray(values).tolist()]


def parse_int(text: str | None, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """An integer query parameter, or a 400 naming it."""
    if text is None or not _INT.fullmatch(text.strip()):
        raise ViewError(f"{name}: expected an integer, got {text!r}")
    value = int(text)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ViewError(f"{name}={value}: out of range {lo}..{hi}")
    return value


@dataclass
class Layer:
    """A volume on the cube's grid and how to draw it."""

    key: str
    title: str
    kind: str  # expression | coverage | labels | correlation | map
    values: np.ndarray  # (zspace, yspace, xspace) float32; NaN = nothing there
    vmin: float
    vmax: float
    cmap: str
    nodata: float | None = None  # the value that means "no data" (-1 for expression)


def _robust_range(values: np.ndarray, nodata: float | None) -> tuple[float, float]:
    v = values[np.isfinite(values)]
    if nodata is not None:
        v = v[v != nodata]
    if v.size == 0:
        return 0.0, 1.0
    lo = float(min(0.0, np.percentile(v, 0.5))) if nodata is not None else float(np.percentile(v, 1))
    hi = float(np.percentile(v, 99.5) if nodata is not None else np.percentile(v, 99))
    if not hi > lo:
        hi = lo + (abs(lo) or 1.0)
    return lo, hi


@dataclass
class CubeData:
    """The cube as the page sees it; thread-safe for reads."""

    location: str
    labels_path: str | None = None
    label_names_path: str | None = None
    ds: Any = field(init=False, repr=False)
    geometry: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        import ambasync
        from ambasync.cube.read import cube_geometry

        self.ds = ambasync.open_cube(cube=self.location)
        self.geometry = cube_geometry(self.ds)
        self.shape = tuple(int(self.ds.sizes[d]) for d in DIMNAMES)
        self.coords = {d: np.asarray(self.ds[d].values, dtype=float) for d in DIMNAMES}
        ids = np.asarray(self.ds["experiment"].values, dtype=np.int64)
        self.position = {int(i): p for p, i in enumerate(ids) if i >= 0}  # empty slots have negative ids
        cols = {}
        for name in CATALOGUE:
            if name in self.ds.coords:
                values = self.ds[name].values
                cols[name] = _strings(values) if name in ("gene", "plane", "gene_name") else np.asarray(values).tolist()
        self.catalogue: dict[int, dict] = {}
        for p, i in enumerate(ids):
            if i >= 0:
                row = {"experiment_id": int(i)}
                for name, values in cols.items():
                    v = values[p]
                    row[name] = None if isinstance(v, float) and not np.isfinite(v) else v
                self.catalogue[int(i)] = row
        self.by_gene: dict[str, list[int]] = collections.defaultdict(list)
        for i, row in self.catalogue.items():
            self.by_gene[row.get("gene", "")].append(i)
        self.gene_lower = {g.lower(): g for g in self.by_gene}
        self.has_voxel_major = BY_VOXEL in self.ds
        self._volumes: collections.OrderedDict[int, Layer] = collections.OrderedDict()
        self._extra: collections.OrderedDict[str, Layer] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.labels = self._read_labels() if self.labels_path else None
        self.label_names = self._read_label_names() if self.label_names_path else {}

    # ---------------------------------------------------------------- catalogue
    def find(self, query: str, limit: int = 20) -> list[dict]:
        """Genes (acronym or name) and experiment ids matching ``query``: exact, then prefix,
        then substring matches."""
        q = query.strip().lower()
        if not q:
            return []
        ranked: list[tuple[int, str, dict]] = []
        for gene, ids in self.by_gene.items():
            name = str(self.catalogue[ids[0]].get("gene_name") or "")
            g, n = gene.lower(), name.lower()
            rank = 0 if g == q else 1 if g.startswith(q) else 2 if q in g else 3 if q in n else None
            if rank is not None:
                ranked.append((rank, gene.lower(), {"kind": "gene", "gene": gene, "gene_name": name,
                                                    "experiments": len(ids)}))
        if q.isdigit():
            for i in self.catalogue:
                s = str(i)
                if s.startswith(q):
                    row = self.catalogue[i]
                    ranked.append((0 if s == q else 1, s, {"kind": "experiment", "experiment_id": i,
                                                           "gene": row.get("gene"), "plane": row.get("plane")}))
        ranked.sort(key=lambda t: (t[0], t[1]))
        return [r for _, _, r in ranked[:limit]]

    def gene(self, gene: str) -> dict:
        real = self.gene_lower.get(gene.strip().lower())
        if real is None:
            raise ViewError(f"gene {gene!r} is not in the cube", 404)
        rows = sorted((self.catalogue[i] for i in self.by_gene[real]),
                      key=lambda r: (r.get("plane") != "coronal", r["experiment_id"]))
        return {"gene": real, "gene_name": rows[0].get("gene_name"), "experiments": rows}

    def experiment(self, experiment_id: int) -> dict:
        if experiment_id not in self.catalogue:
            raise ViewError(f"experiment {experiment_id} is not in the cube", 404)
        return self.catalogue[experiment_id]

    # ---------------------------------------------------------------- layers
    def volume(self, experiment_id: int) -> Layer:
        """One experiment's volume (cached), read with one zarr call."""
        from ambasync.cube.read import read_experiments

        with self._lock:
            if experiment_id in self._volumes:
                self._volumes.move_to_end(experiment_id)
                return self._volumes[experiment_id]
        row = self.experiment(experiment_id)
        p = self.position[experiment_id]
        values = read_experiments(self.location, p, p + 1)[0].astype(np.float32, copy=False)
        lo, hi = _robust_range(values, -1.0)
        layer = Layer(f"experiment:{experiment_id}", f"{row.get('gene')} {experiment_id} ({row.get('plane')})",
                      "expression", values, 0.0 if lo >= 0 else lo, hi, "viridis", nodata=-1.0)
        with self._lock:
            self._volumes[experiment_id] = layer
            while len(self._volumes) > VOLUME_CACHE:
                self._volumes.popitem(last=False)
        return layer

    def put(self, layer: Layer, keep: int = 16) -> Layer:
        with self._lock:
            self._extra[layer.key] = layer
            self._extra.move_to_end(layer.key)
            while len(self._extra) > keep:
                self._extra.popitem(last=False)
        return layer

    def cached(self, key: str) -> Layer | None:
        with self._lock:
            return self._extra.get(key)

    def layer(self, key: str, make: Callable[[str], Layer] | None = None) -> Layer:
        """The layer named ``key``; ``make`` builds the keys this module does not know (seed:, map:)."""
        kind, _, arg = key.partition(":")
        if kind == "experiment":
            return self.volume(parse_int(arg, "experiment"))
        if kind == "coverage":
            if arg not in ("coronal", "sagittal"):
                raise ViewError(f"layer {key!r}: coverage:coronal or coverage:sagittal")
            if (hit := self.cached(key)) is None:
                values = np.asarray(self.ds[f"coverage_{arg}"].values, dtype=np.float32)
                hit = self.put(Layer(key, f"{arg} coverage", "coverage", values, 0.0, 1.0, "gray"))
            return hit
        if kind == "labels":
            if self.labels is None:
                raise ViewError("no label image: start the viewer with --labels PATH", 404)
            return self.labels
        if (hit := self.cached(key)) is not None:
            return hit
        if make is not None and kind in ("seed", "map"):
            return make(key)
        raise ViewError(f"unknown layer {key!r}: experiment:ID, coverage:coronal, labels, seed:Z,Y,X or map:KEY")

    def slice(self, layer: Layer, axis: str, index: int) -> dict:
        """One plane of a layer as JSON-ready values, rows in index order: axis z gives (y, x),
        y gives (z, x), x gives (z, y). NaN is null."""
        if axis not in AXES:
            raise ViewError(f"axis {axis!r}: one of z, y, x")
        a = AXES[axis]
        if not 0 <= index < self.shape[a]:
            raise ViewError(f"index {index} outside 0..{self.shape[a] - 1} along {axis}")
        plane = np.take(layer.values, index, axis=a)
        dims = [d for i, d in enumerate(DIMNAMES) if i != a]
        return {"layer": layer.key, "title": layer.title, "kind": layer.kind, "axis": axis, "index": index,
                "world_mm": float(self.coords[DIMNAMES[a]][index]), "dims": dims, "shape": list(plane.shape),
                "vmin": layer.vmin, "vmax": layer.vmax, "cmap": layer.cmap, "nodata": layer.nodata,
                "values": plane}

    def voxel(self, z: int, y: int, x: int, keys: list[str], make: Callable[[str], Layer] | None = None) -> dict:
        """World coordinates, each layer's value and the label at voxel (z, y, x)."""
        for v, n, name in zip((z, y, x), self.shape, "zyx"):
            if not 0 <= v < n:
                raise ViewError(f"{name}={v}: outside 0..{n - 1}")
        values = {}
        for key in keys[:4]:
            layer = self.layer(key, make)
            value = float(layer.values[z, y, x])
            values[key] = {"value": None if not np.isfinite(value) else value,
                           "nodata": layer.nodata is not None and value == layer.nodata, "title": layer.title}
        out: dict[str, Any] = {"index": [z, y, x], "world_mm": {d[0]: float(self.coords[d][i]) for d, i in
                                                               zip(DIMNAMES, (z, y, x))}, "values": values}
        if self.labels is not None:
            label = self.labels.values[z, y, x]
            lab = int(label) if np.isfinite(label) else 0
            out["label"] = {"value": lab, "name": self.label_names.get(lab, "" if lab else "outside")}
        return out

    # ---------------------------------------------------------------- images
    def on_cube(self, path: str, method: str = "linear") -> np.ndarray:
        """An image file brought onto the cube's grid (NaN outside it); AnalysisError if it
        cannot be read or does not overlap."""
        from ambasync.imaging.regrid import on_grid, read_image

        data, geometry = read_image(path)
        return on_grid(data, geometry, self.geometry, method).astype(np.float32)

    def map_layer(self, key: str, path: str, title: str) -> Layer:
        values = self.on_cube(path)
        lo, hi = _robust_range(values, None)
        if lo < 0 < hi:
            m = max(-lo, hi)
            lo, hi, cmap = -m, m, "coolwarm"
        else:
            cmap = "magma"
        return self.put(Layer(key, title, "map", values, lo, hi, cmap))

    def _read_labels(self) -> Layer:
        assert self.labels_path is not None
        try:
            values = self.on_cube(self.labels_path, "nearest")
        except AnalysisError as exc:
            raise ViewError(f"--labels: {exc}") from None
        values = np.where(np.isfinite(values), np.rint(values), 0).astype(np.float32)
        return Layer("labels", f"labels ({Path(self.labels_path).name})", "labels", values, 0.0,
                     float(values.max() or 1), "labels")

    def _read_label_names(self) -> dict[int, str]:
        """``--label-names CSV``: a column of label values (``Label``, ``label``, ``id`` or
        ``value``) and one of names (``Structure``, ``name``, ``acronym``)."""
        assert self.label_names_path is not None
        names: dict[int, str] = {}
        with open(self.label_names_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = {k.lower(): k for k in reader.fieldnames or []}
            vcol = next((fields[k] for k in ("label", "id", "value") if k in fields), None)
            ncol = next((fields[k] for k in ("structure", "name", "acronym") if k in fields), None)
            if vcol is None or ncol is None:
                raise ViewError(f"--label-names {self.label_names_path}: needs a Label (or id) and a Structure "
                                f"(or name) column; has {', '.join(reader.fieldnames or [])}")
            for row in reader:
                try:
                    names[int(float(row[vcol]))] = row[ncol].strip()
                except (TypeError, ValueError):
                    continue
        return names

    def info(self) -> dict:
        return {"location": self.location, "experiments": len(self.catalogue), "shape": list(self.shape),
                "dims": list(DIMNAMES), "coords_mm": {d[0]: self.coords[d].round(4).tolist() for d in DIMNAMES},
                "planes": dict(collections.Counter(r.get("plane") for r in self.catalogue.values())),
                "labels": self.labels is not None, "voxel_major": self.has_voxel_major,
                "space": self.ds.attrs.get("space"), "orientation": self.ds.attrs.get("orientation")}


def map_files(folder: str | None) -> dict[str, str]:
    """The maps a ``--maps`` folder offers: name -> real path, for regular files with a map
    suffix directly in it whose real path (symlinks resolved) stays inside it."""
    if not folder:
        return {}
    root = os.path.realpath(folder)
    found = {}
    try:
        entries = list(os.scandir(root))
    except OSError:
        return {}
    for entry in entries:
        if not entry.name.lower().endswith(MAP_SUFFIXES) or entry.name.startswith("."):
            continue
        real = os.path.realpath(entry.path)
        if os.path.dirname(real) != root or not os.path.isfile(real):
            continue  # a symlink out of the folder (or into a subfolder) is not served
        found[entry.name] = real
    return dict(sorted(found.items()))


__all__ = ["AXES", "CubeData", "Layer", "ViewError", "map_files", "parse_int"]
