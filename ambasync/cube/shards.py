"""Zarr v3 shards (the ``sharding_indexed`` codec) written and read whole by the publisher.

A shard is its inner chunks' encoded bytes one after another, then the index: one (offset,
length) pair of little-endian uint64 per inner chunk, in C order over the shard's grid of inner
chunks ((2^64-1, 2^64-1) for a chunk that is not stored: it reads as the fill value), then the
index's crc32c (zarr's default ``index_codecs``: bytes, crc32c; ``index_location`` end). Building
them here, rather than through zarr's array API, lets the publisher copy an unchanged inner chunk's
bytes without decoding them, and write each shard once. Every reader (xarray, zarr, any Zarr v3
implementation) reads them as zarr would have written them; tests read them back through zarr.
"""

from __future__ import annotations

import struct

import numpy as np

EMPTY = 2**64 - 1


def _crc32c(data: bytes) -> bytes:
    import google_crc32c  # zarr's own dependency for the crc32c codec

    return struct.pack("<I", google_crc32c.value(data))


def assemble(chunks: list[bytes | None]) -> bytes:
    """The shard holding ``chunks`` (encoded inner chunks in C order; None: not stored)."""
    return b"".join(parts(chunks))


def parts(chunks: list[bytes | None]) -> list[bytes]:
    """The shard holding ``chunks`` as the pieces to write one after another (no joined copy)."""
    index = np.full((len(chunks), 2), EMPTY, dtype="<u8")
    pieces: list[bytes] = []
    offset = 0
    for i, blob in enumerate(chunks):
        if blob is None:
            continue
        index[i] = (offset, len(blob))
        pieces.append(blob)
        offset += len(blob)
    raw_index = index.tobytes()
    pieces.append(raw_index)
    pieces.append(_crc32c(raw_index))
    return pieces


def split(shard: bytes, n_chunks: int) -> list[bytes | None]:
    """The encoded inner chunks of a shard written by :func:`assemble` (or zarr), in C order."""
    size = n_chunks * 16
    raw_index = shard[-(size + 4):-4]
    if len(raw_index) != size or _crc32c(raw_index) != shard[-4:]:
        raise ValueError("shard index damaged (crc32c)")
    index = np.frombuffer(raw_index, dtype="<u8").reshape(n_chunks, 2)
    view = memoryview(shard)  # slices without copies: a shard of 512 experiments is ~100 MB
    out: list[bytes | None] = []
    for offset, length in index.tolist():
        out.append(None if offset == EMPTY else view[offset:offset + length])
    return out


class Writer:
    """A shard written as its inner chunks come (any order), the index last: a publish task does
    not hold a shard of 512 experiments (~100 MB) in memory. ``kv.open_write`` gives the object's
    file (a local temporary file renamed into place, or a buffer sent whole to an object store)."""

    def __init__(self, kv, key: str, n_chunks: int):
        self.index = np.full((n_chunks, 2), EMPTY, dtype="<u8")
        self.offset = 0
        self.fh, self._commit = kv.open_write(key)

    def add(self, i: int, blob) -> None:
        self.index[i] = (self.offset, len(blob))
        self.fh.write(blob)
        self.offset += len(blob)

    def close(self) -> None:
        raw_index = self.index.tobytes()
        self.fh.write(raw_index)
        self.fh.write(_crc32c(raw_index))
        self._commit()
