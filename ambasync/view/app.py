"""The aiohttp app of ``ambasync view``: the page, its static files, and a small JSON API over
:mod:`ambasync.view.data` and :mod:`ambasync.view.coexpression`.

Safety: read-only on the cube and the mirror (uploads and search results go to a temporary
folder of the app's own, removed when it stops); static files come from a fixed list read from
the package's ``static/`` folder at start (no path from a request ever reaches the file
system); maps only by a name listed in the ``--maps`` folder (symlinks out of it are not
listed); every error is a 4xx/5xx JSON ``{"error": message}``, never a traceback.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import logging
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from ambasync.errors import AnalysisError
from ambasync.view.coexpression import DEFAULT_BUDGET_MB, Coexpression, parse_seed
from ambasync.view.data import CubeData, Layer, ViewError, map_files, parse_int

log = logging.getLogger("ambasync.view")

STATIC = Path(__file__).with_name("static")
CONTENT_TYPES = {".html": "text/html", ".js": "application/javascript", ".css": "text/css",
                 ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon"}
MAX_UPLOAD_BYTES = 64 * 1024 * 1024  # a 200 µm map is < 1 MB; a 40 µm float NIfTI ~ 100 MB gzipped to less
MAX_NULLS = 1000
KEY = web.AppKey("view", "Opening")


def static_files() -> dict[str, tuple[bytes, str]]:
    """The page's files: a fixed list read once from the package's static folder."""
    return {p.name: (p.read_bytes(), CONTENT_TYPES.get(p.suffix, "application/octet-stream"))
            for p in sorted(STATIC.iterdir()) if p.is_file() and p.suffix in CONTENT_TYPES}


@dataclass
class SearchJob:
    id: str
    map_key: str
    map_title: str
    nulls: int
    state: str = "running"  # running | done | failed
    phase: str = "starting"
    done_tasks: int = 0
    total_tasks: int = 0
    started: float = field(default_factory=time.monotonic)
    seconds: float | None = None
    error: str | None = None
    table: Any = None
    picture: Path | None = None

    def as_json(self, rows: int) -> dict:
        out: dict[str, Any] = {"job": self.id, "state": self.state, "phase": self.phase, "map": self.map_key,
                               "map_title": self.map_title, "nulls": self.nulls, "done_tasks": self.done_tasks,
                               "total_tasks": self.total_tasks, "error": self.error,
                               "seconds": round(self.seconds if self.seconds is not None
                                                else time.monotonic() - self.started, 2)}
        if self.table is not None:
            head = self.table.head(rows)
            out["rows"] = [{k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                            for k, v in rec.items()} for rec in head.to_dict("records")]
            out["n_rows"] = len(self.table)
        return out


def _progress_callback(job: SearchJob) -> Any:
    """A dask local-scheduler callback that counts the search's finished tasks into ``job``."""
    from dask.callbacks import Callback

    class Progress(Callback):
        calls = 0

        def _start_state(self, dsk: Any, state: Any) -> None:
            self.calls += 1
            job.phase = "making null maps" if self.calls == 1 and job.nulls else "scoring experiments"
            job.done_tasks = 0
            job.total_tasks = sum(len(state[k]) for k in ("ready", "waiting", "running"))

        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            job.done_tasks = len(state["finished"])

    return Progress()


class View:
    """What the app holds: the cube, the co-expression matrix, the maps, the search jobs."""

    def __init__(self, location: str, *, labels: str | None = None, label_names: str | None = None,
                 maps: str | None = None, budget_mb: int = DEFAULT_BUDGET_MB, coexpression: bool = True,
                 seed_planes: tuple[str, ...] = ("coronal",)) -> None:
        self.data = CubeData(location, labels, label_names)
        self.location = location
        self.maps_dir = maps
        if not seed_planes or any(p not in ("coronal", "sagittal") for p in seed_planes):
            raise ViewError(f"seed planes {seed_planes!r}: coronal and/or sagittal")
        # one profile matrix per plane, the budget shared between them
        self.coexpressions = {p: Coexpression(self.data, budget_mb // len(seed_planes), p) for p in seed_planes}
        self.coexpression = next(iter(self.coexpressions.values()))
        if coexpression:
            for co in self.coexpressions.values():
                co.start()
        self.tmp = Path(tempfile.mkdtemp(prefix="ambasync-view-"))
        self.uploads: dict[str, tuple[str, str]] = {}  # key -> (path, original name)
        self.jobs: dict[str, SearchJob] = {}
        self.search_lock = threading.Lock()
        self.search_pool = ThreadPoolExecutor(1, thread_name_prefix="ambasync-view-search")
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="ambasync-view")

    def close(self) -> None:
        self.search_pool.shutdown(wait=False, cancel_futures=True)
        self.pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---------------------------------------------------------------- maps
    def maps(self) -> list[dict]:
        listed = [{"key": f"file:{name}", "name": name, "source": "--maps"} for name in map_files(self.maps_dir)]
        listed += [{"key": key, "name": name, "source": "upload"} for key, (_, name) in self.uploads.items()]
        return listed

    def map_path(self, key: str) -> tuple[str, str]:
        kind, _, name = key.partition(":")
        if kind == "file":
            files = map_files(self.maps_dir)
            if name not in files:  # only names the folder lists: no ../, no absolute path, no symlink out
                raise ViewError(f"map {name!r} is not in the --maps folder"
                                + ("" if self.maps_dir else " (the viewer was started without --maps)"), 404)
            return files[name], name
        if kind == "upload" and key in self.uploads:
            return self.uploads[key]
        raise ViewError(f"unknown map {key!r}: file:NAME (from --maps) or an uploaded map's key", 404)

    def make_layer(self, key: str) -> Layer:
        kind, _, arg = key.partition(":")
        if kind == "seed":
            where, _, plane = arg.partition(":")
            z, y, x = parse_seed(where)
            return self.data.put(self.seed_plane(plane or "coronal").layer(z, y, x), keep=8)
        path, name = self.map_path(arg)
        try:
            return self.data.map_layer(key, path, name)
        except AnalysisError as exc:
            raise ViewError(str(exc), 422) from None

    def seed_plane(self, plane: str) -> Coexpression:
        co = self.coexpressions.get(plane)
        if co is None:
            raise ViewError(f"no co-expression across {plane!r} experiments: the viewer loads "
                            f"{', '.join(self.coexpressions)} (--seed-planes)", 404)
        return co

    # ---------------------------------------------------------------- search
    def run_search(self, job: SearchJob, path: str) -> None:
        import ambasync

        try:
            picture = self.tmp / f"{job.id}.png"
            with _progress_callback(job):
                table = ambasync.search(self.location, path, nulls=job.nulls, plot=str(picture))
            job.table, job.picture, job.state = table, picture, "done"
            job.phase = "done"
        except AnalysisError as exc:  # the CLI's own one line (an upload named as the user named it)
            text = str(exc)
            if path.startswith(str(self.tmp)):
                text = text.replace(path, job.map_title)
            job.state, job.error = "failed", text
        except Exception as exc:
            log.exception("view: search failed")
            job.state, job.error = "failed", f"the search failed ({type(exc).__name__}: {exc})"
        finally:
            job.seconds = time.monotonic() - job.started
            self.search_lock.release()


# -------------------------------------------------------------------- helpers

@dataclass
class Opening:
    """The view, or the future that opens it: ``view`` starts serving at once and opens the cube
    (imports of xarray, zarr and dask: most of a start) in a thread meanwhile; API requests wait
    for it, the page and its files do not."""

    view: View | None = None
    future: asyncio.Future | None = None
    static: dict = field(default_factory=static_files)

    async def ready(self) -> View:
        if self.view is None:
            assert self.future is not None
            try:
                self.view = await asyncio.shield(self.future)
            except (ViewError, AnalysisError) as exc:
                raise ViewError(f"the cube could not be opened: {exc}", 503) from None
            except Exception as exc:  # a damaged store says many things; one line, no traceback
                log.exception("view: opening the cube failed")
                raise ViewError(f"the cube could not be opened: {type(exc).__name__}: {exc}", 503) from None
        return self.view


def _view(request: web.Request) -> View:
    view = request.app[KEY].view
    assert view is not None  # the middleware waited for it
    return view


def _json(data: Any, status: int = 200) -> web.Response:
    import orjson

    body = orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
    return web.Response(body=body, status=status, content_type="application/json",
                        headers={"Cache-Control": "no-store"})


async def _in_thread(request: web.Request, fn: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(_view(request).pool, fn, *args)


@web.middleware
async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every failure as JSON ``{"error": ...}``: 4xx for the request's fault, 500 with the
    exception's type for ours; never a traceback in a response."""
    try:
        if request.path.startswith("/api/"):
            await request.app[KEY].ready()
        response = await handler(request)
    except ViewError as exc:
        return _json({"error": str(exc)}, exc.status)
    except AnalysisError as exc:
        return _json({"error": str(exc)}, 422)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _json({"error": exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason},
                     exc.status)
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise
    except Exception as exc:
        log.exception("view: %s %s failed", request.method, request.path_qs)
        return _json({"error": f"internal error ({type(exc).__name__}); see the server's log"}, 500)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    return response


def _query(request: web.Request, name: str) -> str:
    value = request.query.get(name)
    if value is None or value == "":
        raise ViewError(f"missing query parameter {name!r}")
    if len(value) > 200:
        raise ViewError(f"query parameter {name!r} is too long")
    return value


# -------------------------------------------------------------------- handlers

async def index(request: web.Request) -> web.Response:
    body, ctype = request.app[KEY].static["index.html"]
    return web.Response(body=body, content_type=ctype, headers={"Cache-Control": "no-cache"})


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    hit = request.app[KEY].static.get(name)
    if hit is None:  # a fixed list: ../, %2e%2e, absolute paths and symlinks never reach the disk
        raise ViewError(f"no static file {name!r}", 404)
    return web.Response(body=hit[0], content_type=hit[1], headers={"Cache-Control": "no-cache"})


async def info(request: web.Request) -> web.Response:
    view = _view(request)
    return _json({**view.data.info(), "coexpression": view.coexpression.status(),
                  "seed_planes": list(view.coexpressions), "maps": view.maps(),
                  "max_upload_bytes": MAX_UPLOAD_BYTES})


async def find(request: web.Request) -> web.Response:
    q = request.query.get("q", "")
    if len(q) > 100:
        raise ViewError("q: at most 100 characters")
    limit = parse_int(request.query.get("limit", "20"), "limit", 1, 100)
    return _json({"q": q, "matches": _view(request).data.find(q, limit)})


async def gene(request: web.Request) -> web.Response:
    return _json(_view(request).data.gene(_query(request, "gene")))


async def experiment(request: web.Request) -> web.Response:
    view = _view(request)
    eid = parse_int(_query(request, "id"), "id")
    row = view.data.experiment(eid)
    return _json({**row, "same_gene": view.data.gene(str(row.get("gene")))["experiments"]})


async def slice_(request: web.Request) -> web.Response:
    view = _view(request)
    key = _query(request, "layer")
    axis = _query(request, "axis")
    index_ = parse_int(_query(request, "index"), "index", 0, 10_000)
    start = time.perf_counter()
    layer = view.data.cached(key) if key.startswith(("seed:", "map:")) else None
    if layer is None:
        layer = await _in_thread(request, view.data.layer, key, view.make_layer)
    out = view.data.slice(layer, axis, index_)
    response = _json(out)
    response.headers["Server-Timing"] = f"slice;dur={(time.perf_counter() - start) * 1000:.1f}"
    return response


async def voxel(request: web.Request) -> web.Response:
    view = _view(request)
    z, y, x = (parse_int(_query(request, n), n, 0, 10_000) for n in "zyx")
    keys = [k for k in request.query.get("layers", "").split(";") if k][:4]
    return _json(await _in_thread(request, view.data.voxel, z, y, x, keys, view.make_layer))


async def seed(request: web.Request) -> web.Response:
    view = _view(request)
    z, y, x = (parse_int(_query(request, n), n, 0, 10_000) for n in "zyx")
    co = view.seed_plane(request.query.get("plane", "coronal"))

    def compute() -> dict:
        start = time.perf_counter()
        layer = view.data.put(co.layer(z, y, x), keep=8)
        ms = (time.perf_counter() - start) * 1000
        return {"layer": layer.key, "title": layer.title, "ms": round(ms, 1), "top_genes": co.top_genes(z, y, x),
                **{k: v for k, v in co.status().items() if k in ("experiments", "voxels", "plane", "dtype")}}

    return _json(await _in_thread(request, compute))


async def coexpression_status(request: web.Request) -> web.Response:
    view = _view(request)
    return _json({**view.coexpression.status(), "planes": {p: c.status() for p, c in view.coexpressions.items()}})


async def maps(request: web.Request) -> web.Response:
    return _json({"maps": _view(request).maps()})


def _sniff(name: str, head: bytes) -> str:
    """The image type the bytes are, checked against the name's suffix (a 415 otherwise)."""
    lower = name.lower()
    if lower.endswith(".mnc"):
        if head.startswith(b"\x89HDF\r\n\x1a\n") or head[:3] == b"CDF":
            return ".mnc"
        raise ViewError(f"{name}: not a MINC file (neither MINC2/HDF5 nor MINC1/netCDF)", 415)
    if lower.endswith(".nii.gz"):
        if head[:2] != b"\x1f\x8b":
            raise ViewError(f"{name}: not gzip-compressed", 415)
        try:
            inner = gzip.GzipFile(fileobj=io.BytesIO(head)).read(348)
        except (OSError, EOFError):
            raise ViewError(f"{name}: a damaged gzip stream", 415) from None
        _nifti_header(name, inner)
        return ".nii.gz"
    if lower.endswith(".nii"):
        _nifti_header(name, head)
        return ".nii"
    raise ViewError(f"{name}: upload a MINC (.mnc) or NIfTI (.nii, .nii.gz) map", 415)


def _nifti_header(name: str, head: bytes) -> None:
    """NIfTI-1 (348-byte header, magic n+1/ni1) or NIfTI-2 (540, n+2), either byte order."""
    sizes = {int.from_bytes(head[:4], order) for order in ("little", "big")} if len(head) >= 4 else set()
    if 348 in sizes and len(head) >= 348 and head[344:347] in (b"n+1", b"ni1"):
        return
    if 540 in sizes and head[4:7] in (b"n+2", b"ni2"):
        return
    raise ViewError(f"{name}: not a NIfTI image (bad header)", 415)


async def upload(request: web.Request) -> web.Response:
    view = _view(request)
    if request.content_length is not None and request.content_length > MAX_UPLOAD_BYTES + 64 * 1024:
        raise ViewError(f"the upload is larger than {MAX_UPLOAD_BYTES // 2**20} MB", 413)
    if not request.content_type.startswith("multipart/"):
        raise ViewError("upload the map as multipart/form-data with a field named 'file'", 400)
    reader = await request.multipart()
    part = await reader.next()
    while part is not None and getattr(part, "name", None) != "file":
        part = await reader.next()
    if part is None:
        raise ViewError("no field named 'file' in the upload", 400)
    name = Path(part.filename or "").name  # the client's name, for display only
    if not name:
        raise ViewError("the uploaded file has no name", 400)
    suffix = ".nii.gz" if name.lower().endswith(".nii.gz") else Path(name).suffix.lower()
    key = f"upload:{secrets.token_hex(8)}"
    dest = view.tmp / f"{key.split(':')[1]}{suffix}"
    size, head = 0, b""
    with open(dest, "wb") as f:
        while chunk := await part.read_chunk(1 << 16):
            size += len(chunk)
            if size > MAX_UPLOAD_BYTES:
                f.close()
                dest.unlink(missing_ok=True)
                raise ViewError(f"the upload is larger than {MAX_UPLOAD_BYTES // 2**20} MB", 413)
            if len(head) < 4096:
                head += chunk[:4096 - len(head)]
            f.write(chunk)
    try:
        _sniff(name, head)
        from ambasync.imaging.regrid import read_image

        await _in_thread(request, read_image, str(dest))  # a readable 3-D image (whether it fits: the search says)
    except (ViewError, AnalysisError) as exc:
        dest.unlink(missing_ok=True)
        if isinstance(exc, AnalysisError):
            raise ViewError(str(exc).replace(str(dest), name), 422) from None
        raise
    view.uploads[key] = (str(dest), name)
    return _json({"key": key, "name": name, "bytes": size}, 201)


async def search_start(request: web.Request) -> web.Response:
    view = _view(request)
    try:
        body = await request.json()
    except Exception:
        raise ViewError("the body must be JSON: {\"map\": KEY, \"nulls\": N}") from None
    if not isinstance(body, dict) or not isinstance(body.get("map"), str):
        raise ViewError("the body must be JSON: {\"map\": KEY, \"nulls\": N}")
    nulls = body.get("nulls", 100)
    if isinstance(nulls, bool) or not isinstance(nulls, int) or not 0 <= nulls <= MAX_NULLS:
        raise ViewError(f"nulls: an integer 0..{MAX_NULLS}")
    path, name = view.map_path(body["map"])
    if not view.search_lock.acquire(blocking=False):
        raise ViewError("a search is already running; wait for it to finish", 409)
    job = SearchJob(secrets.token_hex(6), body["map"], name, nulls)
    view.jobs[job.id] = job
    asyncio.get_running_loop().run_in_executor(view.search_pool, view.run_search, job, path)
    return _json(job.as_json(0), 202)


def _job(request: web.Request) -> SearchJob:
    job = _view(request).jobs.get(request.match_info["job"])
    if job is None:
        raise ViewError(f"no search {request.match_info['job']!r}", 404)
    return job


async def search_status(request: web.Request) -> web.Response:
    rows = parse_int(request.query.get("rows", "50"), "rows", 0, 1000)
    return _json(_job(request).as_json(rows))


async def search_csv(request: web.Request) -> web.Response:
    job = _job(request)
    if job.table is None:
        raise ViewError(f"search {job.id} has no results ({job.state})", 409)
    return web.Response(body=job.table.to_csv(index=False).encode(), content_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="search-{job.id}.csv"'})


async def search_png(request: web.Request) -> web.Response:
    job = _job(request)
    if job.picture is None or not job.picture.is_file():
        raise ViewError(f"search {job.id} has no picture ({job.state})", 409)
    return web.Response(body=job.picture.read_bytes(), content_type="image/png",
                        headers={"Content-Disposition": f'attachment; filename="search-{job.id}.png"'})


async def not_found(request: web.Request) -> web.Response:
    raise ViewError(f"no such page: {request.path[:200]}", 404)


def make_app(view: View | Callable[[], View], close_view: bool = True) -> web.Application:
    """The app on ``view``, or on the view ``view()`` opens in a thread once the app has started
    (``python -m ambasync view`` answers at once, the cube opening meanwhile). ``close_view``: the
    app's cleanup closes the view (pools, temporary folder)."""
    app = web.Application(middlewares=[errors], client_max_size=MAX_UPLOAD_BYTES + 64 * 1024)
    opening = Opening(view if isinstance(view, View) else None)
    app[KEY] = opening
    r = app.router
    r.add_get("/", index)
    r.add_get("/static/{name}", static)
    r.add_get("/api/info", info)
    r.add_get("/api/find", find)
    r.add_get("/api/gene", gene)
    r.add_get("/api/experiment", experiment)
    r.add_get("/api/slice", slice_)
    r.add_get("/api/voxel", voxel)
    r.add_get("/api/seed", seed)
    r.add_get("/api/coexpression", coexpression_status)
    r.add_get("/api/maps", maps)
    r.add_post("/api/maps", upload)
    r.add_post("/api/search", search_start)
    r.add_get("/api/search/{job}", search_status)
    r.add_get("/api/search/{job}/results.csv", search_csv)
    r.add_get("/api/search/{job}/picture.png", search_png)
    r.add_route("*", "/{tail:.*}", not_found)

    if opening.view is None:
        async def start_opening(_: web.Application) -> None:
            opening.future = asyncio.get_running_loop().run_in_executor(None, view)  # type: ignore[arg-type]

        app.on_startup.append(start_opening)

    async def cleanup(_: web.Application) -> None:
        if opening.future is not None and not opening.future.done():
            try:
                await opening.future
            except Exception:
                pass
        if opening.view is None and opening.future is not None and opening.future.done() \
                and opening.future.exception() is None:
            opening.view = opening.future.result()
        if opening.view is not None:
            opening.view.close()

    if close_view:
        app.on_cleanup.append(cleanup)
    return app


__all__ = ["KEY", "MAX_UPLOAD_BYTES", "Opening", "View", "make_app"]
