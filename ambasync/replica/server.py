"""The replica on the network: aiohttp handlers for the catalogue and the grids, with latency,
bandwidth, a connection limit and faults injected as its settings say."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import signal
import time
import urllib.parse
from typing import Any, AsyncIterator

import numpy as np
from aiohttp import web

from ambasync.mirror.catalog import COLUMNS
from ambasync.replica.catalogue import build_rows, catalogue_row, csv_text, select_page
from ambasync.replica.faults import fault_for
from ambasync.replica.grids import (
    REAL_FILES,
    REAL_IDS,
    SAGITTAL_IDS,
    data_set_xml,
    find_real_dir,
    grid_zip,
    real_grid,
    synthetic_grid,
)
from ambasync.replica.settings import ReplicaConfig, ReplicaStats

HTML_ERROR = "<html><head><title>{status}</title></head><body><h1>{status}</h1></body></html>"
REASONS = {404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}


class Replica:
    """The replica's data, caches and counters; :meth:`app` puts it on the network."""

    def __init__(self, config: ReplicaConfig | None = None):
        self.config = config or ReplicaConfig()
        self.real_dir = find_real_dir(self.config.real_dir)
        self.stats = ReplicaStats()
        self._catalog_calls = 0
        self._grown = False
        self.rows = build_rows(self.config, self.real_dir is not None)
        self._by_id = {r["experiment_id"]: r for r in self.rows}
        cache = None if self.config.prebuild else self.config.zip_cache
        self.zip_bytes = functools.lru_cache(maxsize=cache)(self._build_zip)
        if self.config.prebuild:
            for row in self.rows:
                self.zip_for(row["experiment_id"])

    def query(self, params: dict[str, str]) -> tuple[int, list[dict[str, Any]] | str]:
        """(total_rows, rows of the page) or (0, error string) for a failed query."""
        self._catalog_calls += 1
        c = self.config
        if c.grow_after_requests and self._catalog_calls > c.grow_after_requests and not self._grown:
            self._grown = True
            eid = max(r["experiment_id"] for r in self.rows) + 1
            self.rows.append(catalogue_row(eid, "Late1", "coronal", 30000))
            self._by_id[eid] = self.rows[-1]
        if c.catalog_fail:
            return 0, "Data Access error in query: (replica told to fail)"
        return select_page(self.rows, params)

    def raw_grid(self, experiment_id: int, volume: str = "energy") -> np.ndarray:
        """Exactly the voxels served in ``{volume}.raw``, shape (58, 41, 67), float32."""
        if experiment_id in REAL_IDS and self.real_dir is not None and volume == "energy":
            return real_grid(self.real_dir, experiment_id)
        variant = self._variant(experiment_id)
        if variant != experiment_id:  # a shared grid: its plane from its number, its own gene
            return synthetic_grid(self.config.seed, variant, volume)
        row = self._by_id.get(experiment_id, {})  # its plane sets the coverage, its gene the pattern
        return synthetic_grid(self.config.seed, experiment_id, volume, plane=row.get("plane"), gene=row.get("gene"))

    def _variant(self, experiment_id: int) -> int:
        """With ``variants`` K: one of K shared grids per plane (a sagittal row gets a sagittal one)."""
        v = self.config.variants
        if v <= 0 or experiment_id in self.config.bad or experiment_id not in self._by_id:
            return experiment_id  # (an id without a catalogue row is a shared grid's own number)
        sagittal = self._by_id.get(experiment_id, {}).get("plane") == "sagittal"
        # numbers no catalogue row has: 0..K-1 (coronal), the top of the sagittal range (sagittal)
        return SAGITTAL_IDS.stop - 1 - experiment_id % v if sagittal else experiment_id % v

    def zip_for(self, experiment_id: int, include: tuple[str, ...] | None = None) -> bytes:
        """The zip served for an experiment (cached; shared between experiments with ``variants``)."""
        if self.config.variants > 0 and experiment_id not in REAL_IDS:
            experiment_id = self._variant(experiment_id)
        return self.zip_bytes(experiment_id, include)

    def _build_zip(self, experiment_id: int, include: tuple[str, ...] | None = None) -> bytes:
        bad = self.config.bad.get(experiment_id)
        if include is None and bad is None and experiment_id in REAL_IDS and self.real_dir is not None:
            return (self.real_dir / REAL_FILES[experiment_id]).read_bytes()
        xml = None
        if include is None:
            xml = data_set_xml(experiment_id, self._by_id.get(experiment_id, {}).get("specimen_id", 0))
        raws = {v: self.raw_grid(experiment_id, v).tobytes() for v in include or ("energy",)}
        return grid_zip(raws, bad, xml)

    # -- HTTP -----------------------------------------------------------------
    async def _pause(self) -> None:
        if self.config.latency_ms > 0:
            await asyncio.sleep(self.config.latency_ms / 1000)

    async def _send(self, request: web.Request, body: bytes, content_type: str, *, cut: int | None = None,
                    stall: bool = False, declared: int | None = None) -> web.StreamResponse:
        """Stream ``body`` at the configured bandwidth; optionally stop after ``cut`` bytes
        (then abort the connection) or stall after 4 KiB."""
        resp = web.StreamResponse(headers={"Content-Type": content_type})
        resp.content_length = declared if declared is not None else len(body)
        limit = len(body) if cut is None else cut
        limit = min(limit, 4096) if stall else limit
        rate = self.config.bandwidth_kbps * 1024
        chunk = 16 * 1024 if rate > 0 or limit < len(body) else max(1, limit)  # unthrottled: one write
        try:
            await resp.prepare(request)
            for start in range(0, limit, chunk):
                piece = body[start:min(start + chunk, limit)]
                await resp.write(piece)
                if rate > 0:
                    await asyncio.sleep(len(piece) / rate)
            if stall:
                await asyncio.sleep(self.config.stall_seconds)
            if cut is not None or stall:
                if request.transport is not None:
                    request.transport.abort()
                return resp
            await resp.write_eof()
        except ConnectionResetError:  # the client went away (timed out, or was killed): nothing to do
            pass
        return resp

    async def handle_query(self, request: web.Request) -> web.StreamResponse:
        fmt = request.match_info["fmt"]
        self.stats.catalog_requests += 1
        params = {k: v[0] for k, v in urllib.parse.parse_qs(request.query_string, keep_blank_values=True).items()}
        start_text = params.get("start_row", "0")
        start = int(start_text) if start_text.isdigit() else 0
        self.stats.events.append(("catalog", start))
        await self._pause()
        total, rows = self.query(params)
        if isinstance(rows, str):
            doc = {"success": False, "id": 0, "start_row": start, "num_rows": 0, "total_rows": 0, "msg": rows}
            return await self._send(request, json.dumps(doc).encode(), "application/json")
        if fmt == "csv":
            return await self._send(request, csv_text(rows).encode(), "text/csv")
        doc = {"success": True, "id": 0, "start_row": start, "num_rows": len(rows), "total_rows": total,
               "msg": [{c: r[c] for c in COLUMNS} for r in rows]}
        return await self._send(request, json.dumps(doc).encode(), "application/json")

    async def handle_grid(self, request: web.Request) -> web.StreamResponse:
        try:
            eid = int(request.match_info["eid"])
        except ValueError:
            raise web.HTTPNotFound(text=HTML_ERROR.format(status="404 Not Found"), content_type="text/html")
        stats, c = self.stats, self.config
        n = stats.grid_requests[eid]
        stats.grid_requests[eid] += 1
        if stats.first_grid_request is None:
            stats.first_grid_request = time.time()
        stats.events.append(("grid", eid))
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            await self._pause()
            if c.max_connections and stats.in_flight > c.max_connections:
                stats.over_limit_429 += 1
                return self._error(429)
            if eid not in self._by_id or c.bad.get(eid) == "404":
                return self._error(404)
            if c.bad.get(eid) in ("redirect_loop", "redirect_ftp"):
                return self._redirect(request, c.bad[eid])
            fault = fault_for(c.seed, c.fault_rate, c.fault_kinds, eid, n)
            if fault is not None:
                stats.faults[fault] += 1
            if fault in ("500", "503", "429"):
                return self._error(int(fault))
            if c.bad.get(eid) == "not_zip":
                return await self._send(request, HTML_ERROR.format(status="Service Unavailable").encode(), "text/html")
            include = tuple(v for v in request.query.get("include", "").split(",") if v) or None
            body = self.zip_for(eid, include)
            if fault == "drop":
                return await self._send(request, body, "application/zip", cut=len(body) // 2)
            if fault == "truncate":
                return await self._send(request, body[: len(body) * 6 // 10], "application/zip")
            if fault == "stall":
                return await self._send(request, body, "application/zip", stall=True)
            resp = await self._send(request, body, "application/zip")
            stats.completed[eid] += 1
            return resp
        finally:
            stats.in_flight -= 1

    def _redirect(self, request: web.Request, kind: str) -> web.Response:
        """A 302 that never ends: to the same grid with ``loop=1`` added or taken away (a loop
        of two URLs), or to an ftp:// URL no HTTP client may follow."""
        self.stats.redirects += 1
        if kind == "redirect_ftp":
            location = f"ftp://127.0.0.1/grid_data/{request.match_info['eid']}.zip"
        else:
            query = {k: v for k, v in request.query.items() if k != "loop"}
            if "loop" not in request.query:
                query["loop"] = "1"
            location = str(request.rel_url.with_query(query))
        return web.Response(status=302, headers={"Location": location})

    def _error(self, status: int) -> web.Response:
        headers = {}
        if status in (429, 503):
            headers["Retry-After"] = f"{self.config.retry_after:g}"
        if status == 429:
            self.stats.served_429 += 1
        return web.Response(status=status, text=HTML_ERROR.format(status=f"{status} {REASONS.get(status, '')}"),
                            content_type="text/html", headers=headers)

    async def handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.as_json())

    async def handle_reset(self, request: web.Request) -> web.Response:
        """Counters back to zero, so one served replica can measure several clients in turn."""
        self.stats = ReplicaStats()
        return web.json_response(self.stats.as_json())

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(r"/api/v2/data/SectionDataSet/query.{fmt:(json|csv)}", self.handle_query)
        app.router.add_get(r"/grid_data/download/{eid}", self.handle_grid)
        app.router.add_get("/replica/stats", self.handle_stats)
        app.router.add_post("/replica/reset", self.handle_reset)
        return app


@contextlib.asynccontextmanager
async def serve(config: ReplicaConfig | Replica | None = None, port: int = 0) -> AsyncIterator[tuple[Replica, str]]:
    """Serve a replica on 127.0.0.1 for the duration of the block; yields (replica, base URL)."""
    replica = config if isinstance(config, Replica) else Replica(config)
    runner = web.AppRunner(replica.app(), handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    actual = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield replica, f"http://127.0.0.1:{actual}"
    finally:
        await runner.cleanup()


def main_serve(config: ReplicaConfig, port: int) -> None:
    """Serve until SIGINT/SIGTERM; the first line on stdout is the base URL."""

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with serve(config, port) as (_, url):
            print(url, flush=True)
            await stop.wait()

    asyncio.run(run())
