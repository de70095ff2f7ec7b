"""Which catalogue rows a run takes: the user's filters, the shard, the limit, no repeats.

:class:`Selection` is plain bookkeeping (no I/O); :func:`selected` applies it to the
catalogue stream, so the run and the dry run read the catalogue the same way.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator

from ambasync.config import Config
from ambasync.mirror.catalog import Item, Row

log = logging.getLogger("ambasync")
GENES_SEPARATOR = ";"  # in the manifest's genes column (gene acronyms never hold it)


class Take(enum.Enum):
    TAKE = "take"
    REPEAT = "repeat"  # an id already taken (rows of one id are merged first: see one_row)
    UNWANTED = "unwanted"  # another gene, id or shard
    LIMIT = "limit"  # the limit is reached: stop reading


@dataclass
class Selection:
    genes: frozenset[str] = frozenset()
    ids: frozenset[int] = frozenset()
    shard: tuple[int, int] | None = None  # (k, n): ids with id % n == k
    limit: int = 0  # 0: all
    taken: int = 0
    _seen: set[int] = field(default_factory=set)

    @classmethod
    def for_config(cls, cfg: Config) -> "Selection":
        src = cfg.source
        return cls(frozenset(src.genes), frozenset(src.experiment_ids), cfg.shard, src.limit)

    @property
    def filtered(self) -> bool:
        """Only some genes or ids were asked for: the catalogue as a whole was not seen."""
        return bool(self.genes or self.ids)

    def wanted(self, row: Row) -> bool:
        if self.genes and self.genes.isdisjoint(row_genes(row)):
            return False
        if self.ids and row.experiment_id not in self.ids:
            return False
        return self.shard is None or row.experiment_id % self.shard[1] == self.shard[0]

    def take(self, row: Row) -> Take:
        if row.experiment_id in self._seen:
            return Take.REPEAT
        self._seen.add(row.experiment_id)
        if not self.wanted(row):
            return Take.UNWANTED
        if self.limit and self.taken >= self.limit:
            return Take.LIMIT
        self.taken += 1
        return Take.TAKE

    def complete(self) -> bool:
        """After the stream ended: whether every row was considered (no limit cut it short)."""
        return not self.limit or self.taken < self.limit


def row_genes(row: Row) -> set[str]:
    """Every gene the catalogue gave the row's experiment (see :func:`one_row`)."""
    return {row.gene, *(row.fields.get("genes") or "").split(GENES_SEPARATOR)} - {""}


def one_row(rows: list[Row]) -> Row:
    """The row that stands for an experiment the catalogue lists several times (upstream repeats
    some rows, seen: 78153149, sometimes with another gene). Chosen by content, not by the order
    upstream sent them, so every run picks the same one and its file is never renamed: the
    first gene in sort order, a named gene before none. Its ``fields["genes"]`` lists every
    distinct gene, joined by GENES_SEPARATOR, for the manifest."""
    best = min(rows, key=lambda r: (not r.gene, r.gene, r.plane))
    genes = sorted({r.gene for r in rows if r.gene})
    if len(genes) > 1:
        log.warning("experiment %s is listed with %d genes (%s): mirrored once, as %s; the manifest's genes "
                    "column keeps them all", best.experiment_id, len(genes), ", ".join(genes), best.gene,
                    extra={"experiment_id": best.experiment_id, "genes": genes})
    return Row(best.experiment_id, best.gene, best.plane, {**best.fields, "genes": GENES_SEPARATOR.join(genes) or None})


async def selected(items: AsyncIterator[tuple[str, Item]], selection: Selection) -> AsyncIterator[tuple[str, Item]]:
    """The catalogue's totals, invalid rows and the rows ``selection`` takes, in order; ends
    at the limit. Rows come in id order, so the rows of one id are adjacent: each id is held
    until the next one shows, then its rows become :func:`one_row`."""
    group: list[tuple[str, Row]] = []

    def close() -> tuple[str, Row]:
        row = one_row([r for _, r in group])
        plane = next(p for p, r in group if r.plane == row.plane)
        group.clear()
        return plane, row

    async with contextlib.aclosing(items):  # at the limit, the pages' streams close too
        async for plane, item in items:
            if not isinstance(item, Row):
                yield plane, item
                continue
            if group and group[0][1].experiment_id != item.experiment_id:
                plane_taken, row = close()
                take = selection.take(row)
                if take is Take.LIMIT:
                    return
                if take is Take.TAKE:
                    yield plane_taken, row
            group.append((plane, item))
        if group:
            plane_taken, row = close()
            if selection.take(row) is Take.TAKE:
                yield plane_taken, row
