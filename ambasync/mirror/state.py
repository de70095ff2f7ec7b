"""What the mirror holds: one SQLite row per experiment, one per output file, one per run.

The database lives in ``{out}/.ambasync/state.sqlite`` (WAL, one writer: the
run's event loop). An experiment becomes ``done`` only after its files were
renamed into place, in the same transaction that records their checksums, so
a killed run leaves a state that never claims more than the disk holds. The
manifest CSV is an export of this database.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from ambasync.mirror.catalog import COLUMNS
from ambasync.mirror.record import (  # the state's values, importable from here too
    Output,
    Record,
    Status,
)

OUTPUTS_TABLE = """
CREATE TABLE IF NOT EXISTS outputs (
    experiment_id INTEGER NOT NULL REFERENCES experiments(experiment_id) ON DELETE CASCADE,
    volume TEXT NOT NULL,
    path TEXT NOT NULL,                 -- relative to the output folder
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (experiment_id, path)   -- one row per file: a volume may be written as MINC and NIfTI
);
"""
SCHEMA = """
CREATE TABLE IF NOT EXISTS experiments (
    experiment_id INTEGER PRIMARY KEY,
    gene TEXT NOT NULL,
    plane TEXT NOT NULL,
    catalog TEXT NOT NULL,              -- the catalogue row as JSON
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done', 'failed', 'invalid')),
    attempts INTEGER NOT NULL DEFAULT 0,
    failed_runs INTEGER NOT NULL DEFAULT 0,
    last_failed_run INTEGER,
    error TEXT,
    transient INTEGER,                  -- 1: the last error may go away by itself
    settings TEXT,                      -- conversion settings that produced the files
    zip_sha256 TEXT,
    zip_size INTEGER,
    last_modified TEXT,
    etag TEXT,
    first_seen REAL NOT NULL,
    last_seen_run INTEGER,
    updated REAL NOT NULL
);
""" + OUTPUTS_TABLE + """
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT,
    pid INTEGER NOT NULL,
    started REAL NOT NULL,
    finished REAL,
    exit_code INTEGER,
    summary TEXT
);
"""

# genes: every gene the catalogue lists the experiment with, ";"-joined (select.one_row), or its gene.
MANIFEST_EXTRA = ("volume", "status", "path", "sha256", "error", "genes")


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a state written by an earlier version up to SCHEMA, in one transaction.

    Before NIfTI output, ``outputs`` was keyed by (experiment, volume); a volume written in two
    formats needs (experiment, path). Same columns, so the rows are copied as they are."""
    key = [r[1] for r in sorted(db.execute("PRAGMA table_info(outputs)"), key=lambda r: r[5]) if r[5]]
    if key != ["experiment_id", "volume"]:
        return
    with db:
        db.execute("ALTER TABLE outputs RENAME TO outputs_by_volume")
        db.executescript(OUTPUTS_TABLE)
        db.execute("INSERT INTO outputs SELECT experiment_id, volume, path, sha256, size FROM outputs_by_volume")
        db.execute("DROP TABLE outputs_by_volume")


class State:
    def __init__(self, path: str | os.PathLike, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
            _migrate(self.db)
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.row_factory = sqlite3.Row

    def close(self) -> None:
        """Close; what was not committed is rolled back (commit first to keep it)."""
        self.db.close()

    def commit(self) -> None:
        self.db.commit()

    # runs -----------------------------------------------------------------
    def start_run(self) -> int:
        cur = self.db.execute("INSERT INTO runs (pid, started) VALUES (?, ?)", (os.getpid(), time.time()))
        self.db.commit()
        return int(cur.lastrowid)

    def finish_run(self, run_id: int, exit_code: int, summary: dict[str, Any]) -> None:
        self.db.execute(
            "UPDATE runs SET finished = ?, exit_code = ?, summary = ? WHERE run_id = ?",
            (time.time(), exit_code, json.dumps(summary), run_id),
        )
        self.db.commit()

    def last_runs(self, n: int = 5) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM runs ORDER BY run_id DESC LIMIT ?", (n,)).fetchall()

    # experiments ------------------------------------------------------------
    def seen(self, experiment_id: int, gene: str, plane: str, fields: dict[str, Any], run_id: int) -> None:
        """Record a catalogue row (new or updated) as seen by this run. Not committed here:
        the run commits in batches."""
        now = time.time()
        self.db.execute(
            """INSERT INTO experiments (experiment_id, gene, plane, catalog, first_seen, last_seen_run, updated)
               VALUES (?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (experiment_id) DO UPDATE SET
                 gene = excluded.gene, plane = excluded.plane, catalog = excluded.catalog,
                 last_seen_run = excluded.last_seen_run""",
            (experiment_id, gene, plane, json.dumps(fields, ensure_ascii=False), now, run_id, now),
        )

    def mark_invalid(self, experiment_id: int, gene: str, plane: str, fields: dict[str, Any], run_id: int, reason: str) -> None:
        self.seen(experiment_id, gene, plane, fields, run_id)
        self.db.execute(
            "UPDATE experiments SET status = 'invalid', error = ?, transient = 0, updated = ? WHERE experiment_id = ?",
            (reason, time.time(), experiment_id),
        )

    def get(self, experiment_id: int) -> Record | None:
        row = self.db.execute("SELECT * FROM experiments WHERE experiment_id = ?", (experiment_id,)).fetchone()
        if row is None:
            return None
        outputs = [
            Output(o["volume"], o["path"], o["sha256"], o["size"])
            for o in self.db.execute("SELECT * FROM outputs WHERE experiment_id = ? ORDER BY volume, path", (experiment_id,))
        ]
        return Record(
            experiment_id=row["experiment_id"], gene=row["gene"], plane=row["plane"], status=Status(row["status"]),
            attempts=row["attempts"], failed_runs=row["failed_runs"], error=row["error"],
            transient=bool(row["transient"]), settings=row["settings"], zip_sha256=row["zip_sha256"], outputs=outputs,
        )

    def mark_done(
        self, experiment_id: int, outputs: Iterable[Output], settings: str, attempts: int,
        zip_sha256: str | None, zip_size: int | None, last_modified: str | None, etag: str | None,
    ) -> None:
        with self.db:  # one transaction: files and status agree
            self.db.execute("DELETE FROM outputs WHERE experiment_id = ?", (experiment_id,))
            self.db.executemany(
                "INSERT INTO outputs (experiment_id, volume, path, sha256, size) VALUES (?, ?, ?, ?, ?)",
                [(experiment_id, o.volume, o.path, o.sha256, o.size) for o in outputs],
            )
            self.db.execute(
                """UPDATE experiments SET status = 'done', error = NULL, transient = NULL, failed_runs = 0,
                   attempts = attempts + ?, settings = ?, zip_sha256 = coalesce(?, zip_sha256),
                   zip_size = coalesce(?, zip_size), last_modified = coalesce(?, last_modified),
                   etag = coalesce(?, etag), updated = ? WHERE experiment_id = ?""",
                (attempts, settings, zip_sha256, zip_size, last_modified, etag, time.time(), experiment_id),
            )

    def mark_failed(self, experiment_id: int, reason: str, transient: bool, attempts: int, run_id: int) -> None:
        """A failed experiment keeps no outputs (its files, if any, were removed by the caller)."""
        with self.db:
            self.db.execute("DELETE FROM outputs WHERE experiment_id = ?", (experiment_id,))
            self.db.execute(
                """UPDATE experiments SET status = 'failed', error = ?, transient = ?, attempts = attempts + ?,
                   failed_runs = failed_runs + (coalesce(last_failed_run, -1) != ?), last_failed_run = ?,
                   settings = NULL, updated = ? WHERE experiment_id = ?""",
                (reason, int(transient), attempts, run_id, run_id, time.time(), experiment_id),
            )

    def note_error(self, experiment_id: int, reason: str, transient: bool, attempts: int) -> None:
        """A done experiment could not be refreshed: it keeps its files and status."""
        with self.db:
            self.db.execute(
                "UPDATE experiments SET error = ?, transient = ?, attempts = attempts + ?, updated = ? "
                "WHERE experiment_id = ?",
                (reason, int(transient), attempts, time.time(), experiment_id),
            )

    def mark_pending(self, experiment_id: int, reason: str) -> None:
        """Send an experiment back to be fetched (verify found its file missing or broken)."""
        with self.db:
            self.db.execute("DELETE FROM outputs WHERE experiment_id = ?", (experiment_id,))
            self.db.execute(
                "UPDATE experiments SET status = 'pending', error = ?, transient = 1, settings = NULL, updated = ? "
                "WHERE experiment_id = ?",
                (reason, time.time(), experiment_id),
            )

    def vanished(self, run_id: int, planes: Iterable[str]) -> list[Record]:
        """Experiments of these planes the catalogue of ``run_id`` no longer lists."""
        planes = list(planes)
        marks = ",".join("?" * len(planes))
        ids = [r[0] for r in self.db.execute(
            f"SELECT experiment_id FROM experiments WHERE plane IN ({marks}) AND coalesce(last_seen_run, -1) != ?",
            (*planes, run_id),
        )]
        return [rec for rec in map(self.get, ids) if rec is not None]

    def forget(self, experiment_id: int) -> None:
        with self.db:
            self.db.execute("DELETE FROM experiments WHERE experiment_id = ?", (experiment_id,))

    def counts(self) -> list[sqlite3.Row]:
        return self.db.execute(
            "SELECT plane, status, count(*) AS n FROM experiments GROUP BY plane, status ORDER BY plane, status"
        ).fetchall()

    def failures(self, limit: int | None = None) -> list[sqlite3.Row]:
        sql = "SELECT experiment_id, gene, plane, status, failed_runs, error FROM experiments " \
              "WHERE status IN ('failed', 'invalid') ORDER BY experiment_id"
        return self.db.execute(sql + (f" LIMIT {int(limit)}" if limit else "")).fetchall()

    def experiment_ids(self) -> list[int]:
        """Every experiment the state holds, whatever its status."""
        return [r[0] for r in self.db.execute("SELECT experiment_id FROM experiments ORDER BY experiment_id")]

    def ids_with_status(self, status: Status) -> list[int]:
        return [r[0] for r in self.db.execute(
            "SELECT experiment_id FROM experiments WHERE status = ? ORDER BY experiment_id", (status.value,))]

    def iter_done(self) -> Iterator[Record]:
        for eid in self.ids_with_status(Status.DONE):
            rec = self.get(eid)
            if rec is not None:
                yield rec

    def manifest_rows(self) -> Iterator[dict[str, Any]]:
        """One row per output file, plus one per experiment without files, catalogue columns first."""
        query = """SELECT e.experiment_id, e.catalog, e.status, e.error, o.volume, o.path, o.sha256
                   FROM experiments e LEFT JOIN outputs o USING (experiment_id)
                   ORDER BY e.experiment_id, o.volume, o.path"""
        for row in self.db.execute(query):
            catalog = json.loads(row["catalog"])
            out = {col: catalog.get(col) for col in COLUMNS}
            out["experiment_id"] = row["experiment_id"]
            out.update(volume=row["volume"], status=row["status"], path=row["path"], sha256=row["sha256"], error=row["error"],
                       genes=catalog.get("genes", catalog.get("gene")))
            yield out
