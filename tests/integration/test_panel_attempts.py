"""The job page and manual retries against a real worker: Retry-After and numbering.

Jobs are deferred through the panel's form, run by the product's worker in this
process against a loopback upstream, and then read and retried through the panel.
"""

from __future__ import annotations

import datetime
import html
import re
from collections.abc import Iterator
from email.utils import format_datetime
from typing import Any

import pytest
from flask import Flask

from tests.integration.panel_worker_support import (
    defer_from_form,
    panel_for_upstream,
    post_with_token,
)
from tests.support.faults import (
    InProcessWorker,
    attempts,
    fleet_settings,
    job,
    wait_for_status,
    wait_until,
)
from tests.support.panel import logged_in_client
from tests.support.upstream import Upstream
from webpanel import db
from webpanel.job_timeline import mark_capped_retry_after
from webpanel.jobs import job_time

RETRY_AFTER_MAX = 3600.0  # seconds, the documented default cap


@pytest.fixture
def panel(database_url: str, upstream: Upstream) -> Iterator[Flask]:
    """Yield the panel on the test database, calling the test's upstream."""
    app = panel_for_upstream(database_url, upstream.url)
    yield app
    db.close_process_pool()


def _page_text(raw: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", raw)))


def _retry_plan(page: str) -> str:
    match = re.search(r'data-section="retry-schedule">(.*?)</section>', page, re.S)
    assert match is not None, "the job page has no retry schedule section"
    return _page_text(match.group(1))


def test_job_page_shows_capped_retry_after(
    database_url: str, upstream: Upstream, panel: Flask
) -> None:
    upstream.retry_after("/jokes/random", 429, "86400")
    settings = fleet_settings(database_url, upstream.url)
    assert settings.retry_after_max == RETRY_AFTER_MAX
    client = logged_in_client(panel, "operator")
    job_id = defer_from_form(client, "fetch_joke", {})

    with InProcessWorker(settings):
        wait_until(lambda: attempts(database_url, job_id), 15, "the first attempt")
        row = wait_for_status(database_url, job_id, "todo", timeout=10)

    (attempt,) = attempts(database_url, job_id)
    wait = (attempt["next_attempt_at"] - attempt["ended_at"]).total_seconds()
    assert RETRY_AFTER_MAX - 1 <= wait <= RETRY_AFTER_MAX + 0.5
    assert row["scheduled_at"] == attempt["next_attempt_at"]
    assert upstream.count("/jokes/random") == 1

    response = client.get(f"/jobs/{job_id}")
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    plan = _retry_plan(page)
    next_at = job_time(attempt["next_attempt_at"])
    assert f"Attempt 2: scheduled for {next_at}" in plan
    assert f"by at most {RETRY_AFTER_MAX:g} s" in plan
    text = _page_text(page)
    assert "HTTP 429 · Retry-After: 86400 (capped at 3600 s by RETRY_AFTER_MAX)" in text
    assert f"Next attempt planned for {next_at}" in text


def test_manual_retry_continues_attempt_numbers(
    database_url: str, upstream: Upstream, panel: Flask
) -> None:
    # Two 503 responses use up both attempts. The upstream then responds 200, so
    # the third attempt, after the manual retry, succeeds.
    upstream.respond("/items/7", status=503, times=2)
    settings = fleet_settings(database_url, upstream.url, RETRY_MAX_ATTEMPTS="2",
                              RETRY_BASE_DELAY="0.05", RETRY_MAX_DELAY="0.1")
    client = logged_in_client(panel, "operator")
    job_id = defer_from_form(client, "call_api", {"method": "GET",
                                                  "path": "/items/7"})

    with InProcessWorker(settings):
        wait_for_status(database_url, job_id, "failed", timeout=20)
        before = [row["attempt"] for row in attempts(database_url, job_id)]
        response = post_with_token(client, f"/jobs/{job_id}/retry",
                                   f"/jobs/{job_id}")
        assert response.status_code == 303
        wait_for_status(database_url, job_id, "succeeded", timeout=20)

    assert before == [1, 2]
    rows = attempts(database_url, job_id)
    assert [row["attempt"] for row in rows] == [1, 2, 3]
    assert [row["outcome"] for row in rows] == ["error", "failed", "succeeded"]
    assert job(database_url, job_id)["attempts"] == 3
    assert upstream.count("/items/7") == 3
    page = _page_text(client.get(f"/jobs/{job_id}").get_data(as_text=True))
    assert "Attempt 3 succeeded" in page
    assert "Attempt 4" not in page


def test_retry_plan_after_manual_retry(
    database_url: str, upstream: Upstream, panel: Flask
) -> None:
    upstream.respond("/items/8", status=404)
    settings = fleet_settings(database_url, upstream.url)
    client = logged_in_client(panel, "operator")
    job_id = defer_from_form(client, "call_api", {"method": "GET",
                                                  "path": "/items/8"})

    with InProcessWorker(settings):
        wait_for_status(database_url, job_id, "failed", timeout=20)

    response = post_with_token(client, f"/jobs/{job_id}/retry", f"/jobs/{job_id}")
    assert response.status_code == 303
    assert job(database_url, job_id)["status"] == "todo"
    assert job(database_url, job_id)["attempts"] == 1
    plan = _retry_plan(client.get(f"/jobs/{job_id}").get_data(as_text=True))
    assert plan.strip().startswith("Attempts ahead Attempt 2:")


def test_capped_retry_after_marks_only_excess() -> None:
    ended = datetime.datetime(2030, 1, 1, 12, 0, tzinfo=datetime.UTC)
    two_hours = format_datetime(ended + datetime.timedelta(hours=2), usegmt=True)
    rows: list[dict[str, Any]] = [
        {"retry_after": value, "ended_at": ended, "started_at": ended}
        for value in ("1", "3600", "86400", two_hours, "soon", None)
    ]
    mark_capped_retry_after(rows, RETRY_AFTER_MAX)
    caps = [row["retry_after_cap"] for row in rows]
    assert caps == [None, None, RETRY_AFTER_MAX, RETRY_AFTER_MAX, None, None]
