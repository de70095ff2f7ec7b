"""HTTP for ambasync: one polite aiohttp session, bounded bodies, classified errors, retries.

Every failure is turned into a :class:`TransientError` (retry with backoff) or a
:class:`PermanentError` (retrying cannot help), each naming the URL; :func:`retrying`
returns what the attempts gave as a value. :class:`ambasync.mirror.source.AllenSource` owns the
session and uses these.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Generic, TypeVar

import aiohttp
import yarl
from aiohttp.helpers import get_env_proxy_for_url

from ambasync.config import DownloadConfig
from ambasync.errors import ExperimentError, PermanentError, TransientError

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_STATUSES = {408, 429, 500, 502, 503, 504}
# Redirects followed per request. The Allen API answers grids and pages directly; a proxy or a
# CDN in front of it may add a hop or two. More than this is a loop, and retrying cannot help.
MAX_REDIRECTS = 5


@dataclass
class Response:
    body: bytes
    last_modified: str | None
    etag: str | None


def make_session(cfg: DownloadConfig, base_url: str) -> aiohttp.ClientSession:
    """One session for the run: connections reused, at most ``concurrency`` to the host.

    Proxies come from the environment (HTTP_PROXY, HTTPS_PROXY, NO_PROXY; credentials from the
    proxy URL or ~/.netrc) by aiohttp's own rules, looked up once here: ``trust_env=True`` does
    it, and reads ~/.netrc, in a thread on every request (measured: a quarter of the event
    loop's CPU at loopback speed).
    """
    connector = aiohttp.TCPConnector(limit=cfg.concurrency, limit_per_host=cfg.concurrency, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(
        total=cfg.total_timeout, connect=cfg.connect_timeout, sock_connect=cfg.connect_timeout, sock_read=cfg.read_timeout
    )
    try:
        proxy, proxy_auth = get_env_proxy_for_url(yarl.URL(base_url))
    except LookupError:  # none set, or NO_PROXY covers the host
        proxy, proxy_auth = None, None
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        headers={"User-Agent": cfg.user_agent},
        proxy=proxy,
        proxy_auth=proxy_auth,
        trust_env=False,
        auto_decompress=True,
    )


def retry_after_seconds(value: str | None) -> float | None:
    """Parse a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Throttle:
    """Shared politeness: an optional request-rate cap and a pause all workers honour after a 429."""

    def __init__(self, requests_per_second: float = 0.0):
        self._interval = 1.0 / requests_per_second if requests_per_second > 0 else 0.0
        self._next_slot = 0.0
        self._paused_until = 0.0
        self._lock = asyncio.Lock()

    def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    async def wait(self) -> None:
        async with self._lock:
            now = time.monotonic()
            start = max(now, self._next_slot, self._paused_until)
            self._next_slot = start + self._interval
        if start > now:
            await asyncio.sleep(start - now)


async def get_bytes(
    session: aiohttp.ClientSession, url: str, max_bytes: int, throttle: Throttle | None = None
) -> Response:
    """GET ``url`` into memory, refusing bodies over ``max_bytes``; errors are classified."""
    if throttle is not None:
        await throttle.wait()
    try:
        async with session.get(yarl.URL(url, encoded=True), max_redirects=MAX_REDIRECTS) as resp:
            if resp.status != 200:
                retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
                if resp.status == 429 and throttle is not None:
                    throttle.pause(retry_after if retry_after is not None else 1.0)
                reason = f"HTTP {resp.status} {resp.reason or ''} from {url}".replace("  ", " ")
                if resp.status in RETRY_STATUSES:
                    raise TransientError(reason, retry_after=retry_after)
                raise PermanentError(reason)
            declared = resp.content_length
            if declared is not None and declared > max_bytes:
                raise PermanentError(f"{url} announces {declared} bytes, over the limit of {max_bytes}")
            if declared is not None:  # the parser stops at Content-Length: one read, no chunk loop
                body = await resp.read()
            else:
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > max_bytes:
                        raise PermanentError(f"{url} sent more than {max_bytes} bytes: abandoned")
                    chunks.append(chunk)
                body = b"".join(chunks)
            return Response(body, resp.headers.get("Last-Modified"), resp.headers.get("ETag"))
    except ExperimentError:
        raise
    except asyncio.TimeoutError:
        raise TransientError(f"timed out reading {url}") from None
    except aiohttp.ClientPayloadError as exc:
        raise TransientError(f"body of {url} was cut short ({exc})") from None
    except aiohttp.TooManyRedirects as exc:
        last = exc.history[-1].headers.get("Location", "?") if exc.history else "?"
        raise PermanentError(f"{url} redirects more than {MAX_REDIRECTS} times (a redirect loop; the last hop "
                             f"pointed to {last})") from None
    except aiohttp.RedirectClientError as exc:  # to ftp:, file:, or no valid URL at all
        target = exc.args[0] if exc.args else "?"
        raise PermanentError(f"{url} redirects to {target}, which is not an HTTP(S) URL: refused") from None
    except aiohttp.ClientResponseError as exc:
        raise TransientError(f"bad response from {url}: {exc.message}") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise TransientError(f"cannot reach {url}: {exc or type(exc).__name__}") from None


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Full-jitter exponential backoff; a server's Retry-After is a floor (bounded by ``cap``,
    so one answer cannot park a worker for hours)."""
    delay = random.uniform(0, min(cap, base * (2 ** attempt)))
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay


@dataclass(frozen=True)
class Tried(Generic[T]):
    """What retrying gave: the value, or the error that ended it; and how many attempts it took."""

    value: T | None
    error: ExperimentError | None
    attempts: int


async def retrying(action: Callable[[], Awaitable[T]], cfg: DownloadConfig, what: str) -> Tried[T]:
    """Run ``action`` until it succeeds, a permanent error occurs, or ``cfg.attempts`` run out.
    Errors that stop the run (:class:`RunError`) pass through."""
    for attempt in range(1, cfg.attempts + 1):
        try:
            return Tried(await action(), None, attempt)
        except TransientError as exc:
            if attempt >= cfg.attempts:
                return Tried(None, TransientError(f"{exc.reason} (gave up after {cfg.attempts} attempts)"), attempt)
            delay = backoff_delay(attempt - 1, cfg.backoff_base, cfg.backoff_max, exc.retry_after)
            log.debug("%s: %s; retry %d in %.2fs", what, exc.reason, attempt, delay)
            await asyncio.sleep(delay)
        except ExperimentError as exc:  # permanent: retrying cannot help
            return Tried(None, exc, attempt)
    raise ValueError(f"download.attempts must be at least 1, not {cfg.attempts}")
