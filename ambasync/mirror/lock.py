"""One run at a time per output folder (per shard, when the catalogue is split), and one layout.

An ``flock`` on ``{out}/.ambasync/lock``: the kernel drops it when its process
dies, however it dies, so a stale lock from a killed run is simply taken over.
The file records the holder (pid, start time) for the message the loser prints.

Shards of one catalogue share the folder, each with its own lock; every run also
holds a shared ``flock`` on ``{out}/.ambasync/active``, so a run can tell whether
it is alone before it sweeps temporary files (another shard's would be files
being written).

The *layout* (unsharded, or N shards) is recorded in ``active`` by the first run
that takes it: runs of the same layout share the folder, a run of another layout
(unsharded against ``--shard K/N``, or N against M shards) would fetch the same
experiments into the same files, so it stops with :class:`LockedError` naming the
runs that hold the folder. Joining, leaving and the "am I alone" test happen under
a short exclusive ``flock`` on ``{out}/.ambasync/active.guard``, so two runs of
different layouts starting at the same moment cannot both get in.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterator

from ambasync.errors import LockedError

ACTIVE = "active"
GUARD = "active.guard"
UNSHARDED = "unsharded"


def layout_for(shard: tuple[int, int] | None) -> str:
    """The layout a run's ``--shard`` gives: runs with equal layouts may share a folder."""
    return UNSHARDED if shard is None else f"{shard[1]} shards"


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """``layout``: see :func:`layout_for`. ``guard_timeout``: seconds to wait for the guard,
    held by other runs only while they join, leave or sweep (milliseconds, a second at worst)."""

    def __init__(self, path: Path, layout: str = UNSHARDED, guard_timeout: float = 30.0):
        self.path = path
        self.layout = layout
        self.guard_timeout = guard_timeout
        self._fd: int | None = None
        self._active: int | None = None
        self._me: dict[str, object] = {}

    @property
    def _meta(self) -> Path:
        return self.path.parent

    def acquire(self) -> None:
        self._meta.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise LockedError(
                f"another ambasync run holds {self.path} ({holder}); wait for it to finish"
            ) from None
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "started": started}).encode())
        self._fd = fd
        self._me = {"pid": os.getpid(), "started": started, "lock": self.path.name}
        try:
            self._join()
        except BaseException:
            self._release_own()
            raise

    # -- the layout, in ``active`` ----------------------------------------------
    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        fd = os.open(self._meta / GUARD, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + self.guard_timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LockedError(f"{self._meta / GUARD} stayed locked for {self.guard_timeout:g} s "
                                          "(a run stuck while starting?); try again") from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)  # drops the flock

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            record = json.loads(os.pread(fd, 1 << 20, 0) or b"{}")
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    @staticmethod
    def _write(fd: int, record: dict) -> None:
        data = json.dumps(record).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)

    def _join(self) -> None:
        with self._guard():
            fd = os.open(self._meta / ACTIVE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    record = {"layout": self.layout, "runs": []}  # nobody else: the folder takes our layout
                except BlockingIOError:
                    record = self._read(fd)
                    if record.get("layout") != self.layout:
                        raise LockedError(self._conflict(record)) from None
                runs = [r for r in record.get("runs", []) if isinstance(r, dict) and _alive(r.get("pid"))]
                record["runs"] = [*runs, self._me]
                self._write(fd, record)
                fcntl.flock(fd, fcntl.LOCK_SH)  # never blocks: every other holder is shared (we hold the guard)
            except BaseException:
                os.close(fd)
                raise
            self._active = fd

    def _conflict(self, record: dict) -> str:
        layout = record.get("layout") or "an unknown layout"
        runs = [r for r in record.get("runs", []) if isinstance(r, dict) and _alive(r.get("pid"))]
        who = ", ".join(f"pid {r.get('pid')} ({r.get('lock')}, started {r.get('started')})" for r in runs)
        return (f"{self._meta.parent} is being mirrored with another layout ({layout}: {who or 'holder unknown'}); "
                f"this run's layout is {self.layout}: wait for those runs to finish, or use their --shard layout")

    def if_alone(self, action: Callable[[], int]) -> int | None:
        """Run ``action`` only if no other run uses the folder; None when another does."""
        assert self._active is not None, "acquire() first"
        with self._guard():  # no run joins while we hold the folder alone
            try:
                fcntl.flock(self._active, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fcntl.flock(self._active, fcntl.LOCK_SH)  # a failed conversion may have dropped ours
                return None
            try:
                return action()
            finally:
                fcntl.flock(self._active, fcntl.LOCK_SH)

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return f"pid {info.get('pid')}, started {info.get('started')}"
        except (OSError, ValueError):
            return "holder unknown"

    def _leave(self) -> None:
        """Take our entry out of ``active``; a run that cannot (the guard stuck) just closes it:
        the next run prunes entries of dead processes."""
        if self._active is None:
            return
        try:
            with self._guard():
                record = self._read(self._active)
                record["runs"] = [r for r in record.get("runs", []) if r != self._me]
                self._write(self._active, record)
        except (LockedError, OSError):
            pass
        finally:
            os.close(self._active)
            self._active = None

    def _release_own(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def release(self) -> None:
        self._leave()
        self._release_own()

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
