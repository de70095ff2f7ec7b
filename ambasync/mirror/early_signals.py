"""SIGINT and SIGTERM that arrive while ambasync starts, before a command handles them.

Starting takes about a second (imports, the forkserver). Python's defaults would end the
process there with a KeyboardInterrupt traceback (SIGINT) or at once with no summary, no
manifest and an unfinished run record (SIGTERM). :func:`defer` is called first thing by
``python -m ambasync``: a signal is only noted. ``run`` then takes it with :func:`take`
once its own handlers are installed and stops cleanly (summary, report, exit 143/130);
every other command gets the defaults back with :func:`restore` and, if a signal was
noted meanwhile, stops with one line.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator

from ambasync.errors import EXIT_SIGINT, EXIT_SIGTERM

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODES = {signal.SIGINT: EXIT_SIGINT, signal.SIGTERM: EXIT_SIGTERM}

_noted: list[int] = []


def _note(signum: int, frame: object) -> None:
    _noted.append(signum)


def defer() -> None:
    """Note SIGINT and SIGTERM instead of acting on them (main thread only)."""
    for sig in SIGNALS:
        signal.signal(sig, _note)


def noted() -> tuple[signal.Signals, ...]:
    """The signals noted so far (kept)."""
    return tuple(signal.Signals(s) for s in _noted)


def take() -> signal.Signals | None:
    """The first signal noted since :func:`defer` (then forgotten), or None."""
    if not _noted:
        return None
    first = signal.Signals(_noted[0])
    _noted.clear()
    return first


def deferring() -> bool:
    """Whether signals are still only noted (nobody has taken over their handling)."""
    return signal.getsignal(signal.SIGTERM) is _note


def restore() -> signal.Signals | None:
    """Python's defaults back (SIGINT raises KeyboardInterrupt, SIGTERM ends the process), for
    commands that need no clean stop; returns the signal noted meanwhile, if any."""
    if deferring():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return take()


@contextlib.contextmanager
def sigint_blocked() -> Iterator[None]:
    """SIGINT blocked while the block runs. A child process started in it (the forkserver, the
    resource tracker) inherits the blocked mask across exec, so a Ctrl-C sent to the whole
    terminal's process group while it imports its modules cannot end it with a traceback (it
    never unblocks SIGINT, and ignores it once started; its workers ignore it too). Here the
    signal waits, pending, and is handled as soon as the block ends: it is never lost."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
