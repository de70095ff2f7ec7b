"""A faithful offline replica of the Allen Brain Atlas API (127.0.0.1 only).

It serves what ambasync uses of the real service, as its public documentation and real downloads
describe it: the RMA catalogue (JSON envelope and CSV, paging, ``total_rows``,
nulls, repeated rows) and grid zips laid out like real downloads. Grids are
synthetic and deterministic (``-1`` outside an ellipsoid brain), plus the real
Nrp1 and Pdyn zips under their real ids when the reference data is found.
Transient faults, permanently bad experiments, a connection limit, latency and
bandwidth are injected deterministically from a seed, for tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import io
import json
import os
import re
import signal
import urllib.parse
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np
from aiohttp import web

REAL_IDS = {74272479: "Nrp1", 71717084: "Pdyn"}
REAL_FILES = {74272479: "Nrp1_P56_coronal_74272479_200um.zip", 71717084: "Pdyn_P56_coronal_71717084_200um.zip"}
TABULAR_COLUMNS = ["experiment_id", "section_thickness", "specimen_id", "plane", "gene", "gene_name",
                   "chromosome_id", "entrez_id", "genomic_reference_update_id", "homologene_id", "organism_id"]
GRID_SHAPE = (58, 41, 67)  # C order (z, y, x): PIR, x fastest
VOLUMES = ("energy", "density", "intensity")
FAULT_KINDS = ("500", "503", "429", "drop", "truncate", "stall")
BAD_KINDS = ("no_energy", "short_raw", "not_zip", "404", "bomb")
# energy.mhd of a real Allen download, verbatim (allen-api.md §2).
MHD_TEMPLATE = (
    "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
    "TransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = 0 0 0\nCenterOfRotation = 0 0 0\n"
    "AnatomicalOrientation = RAI\nElementSpacing = 200 200 200\nDimSize = 67 41 58\n"
    "ElementType = MET_FLOAT\nElementDataFile = {volume}.raw\n"
)
HTML_ERROR = "<html><head><title>{status}</title></head><body><h1>{status}</h1></body></html>"


@dataclass
class ReplicaConfig:
    n_coronal: int = 60
    n_sagittal: int = 20
    seed: int = 0
    latency_ms: float = 0.0
    bandwidth_kbps: float = 0.0  # per connection, KB/s; 0 = unthrottled
    fault_rate: float = 0.0
    fault_kinds: tuple[str, ...] = FAULT_KINDS
    retry_after: float = 1.0
    stall_seconds: float = 30.0
    max_connections: int = 0
    bad: dict[int, str] = field(default_factory=dict)
    extra_rows: list[dict] = field(default_factory=list)
    duplicate_ids: tuple[int, ...] = ()
    grow_after_requests: int = 0
    catalog_fail: bool = False
    real_dir: str | None = None
    zip_cache: int = 256
    prebuild: bool = False
    variants: int = 0  # >0: experiment i serves the grid (and zip) of variant i % variants; for atlas-scale benchmarks


@dataclass
class ReplicaStats:
    grid_requests: collections.Counter = field(default_factory=collections.Counter)
    completed: collections.Counter = field(default_factory=collections.Counter)
    faults: collections.Counter = field(default_factory=collections.Counter)
    catalog_requests: int = 0
    served_429: int = 0
    over_limit_429: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    events: list[tuple[str, int]] = field(default_factory=list)  # ("catalog", start_row) / ("grid", id), in order

    def as_json(self) -> dict[str, Any]:
        doc = {k: (dict(v) if isinstance(v, collections.Counter) else v) for k, v in vars(self).items()}
        doc["events"] = self.events[-10000:]
        return doc


def _hash01(*parts: Any) -> float:
    """Stable uniform number in [0, 1) from the parts (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2 ** 64


def find_real_dir(configured: str | None) -> Path | None:
    """The folder of the real Nrp1 and Pdyn zips: ``configured``, else
    ``$AMBASYNC_REFERENCE_DIR/allen-grids`` (the tests point it at their fixtures); without
    either the replica serves synthetic grids only."""
    env = os.environ.get("AMBASYNC_REFERENCE_DIR")
    candidates = [configured] if configured else [os.path.join(env, "allen-grids") if env else None]
    for c in candidates:
        if c and all((Path(c) / name).is_file() for name in REAL_FILES.values()):
            return Path(c)
    return None


def synthetic_grid(seed: int, experiment_id: int, volume: str = "energy") -> np.ndarray:
    """Deterministic grid: -1 outside an off-centre ellipsoid, inside non-negative values with
    exact zeros and a gradient along every axis, so any flip or transpose changes it."""
    z, y, x = np.ogrid[: GRID_SHAPE[0], : GRID_SHAPE[1], : GRID_SHAPE[2]]
    inside = ((z - 30) / 32.0) ** 2 + ((y - 18) / 23.0) ** 2 + ((x - 35) / 38.0) ** 2 <= 1.0  # ~1/3 outside
    rng = np.random.default_rng([seed, experiment_id, VOLUMES.index(volume) if volume in VOLUMES else 9])
    values = rng.gamma(1.5, 1.0, GRID_SHAPE).astype(np.float32)
    values += (0.01 * z + 0.02 * y + 0.03 * x).astype(np.float32)
    values[rng.random(GRID_SHAPE) < 0.05] = 0.0
    return np.where(inside, values, np.float32(-1.0)).astype("<f4")


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def data_set_xml(experiment_id: int, specimen_id: int) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<section-data-set>\n'
        f"  <failed>false</failed>\n  <id>{experiment_id}</id>\n  <reference-space-id>9</reference-space-id>\n"
        f"  <section-thickness>25.0</section-thickness>\n  <specimen-id>{specimen_id}</specimen-id>\n"
        "  <products>\n    <product>\n      <abbreviation>Mouse</abbreviation>\n    </product>\n  </products>\n"
        "</section-data-set>\n"
    ).encode()


class Replica:
    """The replica's data, caches and counters; :meth:`app` puts it on the network."""

    def __init__(self, config: ReplicaConfig | None = None):
        self.config = config or ReplicaConfig()
        self.real_dir = find_real_dir(self.config.real_dir)
        self.stats = ReplicaStats()
        self._catalog_calls = 0
        self._grown = False
        self.rows = self._build_rows()
        self._by_id = {r["experiment_id"]: r for r in self.rows}
        self.zip_bytes = functools.lru_cache(maxsize=self.config.zip_cache)(self._build_zip)  # type: ignore[method-assign]
        if self.config.prebuild:
            self.zip_bytes = functools.lru_cache(maxsize=None)(self._build_zip)  # type: ignore[method-assign]
            for row in self.rows:
                self.zip_for(row["experiment_id"])

    # -- catalogue --------------------------------------------------------------
    def _row(self, eid: int, gene: str, plane: str, i: int) -> dict[str, Any]:
        return {
            "experiment_id": eid, "section_thickness": 25, "specimen_id": 700000 + 7 * i, "plane": plane,
            "gene": gene, "gene_name": f"{gene} gene", "chromosome_id": 30 + i % 21,
            "entrez_id": None if i % 11 == 5 else 10000 + 17 * i, "genomic_reference_update_id": 491928275,
            "homologene_id": 100 + 3 * i, "organism_id": 2,
        }

    def _build_rows(self) -> list[dict[str, Any]]:
        c = self.config
        rows = []
        for i in range(c.n_coronal):  # ~2 experiments per gene, like the real atlas
            rows.append(self._row(100000 + 13 * i, f"Gene{(i * 7) % max(1, c.n_coronal // 2 + 1)}", "coronal", i))
        for i in range(c.n_sagittal):
            rows.append(self._row(5000000 + 11 * i, f"Sgene{(i * 5) % max(1, c.n_sagittal // 2 + 1)}", "sagittal",
                                  c.n_coronal + i))
        if self.real_dir is not None:
            for j, (eid, gene) in enumerate(REAL_IDS.items()):
                rows.append(self._row(eid, gene, "coronal", 9000 + j))
        for j, extra in enumerate(c.extra_rows):
            rows.append({**self._row(int(extra["experiment_id"]), "", "coronal", 20000 + j), **extra})
        rows.sort(key=lambda r: r["experiment_id"])
        for eid in c.duplicate_ids:
            rows.extend([dict(r) for r in rows if r["experiment_id"] == eid][:1])
        rows.sort(key=lambda r: r["experiment_id"])
        return rows

    def query(self, params: dict[str, str]) -> tuple[int, list[dict[str, Any]] | str]:
        """(total_rows, rows of the page) or (0, error string) for a failed query."""
        self._catalog_calls += 1
        c = self.config
        if c.grow_after_requests and self._catalog_calls > c.grow_after_requests and not self._grown:
            self._grown = True
            eid = max(r["experiment_id"] for r in self.rows) + 1
            self.rows.append(self._row(eid, "Late1", "coronal", 30000))
            self._by_id[eid] = self.rows[-1]
        criteria = params.get("criteria", "")
        if c.catalog_fail:
            return 0, "Data Access error in query: (replica told to fail)"
        if "treatments[name$eqISH]" not in criteria or "products[abbreviation$eqMouse]" not in criteria:
            return 0, f"Unsupported criteria for this replica: {criteria!r}"
        match = re.search(r"plane_of_section\[name\$eq(\w+)\]", criteria)
        rows = [r for r in self.rows if match is None or r["plane"] == match.group(1)]
        try:
            start = int(params.get("start_row", "0"))
            num = len(rows) if params.get("num_rows") == "all" else int(params.get("num_rows", "50"))
        except ValueError:
            return 0, "start_row and num_rows must be integers"
        return len(rows), rows[start:start + num]

    # -- grids ----------------------------------------------------------------
    def raw_grid(self, experiment_id: int, volume: str = "energy") -> np.ndarray:
        """Exactly the voxels served in ``{volume}.raw``, shape (58, 41, 67), float32."""
        if experiment_id in REAL_IDS and self.real_dir is not None and volume == "energy":
            with zipfile.ZipFile(self.real_dir / REAL_FILES[experiment_id]) as zf:
                return np.frombuffer(zf.read("energy.raw"), "<f4").reshape(GRID_SHAPE)
        return synthetic_grid(self.config.seed, self._variant(experiment_id), volume)

    def _variant(self, experiment_id: int) -> int:
        v = self.config.variants
        return experiment_id if v <= 0 or experiment_id in self.config.bad else experiment_id % v

    def zip_for(self, experiment_id: int, include: tuple[str, ...] | None = None) -> bytes:
        """The zip served for an experiment (cached; shared between experiments with ``variants``)."""
        if self.config.variants > 0 and experiment_id not in REAL_IDS:
            experiment_id = self._variant(experiment_id)
        return self.zip_bytes(experiment_id, include)

    def _build_zip(self, experiment_id: int, include: tuple[str, ...] | None = None) -> bytes:
        bad = self.config.bad.get(experiment_id)
        if include is None and bad is None and experiment_id in REAL_IDS and self.real_dir is not None:
            return (self.real_dir / REAL_FILES[experiment_id]).read_bytes()
        volumes = include or ("energy",)
        members: list[tuple[str, bytes]] = []
        if include is None:
            members.append(("data_set.xml", data_set_xml(experiment_id, self._by_id.get(experiment_id, {}).get("specimen_id", 0))))
        for v in volumes:
            raw = self.raw_grid(experiment_id, v).tobytes()
            if bad == "short_raw":
                raw = raw[:-1000]
            elif bad == "bomb":
                raw = bytes(200 * 1024 * 1024)
            if not (bad == "no_energy" and v == "energy"):
                members.append((f"{v}.raw", raw))
            members.append((f"{v}.mhd", MHD_TEMPLATE.format(volume=v).encode()))
        return _zip(members)  # real order: data_set.xml, energy.raw, energy.mhd

    def _fault(self, experiment_id: int, n: int) -> str | None:
        c = self.config
        if c.fault_rate <= 0 or not c.fault_kinds or _hash01(c.seed, experiment_id, n, "fault") >= c.fault_rate:
            return None
        return c.fault_kinds[int(_hash01(c.seed, experiment_id, n, "kind") * len(c.fault_kinds))]

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
        self.stats.events.append(("catalog", int(params.get("start_row", "0") or 0) if params.get("start_row", "0").isdigit() else 0))
        await self._pause()
        total, rows = self.query(params)
        start = int(params.get("start_row", "0")) if params.get("start_row", "0").isdigit() else 0
        if isinstance(rows, str):
            doc = {"success": False, "id": 0, "start_row": start, "num_rows": 0, "total_rows": 0, "msg": rows}
            return await self._send(request, json.dumps(doc).encode(), "application/json")
        if fmt == "csv":
            out = io.StringIO()
            out.write(",".join(TABULAR_COLUMNS) + "\n")
            for r in rows:
                out.write(",".join(_csv_field(r[c]) for c in TABULAR_COLUMNS) + "\n")
            return await self._send(request, out.getvalue().encode(), "text/csv")
        doc = {"success": True, "id": 0, "start_row": start, "num_rows": len(rows), "total_rows": total,
               "msg": [{c: r[c] for c in TABULAR_COLUMNS} for r in rows]}
        return await self._send(request, json.dumps(doc).encode(), "application/json")

    async def handle_grid(self, request: web.Request) -> web.StreamResponse:
        try:
            eid = int(request.match_info["eid"])
        except ValueError:
            raise web.HTTPNotFound(text=HTML_ERROR.format(status="404 Not Found"), content_type="text/html")
        stats, c = self.stats, self.config
        n = stats.grid_requests[eid]
        stats.grid_requests[eid] += 1
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
            fault = self._fault(eid, n)
            if fault in ("500", "503", "429"):
                stats.faults[fault] += 1
                return self._error(int(fault))
            if c.bad.get(eid) == "not_zip":
                return await self._send(request, HTML_ERROR.format(status="Service Unavailable").encode(), "text/html")
            include = tuple(v for v in request.query.get("include", "").split(",") if v) or None
            body = self.zip_for(eid, include)
            if fault == "drop":
                stats.faults[fault] += 1
                return await self._send(request, body, "application/zip", cut=len(body) // 2)
            if fault == "truncate":
                stats.faults[fault] += 1
                return await self._send(request, body[: len(body) * 6 // 10], "application/zip")
            if fault == "stall":
                stats.faults[fault] += 1
                return await self._send(request, body, "application/zip", stall=True)
            resp = await self._send(request, body, "application/zip")
            stats.completed[eid] += 1
            return resp
        finally:
            stats.in_flight -= 1

    def _error(self, status: int) -> web.Response:
        headers = {}
        if status in (429, 503):
            headers["Retry-After"] = f"{self.config.retry_after:g}"
        if status == 429:
            self.stats.served_429 += 1
        reason = {404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}
        return web.Response(status=status, text=HTML_ERROR.format(status=f"{status} {reason.get(status, '')}"),
                            content_type="text/html", headers=headers)

    async def handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.as_json())

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(r"/api/v2/data/SectionDataSet/query.{fmt:(json|csv)}", self.handle_query)
        app.router.add_get(r"/grid_data/download/{eid}", self.handle_grid)
        app.router.add_get("/replica/stats", self.handle_stats)
        return app


def _csv_field(value: Any) -> str:
    if value is None:
        return ""
    text = str(value)
    return '"' + text.replace('"', '""') + '"' if any(ch in text for ch in ',"\n') else text


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


class ReplicaProcess:
    """`python -m ambasync replica` in a subprocess, for tests and benchmarks that must kill or
    measure the mirror as a whole process; ``args`` are the command's options."""

    def __init__(self, *args: str):
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, "-m", "ambasync", "replica", "--port", "0", *args],
                                     stdout=subprocess.PIPE, text=True)
        self.url = (self.proc.stdout.readline() if self.proc.stdout else "").strip()
        if not self.url.startswith("http://127.0.0.1:"):
            self.proc.kill()
            raise RuntimeError(f"the replica did not start (said {self.url!r})")

    def stats(self) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/replica/stats", timeout=30) as resp:
            return json.load(resp)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


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
