"""The manifest: the state exported as CSV (readable with pandas), catalogue columns first."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import aiofiles

from ambasync.files import atomic_path
from ambasync.mirror.catalog import COLUMNS
from ambasync.mirror.state import MANIFEST_EXTRA, State

ROWS_PER_WRITE = 2000


async def write_manifest(state: State, path: Path) -> int:
    """Write it atomically (temporary file, then rename), through aiofiles in pieces, so neither
    the loop nor memory grows with the catalogue. Returns the number of rows."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, [*COLUMNS, *MANIFEST_EXTRA])
    writer.writeheader()
    count = 0
    with atomic_path(path) as tmp:
        async with aiofiles.open(tmp, "w", newline="", encoding="utf-8") as fh:
            for row in state.manifest_rows():
                writer.writerow(row)
                count += 1
                if count % ROWS_PER_WRITE == 0:
                    await fh.write(buf.getvalue())
                    buf.seek(0)
                    buf.truncate()
            await fh.write(buf.getvalue())
    return count
