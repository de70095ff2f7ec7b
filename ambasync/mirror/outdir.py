"""Is this output folder usable? Asked once, before a command touches it.

``run``, ``status`` and ``verify`` all take ``--out``; a path that is a regular
file, lies under a file, or sits where nothing can be created (``/proc``, a
read-only mount, a folder the user may not write) would otherwise surface as a
traceback from deep inside the run. Here it is one line naming the folder and
what to do (ConfigError: exit code 2).

Writability is tried, not guessed from permission bits: root passes every
``os.access`` check yet cannot create anything under ``/proc`` or on a
read-only file system. The trial leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from ambasync.errors import ConfigError

PROBE_PREFIX = ".ambasync-probe-"


def _why(exc: OSError) -> str:
    """The OS's reason in words a user can act on."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EROFS:
        return "it is on a read-only file system"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the device is full"
    return exc.strerror or type(exc).__name__


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (as anything: folder, file, link)."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor or ".")


def _try_write(folder: Path) -> None:
    """Create and remove a folder entry in ``folder``; raise OSError if the system refuses."""
    made = tempfile.mkdtemp(prefix=PROBE_PREFIX, dir=folder)
    os.rmdir(made)


def check_output_folder(path: str | os.PathLike, *, create: bool, writable: bool = True) -> Path:
    """Return ``path`` (absolute) if a mirror can live there; raise ConfigError (one line) if not.

    ``create``: make the folder and its parents when missing (``run``). Without it a missing
    folder is returned as it is (the command says there is no mirror yet), provided it could
    be created: a path under a file or under ``/proc`` cannot hold a mirror, ever.
    ``writable``: the folder must accept new files (``run``, ``verify``); ``status`` only reads.
    """
    folder = Path(os.path.abspath(os.fspath(path)))
    label = f"output folder {folder}"
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{label} is a file, not a folder: give --out (output.out) a folder path")
    if not folder.exists():
        base = _nearest_existing(folder)
        if not base.is_dir():
            raise ConfigError(f"{label} cannot be created: {base} is a file, not a folder; give --out another path")
        try:
            if create:
                folder.mkdir(parents=True, exist_ok=True)
            else:
                _try_write(base)
        except OSError as exc:
            raise ConfigError(f"{label} cannot be created in {base} ({_why(exc)}); give --out another path") from None
        if not create:
            return folder
    if writable:
        try:
            _try_write(folder)
        except OSError as exc:
            raise ConfigError(f"{label} is not writable ({_why(exc)}); fix its permissions or give --out "
                              "another path") from None
    elif not os.access(folder, os.R_OK | os.X_OK):
        raise ConfigError(f"{label} cannot be read (permission denied); fix its permissions")
    return folder
