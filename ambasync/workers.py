"""Worker processes: the forkserver that imports what every conversion needs once,
and the watchdog that makes a worker leave when its run is gone.

Shared by the mirror's conversion pool and the cube's rebuilds, so neither reaches into
the other.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import signal
import threading
import time

# What every worker needs, imported once by the forkserver before it forks them.
PRELOAD = ["ambasync.mirror.convert", "ambasync.mirror.formats.writers", "ambasync.geometry",
           "ambasync.imaging.allen_grid", "ambasync.imaging.minc", "ambasync.imaging.nifti", "ambasync.cube.writer",
           "pyminc.volumes.factory"]


def init_worker(run_pid: int | None = None) -> None:
    """Pool initializer: Ctrl-C belongs to the parent, which stops the run cleanly; and leave
    when the run's process is gone (a ``kill -9`` of it would otherwise leave workers waiting
    forever)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if run_pid is not None:
        threading.Thread(target=_exit_with, args=(run_pid,), daemon=True, name="ambasync-watchdog").start()


def _alive(pid: int) -> bool:
    """Whether the run's process still runs: a killed one not yet reaped by its parent is a
    zombie, which ``kill(pid, 0)`` still reaches, so /proc's state decides where there is one."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _exit_with(pid: int, period: float = 0.2) -> None:
    """Leave within ``period`` of the run's process (issue: gone within 1 s of it)."""
    while True:
        time.sleep(period)
        if not _alive(pid):
            os._exit(1)  # a conversion cut short leaves only a temporary file, swept by the next run


def start_forkserver() -> multiprocessing.context.BaseContext:
    """Start the forkserver now (it returns at once; the server imports PRELOAD meanwhile), e.g.
    before the event-loop process has imported aiohttp, so the workers are ready sooner."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    # Ctrl-C belongs to the run. The forkserver and the resource tracker inherit a blocked SIGINT
    # from their first instruction (the mask survives exec), so a Ctrl-C while their interpreter
    # starts prints no traceback from them; here it stays pending and is handled once unblocked.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return ctx

