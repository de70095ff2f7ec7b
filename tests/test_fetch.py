"""Politeness and retries without a server: what a lab would notice if these broke is a mirror
that hammers the Allen API after a 429, waits for hours on one bad header, or gives up early."""

import asyncio
import email.utils
import time

import pytest

from ambasync.config import DownloadConfig
from ambasync.errors import PermanentError, RunError, TransientError
from ambasync.mirror.fetch import Throttle, backoff_delay, retry_after_seconds, retrying


@pytest.mark.parametrize("header, expected", [
    ("120", 120.0), (" 3.5 ", 3.5), ("0", 0.0), ("-4", 0.0), ("", None), (None, None), ("soon", None),
])
def test_retry_after_in_seconds_is_read_and_never_negative(header, expected):
    assert retry_after_seconds(header) == expected


def test_retry_after_as_an_http_date_is_the_time_left_until_then():
    when = email.utils.formatdate(time.time() + 90, usegmt=True)
    assert 85 <= retry_after_seconds(when) <= 90
    assert retry_after_seconds(email.utils.formatdate(time.time() - 90, usegmt=True)) == 0.0


def test_backoff_grows_with_attempts_is_capped_and_honours_retry_after_up_to_the_cap():
    for attempt in range(8):
        delays = [backoff_delay(attempt, base=1.0, cap=10.0) for _ in range(200)]
        assert all(0.0 <= d <= min(10.0, 2.0 ** attempt) for d in delays)
    assert max(backoff_delay(6, 1.0, 10.0) for _ in range(200)) > 5.0  # full jitter reaches high
    assert all(backoff_delay(0, 1.0, 10.0, retry_after=4.0) >= 4.0 for _ in range(50))  # a floor
    assert all(backoff_delay(0, 1.0, 10.0, retry_after=3600.0) == 10.0 for _ in range(50))  # never hours


async def test_a_429_pause_holds_every_worker_and_a_rate_cap_spaces_requests():
    throttle = Throttle()
    throttle.pause(0.2)
    start = time.monotonic()
    await asyncio.gather(*(throttle.wait() for _ in range(3)))
    assert time.monotonic() - start >= 0.19  # nobody went before the pause ended

    capped = Throttle(requests_per_second=20)  # one request every 50 ms
    start = time.monotonic()
    await asyncio.gather(*(capped.wait() for _ in range(5)))
    assert time.monotonic() - start >= 4 * 0.05 - 0.01  # the fifth waited for four intervals


def _policy(attempts: int) -> DownloadConfig:
    return DownloadConfig(attempts=attempts, backoff_base=0.001, backoff_max=0.002)


async def test_transient_errors_are_retried_until_success_and_the_attempts_counted():
    calls = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise TransientError("HTTP 503 from http://x")
        return "body"

    tried = await retrying(flaky, _policy(5), "test")
    assert (tried.value, tried.error, tried.attempts) == ("body", None, 3)


async def test_giving_up_says_so_and_a_permanent_error_is_not_retried():
    async def always_503() -> str:
        raise TransientError("HTTP 503 from http://x")

    tried = await retrying(always_503, _policy(3), "test")
    assert tried.value is None and tried.attempts == 3 and tried.error.transient
    assert "HTTP 503 from http://x (gave up after 3 attempts)" == tried.error.reason

    calls = []

    async def gone() -> str:
        calls.append(1)
        raise PermanentError("HTTP 404 from http://x")

    tried = await retrying(gone, _policy(5), "test")
    assert len(calls) == 1 and tried.attempts == 1 and not tried.error.transient


async def test_an_error_that_stops_the_run_is_not_swallowed_by_retries():
    async def disk_full() -> str:
        raise RunError("no space left")

    with pytest.raises(RunError):
        await retrying(disk_full, _policy(5), "test")
