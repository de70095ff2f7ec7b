"""The search's results tables written as CSV, atomically, and where the gene table goes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ambasync.files import atomic_path

if TYPE_CHECKING:
    import pandas as pd


def write_table(table: pd.DataFrame, path: str | Path) -> Path:
    """A results table as CSV, atomically (an interrupted write leaves nothing under ``path``)."""
    from ambasync.errors import AnalysisError

    dest = Path(path)
    if not dest.parent.is_dir():
        raise AnalysisError(f"{dest}: the folder {dest.parent} does not exist")
    with atomic_path(dest) as tmp:
        table.to_csv(tmp, index=False)
    return dest


def genes_path(to: str | Path) -> Path:
    """Where ``--by gene`` writes its table: beside RESULTS, ``_genes`` before the suffix."""
    dest = Path(to)
    return dest.with_name(f"{dest.stem}_genes{dest.suffix or '.csv'}")


__all__ = ["genes_path", "write_table"]
