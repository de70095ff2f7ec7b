"""Progress of a long step: a tqdm bar on a terminal, else a plain log line now and then, both
with the rate and an ETA. A leaf module: the analysis commands use it, it imports nothing of theirs.

    bar = Progress("reading the cube", total=4345, unit="experiments", enabled=True)
    bar.update(128)
    ...
    bar.close()

``total`` may be None until known (set ``bar.total`` before the first update); a disabled
bar does nothing. Plain lines go to the ``ambasync.progress`` logger at most every
``interval`` seconds (and at the end), as "reading the cube: 1,280/4,345 experiments (29%),
12 s, ETA 29 s".
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("ambasync.progress")


def _seconds(s: float) -> str:
    s = max(0.0, s)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


class Progress:
    """``update(n)`` after each piece of work, ``close()`` at the end (or use as a context)."""

    def __init__(self, what: str, total: int | None = None, unit: str = "", enabled: bool = True,
                 interval: float = 10.0, stream: Any = None) -> None:
        self.what, self.unit, self.enabled, self.interval = what, unit, enabled, interval
        self._total = total
        self.done = 0
        self.start = time.monotonic()
        self._last = self.start
        self._bar = None
        stream = stream or sys.stderr
        self._tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        if self._tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=what, unit=f" {unit}" if unit else "it", leave=False,
                             file=stream, dynamic_ncols=True)

    @property
    def total(self) -> int | None:
        return self._total

    @total.setter
    def total(self, value: int | None) -> None:
        self._total = value
        if self._bar is not None:
            self._bar.total = value
            self._bar.refresh()

    def refresh(self) -> None:  # tqdm's name: callers that set total then refresh
        if self._bar is not None:
            self._bar.refresh()

    def update(self, n: int = 1) -> None:
        if not self.enabled or n <= 0:
            return
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """The plain progress line: done/total, share, time so far and the ETA."""
        elapsed = (now or time.monotonic()) - self.start
        unit = f" {self.unit}" if self.unit else ""
        if self._total:
            share = self.done / self._total
            eta = elapsed * (1 - share) / share if share > 0 else float("nan")
            tail = f", ETA {_seconds(eta)}" if 0 < share < 1 else ""
            return (f"{self.what}: {self.done:,}/{self._total:,}{unit} ({share:.0%}), "
                    f"{_seconds(elapsed)}{tail}")
        return f"{self.what}: {self.done:,}{unit}, {_seconds(elapsed)}"

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            return
        if self.done:
            log.info("%s", self.line())
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Progress"]
