"""Atomic files: written under a hidden temporary name beside the target, renamed into place.

A final name therefore never holds a partial file, whatever stops the process;
leftover temporaries carry ``TMP_SUFFIX`` and are swept by the next run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator

TMP_SUFFIX = ".ambasync-tmp"


def tmp_name(path: Path) -> Path:
    """Hidden temporary sibling of ``path``, unique per process."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on failure it is removed.
    ``durable`` also flushes the file and its folder to disk before and after the rename."""
    tmp = tmp_name(path)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sweep_tmp(root: Path) -> int:
    """Remove temporary files a killed run left below ``root``; returns how many."""
    removed = 0
    for tmp in root.rglob(f"*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed
