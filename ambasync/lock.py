"""One run at a time per output folder (per shard, when the catalogue is split).

An ``flock`` on ``{out}/.ambasync/lock``: the kernel drops it when its process
dies, however it dies, so a stale lock from a killed run is simply taken over.
The file records the holder (pid, start time) for the message the loser prints.

Shards of one catalogue share the folder, each with its own lock; every run also
holds a shared ``flock`` on ``{out}/.ambasync/active``, so a run can tell whether
it is alone before it sweeps temporary files (another shard's would be files
being written).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Callable

from .errors import LockedError

ACTIVE = "active"


class OutputLock:
    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._active: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise LockedError(
                f"another ambasync run holds {self.path} ({holder}); wait for it to finish"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
        self._fd = fd
        self._active = os.open(self.path.parent / ACTIVE, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._active, fcntl.LOCK_SH)

    def if_alone(self, action: Callable[[], int]) -> int | None:
        """Run ``action`` only if no other run uses the folder; None when another does."""
        assert self._active is not None, "acquire() first"
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

    def release(self) -> None:
        if self._active is not None:
            os.close(self._active)
            self._active = None
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
