"""Which catalogue rows a run takes: the user's filters, the shard, the limit, no repeats.

:class:`Selection` is plain bookkeeping (no I/O); :func:`selected` applies it to the
catalogue stream, so the run and the dry run read the catalogue the same way.
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass, field
from typing import AsyncIterator

from .catalog import Item, Row
from .config import Config


class Take(enum.Enum):
    TAKE = "take"
    REPEAT = "repeat"  # upstream lists some rows twice (seen: 78153149)
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
        if self.genes and row.gene not in self.genes:
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


async def selected(items: AsyncIterator[tuple[str, Item]], selection: Selection) -> AsyncIterator[tuple[str, Item]]:
    """The catalogue's totals, invalid rows and the rows ``selection`` takes, in order; ends
    at the limit."""
    async with contextlib.aclosing(items):  # at the limit, the pages' streams close too
        async for plane, item in items:
            if isinstance(item, Row):
                take = selection.take(item)
                if take is Take.LIMIT:
                    return
                if take is not Take.TAKE:
                    continue
            yield plane, item
