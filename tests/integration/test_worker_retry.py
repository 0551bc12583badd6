"""Retries through a real worker and database: Retry-After, giving up, redirects.

Each test runs the product's worker in this process against a fresh database and the
in-process upstream server. Retry-After waits of 30 s and 45 s are scaled down to
a few seconds, and ``FULL=1`` runs them at full length.
"""

from __future__ import annotations

import datetime
import logging
from email.utils import format_datetime

import pytest

from tests.support.faults import (
    InProcessWorker,
    attempts,
    defer_job,
    events,
    fleet_settings,
    insert_job,
    job,
    query,
    wait_for_status,
    wait_until,
)
from tests.support.upstream import Upstream


@pytest.fixture
def retry_after_seconds(full_run: bool) -> int:
    """Return the Retry-After wait under test: 30 s in a full run, else 2 s."""
    return 30 if full_run else 2


def test_retry_after_seconds_honoured(
    database_url: str, upstream: Upstream, retry_after_seconds: int
) -> None:
    wait = retry_after_seconds
    upstream.retry_after("/jokes/random", 429, str(wait), times=2)
    settings = fleet_settings(
        database_url, upstream.url, RETRY_BASE_DELAY="0.1", RETRY_MAX_DELAY="0.2"
    )
    with InProcessWorker(settings):
        job_id = defer_job(settings, "fetch_joke")
        wait_for_status(database_url, job_id, "succeeded", timeout=3 * wait + 15)

    requests = upstream.requests("/jokes/random")
    assert [r.status for r in requests] == [429, 429, 200]
    for earlier, later in zip(requests, requests[1:]):
        assert earlier.ended_at is not None
        assert later.started_at - earlier.ended_at >= wait - 0.05

    rows = attempts(database_url, job_id)
    assert [row["outcome"] for row in rows] == ["error", "error", "succeeded"]
    for row in rows[:2]:
        assert row["http_status"] == 429
        assert row["retry_after"] == str(wait)
        gap = (row["next_attempt_at"] - row["ended_at"]).total_seconds()
        assert gap >= wait - 0.05
    assert job(database_url, job_id)["attempts"] == 3


def test_retry_after_http_date_honoured(
    database_url: str, upstream: Upstream, full_run: bool
) -> None:
    ahead = 45 if full_run else 4
    when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
        seconds=ahead
    )
    upstream.retry_after("/jokes/random", 503, format_datetime(when, usegmt=True),
                         times=1)
    settings = fleet_settings(database_url, upstream.url)
    with InProcessWorker(settings):
        job_id = defer_job(settings, "fetch_joke")
        wait_for_status(database_url, job_id, "succeeded", timeout=ahead + 15)

    first, second = upstream.requests("/jokes/random")
    assert first.status == 503
    assert first.ended_at is not None
    # An HTTP date has whole seconds, so the wait may be up to 1 s shorter.
    assert second.started_at - first.ended_at >= ahead - 1.05


def test_absurd_retry_after_capped(database_url: str, upstream: Upstream) -> None:
    upstream.retry_after("/jokes/random", 429, "86400")
    settings = fleet_settings(database_url, upstream.url, RETRY_AFTER_MAX="60")
    with InProcessWorker(settings):
        job_id = defer_job(settings, "fetch_joke")
        wait_until(lambda: attempts(database_url, job_id), 10, "the first attempt")
        row = wait_for_status(database_url, job_id, "todo", timeout=10)

    (attempt,) = attempts(database_url, job_id)
    gap = (attempt["next_attempt_at"] - attempt["ended_at"]).total_seconds()
    assert 59 <= gap <= 60.5
    assert row["scheduled_at"] == attempt["next_attempt_at"]
    assert upstream.count("/jokes/random") == 1


def test_rate_limited_job_gives_up(
    database_url: str, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "workers.middleware")
    upstream.retry_after("/jokes/random", 429, "1")
    settings = fleet_settings(
        database_url, upstream.url, RETRY_MAX_ATTEMPTS="5",
        RETRY_BASE_DELAY="0.1", RETRY_MAX_DELAY="0.2",
    )
    with InProcessWorker(settings):
        job_id = defer_job(settings, "fetch_joke")
        wait_for_status(database_url, job_id, "failed", timeout=30)

    assert upstream.count("/jokes/random") == 5
    rows = attempts(database_url, job_id)
    assert [row["outcome"] for row in rows] == ["error"] * 4 + ["failed"]
    assert [row["http_status"] for row in rows] == [429] * 5
    assert [row["retry_after"] for row in rows] == ["1"] * 5
    assert rows[-1]["error_message"] == (
        "gave up after 5 attempts; last error: HTTP 429 from /jokes/random"
    )
    job_records = [r for r in caplog.records if getattr(r, "job_id", None) == job_id]
    retries = [r for r in job_records if r.levelno == logging.WARNING]
    failures = [r for r in job_records if r.levelno == logging.ERROR]
    assert len(retries) == 4
    assert len(failures) == 1
    assert "HTTP 429" in failures[0].getMessage()


def test_server_errors_exhaust_attempts(database_url: str, upstream: Upstream) -> None:
    upstream.respond("/jokes/random", status=503)
    settings = fleet_settings(
        database_url, upstream.url, RETRY_BASE_DELAY="0.05", RETRY_MAX_DELAY="0.1"
    )
    with InProcessWorker(settings):
        job_id = defer_job(settings, "fetch_joke")
        wait_for_status(database_url, job_id, "failed", timeout=30)

    rows = attempts(database_url, job_id)
    assert len(rows) == 5
    assert rows[-1]["error_message"] == (
        "gave up after 5 attempts; last error: HTTP 503 from /jokes/random"
    )
    started = [e for e in events(database_url, job_id) if e["type"] == "started"]
    assert len(started) == 5
    assert query(database_url, "SELECT * FROM job_results") == []


def test_client_error_fails_at_once(database_url: str, upstream: Upstream) -> None:
    upstream.respond("/items/9", status=404, method="DELETE")
    settings = fleet_settings(database_url, upstream.url)
    with InProcessWorker(settings):
        job_id = defer_job(settings, "call_api", method="DELETE", path="/items/9")
        wait_for_status(database_url, job_id, "failed", timeout=10)

    (row,) = attempts(database_url, job_id)
    assert row["error_message"] == "not retryable: HTTP 404 from /items/9"
    assert upstream.count("/items/9") == 1


def test_invalid_arguments_fail_without_request(
    database_url: str, upstream: Upstream
) -> None:
    # Written by SQL, because a defer would reject these arguments at once.
    settings = fleet_settings(database_url, upstream.url)
    job_id = insert_job(database_url, "call_api",
                        {"method": "GET", "path": "/../admin"})
    with InProcessWorker(settings):
        wait_for_status(database_url, job_id, "failed", timeout=10)

    (row,) = attempts(database_url, job_id)
    assert row["error_type"] == "InvalidTaskArguments"
    assert "'..'" in row["error_message"]
    assert upstream.stats()["total"] == 0


def test_permanent_redirect_fails_once(database_url: str, upstream: Upstream) -> None:
    upstream.redirect("/jokes/random", 301, "/v2/jokes/random")
    settings = fleet_settings(database_url, upstream.url)
    with InProcessWorker(settings):
        job_id = defer_job(settings, "fetch_joke")
        wait_for_status(database_url, job_id, "failed", timeout=10)

    (row,) = attempts(database_url, job_id)
    assert row["error_message"] == (
        "not retryable: HTTP 301 redirect to /v2/jokes/random; update "
        "API_BASE_URL or the path"
    )
    assert job(database_url, job_id)["attempts"] == 1
    assert upstream.count("/jokes/random") == 1
    assert upstream.count("/v2/jokes/random") == 0
    assert query(database_url, "SELECT * FROM job_results") == []


def test_same_host_307_keeps_key(database_url: str, upstream: Upstream) -> None:
    upstream.redirect("/items", 307, "/v2/items", method="POST")
    upstream.respond("/v2/items", status=201, json={"id": 5}, method="POST")
    settings = fleet_settings(database_url, upstream.url)
    with InProcessWorker(settings):
        job_id = defer_job(
            settings, "call_api", method="POST", path="/items", json={"name": "a"}
        )
        wait_for_status(database_url, job_id, "succeeded", timeout=10)

    (moved,) = upstream.requests("/v2/items")
    assert moved.method == "POST"
    assert moved.json() == {"name": "a"}
    assert moved.headers["Idempotency-Key"] == str(job_id)
    (result,) = query(database_url, "SELECT * FROM job_results")
    assert result["result"] == {"http_status": 201, "body": {"id": 5}}


def test_cross_host_308_rejected(database_url: str, upstream: Upstream) -> None:
    with Upstream() as other:
        upstream.redirect("/items", 308, f"{other.url}/items", method="POST")
        settings = fleet_settings(database_url, upstream.url)
        with InProcessWorker(settings):
            job_id = defer_job(
                settings, "call_api", method="POST", path="/items", json={"name": "a"}
            )
            wait_for_status(database_url, job_id, "failed", timeout=10)
        assert other.stats()["total"] == 0

    (row,) = attempts(database_url, job_id)
    assert f"{other.url}/items" in row["error_message"]
    assert "outside API_BASE_URL" in row["error_message"]


def test_redirect_loop_fails(database_url: str, upstream: Upstream) -> None:
    upstream.redirect("/loop", 307, "/loop")
    settings = fleet_settings(database_url, upstream.url)
    with InProcessWorker(settings):
        job_id = defer_job(settings, "call_api", method="GET", path="/loop")
        wait_for_status(database_url, job_id, "failed", timeout=10)

    (row,) = attempts(database_url, job_id)
    assert "too many redirects" in row["error_message"]
    assert upstream.count("/loop") <= 6


def test_post_carries_job_id_key(database_url: str, upstream: Upstream) -> None:
    upstream.respond("/items", status=500, method="POST", times=1)
    upstream.respond("/items", status=201, json={"id": 1}, method="POST")
    settings = fleet_settings(
        database_url, upstream.url, RETRY_BASE_DELAY="0.05", RETRY_MAX_DELAY="0.1"
    )
    with InProcessWorker(settings):
        job_id = defer_job(
            settings, "call_api", method="POST", path="/items", json={"n": 1}
        )
        get_id = defer_job(settings, "call_api", method="GET", path="/items")
        wait_for_status(database_url, job_id, "succeeded", timeout=15)
        wait_for_status(database_url, get_id, "succeeded", timeout=15)

    posts = upstream.requests("/items", method="POST")
    assert [r.headers.get("Idempotency-Key") for r in posts] == [str(job_id)] * 2
    (get,) = upstream.requests("/items", method="GET")
    assert "Idempotency-Key" not in get.headers
    results = query(
        database_url, "SELECT * FROM job_results WHERE job_id = %s", (job_id,)
    )
    assert len(results) == 1
