"""Why a run stops early, in one place: every part asks :attr:`Stop.requested`; the exit code
is read once, when the run ends."""

from __future__ import annotations

import logging

from ambasync.errors import EXIT_SIGINT, EXIT_SIGTERM
from ambasync.mirror.report import Summary

log = logging.getLogger("ambasync")


class Stop:
    """The first reason wins, but a signal overrides it (the operator's word is last)."""

    def __init__(self, summary: Summary):
        self._summary = summary
        self.code: int | None = None

    @property
    def requested(self) -> bool:
        return self.code is not None

    def request(self, code: int, reason: str) -> None:
        if self.code is None or code in (EXIT_SIGINT, EXIT_SIGTERM):
            self.code = code
            self._summary.error = reason
        log.error("stopping: %s", reason)
