"""A nightly mirror that never loses, corrupts or repeats work, whatever the upstream
or the operator does to it. Real processes, real signals, real files."""

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from ambasync.mirror.lock import OutputLock, layout_for
from ambasync.replica import Replica, ReplicaConfig, serve
from helpers import (
    ReplicaProcess, ambasync_cmd, manifest, mirror, notebook_ras, quantisation_step, read_minc, sha256, state_rows,
)

pytestmark = pytest.mark.e2e  # real runs, servers or clusters: make test-fast leaves these out

FAST = ["--concurrency", "4", "--workers", "2", "-q"]


def env_fast_retries() -> dict:
    return {**os.environ, "AMBASYNC_DOWNLOAD_BACKOFF_BASE": "0.01", "AMBASYNC_DOWNLOAD_BACKOFF_MAX": "0.05",
            "AMBASYNC_DOWNLOAD_READ_TIMEOUT": "2", "AMBASYNC_PIPELINE_UVLOOP": "true"}


def assert_mirror_is_correct(out: Path, replica: Replica, ids) -> None:
    """Every listed experiment: recorded done, file present, sha256 right, voxels right."""
    m = manifest(out).set_index("experiment_id")
    for eid in ids:
        rec = m.loc[eid]
        assert rec["status"] == "done", (eid, rec["error"])
        path = out / rec["path"]
        assert sha256(path) == rec["sha256"]
        expected = notebook_ras(replica.raw_grid(eid))
        data, _ = read_minc(path)
        assert np.abs(data - expected).max() <= quantisation_step(expected), eid


async def test_chaos_run_ends_with_every_good_experiment_right_and_the_bad_ones_failed(tmp_path):
    bad = {100000 + 13 * i: kind for i, kind in
           zip(range(3, 200, 40), ["no_energy", "short_raw", "404", "bomb", "no_energy"])}
    cfg = ReplicaConfig(n_coronal=198, n_sagittal=0, seed=7, fault_rate=0.3, bad=bad, retry_after=0.05,
                        stall_seconds=5.0)
    async with serve(cfg) as (rep, url):
        summary = await mirror(url, tmp_path, download__attempts=10, download__read_timeout=1.0,
                               download__concurrency=16)
        assert sum(rep.stats.faults.values()) > 40, "the replica injected too few faults to test anything"
        assert len(rep.rows) == 200
        good = [r["experiment_id"] for r in rep.rows if r["experiment_id"] not in bad]
        assert summary.exit_code == 1 and summary.failed == 5 and summary.done == 195
        assert_mirror_is_correct(tmp_path, rep, good)
    m = manifest(tmp_path).set_index("experiment_id")
    for eid, kind in bad.items():
        assert m.loc[eid, "status"] == "failed" and m.loc[eid, "error"]
        assert not list((tmp_path / "coronal").glob(f"*_{eid}.mnc"))
    # the bomb is refused from the size its zip declares, before anything is inflated
    assert "209715200 bytes but its header says 637304" in m.loc[[e for e, k in bad.items() if k == "bomb"][0], "error"]
    assert len(list((tmp_path / "coronal").glob("*.mnc"))) == 195
    assert not list(tmp_path.rglob("*.ambasync-tmp"))


async def test_with_the_servers_connection_limit_equal_to_concurrency_no_429_is_ever_answered(tmp_path):
    async with serve(ReplicaConfig(n_coronal=30, n_sagittal=0, max_connections=4, latency_ms=20)) as (rep, url):
        s = await mirror(url, tmp_path, download__concurrency=4)
        assert s.done == 32 and rep.stats.over_limit_429 == 0 and rep.stats.max_in_flight <= 4
    # the same server with a greedier client does answer 429s, and the run still completes by backing off
    async with serve(ReplicaConfig(n_coronal=30, n_sagittal=0, max_connections=2, latency_ms=20,
                                   retry_after=0.05)) as (rep, url):
        s = await mirror(url, tmp_path / "greedy", download__concurrency=8, download__attempts=20)
        assert rep.stats.over_limit_429 > 0 and s.done == 32


async def test_an_output_folder_that_cannot_be_made_stops_the_run_cleanly_naming_it(tmp_path):
    (tmp_path / "coronal").write_text("a file where the plane's folder should be")
    async with serve(ReplicaConfig(n_coronal=6, n_sagittal=0)) as (_, url):
        s = await asyncio.wait_for(mirror(url, tmp_path), 120)  # stops; never hangs
    assert s.exit_code == 1 and "FileExistsError" in s.error and str(tmp_path / "coronal") in s.error
    assert (tmp_path / "manifest.csv").is_file() and len(list((tmp_path / "reports").glob("run-*.json"))) == 1


async def test_a_catalogue_that_changes_mid_run_is_detected_and_work_done_is_kept(tmp_path):
    async with serve(ReplicaConfig(n_coronal=20, n_sagittal=0, grow_after_requests=2)) as (_, url):
        s = await mirror(url, tmp_path, source__page_size=5)
    assert s.exit_code == 4 and "catalogue changed" in s.error
    m = manifest(tmp_path)
    assert (m["status"] == "done").sum() >= 5
    for rec in m[m["status"] == "done"].itertuples():
        assert sha256(tmp_path / rec.path) == rec.sha256


async def test_hostile_gene_names_stay_inside_the_folder_unique_and_mapped_back(tmp_path):
    genes = ["a/b", "../../escape", "..", "with space", "Gène-ü", "ctl\x07x", "y" * 300, "CON", "Avp", "Avp",
             "a_b"]
    extra = [{"experiment_id": 800000 + i, "gene": g, "plane": "coronal"} for i, g in enumerate(genes)]
    async with serve(ReplicaConfig(n_coronal=0, n_sagittal=0, extra_rows=extra, real_dir="/nonexistent")) as (_, url):
        s = await mirror(url, tmp_path)
    assert s.done == len(genes) and s.exit_code == 0
    files = list((tmp_path / "coronal").iterdir())
    assert len(files) == len(genes)
    assert all(f.resolve().parent == (tmp_path / "coronal").resolve() for f in files)
    assert not any(p.name == "escape" or "escape_" in p.name for p in tmp_path.parent.iterdir())
    m = manifest(tmp_path).set_index("experiment_id")
    for i, gene in enumerate(genes):
        assert m.loc[800000 + i, "gene"] == gene  # the manifest keeps the real acronym
        assert (tmp_path / m.loc[800000 + i, "path"]).is_file()


async def test_a_run_sweeps_leftover_temporaries_but_never_those_of_a_shard_still_running(tmp_path):
    """Shards share the folder: sweeping a file another shard is writing would fail that experiment."""
    (tmp_path / "coronal").mkdir()
    writing = tmp_path / "coronal" / ".Gene1_100013.mnc.4242.ambasync-tmp"
    writing.write_bytes(b"half a volume")
    other = OutputLock(tmp_path / ".ambasync" / "lock-shard1of2", layout=layout_for((1, 2)))  # shard 1's run
    other.acquire()
    try:
        async with serve(ReplicaConfig(n_coronal=4, n_sagittal=0)) as (_, url):
            s = await mirror(url, tmp_path, source__shard="0/2")
        assert s.done >= 1 and writing.exists()
    finally:
        other.release()
    async with serve(ReplicaConfig(n_coronal=4, n_sagittal=0)) as (_, url):
        await mirror(url, tmp_path, source__shard="0/2")  # alone now: the leftover goes
    assert not writing.exists()


def test_a_second_run_exits_3_naming_the_holder_and_a_stale_lock_is_taken_over(tmp_path):
    lock = OutputLock(tmp_path / ".ambasync" / "lock")
    lock.acquire()
    try:
        proc = subprocess.run(ambasync_cmd("run", "--out", str(tmp_path), "--base-url", "http://127.0.0.1:9"),
                              capture_output=True, text=True, timeout=60)
    finally:
        lock.release()
    assert proc.returncode == 3 and f"pid {os.getpid()}" in proc.stderr
    # a lock file left by a dead process (no flock held) does not stop the next run
    (tmp_path / ".ambasync" / "lock").write_text('{"pid": 999999, "started": "yesterday"}')
    replica = ReplicaProcess("--experiments", "2", "--sagittal", "0")
    try:
        proc = subprocess.run(ambasync_cmd("run", "--out", str(tmp_path), "--base-url", replica.url, *FAST),
                              capture_output=True, text=True, timeout=120)
    finally:
        replica.close()
    assert proc.returncode == 0, proc.stderr
    with OutputLock(tmp_path / ".ambasync" / "lock"):  # verify waits its turn too
        verify = subprocess.run(ambasync_cmd("verify", "--out", str(tmp_path)), capture_output=True, text=True,
                                timeout=60)
    assert verify.returncode == 3 and "holds" in verify.stderr


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                children = {int(c) for c in (task / "children").read_text().split()}
            except OSError:
                continue
            todo.extend(children - found)
            found |= children
    return found


def wait_gone(pids: set[int], timeout: float = 15) -> set[int]:
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = {p for p in pids if Path(f"/proc/{p}").exists() and "(Z" not in _stat(p)}
        time.sleep(0.1)
    return pids


def _stat(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
    except (OSError, IndexError):
        return "(Z"


def wait_for_files(out: Path, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((out / "coronal").glob("*.mnc"))) >= n if (out / "coronal").is_dir() else False:
            return
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_at_any_moment_loses_nothing_and_redoes_nothing(tmp_path):
    replica = ReplicaProcess("--experiments", "48", "--sagittal", "0", "--latency-ms", "40", "--seed", "3")
    local = Replica(ReplicaConfig(n_coronal=48, n_sagittal=0, seed=3))
    done_before_kill: set[int] = set()
    try:
        for kill_at in (0, 3, 12, 25):
            proc = subprocess.Popen(ambasync_cmd("run", "--out", str(tmp_path), "--base-url", replica.url, *FAST),
                                    env=env_fast_retries())
            wait_for_files(tmp_path, kill_at, proc)
            helpers = descendants(proc.pid)  # the conversion pool
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            assert not wait_gone(helpers), "conversion workers outlived the killed run"
            # after each kill the state never claims more than the disk holds
            if (tmp_path / ".ambasync" / "state.sqlite").exists():
                for eid, path, digest in state_rows(
                        tmp_path, "SELECT e.experiment_id, o.path, o.sha256 FROM experiments e "
                                  "JOIN outputs o USING (experiment_id) WHERE e.status = 'done'"):
                    assert sha256(tmp_path / path) == digest
                    done_before_kill.add(eid)
            requests_at_kill = replica.stats()["grid_requests"]
        for f in (tmp_path / "coronal").glob("*.mnc"):  # no final name holds a partial file
            read_minc(f)
        proc = subprocess.run(ambasync_cmd("run", "--out", str(tmp_path), "--base-url", replica.url, *FAST),
                              env=env_fast_retries(), capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr
        after = replica.stats()["grid_requests"]
    finally:
        replica.close()
    assert done_before_kill, "no experiment finished before the kills: the test proved nothing"
    for eid in done_before_kill:
        assert after.get(str(eid)) == requests_at_kill.get(str(eid)), f"{eid} was fetched again after it was done"
    assert_mirror_is_correct(tmp_path, local, [r["experiment_id"] for r in local.rows])
    assert not list(tmp_path.rglob("*.ambasync-tmp"))


@pytest.mark.slow
def test_sigterm_stops_within_10_seconds_with_code_143_and_the_state_flushed(tmp_path):
    replica = ReplicaProcess("--experiments", "200", "--sagittal", "0", "--latency-ms", "200")
    try:
        proc = subprocess.Popen(ambasync_cmd("run", "--out", str(tmp_path), "--base-url", replica.url, *FAST),
                                env=env_fast_retries(), stderr=subprocess.PIPE, text=True)
        wait_for_files(tmp_path, 2, proc)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        _, err = proc.communicate(timeout=30)
        stopped_in = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
        replica.close()
    assert proc.returncode == 143, err
    assert stopped_in < 10, f"took {stopped_in:.1f} s to stop"
    runs = state_rows(tmp_path, "SELECT exit_code, finished FROM runs")
    assert runs[-1][0] == 143 and runs[-1][1] is not None
    done = state_rows(tmp_path, "SELECT count(*) FROM experiments WHERE status = 'done'")[0][0]
    assert done >= 2 and len(manifest(tmp_path)) >= done and "interrupted by SIGTERM" in err


CHECK_STATE = """
import hashlib, json, sqlite3, sys, pathlib
out = pathlib.Path(sys.argv[1])
db = sqlite3.connect(out / '.ambasync' / 'state.sqlite')
rows = db.execute("SELECT o.path, o.sha256 FROM experiments e JOIN outputs o USING (experiment_id) WHERE status='done'").fetchall()
bad = [p for p, d in rows if hashlib.sha256((out / p).read_bytes()).hexdigest() != d]
print(json.dumps({'done': len(rows), 'bad': bad, 'tmp': [str(p) for p in out.rglob('*.ambasync-tmp')]}))
"""


@pytest.mark.slow
def test_disk_full_stops_with_exit_5_a_clear_message_and_a_consistent_state(tmp_path):
    """A 1.5 MB tmpfs (its own mount namespace) holds the state and a few volumes, then fills up."""
    out = tmp_path / "small"
    out.mkdir()
    replica = ReplicaProcess("--experiments", "30", "--sagittal", "0")
    run = " ".join(ambasync_cmd("run", "--out", str(out), "--base-url", replica.url, *FAST))
    (tmp_path / "check.py").write_text(CHECK_STATE)
    check = " ".join(ambasync_cmd()[:1] + [str(tmp_path / "check.py"), str(out)])
    script = f"mount -t tmpfs -o size=1500k tmpfs {out} || exit 99; {run}; code=$?; {check}; exit $code"
    unshare = ["unshare", "-m"] if os.getuid() == 0 else ["unshare", "-rm"]
    try:
        proc = subprocess.run([*unshare, "sh", "-c", script], capture_output=True, text=True, timeout=120,
                              env=env_fast_retries())
    finally:
        replica.close()
    if proc.returncode == 99:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip()}")
    assert proc.returncode == 5, proc.stderr
    assert "no space left" in proc.stderr.lower()
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["done"] >= 1 and report["bad"] == [] and report["tmp"] == [], report
