"""The Allen RMA catalogue of ISH experiments, read page by page.

The query is the reference notebook's (adult mouse ISH, not failed, one plane,
same tabular columns), asked as paged JSON in a stable order so pages neither
overlap nor skip. Parsing and validation are pure; :func:`iter_rows` streams
rows as pages arrive, so downloads can start after the first page.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import aiohttp

from .config import Config
from .errors import ExperimentError, TransientError, UpstreamError
from .fetch import Throttle, get_bytes, with_retries

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
MAX_PAGE_BYTES = 64 * 1024 * 1024
FIRST_PAGE_ROWS = 100


@dataclass(frozen=True)
class Row:
    """One valid catalogue row. ``fields`` keeps every column as upstream sent it (None = null)."""

    experiment_id: int
    gene: str
    plane: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class InvalidRow:
    """A row that cannot be mirrored (no id, no gene): reported, never fatal."""

    reason: str
    fields: dict[str, Any]


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
    if not isinstance(raw, dict):
        return InvalidRow(f"catalogue row is not an object: {raw!r}", {})
    fields = {col: (None if raw.get(col) == "" else raw.get(col)) for col in COLUMNS}
    eid = _as_int(raw.get("experiment_id"))
    if eid is None:
        return InvalidRow(f"catalogue row has no valid experiment_id ({raw.get('experiment_id')!r})", fields)
    gene = raw.get("gene")
    if not isinstance(gene, str) or not gene.strip():
        return InvalidRow(f"experiment {eid}: catalogue row has no gene acronym", fields)
    fields["experiment_id"] = eid
    return Row(experiment_id=eid, gene=gene, plane=str(raw.get("plane") or ""), fields=fields)


async def iter_rows(
    session: aiohttp.ClientSession,
    cfg: Config,
    plane: str,
    throttle: Throttle | None = None,
    on_total: Callable[[int], None] | None = None,
) -> AsyncIterator[Row | InvalidRow]:
    """Yield the plane's rows page by page; raises :class:`UpstreamError` if the catalogue
    cannot be read or changes size mid-run (pages would then skip or repeat rows)."""
    size = cfg.source.page_size
    start, total = 0, None
    while total is None or start < total:
        # A short first page starts the downloads sooner: a 1,000-row page is ~250 KB, close to half
        # a second at the 0.4-0.8 MB/s one connection to the Allen API gets.
        num = min(size, FIRST_PAGE_ROWS) if start == 0 else size
        url = query_url(cfg.source.base_url, plane, start, num)

        async def fetch_page() -> Page:
            return parse_page((await get_bytes(session, url, MAX_PAGE_BYTES, throttle)).body, url)

        try:
            page = await with_retries(fetch_page, cfg.download, f"catalogue page at row {start}")
        except ExperimentError as exc:
            raise UpstreamError(f"catalogue unreachable: {exc.reason}") from None
        if total is not None and page.total_rows != total:
            raise UpstreamError(
                f"catalogue changed during the run (total_rows {total} -> {page.total_rows} at row {start}); "
                "what was fetched is kept: run again to pick up the rest"
            )
        if total is None and on_total is not None:
            on_total(page.total_rows)
        total = page.total_rows
        for raw in page.rows:
            row = validate_row(raw)
            if isinstance(row, Row) and not row.plane:
                row = Row(row.experiment_id, row.gene, plane, {**row.fields, "plane": plane})
            yield row
        if len(page.rows) < num:
            break
        start += num


async def merge_by_id(
    streams: dict[str, AsyncIterator[Row | InvalidRow]]
) -> AsyncIterator[tuple[str, Row | InvalidRow]]:
    """(plane, row) from several planes' streams, each in id order, merged in id order;
    invalid rows (no usable id) come as soon as they are read."""
    heads: dict[str, Row | InvalidRow | None] = {plane: await anext(it, None) for plane, it in streams.items()}
    while True:
        live = [(plane, row) for plane, row in heads.items() if row is not None]
        if not live:
            return
        plane, row = min(live, key=lambda pr: pr[1].experiment_id if isinstance(pr[1], Row) else -1)
        yield plane, row
        heads[plane] = await anext(streams[plane], None)
