"""Tests of the retry policy: backoff, jitter, classification and Retry-After."""

from __future__ import annotations

import asyncio
import datetime
import random
from email.utils import format_datetime

import httpx
import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from procrastinate.jobs import Job

from workers.app import retry_strategy
from workers.errors import InvalidTaskArguments
from workers.retry import (
    BackoffRetry,
    JobTimeout,
    RedirectRejected,
    UpstreamHTTPError,
    backoff_ceiling,
    describe_failure,
    is_retryable,
    parse_retry_after,
)
from workers.settings import load_settings
from workers.tasks.catalog import TASKS

NOW = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.timezone.utc)


def make_job(attempts: int = 0) -> Job:
    return Job(
        id=1, queue="api_calls", lock=None, queueing_lock=None,
        task_name="fetch_joke", attempts=attempts,
    )


def delay_of(strategy: BackoffRetry, exc: BaseException, attempts: int) -> float:
    decision = strategy.get_retry_decision(exception=exc, job=make_job(attempts))
    assert decision is not None and decision.retry_at is not None
    now = datetime.datetime.now(datetime.timezone.utc)
    return (decision.retry_at - now).total_seconds()


def test_backoff_doubles_from_base() -> None:
    assert [backoff_ceiling(2, 300, n) for n in range(6)] == [2, 4, 8, 16, 32, 64]


def test_backoff_capped_at_max_delay() -> None:
    assert backoff_ceiling(2, 300, 8) == 300
    assert backoff_ceiling(2, 300, 10_000) == 300


@given(st.integers(min_value=-5, max_value=10**9))
def test_backoff_never_overflows(attempts: int) -> None:
    ceiling = backoff_ceiling(2.0, 300.0, attempts)
    assert 0 < ceiling <= 300


def test_backoff_zero_base_means_no_wait() -> None:
    assert backoff_ceiling(0, 300, 50) == 0


@given(st.integers(min_value=0, max_value=100_000), st.randoms(use_true_random=False))
def test_full_jitter_within_ceiling(attempts: int, rng: random.Random) -> None:
    strategy = BackoffRetry(base_delay=2, max_delay=300)
    delay = strategy.delay_for(attempts, rng)
    assert 0 <= delay <= backoff_ceiling(2, 300, attempts)


def test_full_jitter_spreads_delays() -> None:
    strategy = BackoffRetry(base_delay=2, max_delay=300)
    rng = random.Random(7)
    delays = {round(strategy.delay_for(6, rng), 3) for _ in range(50)}
    assert len(delays) > 40
    assert min(delays) < 64 / 4
    assert max(delays) > 64 * 3 / 4


def test_no_jitter_uses_ceiling() -> None:
    strategy = BackoffRetry(base_delay=2, max_delay=300, jitter=False)
    assert [strategy.delay_for(n) for n in (0, 3, 10_000)] == [2, 16, 300]


def test_defaults_match_documented_policy() -> None:
    settings = load_settings({})
    strategy = retry_strategy(settings, TASKS["fetch_joke"])
    assert strategy.base_delay == 2
    assert strategy.max_delay == 300
    assert strategy.max_attempts == 5
    assert strategy.jitter is True
    assert strategy.retry_after_max == 3600


def test_catalog_overrides_per_task() -> None:
    settings = load_settings({"RETRY_MAX_ATTEMPTS": "7"})
    assert retry_strategy(settings, TASKS["call_api"]).max_attempts == 7
    assert retry_strategy(settings, TASKS["health_check"]).max_attempts == 1


def test_gives_up_after_max_attempts() -> None:
    strategy = BackoffRetry(max_attempts=5)
    assert [strategy.gives_up(n) for n in range(6)] == [
        False, False, False, False, True, True
    ]


def test_fifth_failure_is_final() -> None:
    strategy = BackoffRetry(max_attempts=5, base_delay=0.01, max_delay=0.01)
    error = UpstreamHTTPError(503, "/jokes/random")
    for attempts in range(4):
        decision = strategy.get_retry_decision(
            exception=UpstreamHTTPError(503, "/jokes/random"), job=make_job(attempts)
        )
        assert decision is not None
    assert strategy.get_retry_decision(exception=error, job=make_job(4)) is None


@pytest.mark.parametrize(
    "error",
    [
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
        httpx.RemoteProtocolError("reset"),
        JobTimeout("job timed out after 30 s"),
        UpstreamHTTPError(500, "/x"),
        UpstreamHTTPError(502, "/x"),
        UpstreamHTTPError(503, "/x"),
        UpstreamHTTPError(599, "/x"),
        UpstreamHTTPError(408, "/x"),
        UpstreamHTTPError(429, "/x"),
        psycopg.OperationalError("server closed the connection"),
    ],
    ids=repr,
)
def test_transient_errors_retryable(error: BaseException) -> None:
    assert is_retryable(error)


@pytest.mark.parametrize(
    "error",
    [
        UpstreamHTTPError(400, "/x"),
        UpstreamHTTPError(401, "/x"),
        UpstreamHTTPError(404, "/x"),
        UpstreamHTTPError(409, "/x"),
        UpstreamHTTPError(422, "/x"),
        InvalidTaskArguments("path is missing"),
        RedirectRejected("HTTP 301 redirect to /v2"),
        httpx.TooManyRedirects("loop"),
        ValueError("bug"),
        KeyError("bug"),
    ],
    ids=repr,
)
def test_permanent_errors_not_retryable(error: BaseException) -> None:
    assert not is_retryable(error)
    strategy = BackoffRetry()
    assert strategy.get_retry_decision(exception=error, job=make_job()) is None


def test_retry_after_seconds() -> None:
    assert parse_retry_after("30", NOW) == 30
    assert parse_retry_after(" 120 ", NOW) == 120
    assert parse_retry_after("0", NOW) == 0


def test_retry_after_http_date() -> None:
    later = NOW + datetime.timedelta(seconds=45)
    assert parse_retry_after(format_datetime(later, usegmt=True), NOW) == 45


def test_retry_after_past_date_is_zero() -> None:
    earlier = NOW - datetime.timedelta(hours=1)
    assert parse_retry_after(format_datetime(earlier, usegmt=True), NOW) == 0


@pytest.mark.parametrize(
    "value", [None, "", "soon", "-5", "1.5", "3e3", "\u0663\u0660", "Mon, 99 Foo"]
)
def test_retry_after_invalid_ignored(value: str | None) -> None:
    assert parse_retry_after(value, NOW) is None


def test_retry_after_sets_floor() -> None:
    strategy = BackoffRetry(base_delay=2, max_delay=300)
    error = UpstreamHTTPError(429, "/jokes/random", retry_after="30")
    assert 29 <= delay_of(strategy, error, 0) <= 30.5


def test_retry_after_date_on_503() -> None:
    strategy = BackoffRetry(base_delay=2, max_delay=300)
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
        seconds=45
    )
    error = UpstreamHTTPError(503, "/x", retry_after=format_datetime(later, True))
    assert 43 <= delay_of(strategy, error, 0) <= 46


def test_retry_after_capped() -> None:
    strategy = BackoffRetry(base_delay=2, max_delay=300, retry_after_max=3600)
    error = UpstreamHTTPError(429, "/x", retry_after="86400")
    assert 3599 <= delay_of(strategy, error, 0) <= 3600.5


def test_retry_after_ignored_on_500() -> None:
    strategy = BackoffRetry(base_delay=0.1, max_delay=0.1)
    error = UpstreamHTTPError(500, "/x", retry_after="600")
    assert delay_of(strategy, error, 0) <= 0.2


def test_retry_after_no_longer_than_backoff() -> None:
    strategy = BackoffRetry(base_delay=60, max_delay=60, jitter=False)
    error = UpstreamHTTPError(429, "/x", retry_after="1")
    assert 59 <= delay_of(strategy, error, 0) <= 60.5


def test_decision_cached_per_exception() -> None:
    strategy = BackoffRetry(base_delay=100, max_delay=100)
    error = UpstreamHTTPError(503, "/x")
    first = strategy.get_retry_decision(exception=error, job=make_job())
    second = strategy.get_retry_decision(exception=error, job=make_job())
    assert first is second


def test_shutdown_abort_always_requeued() -> None:
    strategy = BackoffRetry(max_attempts=1)
    error = asyncio.CancelledError()
    error.fleet_shutdown_abort = True  # type: ignore[attr-defined]
    decision = strategy.get_retry_decision(exception=error, job=make_job(9))
    assert decision is not None
    assert decision.retry_at is not None
    wait = decision.retry_at - datetime.datetime.now(datetime.timezone.utc)
    assert wait.total_seconds() <= 0


def test_user_cancellation_not_retried() -> None:
    strategy = BackoffRetry()
    decision = strategy.get_retry_decision(
        exception=asyncio.CancelledError(), job=make_job()
    )
    assert decision is None


def test_upcoming_delays_lists_remaining() -> None:
    strategy = BackoffRetry(max_attempts=5, base_delay=2, max_delay=300)
    assert strategy.upcoming_delays(0) == [
        (2, 0.0, 2), (3, 0.0, 4), (4, 0.0, 8), (5, 0.0, 16)
    ]
    assert strategy.upcoming_delays(3) == [(5, 0.0, 16)]
    assert strategy.upcoming_delays(4) == []


def test_upcoming_delays_without_jitter() -> None:
    strategy = BackoffRetry(max_attempts=3, base_delay=2, max_delay=3, jitter=False)
    assert strategy.upcoming_delays(0) == [(2, 2, 2), (3, 3, 3)]


def test_describe_failure_names_status_and_path() -> None:
    assert describe_failure(UpstreamHTTPError(503, "/jokes/random")) == (
        "HTTP 503 from /jokes/random"
    )
    assert describe_failure(httpx.ConnectError("refused")) == "ConnectError: refused"
    request = httpx.Request("POST", "http://user:pw@127.0.0.1:8001/items/4?token=x")
    assert describe_failure(httpx.ConnectError("refused", request=request)) == (
        "ConnectError: refused (POST http://127.0.0.1:8001/items/4)"
    )
    assert describe_failure(ValueError()) == "ValueError"
