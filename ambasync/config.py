"""The one place settings come from: defaults, ``config.toml``, environment, CLI flags.

Later sources override earlier ones, in that order. Every key is typed and
checked here, so a typo or a bad value stops the run with a one-line error
naming the key and where it was set (exit code 2) instead of surprising it
halfway through. Numbers must be finite (``nan`` and ``inf`` parse as floats
and would otherwise reach the geometry or the timeouts).
"""

from __future__ import annotations

import dataclasses
import math
import os
import string
import tomllib
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ambasync.errors import ConfigError
from ambasync.geometry import ORIENTATIONS, SPACES
from ambasync.imaging.minc import DTYPES
from ambasync.limits import MAX_BODY_BYTES

PLANES = ("coronal", "sagittal")
VOLUMES = ("energy", "density", "intensity")
FORMATS = ("minc", "nifti", "cube")  # what a run writes; each has a writer (writers.py) and hooks (outputs.py)
LOG_FORMATS = ("text", "json")
ENV_PREFIX = "AMBASYNC_"
DEFAULT_CONFIG_TEXT = Path(__file__).with_name("default_config.toml")


@dataclass
class SourceConfig:
    base_url: str = "http://api.brain-map.org"
    plane: str = "coronal"
    page_size: int = 1000
    limit: int = 0
    genes: list[str] = field(default_factory=list)
    experiment_ids: list[int] = field(default_factory=list)
    shard: str = ""


@dataclass
class DownloadConfig:
    concurrency: int = 8
    requests_per_second: float = 0.0
    connect_timeout: float = 15.0
    read_timeout: float = 60.0
    total_timeout: float = 300.0
    max_zip_bytes: int = MAX_BODY_BYTES
    attempts: int = 5
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    quarantine_after: int = 3
    user_agent: str = "ambasync/0.1 (Allen ISH grid mirror; +https://pypi.org/project/ambasync/)"


@dataclass
class ConvertConfig:
    workers: int = 0
    orientation: str = "RAS"
    space: str = "MICe"
    expansion: float = 1.0
    dtype: str = "ushort"
    volumes: list[str] = field(default_factory=lambda: ["energy"])
    name_template: str = "{gene}_{experiment_id}.mnc"
    max_raw_bytes: int = MAX_BODY_BYTES


@dataclass
class OutputConfig:
    out: str = "data"
    formats: list[str] = field(default_factory=lambda: ["minc"])
    cube_voxel_major: bool = True  # the cube's voxel-major copy: fast voxel profiles and scans, twice the size
    cube: str = ""  # where the cube lives: a folder or an fsspec URL (s3://bucket/cube.zarr); "" = {out}/cube.zarr
    keep_zips: bool = False
    cache_dir: str = ""


@dataclass
class PipelineConfig:
    queue_size: int = 64
    conversions_in_flight: int = 0
    uvloop: bool = True
    progress_interval: float = 30.0
    log_format: str = "text"


@dataclass
class AnalysisConfig:
    memory: str = ""  # budget of matrix (and other analysis) steps: "4GB", bytes; "" = a safe share of RAM


@dataclass
class Config:
    source: SourceConfig = field(default_factory=SourceConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)

    @property
    def planes(self) -> tuple[str, ...]:
        return PLANES if self.source.plane == "all" else (self.source.plane,)

    @property
    def workers(self) -> int:
        return self.convert.workers or os.cpu_count() or 1

    @property
    def shard(self) -> tuple[int, int] | None:
        """(k, n) with 0 <= k < n, or None when the catalogue is not split."""
        if not self.source.shard:
            return None
        k, n = self.source.shard.split("/")
        return int(k), int(n)


# Allowed values for string keys; numbers have their own bounds below.
_CHOICES = {
    ("source", "plane"): PLANES + ("all",),
    ("convert", "orientation"): ORIENTATIONS,
    ("convert", "space"): SPACES,
    ("convert", "dtype"): DTYPES,
    ("pipeline", "log_format"): LOG_FORMATS,
}
_POSITIVE = {
    ("source", "page_size"),
    ("download", "concurrency"),
    ("download", "connect_timeout"),
    ("download", "read_timeout"),
    ("download", "total_timeout"),
    ("download", "max_zip_bytes"),
    ("download", "attempts"),
    ("download", "quarantine_after"),
    ("convert", "expansion"),
    ("convert", "max_raw_bytes"),
    ("pipeline", "queue_size"),
    ("pipeline", "progress_interval"),
}
_TEMPLATE_FIELDS = {"gene", "experiment_id", "plane", "volume"}


def _coerce(section: str, key: str, value: Any, default: Any) -> Any:
    """Check ``value`` against the type of the key's default value."""
    name = f"{section}.{key}"
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, str):
            text = value.strip()
            try:
                value = int(text) if isinstance(default, int) and text.lstrip("+-").isdigit() else float(text)
            except ValueError:
                raise ConfigError(f"{name}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{name}: expected a finite number, got {value!r}")
        if isinstance(default, int) and not float(value).is_integer():
            raise ConfigError(f"{name}: expected a whole number, got {value!r}")
        return int(value) if isinstance(default, int) else float(value)
    if isinstance(default, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        if key == "experiment_ids":
            try:
                return [int(v) for v in value]
            except (TypeError, ValueError):
                raise ConfigError(f"{name}: expected experiment ids (whole numbers), got {value!r}") from None
        return [str(v) for v in value]
    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    return value


_NON_NEGATIVE = {
    ("source", "limit"),  # 0 = all
    ("convert", "workers"),  # 0 = one per CPU
    ("download", "requests_per_second"),  # 0 = no cap
    ("download", "backoff_base"),
    ("download", "backoff_max"),
    ("pipeline", "conversions_in_flight"),  # 0 = twice the workers
}


def _validate(cfg: Config, origins: Mapping[tuple[str, str], str] | None = None) -> None:
    """Check values against each other and their bounds; ``origins`` says where each key was set."""
    origins = origins or {}

    def where(section: str, key: str) -> str:
        return f" (set in {origins[section, key]})" if (section, key) in origins else ""

    for (section, key), choices in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"{section}.{key}: {value!r} is not one of {', '.join(choices)}{where(section, key)}")
    for section, key in sorted(_POSITIVE):
        value = getattr(getattr(cfg, section), key)
        if value <= 0:
            raise ConfigError(f"{section}.{key}: must be greater than 0, got {value!r}{where(section, key)}")
    for section, key in sorted(_NON_NEGATIVE):
        value = getattr(getattr(cfg, section), key)
        if value < 0:
            raise ConfigError(f"{section}.{key}: must not be negative, got {value!r}{where(section, key)}")
    formats = cfg.output.formats
    if not formats or any(f not in FORMATS for f in formats) or len(set(formats)) != len(formats):
        raise ConfigError(f"output.formats: {formats!r} must be a non-empty list of distinct formats among "
                          f"{', '.join(FORMATS)}")
    bad_volumes = [v for v in cfg.convert.volumes if v not in VOLUMES]
    if bad_volumes or not cfg.convert.volumes:
        raise ConfigError(f"convert.volumes: {cfg.convert.volumes!r} must be a non-empty list of {', '.join(VOLUMES)}")
    url = urllib.parse.urlsplit(cfg.source.base_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(f"source.base_url: {cfg.source.base_url!r} is not an http(s) URL with a host"
                          f"{where('source', 'base_url')}")
    _validate_template(cfg.convert.name_template)
    if cfg.source.shard:
        try:
            k, n = cfg.shard  # type: ignore[misc]
        except ValueError:
            raise ConfigError(f"source.shard: {cfg.source.shard!r} is not K/N (e.g. 0/3)") from None
        if not (n > 0 and 0 <= k < n):
            raise ConfigError(f"source.shard: {cfg.source.shard!r} needs 0 <= K < N")


def _validate_template(template: str) -> None:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise ConfigError(f"convert.name_template: {template!r} is not a valid template ({exc})") from None
    if not fields <= _TEMPLATE_FIELDS:
        raise ConfigError(f"convert.name_template: unknown field(s) {sorted(fields - _TEMPLATE_FIELDS)}; use {sorted(_TEMPLATE_FIELDS)}")
    if "experiment_id" not in fields:
        raise ConfigError("convert.name_template: must contain {experiment_id} so every file name is unique")
    if "/" in template or "\\" in template or not template.endswith(".mnc"):
        raise ConfigError(f"convert.name_template: {template!r} must be a plain file name ending in .mnc")


def _apply(cfg: Config, section: str, key: str, value: Any, origin: str) -> None:
    sub = getattr(cfg, section, None)
    if sub is None or not dataclasses.is_dataclass(sub):
        raise ConfigError(f"{origin}: unknown section [{section}]")
    if key not in {f.name for f in dataclasses.fields(sub)}:
        raise ConfigError(f"{origin}: unknown key {section}.{key}")
    try:
        setattr(sub, key, _coerce(section, key, value, getattr(sub, key)))
    except ConfigError as exc:
        raise ConfigError(f"{exc} (set in {origin})") from None


def default_config_path(environ: Mapping[str, str] = os.environ) -> Path | None:
    """--config, else $AMBASYNC_CONFIG, else ./config.toml if present, else built-in defaults."""
    if environ.get("AMBASYNC_CONFIG"):
        return Path(environ["AMBASYNC_CONFIG"])
    local = Path("config.toml")
    return local if local.is_file() else None


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Mapping[tuple[str, str], Any] | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Config:
    """Build the run's settings. ``overrides`` maps (section, key) to CLI values (None = not given)."""
    cfg = Config()
    origins: dict[tuple[str, str], str] = {}  # where each key was last set, for error messages
    file = Path(path) if path is not None else default_config_path(environ)
    if file is not None:
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {file} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {file} cannot be read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file} is not valid TOML: {exc}") from None
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{file}: {section!r} must be a [section], not a top-level key")
            for key, value in table.items():
                _apply(cfg, section, key, value, str(file))
                origins[section, key] = str(file)
    sections = {f.name for f in dataclasses.fields(cfg)}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == "AMBASYNC_CONFIG" or name == "AMBASYNC_REFERENCE_DIR":
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section = next((s for s in sections if rest.startswith(s + "_")), None)
        if section is None:
            raise ConfigError(f"environment: {name} names no config section ({', '.join(sorted(sections))})")
        _apply(cfg, section, rest[len(section) + 1:], value, f"environment {name}")
        origins[section, rest[len(section) + 1:]] = f"environment {name}"
    for (section, key), value in (overrides or {}).items():
        if value is not None:
            _apply(cfg, section, key, value, "command line")
            origins[section, key] = "command line"
    _validate(cfg, origins)
    return cfg
