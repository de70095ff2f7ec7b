"""Whether ``state.sqlite`` is intact, missing or damaged, and setting a damaged one aside.

``state.sqlite`` can be truncated (a full disk, a copy cut short), overwritten, or
written by another version of ambasync. Opening it would then fail with a traceback in
every command. Here instead :func:`check_state` says whether it is intact, missing or
damaged (and why), reading it only; :func:`set_aside_state` renames it, with its ``-wal``
and ``-shm``, to ``state.sqlite.damaged-YYYYmmddTHHMMSS`` (SQLite's own naming, so the
copy still opens with its journal): it is never deleted. :mod:`ambasync.mirror.rebuild`
writes the fresh one.
"""

from __future__ import annotations

import enum
import logging
import os
import sqlite3
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from ambasync.errors import ConfigError
from ambasync.mirror.state import SCHEMA

log = logging.getLogger("ambasync")

# SQLite primary result codes that mean the bytes are not a usable database.
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26


class Health(str, enum.Enum):
    INTACT = "intact"
    MISSING = "missing"
    DAMAGED = "damaged"


@dataclass(frozen=True)
class StateCheck:
    path: Path
    health: Health
    reason: str | None = None  # why it is damaged

    def text(self) -> str:
        return f"state {self.path} is {self.health.value}" + (f": {self.reason}" if self.reason else "")


def sidecars(path: Path) -> tuple[Path, Path]:
    return Path(f"{path}-wal"), Path(f"{path}-shm")


def _expected_columns() -> dict[str, list[str]]:
    """Each table's columns as this version of state.py creates them."""
    db = sqlite3.connect(":memory:")
    try:
        db.executescript(SCHEMA)
        return _columns(db)
    finally:
        db.close()


def _columns(db: sqlite3.Connection) -> dict[str, list[str]]:
    tables = [r[0] for r in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
    return {t: [c[1] for c in db.execute(f'PRAGMA table_info("{t}")')] for t in tables}


def _schema_difference(found: dict[str, list[str]], expected: dict[str, list[str]]) -> str | None:
    problems = []
    for table, columns in expected.items():
        if table not in found:
            problems.append(f"no table {table}")
            continue
        missing = [c for c in columns if c not in found[table]]
        extra = [c for c in found[table] if c not in columns]
        if missing:
            problems.append(f"table {table} lacks {', '.join(missing)}")
        if extra:
            problems.append(f"table {table} has unknown {', '.join(extra)}")
    return "; ".join(problems) or None


def check_state(path: str | os.PathLike) -> StateCheck:
    """Intact, missing or damaged (with the reason), without modifying the database file.

    Damaged: not a database, malformed pages (``PRAGMA integrity_check``), or tables and
    columns other than state.py's (a file from another version). A state that cannot be
    opened for another reason (permissions) is not damaged: ConfigError, one line.
    """
    path = Path(path)
    wal, _ = sidecars(path)
    if not os.path.lexists(path):
        if wal.exists():
            return StateCheck(path, Health.DAMAGED, f"{wal.name} is there but the database itself is missing")
        return StateCheck(path, Health.MISSING)
    if not path.is_file():
        return StateCheck(path, Health.DAMAGED, "not a regular file")
    size = path.stat().st_size
    if size == 0:
        return StateCheck(path, Health.DAMAGED, "empty (0 bytes)")
    uri = f"file:{urllib.parse.quote(str(path))}?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot open the state {path} ({exc}); check its permissions") from None
    try:
        problems = [r[0] for r in db.execute("PRAGMA integrity_check(3)")]
        if problems != ["ok"]:
            return StateCheck(path, Health.DAMAGED, f"{size} bytes, integrity check: {'; '.join(problems)}")
        difference = _schema_difference(_columns(db), _expected_columns())
        if difference:
            return StateCheck(path, Health.DAMAGED, f"schema from another version ({difference})")
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorcode", _SQLITE_CORRUPT) & 0xFF not in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            raise ConfigError(f"cannot read the state {path} ({exc}); check its permissions") from None
        return StateCheck(path, Health.DAMAGED, f"{size} bytes, {exc}")
    finally:
        db.close()
    return StateCheck(path, Health.INTACT)


def set_aside_state(path: str | os.PathLike, now: float | None = None) -> Path:
    """Rename the state (and its -wal, -shm) to ``{name}.damaged-YYYYmmddTHHMMSS`` (local time of
    ``now``, default the present); returns the new path of the database. Never deletes anything:
    a name already taken gets ``-2``, ``-3``..."""
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(now))
    n = 1
    while True:
        dest = path.with_name(f"{path.name}.damaged-{stamp}" + (f"-{n}" if n > 1 else ""))
        if not any(os.path.lexists(p) for p in (dest, *sidecars(dest))):
            break
        n += 1
    for src, dst in zip((path, *sidecars(path)), (dest, *sidecars(dest))):
        if os.path.lexists(src):
            os.rename(src, dst)
    return dest


def refuse_damaged(state_path: str | os.PathLike, manifest_path: str | os.PathLike) -> StateCheck:
    """For ``status`` and ``verify``, which read or check the state but do not rebuild it (a rebuild
    checks every file: a run's job): a damaged state stops them with one line (ConfigError, exit 2)
    saying what the next run does about it. Returns the check otherwise."""
    check = check_state(state_path)
    if check.health is Health.DAMAGED:
        raise ConfigError(f"{check.text()}; the next `ambasync run` sets it aside and rebuilds it from "
                          f"{Path(manifest_path).name} and the files on disk")
    return check
