"""Settings: a typo in config.toml must stop the run with a message naming the key,
not be ignored until the mirror is half wrong."""

import os
import subprocess
import sys

import pytest

from ambasync.config import Config, load_config
from ambasync.errors import ConfigError
from helpers import REPO


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_shipped_config_toml_is_exactly_the_defaults():
    assert load_config(REPO / "config.toml", environ={}) == Config()


def test_precedence_file_then_environment_then_flags(tmp_path):
    path = write(tmp_path, "[download]\nconcurrency = 3\n[convert]\ndtype = 'float'\n")
    cfg = load_config(path, environ={"AMBASYNC_DOWNLOAD_CONCURRENCY": "5", "AMBASYNC_SOURCE_GENES": "Nrp1,Pdyn"})
    assert cfg.download.concurrency == 5 and cfg.convert.dtype == "float" and cfg.source.genes == ["Nrp1", "Pdyn"]
    cfg = load_config(path, {("download", "concurrency"): 7, ("convert", "dtype"): None}, environ={})
    assert cfg.download.concurrency == 7 and cfg.convert.dtype == "float"


@pytest.mark.parametrize(
    "text, key",
    [
        ("[download]\nconcurency = 3\n", "download.concurency"),
        ("[downlod]\nconcurrency = 3\n", "[downlod]"),
        ("[download]\nconcurrency = 0\n", "download.concurrency"),
        ("[download]\nconcurrency = 'many'\n", "download.concurrency"),
        ("[convert]\ndtype = 'int'\n", "convert.dtype"),
        ("[convert]\nspace = 'Waxholm'\n", "convert.space"),
        ("[convert]\nvolumes = ['energy', 'colour']\n", "convert.volumes"),
        ("[convert]\nname_template = '{gene}.mnc'\n", "convert.name_template"),
        ("[convert]\nname_template = '../{gene}_{experiment_id}.mnc'\n", "convert.name_template"),
        ("[source]\nshard = '3/3'\n", "source.shard"),
        ("[source]\nbase_url = 'ftp://x'\n", "source.base_url"),
        ("[source]\nplane = 'axial'\n", "source.plane"),
        ("plane = 'coronal'\n", "top-level"),
        ("[source\n", "not valid TOML"),
    ],
)
def test_bad_settings_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace(".", r"\.")):
        load_config(write(tmp_path, text), environ={})


def test_unknown_environment_key_is_an_error():
    with pytest.raises(ConfigError, match="AMBASYNC_DOWNLOAD_SPEED"):
        load_config(None, environ={"AMBASYNC_DOWNLOAD_SPEED": "9"})


def test_cli_reports_a_bad_config_in_one_line_with_exit_code_2(tmp_path):
    path = write(tmp_path, "[download]\nconcurency = 3\n")
    proc = subprocess.run([sys.executable, "-m", "ambasync", "run", "--config", str(path), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "download.concurency" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "ambasync", "run", "--plane", "axial"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


@pytest.mark.parametrize("text, key", [
    ("[convert]\nexpansion = nan\n", "convert.expansion"),
    ("[convert]\nexpansion = inf\n", "convert.expansion"),
    ("[download]\nread_timeout = -inf\n", "download.read_timeout"),
    ("[download]\nrequests_per_second = inf\n", "download.requests_per_second"),
    ("[download]\nbackoff_max = nan\n", "download.backoff_max"),
    ("[source]\nlimit = inf\n", "source.limit"),
])
def test_nan_and_inf_in_the_config_file_name_the_key_and_the_file(tmp_path, text, key):
    """nan is valid TOML: accepted today, it writes NaN geometry or hangs a timeout."""
    with pytest.raises(ConfigError, match=rf"{key}: expected a finite number.*set in .*c\.toml"):
        load_config(write(tmp_path, text), environ={})


@pytest.mark.parametrize("name, value", [
    ("AMBASYNC_DOWNLOAD_READ_TIMEOUT", "nan"),
    ("AMBASYNC_DOWNLOAD_CONNECT_TIMEOUT", "inf"),
    ("AMBASYNC_CONVERT_EXPANSION", "-inf"),
    ("AMBASYNC_DOWNLOAD_CONCURRENCY", "NaN"),
    ("AMBASYNC_PIPELINE_PROGRESS_INTERVAL", " nan "),
])
def test_nan_and_inf_in_the_environment_name_the_key_and_the_variable(name, value):
    key = name[len("AMBASYNC_"):].lower().replace("_", ".", 1)
    with pytest.raises(ConfigError, match=rf"{key}: expected a finite number.*set in environment {name}"):
        load_config(None, environ={name: value})


@pytest.mark.parametrize("section, key, value, why", [
    ("convert", "expansion", float("nan"), "expected a finite number"),
    ("convert", "expansion", float("inf"), "expected a finite number"),
    ("convert", "expansion", 0.0, "must be greater than 0"),
    ("convert", "expansion", -1.0, "must be greater than 0"),
    ("download", "read_timeout", 0.0, "must be greater than 0"),
    ("source", "page_size", 0, "must be greater than 0"),
    ("source", "limit", -1, "must not be negative"),
    ("convert", "workers", -2, "must not be negative"),
])
def test_flags_out_of_range_name_the_key_and_the_command_line(section, key, value, why):
    with pytest.raises(ConfigError, match=rf"{section}\.{key}: {why}.*command line"):
        load_config(None, {(section, key): value}, environ={})


def test_a_zero_or_negative_value_from_the_environment_says_where_it_came_from():
    with pytest.raises(ConfigError, match=r"download\.read_timeout: must be greater than 0, got 0\.0 "
                                          r"\(set in environment AMBASYNC_DOWNLOAD_READ_TIMEOUT\)"):
        load_config(None, environ={"AMBASYNC_DOWNLOAD_READ_TIMEOUT": "0"})


def test_a_base_url_without_a_host_is_refused():
    with pytest.raises(ConfigError, match="source.base_url"):
        load_config(None, {("source", "base_url"): "http://"}, environ={})


def test_cli_refuses_nan_from_a_flag_or_the_environment_in_one_line_with_exit_code_2(tmp_path):
    """Today `--expansion nan` writes NaN geometry and AMBASYNC_DOWNLOAD_READ_TIMEOUT=nan crashes the run."""
    base = [sys.executable, "-m", "ambasync", "run", "--out", str(tmp_path / "out"), "--base-url", "http://127.0.0.1:9"]
    proc = subprocess.run(base + ["--expansion", "nan"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "convert.expansion" in proc.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMBASYNC_") or k == "AMBASYNC_REFERENCE_DIR"}
    proc = subprocess.run(base, capture_output=True, text=True, timeout=60,
                          env={**env, "AMBASYNC_DOWNLOAD_READ_TIMEOUT": "nan"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "AMBASYNC_DOWNLOAD_READ_TIMEOUT" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_output_formats_come_from_flag_config_and_environment_and_a_typo_is_one_line(tmp_path):
    """A nightly job asking for the cube must get it; `--formats minc,zarr` must stop at once, not
    after hours of downloads."""
    from ambasync.config import FORMATS
    from ambasync.mirror.formats.outputs import OUTPUTS
    from ambasync.mirror.formats.writers import WRITERS

    assert load_config(None, environ={}).output.formats == ["minc"]
    assert load_config(None, {("output", "formats"): "minc,cube"}, environ={}).output.formats == ["minc", "cube"]
    assert load_config(None, environ={"AMBASYNC_OUTPUT_FORMATS": "nifti"}).output.formats == ["nifti"]
    for bad in ("minc,zarr", "", "minc,minc"):
        with pytest.raises(ConfigError, match="output.formats"):
            load_config(None, {("output", "formats"): bad}, environ={})
    # Every format a user may name has both halves: a worker-side writer and main-process hooks.
    assert set(FORMATS) == set(OUTPUTS) == set(WRITERS)
