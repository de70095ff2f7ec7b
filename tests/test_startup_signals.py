"""Signals while ambasync starts, and what is left once it has gone (issue 10, item 12). What an
operator would notice if these broke: `docker stop` or systemd in the first second killing the
run with no summary, no report and an unfinished run record; a 30-line traceback from the
forkserver on Ctrl-C; conversion processes or multiprocessing's resource tracker lingering
after the run. Real processes and signals, each run in its own session (as a terminal's job),
against the replica in its own process."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import ReplicaProcess, ambasync_cmd, state_rows

pytestmark = pytest.mark.e2e  # real runs, servers or clusters: make test-fast leaves these out

HANG_GUARD = 30.0  # seconds: only so a broken build fails instead of hanging (not a speed check)


@pytest.fixture(scope="module")
def replica():
    rep = ReplicaProcess("--experiments", "200", "--sagittal", "0", "--latency-ms", "30")
    yield rep
    rep.close()


def session(sid: int) -> set[int]:
    """Live processes of a session: the run and every helper it started, whoever their parent is now."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, _, _, session_id = stat[stat.rindex(")") + 2:].split()[:4]
        if int(session_id) == sid and state != "Z":
            pids.add(int(entry.name))
    return pids


def handles(pid: int, sig: int) -> bool:
    """Whether the process has a handler for ``sig`` (its SigCgt mask)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return False


def wait_until(condition, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while not condition():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the moment came"
        time.sleep(0.002)


def start(tmp_path: Path, url: str) -> tuple[subprocess.Popen, Path]:
    err = tmp_path / "stderr.txt"
    with open(err, "w") as fh:  # a file, not a pipe: helpers that outlive the run must not block the test
        proc = subprocess.Popen(ambasync_cmd("run", "--out", str(tmp_path / "out"), "--base-url", url,
                                             "--workers", "2", "--concurrency", "4"),
                                stdout=subprocess.DEVNULL, stderr=fh, start_new_session=True)
    return proc, err


def finish(proc: subprocess.Popen, err: Path) -> str:
    """Reap the run, wait for its helpers to go, and return its stderr (helpers write there too)."""
    proc.wait(timeout=HANG_GUARD)
    deadline = time.monotonic() + HANG_GUARD
    while (left := session(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not left, f"helpers outlived the run: {left}"
    return err.read_text()


def test_a_sigterm_while_starting_still_ends_with_the_summary_the_records_and_143(replica, tmp_path):
    proc, err = start(tmp_path, replica.url)
    wait_until(lambda: handles(proc.pid, signal.SIGTERM), proc)  # the first lines of python -m ambasync ran
    proc.send_signal(signal.SIGTERM)  # while it imports (the run's own handler comes ~1 s later)
    text = finish(proc, err)
    assert proc.returncode == 143, text
    assert "Traceback" not in text and "exit code 143" in text and "run stopped: interrupted by SIGTERM" in text
    out = tmp_path / "out"
    assert state_rows(out, "SELECT exit_code, finished IS NOT NULL FROM runs") == [(143, 1)]
    report = json.loads(next((out / "reports").glob("run-*.json")).read_text())
    assert report["exit_code"] == 143 and report["error"] == "interrupted by SIGTERM"
    assert 'ambasync_last_run_exit_code{shard="unsharded"} 143' in (out / "reports" / "ambasync.prom").read_text()
    assert (out / "manifest.csv").is_file()


def test_ctrl_c_while_the_forkserver_starts_is_one_line_and_never_a_traceback(replica, tmp_path):
    proc, err = start(tmp_path, replica.url)
    wait_until(lambda: len(session(proc.pid)) >= 2, proc)  # the forkserver (or its tracker) is starting
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
    text = finish(proc, err)
    assert proc.returncode == 130, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    if "while starting" in text:  # the usual case: the run had not begun
        assert text == "ambasync: interrupted by SIGINT while starting; nothing was done\n"
    else:  # a loaded machine: the run had begun, and stopped cleanly
        assert "run stopped: interrupted by SIGINT" in text


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_no_conversion_worker_or_resource_tracker_outlives_the_run_however_it_ends(replica, tmp_path, how):
    proc, err = start(tmp_path, replica.url)
    coronal = tmp_path / "out" / "coronal"
    # converting now, with every helper started (a loaded machine starts the second worker later)
    wait_until(lambda: coronal.is_dir() and any(coronal.glob("*.mnc")) and len(session(proc.pid) - {proc.pid}) >= 4,
               proc)
    helpers = session(proc.pid) - {proc.pid}
    assert len(helpers) >= 4, helpers  # resource tracker, forkserver, two workers
    if how == signal.SIGINT:
        os.killpg(proc.pid, how)
    else:
        proc.send_signal(how)
    text = finish(proc, err)  # fails if any helper is still there
    assert proc.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGKILL: -9}[how], text
    assert "Traceback" not in text
