"""The replica's grid zips: synthetic deterministic grids, or the two real ones, laid out like
real downloads (data_set.xml, energy.raw, energy.mhd; deflated)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.resources
import io
import os
import zipfile
from pathlib import Path

import numpy as np

from ambasync.config import VOLUMES
from ambasync.geometry import GRID_SHAPE_200UM

REAL_IDS = {74272479: "Nrp1", 71717084: "Pdyn"}
REAL_FILES = {74272479: "Nrp1_P56_coronal_74272479_200um.zip", 71717084: "Pdyn_P56_coronal_71717084_200um.zip"}
GRID_SHAPE = GRID_SHAPE_200UM  # C order (z, y, x): PIR, x fastest
# energy.mhd of a real Allen download, verbatim (allen-api.md §2).
MHD_TEMPLATE = (
    "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
    "TransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = 0 0 0\nCenterOfRotation = 0 0 0\n"
    "AnatomicalOrientation = RAI\nElementSpacing = 200 200 200\nDimSize = 67 41 58\n"
    "ElementType = MET_FLOAT\nElementDataFile = {volume}.raw\n"
)
BOMB_BYTES = 200 * 1024 * 1024  # what a "bomb" zip's raw member inflates to


def find_real_dir(configured: str | None) -> Path | None:
    """The folder of the real Nrp1 and Pdyn zips: ``configured``, else
    ``$AMBASYNC_REFERENCE_DIR/allen-grids`` (the tests point it at their fixtures); without
    either the replica serves synthetic grids only."""
    env = os.environ.get("AMBASYNC_REFERENCE_DIR")
    candidates = [configured] if configured else [os.path.join(env, "allen-grids") if env else None]
    for c in candidates:
        if c and all((Path(c) / name).is_file() for name in REAL_FILES.values()):
            return Path(c)
    return None


# -- synthetic grids ---------------------------------------------------------------------------
# Built like real ISH energy on the real P56 annotation (ambasync/replica/data/README.md): per
# gene, a level per structure with a few strongly expressing ones plus smooth fields, log-normal;
# per experiment, its own smooth field, white noise, a gain, its coverage. Everything is a slice
# or a combination of arrays made once per process (``_atlas``), so a grid costs ~2 ms.
ANNOTATION_ZIP = "P56_Mouse_gridAnnotation.zip"  # package data: MET_UINT structure ids, PIR like the grids
SAGITTAL_IDS = range(5_000_000, 6_000_000)  # catalogue.build_rows numbers sagittal rows 5,000,000 + 11 i
MIDLINE = GRID_SHAPE[0] // 2  # axis 0 runs left (0) to right (57); the midline lies between 28 and 29
FIELD_SIGMAS = (1.5, 3.5)  # voxels: the fine and the coarse smooth field
FIELD_PAD = 32  # the fields are this much larger than the grid on every axis: a crop at a random offset
NOISE_POOL = 2  # grids' worth of white noise to slice from
NOISE_SD = 0.2  # white noise of an experiment, log units
RIM_VOXELS = 4.8  # mean depth of the tissue rim with data outside the annotation (real coronal grids ~40,000 voxels)
RIM_JITTER = 2.3  # how far its edge wanders, voxels (sd)
RIM_SLOPE, RIM_DROP = 1.0, 2.0  # log expression falls by DROP + SLOPE per voxel of depth in the rim
RIM_ZERO = 5.5  # depth (voxels) where half the rim reads 0, as in the real grids
FADE_BAND, FADE = 1.5, 3.0  # within BAND (log units) above "not expressed", values fall FADE times faster
DENSITY_HALF = 30.0  # density = energy / (energy + this); intensity = energy / density


@dataclasses.dataclass(frozen=True)
class _Atlas:
    labels: np.ndarray  # grid of structure indices (intp), 0 outside the brain
    sizes: np.ndarray  # voxels per structure index
    centres: np.ndarray  # (structures, 3) a voxel near each structure's centroid
    brain: np.ndarray  # grid, bool
    depth: np.ndarray  # grid, float32: distance (voxels) outside the brain, 0 inside
    rim_drop: np.ndarray  # grid, float32: how much lower log expression is in the rim (0 in the brain)
    rim_zero: np.ndarray  # grid, float32: a voxel reads 0 where white noise falls below this (-inf in the brain)
    sample: np.ndarray  # flat indices of every 16th brain voxel (quantiles)
    fields: tuple[np.ndarray, ...]  # smooth (FIELD_SIGMAS), unit variance, each GRID_SHAPE + FIELD_PAD, float32
    noise: np.ndarray  # white standard normal, float32, NOISE_POOL grids long


def read_annotation() -> np.ndarray:
    """The P56 annotation shipped with the package: structure ids, uint32, GRID_SHAPE (PIR)."""
    with (importlib.resources.files(__package__) / "data" / ANNOTATION_ZIP).open("rb") as fh, \
            zipfile.ZipFile(fh) as zf:
        raw = next(name for name in zf.namelist() if name.endswith(".raw"))
        return np.frombuffer(zf.read(raw), "<u4").reshape(GRID_SHAPE)


@functools.cache
def _atlas() -> _Atlas:
    """What every synthetic grid is cut from, made once per process (~10 MB, ~0.2 s)."""
    from scipy import ndimage

    ids = read_annotation()
    _, labels = np.unique(ids, return_inverse=True)  # id 0 (outside) sorts first: index 0
    labels = labels.reshape(GRID_SHAPE).astype(np.intp)
    sizes = np.bincount(labels.ravel())
    centres = np.stack([np.bincount(labels.ravel(), weights=c.ravel()) for c in np.indices(GRID_SHAPE)], axis=1)
    centres = np.rint(centres / sizes[:, None]).astype(np.intp)
    brain = ids > 0
    depth = ndimage.distance_transform_edt(~brain).astype(np.float32)
    rim_zero = np.where(brain, -np.inf, np.minimum((depth - RIM_ZERO) / 1.5, 0.67)).astype(np.float32)
    rng = np.random.default_rng(20070111)  # fixed: the same fields in every process, whatever the seed
    fields = []
    for sigma in FIELD_SIGMAS:
        field = ndimage.gaussian_filter(rng.standard_normal(tuple(s + FIELD_PAD for s in GRID_SHAPE)), sigma,
                                        mode="wrap")
        fields.append(((field - field.mean()) / field.std()).astype(np.float32))
    noise = rng.standard_normal(NOISE_POOL * brain.size, dtype=np.float32)
    rim_drop = np.where(brain, 0.0, RIM_DROP + RIM_SLOPE * depth).astype(np.float32)
    atlas = _Atlas(labels, sizes, centres, brain, depth, rim_drop, rim_zero, np.flatnonzero(brain)[::16],
                   tuple(fields), noise)
    for array in (labels, sizes, centres, brain, depth, rim_drop, rim_zero, noise, *fields):
        array.flags.writeable = False
    return atlas


def _crop(field: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    z, y, x = rng.integers(0, FIELD_PAD + 1, 3)
    return field[z:z + GRID_SHAPE[0], y:y + GRID_SHAPE[1], x:x + GRID_SHAPE[2]]


def _white(rng: np.random.Generator, atlas: _Atlas) -> np.ndarray:
    start = int(rng.integers(0, atlas.noise.size - atlas.brain.size + 1))
    return atlas.noise[start:start + atlas.brain.size].reshape(GRID_SHAPE)


def _add(out: np.ndarray, field: np.ndarray, weight: float, scratch: np.ndarray) -> None:
    """``out += weight * field`` without temporaries."""
    np.multiply(field, np.float32(weight), out=scratch)
    out += scratch


def _gene_pattern(seed: int, gene: str, atlas: _Atlas, scratch: np.ndarray) -> tuple[np.ndarray, float]:
    """A gene's log expression over the grid, the same in each of its experiments, and the share
    of the brain where it is not expressed (measured 0)."""
    rng = np.random.default_rng([seed, int.from_bytes(hashlib.blake2b(gene.encode(), digest_size=8).digest())])
    base = rng.normal(-2.0, 0.8)
    z, y, x = (atlas.centres + rng.integers(0, FIELD_PAD + 1, 3)).T  # neighbouring structures alike
    levels = atlas.fields[1][z, y, x] * rng.uniform(0.6, 1.0) + rng.normal(base, 0.35, atlas.sizes.size)
    big = np.flatnonzero(atlas.sizes[1:] >= 40) + 1
    weight = np.sqrt(atlas.sizes[big])
    expressing = rng.choice(big, size=int(rng.integers(2, 7)), replace=False, p=weight / weight.sum())
    levels[expressing] += rng.uniform(1.0, 2.5, expressing.size)
    levels[0] = base
    log = np.take(levels.astype(np.float32), atlas.labels)
    _add(log, _crop(atlas.fields[0], rng), rng.uniform(0.5, 0.9), scratch)
    _add(log, _crop(atlas.fields[1], rng), rng.uniform(0.9, 1.4), scratch)
    return log, float(rng.uniform(0.01, 0.10))


def _coverage(plane: str, rng: np.random.Generator, atlas: _Atlas, scratch: np.ndarray) -> np.ndarray:
    """Voxels with data: the brain and a ragged rim of tissue around it, less lost sections
    (coronal: slabs across the anterior-posterior axis; sagittal: the left hemisphere only, its
    lateral edge and a few slices lost)."""
    edge = np.multiply(_crop(atlas.fields[0], rng), np.float32(0.9 * RIM_JITTER), out=scratch)  # sd RIM_JITTER
    edge += np.float32(0.44 * RIM_JITTER) * _crop(atlas.fields[1], rng)
    edge += np.float32(rng.normal(RIM_VOXELS, 0.3))
    cover = atlas.depth < edge
    cover |= atlas.brain
    if plane == "sagittal":
        lateral = int(rng.integers(2, 12))
        cover[MIDLINE:] = False
        cover[:lateral] = False
        for _ in range(min(2, rng.poisson(0.6))):
            cover[int(rng.integers(lateral, MIDLINE))] = False
    else:
        n = GRID_SHAPE[2]  # anterior (0) to posterior
        if rng.random() < 0.6:
            cover[:, :, :int(rng.integers(1, 9))] = False  # olfactory bulb sections lost
        if rng.random() < 0.3:
            cover[:, :, n - int(rng.integers(1, 4)):] = False
        for _ in range(min(2, rng.poisson(0.5))):
            start = int(rng.integers(9, n - 6))
            cover[:, :, start:start + (2 if rng.random() < 0.15 else 1)] = False
    return cover


def synthetic_grid(seed: int, experiment_id: int, volume: str = "energy", *, plane: str | None = None,
                   gene: str | None = None) -> np.ndarray:
    """Deterministic grid shaped like real ISH energy on the P56 annotation: -1 where the
    experiment has no data, else log-normal values with measured zeros, structured by region and
    smooth in space, so any flip or transpose changes it.

    ``plane`` (``coronal``: the whole brain and a rim of tissue around it, less a few lost
    sections, ~100,000 voxels of data, ~61,000 of them in the brain; ``sagittal``: the left
    hemisphere, ~29,000 in the brain) defaults to the catalogue's numbering (ids from 5,000,000
    are sagittal). ``gene`` sets the pattern shared by a gene's experiments (~0.7 Spearman between
    two of them, ~0 between genes); without one each experiment is a gene of its own. ``volume``:
    ``energy``; ``density`` = energy / (energy + 30); ``intensity`` = energy / density (0 where
    energy is); any other name, energy."""
    if plane is None:
        plane = "sagittal" if experiment_id in SAGITTAL_IDS else "coronal"
    if plane not in ("coronal", "sagittal"):
        raise ValueError(f"plane must be coronal or sagittal, not {plane!r}")
    atlas = _atlas()
    scratch = np.empty(GRID_SHAPE, np.float32)
    log, not_expressed = _gene_pattern(seed, gene or f"experiment {experiment_id}", atlas, scratch)
    rng = np.random.default_rng([seed, experiment_id])
    gain = rng.normal(0.0, 0.4)
    _add(log, _crop(atlas.fields[1], rng), rng.uniform(0.8, 1.2), scratch)  # the experiment's own smooth part
    _add(log, _crop(atlas.fields[0], rng), 0.25, scratch)
    zero_below = float(np.quantile(log.ravel()[atlas.sample], not_expressed))
    zero = log < np.float32(zero_below)
    zero |= np.less(_white(rng, atlas), atlas.rim_zero)
    log -= atlas.rim_drop
    np.subtract(np.float32(zero_below + FADE_BAND), log, out=scratch)  # fading out towards "not expressed"
    np.maximum(scratch, np.float32(0.0), out=scratch)
    scratch *= np.float32(FADE)
    log -= scratch
    _add(log, _white(rng, atlas), NOISE_SD, scratch)
    np.maximum(log, np.float32(-36.0 - gain), out=log)  # no underflow to 0: the smallest values are ~1e-16
    log += np.float32(gain)
    values = np.exp(log, out=log)
    kind = volume if volume in VOLUMES else "energy"
    if kind == "density":
        np.add(values, np.float32(DENSITY_HALF), out=scratch)
        values /= scratch
    elif kind == "intensity":
        values += np.float32(DENSITY_HALF)
    values[zero] = 0.0
    cover = _coverage(plane, rng, atlas, scratch)
    np.copyto(values, np.float32(-1.0), where=~cover)
    return values.astype("<f4", copy=False)


def real_grid(real_dir: Path, experiment_id: int) -> np.ndarray:
    """The energy voxels of one of the real zips, exactly as served."""
    with zipfile.ZipFile(real_dir / REAL_FILES[experiment_id]) as zf:
        return np.frombuffer(zf.read("energy.raw"), "<f4").reshape(GRID_SHAPE)


def data_set_xml(experiment_id: int, specimen_id: int) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<section-data-set>\n'
        f"  <failed>false</failed>\n  <id>{experiment_id}</id>\n  <reference-space-id>9</reference-space-id>\n"
        f"  <section-thickness>25.0</section-thickness>\n  <specimen-id>{specimen_id}</specimen-id>\n"
        "  <products>\n    <product>\n      <abbreviation>Mouse</abbreviation>\n    </product>\n  </products>\n"
        "</section-data-set>\n"
    ).encode()


def zip_members(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def grid_zip(raws: dict[str, bytes], bad: str | None, xml: bytes | None) -> bytes:
    """A zip of ``{volume: raw bytes}`` in the real order (data_set.xml, V.raw, V.mhd), spoiled
    as the ``bad`` kind says (see faults.BAD_KINDS)."""
    members: list[tuple[str, bytes]] = [("data_set.xml", xml)] if xml is not None else []
    for volume, raw in raws.items():
        if bad == "short_raw":
            raw = raw[:-1000]
        elif bad == "bomb":
            raw = bytes(BOMB_BYTES)
        if not (bad == "no_energy" and volume == "energy"):
            members.append((f"{volume}.raw", raw))
        members.append((f"{volume}.mhd", MHD_TEMPLATE.format(volume=volume).encode()))
    return zip_members(members)
