"""The errors ambasync tells apart, and the exit code each one means.

Per-experiment errors say whether retrying can help (``transient``); run-level
errors carry the exit code that cron, systemd and scripts act on.
"""

from __future__ import annotations

import errno

# Exit codes: a contract documented in README and `--help`.
EXIT_OK = 0
EXIT_FAILED = 1  # some experiments failed
EXIT_USAGE = 2  # usage or configuration error
EXIT_LOCKED = 3  # another run holds the lock on the output folder
EXIT_UPSTREAM = 4  # upstream unreachable or the catalogue query failed
EXIT_DISK_FULL = 5  # no space left on the output device
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

# What each code means, for `--help` (and the README's table says the same).
EXIT_MEANINGS = (
    (EXIT_OK, "every experiment handled succeeded (or was already up to date)"),
    (EXIT_FAILED, "some experiments failed (see the log, manifest.csv and reports/)"),
    (EXIT_USAGE, "usage or configuration error"),
    (EXIT_LOCKED, "another run holds the lock on the output folder"),
    (EXIT_UPSTREAM, "upstream unreachable or the catalogue query failed"),
    (EXIT_DISK_FULL, "disk full"),
    (EXIT_SIGINT, "interrupted (SIGINT, Ctrl-C)"),
    (EXIT_SIGTERM, "terminated (SIGTERM)"),
)


def exit_codes_text() -> str:
    """The exit-code table as the epilog of every command's help."""
    return "exit codes:\n" + "".join(f"  {code:<4} {meaning}\n" for code, meaning in EXIT_MEANINGS)


class ExperimentError(Exception):
    """One experiment could not be mirrored; the run goes on."""

    transient = False

    def __init__(self, reason: str, *, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class TransientError(ExperimentError):
    """Worth retrying: timeouts, dropped connections, 429/5xx, broken bodies."""

    transient = True


class PermanentError(ExperimentError):
    """Retrying in this run cannot help: 404, no energy.raw, wrong raw length, bad header."""


class RunError(Exception):
    """The whole run must stop; ``exit_code`` says why."""

    exit_code = EXIT_FAILED


class ConfigError(RunError):
    exit_code = EXIT_USAGE


class LockedError(RunError):
    exit_code = EXIT_LOCKED


class UpstreamError(RunError):
    exit_code = EXIT_UPSTREAM


class DiskFullError(RunError):
    exit_code = EXIT_DISK_FULL


def disk_full(exc: BaseException) -> bool:
    """Whether an OS or SQLite error means the device is full (SQLite gives no errno)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "database or disk is full" in str(exc)


class AnalysisError(ConfigError):
    """Bad input to an analysis command: one line naming the file and what to do; exit 2."""

