"""A sharded and an unsharded run on one output folder: what a user would see if this broke is
every experiment fetched twice, two processes writing the same files, and a manifest per
layout that each claim the other's files. Real flocks, real processes."""

import fcntl
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from ambasync.errors import LockedError
from ambasync.mirror.lock import GUARD, OutputLock, layout_for
from helpers import REPO, ambasync_cmd

pytestmark = pytest.mark.e2e  # real runs, servers or clusters: make test-fast leaves these out


def lock(out, shard=None, **kw) -> OutputLock:
    suffix = f"-shard{shard[0]}of{shard[1]}" if shard else ""
    return OutputLock(out / ".ambasync" / f"lock{suffix}", layout=layout_for(shard), **kw)


def test_shards_of_one_layout_share_the_folder_and_an_unsharded_run_is_refused_naming_them(tmp_path):
    a, b = lock(tmp_path, (0, 3)), lock(tmp_path, (1, 3))
    a.acquire()
    b.acquire()
    try:
        with pytest.raises(LockedError) as exc:
            lock(tmp_path).acquire()
        message = str(exc.value)
        assert "another layout (3 shards" in message and f"pid {os.getpid()}" in message
        assert "lock-shard0of3" in message and "lock-shard1of3" in message and "unsharded" in message
        with pytest.raises(LockedError, match="another layout"):
            lock(tmp_path, (0, 2)).acquire()  # another N: other experiments per shard, same files
        with pytest.raises(LockedError, match="another ambasync run holds"):
            lock(tmp_path, (1, 3)).acquire()  # the same shard twice: as before
        c = lock(tmp_path, (2, 3))
        c.acquire()  # the third shard of the layout joins
        c.release()
    finally:
        a.release()
        b.release()
    whole = lock(tmp_path)
    whole.acquire()  # everyone left: the folder takes the next run's layout
    try:
        with pytest.raises(LockedError, match=r"another layout \(unsharded"):
            lock(tmp_path, (0, 3)).acquire()
    finally:
        whole.release()


def test_a_refused_run_leaves_no_trace_and_holds_nothing(tmp_path):
    shard = lock(tmp_path, (0, 2))
    shard.acquire()
    try:
        with pytest.raises(LockedError):
            lock(tmp_path).acquire()
        probe = os.open(tmp_path / ".ambasync" / "lock", os.O_RDWR)  # the refused run's own lock is free again
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(probe)
    finally:
        shard.release()
    solo = lock(tmp_path)
    solo.acquire()
    assert solo.if_alone(lambda: 7) == 7
    solo.release()


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ambasync.mirror.lock import OutputLock, layout_for
    k, n = map(int, sys.argv[2].split("/"))
    lock = OutputLock(Path(sys.argv[1]) / ".ambasync" / f"lock-shard{k}of{n}", layout=layout_for((k, n)))
    lock.acquire()
    print("held", flush=True)
    time.sleep(120)
""")


def test_a_shard_run_in_another_process_blocks_an_unsharded_one_until_it_dies_however_it_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), "1/4"], stdout=subprocess.PIPE,
                              text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError) as exc:
            lock(tmp_path).acquire()
        assert f"pid {holder.pid} (lock-shard1of4" in str(exc.value)
        other = lock(tmp_path, (0, 4))
        other.acquire()  # same layout, other shard: fine
        other.release()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    solo = lock(tmp_path)
    solo.acquire()  # the kernel dropped the dead run's flocks: nothing stale is left to block
    solo.release()


def test_runs_wait_for_the_guard_and_give_up_with_a_clear_message(tmp_path):
    (tmp_path / ".ambasync").mkdir()
    fd = os.open(tmp_path / ".ambasync" / GUARD, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a run in the middle of joining
    try:
        with pytest.raises(LockedError, match="stayed locked for 0.2 s"):
            lock(tmp_path, guard_timeout=0.2).acquire()
    finally:
        os.close(fd)
    ok = lock(tmp_path, guard_timeout=0.2)
    ok.acquire()
    ok.release()


def test_an_unsharded_run_exits_3_while_shards_use_the_folder(tmp_path):
    shard = lock(tmp_path, (0, 2))
    shard.acquire()
    try:
        proc = subprocess.run(ambasync_cmd("run", "--out", str(tmp_path), "--base-url", "http://127.0.0.1:9"),
                              capture_output=True, text=True, timeout=60)
    finally:
        shard.release()
    assert proc.returncode == 3, proc.stderr
    assert f"pid {os.getpid()}" in proc.stderr and "2 shards" in proc.stderr


def test_a_shard_run_exits_3_while_an_unsharded_run_uses_the_folder(tmp_path):
    whole = lock(tmp_path)
    whole.acquire()
    try:
        proc = subprocess.run(ambasync_cmd("run", "--out", str(tmp_path), "--base-url", "http://127.0.0.1:9",
                                           "--shard", "1/2"), capture_output=True, text=True, timeout=60,
                              env={**os.environ, "AMBASYNC_DOWNLOAD_ATTEMPTS": "1"})
    finally:
        whole.release()
    assert proc.returncode == 3, proc.stderr
    assert f"pid {os.getpid()}" in proc.stderr and "unsharded" in proc.stderr
