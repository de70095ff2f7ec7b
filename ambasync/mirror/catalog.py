"""The Allen RMA catalogue of ISH experiments, read page by page.

The query is the reference notebook's (adult mouse ISH, not failed, one plane,
same tabular columns), asked as paged JSON in a stable order so pages neither
overlap nor skip. Everything here is pure (no network): the pages are fetched by
:class:`ambasync.mirror.source.AllenSource`, which streams rows as pages arrive.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, AsyncIterator

from ambasync.errors import TransientError, UpstreamError
from ambasync.limits import MAX_BODY_BYTES

CRITERIA = (
    "[failed$eqfalse],plane_of_section[name$eq{plane}],products[abbreviation$eqMouse],"
    "treatments[name$eqISH],genes"
)
TABULAR = (
    "data_sets.id+as+experiment_id,data_sets.section_thickness,data_sets.specimen_id,"
    "plane_of_sections.name+as+plane,"
    "genes.acronym+as+gene,genes.name+as+gene_name,genes.chromosome_id,genes.entrez_id,"
    "genes.genomic_reference_update_id,genes.homologene_id,genes.organism_id"
)
COLUMNS = (
    "experiment_id", "section_thickness", "specimen_id", "plane", "gene", "gene_name",
    "chromosome_id", "entrez_id", "genomic_reference_update_id", "homologene_id", "organism_id",
)
MAX_PAGE_BYTES = MAX_BODY_BYTES
# A short first page starts the downloads sooner: a 1,000-row page is ~250 KB, close to half
# a second at the 0.4-0.8 MB/s one connection to the Allen API gets.
FIRST_PAGE_ROWS = 100


@dataclass(frozen=True)
class Row:
    """One catalogue row with a usable experiment id. ``gene`` is stripped ("" when upstream gave
    none); ``fields`` keeps every column as upstream sent it (None = null)."""

    experiment_id: int
    gene: str
    plane: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class InvalidRow:
    """A row that cannot be mirrored (no usable experiment id): reported, never fatal."""

    reason: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class Total:
    """How many rows a plane's catalogue lists (from its first page)."""

    rows: int


Item = Row | InvalidRow | Total


@dataclass(frozen=True)
class Page:
    total_rows: int
    rows: list[dict[str, Any]]


def query_url(base_url: str, plane: str, start_row: int, num_rows: int, fmt: str = "json") -> str:
    """The notebook's RMA query, paged and ordered by experiment id. Sent verbatim (``encoded``)."""
    return (
        f"{base_url.rstrip('/')}/api/v2/data/SectionDataSet/query.{fmt}"
        f"?criteria={CRITERIA.format(plane=plane)}&tabular={TABULAR}"
        f"&start_row={start_row}&num_rows={num_rows}&order=data_sets.id"
    )


def grid_url(base_url: str, experiment_id: int, volumes: tuple[str, ...] = ("energy",)) -> str:
    """The grid zip of one experiment; anything beyond energy alone needs ``include=``."""
    url = f"{base_url.rstrip('/')}/grid_data/download/{experiment_id}"
    if tuple(volumes) != ("energy",):
        url += "?include=" + ",".join(volumes)
    return url


def parse_page(body: bytes, url: str) -> Page:
    """Check the RMA envelope: ``success`` decides, not the HTTP status."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise TransientError(f"catalogue page is not JSON ({body[:60]!r}) from {url}") from None
    if not isinstance(doc, dict) or "success" not in doc:
        raise UpstreamError(f"catalogue page has no RMA envelope: {url}")
    if doc["success"] is not True:
        raise UpstreamError(f"catalogue query failed: {doc.get('msg')!r} ({url})")
    rows, total = doc.get("msg"), doc.get("total_rows")
    if not isinstance(rows, list) or not isinstance(total, int):
        raise UpstreamError(f"catalogue page has no row list or total_rows: {url}")
    return Page(total_rows=total, rows=rows)


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def validate_row(raw: Any) -> Row | InvalidRow:
    """A usable experiment id makes a row mirrorable. A gene that is empty, blank or null is real
    data too (upstream has such rows): its Row has ``gene == ""`` (the file gets a placeholder
    name, see :data:`ambasync.names.UNKNOWN_GENE`) and its ``fields`` keep the gene null."""
    if not isinstance(raw, dict):
        return InvalidRow(f"catalogue row is not an object: {raw!r}", {})
    fields = {col: (None if raw.get(col) == "" else raw.get(col)) for col in COLUMNS}
    eid = _as_int(raw.get("experiment_id"))
    if eid is None:
        return InvalidRow(f"catalogue row has no valid experiment_id ({raw.get('experiment_id')!r})", fields)
    gene = raw.get("gene")
    gene = "" if gene is None else (gene if isinstance(gene, str) else str(gene)).strip()
    fields["experiment_id"] = eid
    if not gene:
        fields["gene"] = None
    return Row(experiment_id=eid, gene=gene, plane=str(raw.get("plane") or ""), fields=fields)


def row_in_plane(raw: Any, plane: str) -> Row | InvalidRow:
    """A validated row of the query for ``plane``; a row without its plane gets it."""
    row = validate_row(raw)
    if isinstance(row, Row) and not row.plane:
        row = Row(row.experiment_id, row.gene, plane, {**row.fields, "plane": plane})
    return row


async def merge_by_id(streams: dict[str, AsyncIterator[Item]]) -> AsyncIterator[tuple[str, Item]]:
    """(plane, item) from several planes' streams, each in id order, merged in id order;
    totals and invalid rows (no usable id) come as soon as they are read."""
    heads: dict[str, Item | None] = {plane: await anext(it, None) for plane, it in streams.items()}
    while True:
        live = [(plane, row) for plane, row in heads.items() if row is not None]
        if not live:
            return
        plane, row = min(live, key=lambda pr: pr[1].experiment_id if isinstance(pr[1], Row) else -1)
        yield plane, row
        heads[plane] = await anext(streams[plane], None)
