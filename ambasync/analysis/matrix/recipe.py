"""A matrix recipe: every option of ``ambasync matrix`` as a named field with its default.

The defaults are the ``mhts`` recipe (MouseHumanTranscriptomicSimilarity's
``build_voxel_matrix.py`` with its own defaults), so a recipe file only needs the keys
that differ. Recipes load from and save to flat TOML, and an unknown key or a bad value
is a one-line error naming it (exit 2): a typo must never silently fall back to a default.
Pure: no cube, no numpy.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from ambasync.config import PLANES as CATALOGUE_PLANES
from ambasync.errors import ConfigError

PLANES = (*CATALOGUE_PLANES, "both")
VARIABLES = ("expression", "density", "intensity")
GROUP_BY = ("gene", "experiment")
COMBINE = ("mean", "prefer-coronal", "zscore-mean")
IMPUTE = ("none", "knn", "spatial")
NORMALISE = ("none", "mhts", "srs", "zscore")
NAMED = ("mhts",)  # recipes known by name (``--recipe mhts``)


@dataclass(frozen=True)
class Recipe:
    """What ``matrix`` does, step by step (docs/matrix.md explains each field)."""

    # 1. Experiments
    plane: str = "coronal"  # coronal | sagittal | both
    genes_in_coronal: bool = True  # sagittal: only genes that also have a coronal experiment (MHTS)
    genes: tuple[str, ...] = ()  # only these gene acronyms (empty = all)
    ids: tuple[int, ...] = ()  # only these experiment ids (empty = all)
    variable: str = "expression"  # the cube variable: expression (energy) | density | intensity
    # 2. Mask
    mask: str = "coronal"  # coronal | sagittal | brain | a MINC/NIfTI path on the cube's grid
    resample_images: bool = False  # a mask or label image on another grid is resampled (nearest), not refused
    # 3. Missing
    zero_is_missing: bool = True  # measured 0 -> NaN, as MHTS (-1 -> NaN always)
    # 4. Transform
    log2: bool = True
    log2_offset: float = 0.0  # log2(x + offset); a result of -inf (0 with offset 0) is NaN
    # 5. Group
    group_by: str = "gene"  # gene | experiment
    combine: str = "mean"  # --plane both with group_by gene: mean | prefer-coronal | zscore-mean
    # 6. Filter
    max_missing: float = 0.2  # keep rows whose NaN fraction is strictly below this
    # 7. Impute
    impute: str = "knn"  # none | knn | spatial
    knn_neighbors: int = 5  # KNNImputer's n_neighbors (its default)
    # 8. Normalise
    normalise: str = "none"  # none | mhts | srs | zscore
    # 9. Hemispheres
    mirror_hemisphere: bool = False  # fill sagittal maps' no-data voxels from across the midline
    # 10. Regions and homologs
    homologs: str = ""  # CSV with columns Mouse, Human: keep genes with a human homolog
    labels: str = ""  # label image on the cube's grid: gene x region means
    label_table: str = ""  # CSV with columns Structure, Label (label 0 = none)
    region_means: bool = True  # with labels: gene x region means; false: voxels kept, each named its region

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


_CHOICES = {"plane": PLANES, "variable": VARIABLES, "group_by": GROUP_BY, "combine": COMBINE,
            "impute": IMPUTE, "normalise": NORMALISE}
_DEFAULTS = Recipe()


def _coerce(key: str, value: Any, where: str) -> Any:
    """``value`` checked against the type of the field's default; ``where`` names the source."""
    default = getattr(_DEFAULTS, key)
    name = f"{where}: {key}"
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected a whole number, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        if key == "ids":
            try:
                return tuple(int(v) for v in value)
            except (TypeError, ValueError):
                raise ConfigError(f"{name}: expected experiment ids (whole numbers), got {value!r}") from None
        return tuple(str(v) for v in value)
    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    return value


def make_recipe(values: Mapping[str, Any], base: Recipe | None = None, where: str = "recipe") -> Recipe:
    """``base`` (default: the mhts recipe) with ``values`` applied, every key and value checked."""
    known = {f.name for f in fields(Recipe)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
    clean = {k: _coerce(k, v, where) for k, v in values.items()}
    recipe = dataclasses.replace(base or _DEFAULTS, **clean)
    validate(recipe, where)
    return recipe


def validate(r: Recipe, where: str = "recipe") -> None:
    for key, choices in _CHOICES.items():
        if getattr(r, key) not in choices:
            raise ConfigError(f"{where}: {key} {getattr(r, key)!r} is not one of {', '.join(choices)}")
    if not 0.0 < r.max_missing <= 1.0:
        raise ConfigError(f"{where}: max_missing {r.max_missing} must be in (0, 1] (rows kept have a NaN "
                          "fraction strictly below it)")
    if r.knn_neighbors < 1:
        raise ConfigError(f"{where}: knn_neighbors must be at least 1")
    if r.log2_offset < 0:
        raise ConfigError(f"{where}: log2_offset must not be negative")
    if bool(r.labels) != bool(r.label_table):
        raise ConfigError(f"{where}: labels and label_table go together (a label image and its CSV "
                          "with columns Structure, Label)")


def named_recipe(name: str) -> Recipe:
    if name == "mhts":
        return _DEFAULTS
    raise ConfigError(f"unknown recipe {name!r}: use one of {', '.join(NAMED)} or a .toml file")


def load_recipe(spec: str) -> Recipe:
    """A named recipe (``mhts``) or a TOML file written by :func:`dumps` (or by hand)."""
    if spec in NAMED:
        return named_recipe(spec)
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"recipe {spec!r} is neither a named recipe ({', '.join(NAMED)}) nor a file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{spec}: not a readable TOML recipe ({exc})") from None
    data.pop("ambasync_version", None)  # provenance written by dumps, not an option
    for key, value in data.items():
        if isinstance(value, dict):
            raise ConfigError(f"{spec}: unknown key {key!r} (a recipe is flat: key = value)")
    return make_recipe(data, where=str(spec))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def dumps(recipe: Recipe, version: str = "") -> str:
    """Flat TOML with every field, so that loading it gives exactly ``recipe`` back."""
    lines = ["# ambasync matrix recipe: `python -m ambasync matrix --recipe THIS_FILE ...` redoes it"]
    if version:
        lines.append(f"ambasync_version = {_toml_value(version)}")
    lines += [f"{k} = {_toml_value(v)}" for k, v in recipe.to_dict().items()]
    return "\n".join(lines) + "\n"
