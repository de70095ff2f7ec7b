"""The catalogue turned into decisions: for every selected row, its record, its targets and
what to do with it. One loop, shared by a run and by ``run --dry-run``, which differ only in
what they do with each decision (queue a job, or count it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Callable

from ambasync.mirror.catalog import InvalidRow, Row, Total
from ambasync.mirror.decide import Policy, Verdict, judge
from ambasync.mirror.formats.outputs import Outputs
from ambasync.mirror.record import Record
from ambasync.target import Target


@dataclass(frozen=True)
class Decided:
    """One catalogue row with what the mirror holds of it and what to do."""

    row: Row
    record: Record | None
    targets: tuple[Target, ...]
    verdict: Verdict


async def decisions(items: AsyncIterator[tuple[str, Total | InvalidRow | Row]],
                    lookup: Callable[[int], Record | None], outputs: Outputs, settings: str,
                    policy: Policy) -> AsyncIterator[tuple[str, Total | InvalidRow | Decided]]:
    """``items`` (from :func:`ambasync.mirror.selection.selected`) with each row decided;
    totals and invalid rows pass through. ``lookup`` reads an experiment's record (the state's
    ``get``); ``settings`` is the run's :meth:`ambasync.settings.ConvertSettings.key`."""
    async for plane, item in items:
        if isinstance(item, Row):
            record = lookup(item.experiment_id)
            targets = outputs.targets(item, plane)
            verdict = await judge(record, targets, settings, policy, outputs.holds(item.experiment_id))
            yield plane, Decided(item, record, targets, verdict)
        else:
            yield plane, item


__all__ = ["Decided", "decisions"]
