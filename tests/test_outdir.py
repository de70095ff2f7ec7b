"""An unusable --out (a file, a path under a file, /proc, a folder the user may not write):
what a user would see if this broke is a Python traceback from deep inside the run, or
`status` cheerfully saying "no mirror yet" about a path that can never hold one."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from ambasync.errors import ConfigError
from ambasync.mirror.outdir import check_output_folder
from helpers import ambasync_cmd

pytestmark = pytest.mark.e2e  # real runs, servers or clusters: make test-fast leaves these out


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("create", [True, False])
def test_a_regular_file_as_out_is_refused_naming_it(tmp_path, create):
    target = tmp_path / "data.csv"
    target.write_text("not a folder")
    with pytest.raises(ConfigError) as exc:
        check_output_folder(target, create=create)
    assert f"output folder {target} is a file, not a folder" in one_line(exc)
    assert target.read_text() == "not a folder"


@pytest.mark.parametrize("create", [True, False])
def test_a_path_under_a_regular_file_is_refused_naming_the_file(tmp_path, create):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    with pytest.raises(ConfigError) as exc:
        check_output_folder(blocker / "mirror" / "coronal", create=create)
    assert f"{blocker} is a file, not a folder" in one_line(exc)


@pytest.mark.parametrize("create", [True, False])
def test_a_folder_under_proc_cannot_be_created_and_says_so(create):
    """Root passes every permission check, yet nothing can be created under /proc."""
    path = f"/proc/ambasync-test-{os.getpid()}/mirror"
    with pytest.raises(ConfigError) as exc:
        check_output_folder(path, create=create)
    assert f"output folder {path} cannot be created in /proc" in one_line(exc)
    assert not os.path.lexists(path)


def test_an_existing_folder_nobody_can_write_is_refused_for_run_and_verify_but_readable_for_status():
    with pytest.raises(ConfigError) as exc:
        check_output_folder("/proc/self", create=True)
    assert "output folder /proc/self is not writable" in one_line(exc)
    with pytest.raises(ConfigError, match="is not writable"):
        check_output_folder("/proc/self", create=False, writable=True)
    assert str(check_output_folder("/proc/self", create=False, writable=False)) == "/proc/self"


@pytest.fixture
def root_owned_folder():
    """A folder only its owner may write, in a place everybody may traverse (pytest's own tmp_path is not)."""
    parent = Path(tempfile.mkdtemp(prefix="ambasync-outdir-", dir="/tmp"))
    try:
        parent.chmod(0o755)
        folder = parent / "theirs"
        folder.mkdir()
        folder.chmod(0o755 if os.geteuid() == 0 else 0o555)
        yield folder
    finally:
        (parent / "theirs").chmod(0o755)
        shutil.rmtree(parent)


def test_a_folder_the_user_may_not_write_is_refused_as_permission_denied(root_owned_folder):
    """Asked as an unprivileged user (a forked child drops root), so the permission bits count."""
    folder = root_owned_folder
    expected = f"output folder {folder} is not writable (permission denied); fix its permissions or give --out " \
               "another path"
    if os.geteuid() != 0:
        with pytest.raises(ConfigError) as exc:
            check_output_folder(folder, create=True)
        assert str(exc.value) == expected
        return
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become `nobody`, then ask
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            try:
                check_output_folder(folder, create=True)
                message = "accepted"
            except ConfigError as exc:
                message = str(exc)
            os.write(write, message.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as fh:
        message = fh.read()
    os.waitpid(pid, 0)
    assert message == expected
    assert os.listdir(folder) == []
    assert check_output_folder(folder, create=True) == folder  # root itself may write it


def test_a_missing_folder_is_made_for_run_and_left_alone_for_status(tmp_path):
    target = tmp_path / "a" / "b" / "mirror"
    assert check_output_folder(target, create=False) == target and not (tmp_path / "a").exists()
    assert check_output_folder(target, create=True) == target and target.is_dir()


def test_the_writability_trial_leaves_nothing_behind(tmp_path):
    (tmp_path / "coronal").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    check_output_folder(tmp_path, create=True)
    check_output_folder(tmp_path / "missing", create=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_relative_out_comes_back_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_output_folder("data", create=True) == tmp_path / "data"


@pytest.mark.parametrize("command", ["run", "status", "verify"])
def test_every_command_refuses_an_unusable_out_with_exit_2_and_one_line(tmp_path, command):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub", f"/proc/ambasync-test-{os.getpid()}"):
        args = ["--base-url", "http://127.0.0.1:9"] if command == "run" else []
        proc = subprocess.run(ambasync_cmd(command, "--out", str(out), *args), capture_output=True, text=True,
                              timeout=60, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert proc.returncode == 2, (out, proc.stderr)
        assert proc.stderr.startswith("ambasync: output folder") and proc.stderr.count("\n") == 1, proc.stderr
        assert "Traceback" not in proc.stderr
