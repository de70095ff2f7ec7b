"""The Allen API as the run sees it: one object owns the HTTP session.

:class:`AllenSource` holds the session, its connector, timeouts and proxy settings (see
:func:`ambasync.mirror.fetch.make_session`), the shared throttle and the retry policy, for the
duration of an ``async with``. Nothing else in the run touches HTTP: the producer asks it
for the catalogue, each experiment for its grid.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import AsyncIterator

import aiohttp

from ambasync.config import Config, DownloadConfig
from ambasync.errors import UpstreamError
from ambasync.mirror import catalog
from ambasync.mirror.catalog import InvalidRow, Item, Row, Total
from ambasync.mirror.fetch import Throttle, get_bytes, make_session, retrying


@dataclass(frozen=True)
class Download:
    """One grid zip as received, and what the state keeps of its response."""

    body: bytes
    last_modified: str | None
    etag: str | None


class AllenSource:
    """``async with AllenSource(...) as source``: the catalogue and the grids of one API."""

    def __init__(self, base_url: str, download: DownloadConfig, page_size: int, volumes: tuple[str, ...]):
        self.base_url = base_url
        self.retries = download  # attempts and backoff, for whoever retries a grid
        self.page_size = page_size
        self.volumes = volumes
        self._download = download
        self._throttle = Throttle(download.requests_per_second)
        self._session: aiohttp.ClientSession | None = None
        self.grid_requests = 0  # every attempt counts
        self.bytes_downloaded = 0

    @classmethod
    def for_config(cls, cfg: Config) -> "AllenSource":
        return cls(cfg.source.base_url, cfg.download, cfg.source.page_size, tuple(cfg.convert.volumes))

    async def __aenter__(self) -> "AllenSource":
        self._session = make_session(self._download, self.base_url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("AllenSource is used outside its `async with` block")
        return self._session

    # -- the catalogue -----------------------------------------------------------
    async def catalogue(self, planes: tuple[str, ...]) -> AsyncIterator[tuple[str, Item]]:
        """(plane, item) for every row of these planes, merged in experiment-id order (so a
        limit of N takes the first N ids of all of them); each plane's :class:`Total` first.
        Raises :class:`UpstreamError` if the catalogue cannot be read or changes size mid-run."""
        streams = {plane: self._plane(plane) for plane in planes}
        async with contextlib.AsyncExitStack() as stack:
            merged = catalog.merge_by_id(streams)
            for stream in (*streams.values(), merged):  # closed last to first
                stack.push_async_callback(stream.aclose)
            async for plane, item in merged:
                yield plane, item

    async def _plane(self, plane: str) -> AsyncIterator[Row | InvalidRow | Total]:
        """One plane's rows, page by page (pages neither overlap nor skip: ordered by id)."""
        start, total = 0, None
        while total is None or start < total:
            num = min(self.page_size, catalog.FIRST_PAGE_ROWS) if start == 0 else self.page_size
            url = catalog.query_url(self.base_url, plane, start, num)
            tried = await retrying(lambda: self._page(url), self._download, f"catalogue page at row {start}")
            if tried.value is None:
                raise UpstreamError(f"catalogue unreachable: {tried.error.reason if tried.error else url}")
            page = tried.value
            if total is not None and page.total_rows != total:
                raise UpstreamError(
                    f"catalogue changed during the run (total_rows {total} -> {page.total_rows} at row {start}); "
                    "what was fetched is kept: run again to pick up the rest"
                )
            if total is None:
                yield Total(page.total_rows)
            total = page.total_rows
            for raw in page.rows:
                yield catalog.row_in_plane(raw, plane)
            if len(page.rows) < num:
                break
            start += num

    async def _page(self, url: str) -> catalog.Page:
        return catalog.parse_page((await get_bytes(self.session, url, catalog.MAX_PAGE_BYTES, self._throttle)).body, url)

    # -- the grids -----------------------------------------------------------------
    def grid_url(self, experiment_id: int) -> str:
        return catalog.grid_url(self.base_url, experiment_id, self.volumes)

    async def grid(self, experiment_id: int) -> Download:
        """One request for an experiment's zip (the caller retries: a corrupt zip is found only
        when it is decoded). Raises :class:`ambasync.errors.ExperimentError` naming the URL."""
        self.grid_requests += 1
        resp = await get_bytes(self.session, self.grid_url(experiment_id), self._download.max_zip_bytes,
                               self._throttle)
        self.bytes_downloaded += len(resp.body)
        return Download(resp.body, resp.last_modified, resp.etag)
