"""Settings: a typo in config.toml must stop the run with a message naming the key,
not be ignored until the mirror is half wrong."""

import subprocess
import sys

import pytest

from ambasync.config import Config, load_config
from ambasync.errors import ConfigError
from conftest import REPO


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
