"""The job list: filters, argument search, time range, keyset pages and counts."""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.datastructures import MultiDict

from tests.integration.test_jobs_fixtures import (
    database_url,
    defer_job,
    job_in_state,
    listed_ids,
    run_sql,
    shared_client_for,  # noqa: F401 - a fixture
    shared_panel,  # noqa: F401 - a fixture
    text,
)
from tests.support.panel import build_panel, logged_in_client
from webpanel import db, job_service

UTC = datetime.timezone.utc


def _explain(panel: Flask, sql: str, params: dict[str, Any]) -> str:
    with psycopg.connect(database_url(panel)) as conn:
        conn.execute("SET enable_seqscan = off")
        rows = conn.execute("EXPLAIN " + sql, params).fetchall()
    return "\n".join(row[0] for row in rows)


def test_list_newest_first(panel: Flask,
                           client_for: Callable[[str], FlaskClient]) -> None:
    ids = [defer_job(panel) for _ in range(3)]
    html = text(client_for("viewer").get("/jobs"))
    assert listed_ids(html) == sorted(ids, reverse=True)
    assert "3 jobs match" in html
    assert "(exact count)" in html


def test_list_filters_several_statuses(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    failed = job_in_state(panel, "failed")
    todo = job_in_state(panel, "todo")
    job_in_state(panel, "succeeded")
    response = client_for("viewer").get("/jobs?status=failed&status=todo")
    assert response.status_code == 200
    assert listed_ids(text(response)) == [todo, failed]


@pytest.mark.parametrize("field", ["queue", "task", "lock", "queueing_lock"])
def test_list_filters_by_field(panel: Flask,
                               client_for: Callable[[str], FlaskClient],
                               field: str) -> None:
    wanted = defer_job(panel, "call_api", queue="default", lock="lk-1",
                       queueing_lock="qk-1",
                       arguments={"method": "GET", "path": "/x"})
    defer_job(panel, "fetch_joke", lock="lk-2", queueing_lock="qk-2")
    value = {"queue": "default", "task": "call_api", "lock": "lk-1",
             "queueing_lock": "qk-1"}[field]
    response = client_for("viewer").get("/jobs", query_string={field: value})
    assert listed_ids(text(response)) == [wanted]


def test_argument_search_matches_text_and_typed_values(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    dev = defer_job(panel, arguments={"category": "dev"})
    defer_job(panel, arguments={"category": "food"})
    nested = defer_job(panel, "call_api", arguments={
        "method": "POST", "path": "/items", "json": {"name": "a", "count": 42}})
    client = client_for("viewer")
    assert listed_ids(text(client.get(
        "/jobs?arg_key=category&arg_value=dev"))) == [dev]
    assert listed_ids(text(client.get(
        "/jobs?arg_key=json.name&arg_value=a"))) == [nested]
    assert listed_ids(text(client.get(
        "/jobs?arg_key=json.count&arg_value=42"))) == [nested]
    assert listed_ids(text(client.get(
        "/jobs?arg_key=category&arg_value=nothing"))) == []


def test_argument_search_rejects_redacted_key(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    defer_job(panel, "call_api", arguments={
        "method": "POST", "path": "/login", "json": {"password": "hunter2"}})
    response = client_for("viewer").get(
        "/jobs?arg_key=json.password&arg_value=hunter2")
    assert response.status_code == 400
    assert "redacted" in text(response)
    assert listed_ids(text(response)) == []


def test_argument_search_uses_gin_index(panel: Flask) -> None:
    with panel.app_context():
        filters = job_service.parse_filters(
            MultiDict({"arg_key": "category", "arg_value": "dev"}))
        clauses = job_service.where(filters)
    sql = "SELECT j.id FROM procrastinate_jobs j WHERE " + clauses.sql()
    plan = _explain(panel, sql, clauses.params)
    assert "panel_jobs_args_idx" in plan


def test_created_range_filters_by_deferred_event(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    old = defer_job(panel)
    middle = defer_job(panel)
    new = defer_job(panel)
    run_sql(panel, "UPDATE procrastinate_events SET at = %(at)s WHERE job_id = "
                   "%(id)s AND type = 'deferred'",
            {"at": datetime.datetime(2024, 1, 1, 8, tzinfo=UTC), "id": old})
    run_sql(panel, "UPDATE procrastinate_events SET at = %(at)s WHERE job_id = "
                   "%(id)s AND type = 'deferred'",
            {"at": datetime.datetime(2024, 1, 1, 10, tzinfo=UTC), "id": middle})
    run_sql(panel, "UPDATE procrastinate_events SET at = %(at)s WHERE job_id = "
                   "%(id)s AND type = 'deferred'",
            {"at": datetime.datetime(2024, 1, 1, 12, tzinfo=UTC), "id": new})
    client = client_for("viewer")
    assert listed_ids(text(client.get(
        "/jobs?created_from=2024-01-01T09:00&created_before=2024-01-01T11:00"))) \
        == [middle]
    assert listed_ids(text(client.get(
        "/jobs?created_from=2024-01-01T10:00"))) == [new, middle]
    assert listed_ids(text(client.get(
        "/jobs?created_before=2024-01-01T10:00"))) == [old]
    assert listed_ids(text(client.get(
        "/jobs?created_from=2030-01-01T00:00"))) == []


def test_created_range_bounds_use_events_index(panel: Flask) -> None:
    plan = _explain(panel, "SELECT job_id FROM procrastinate_events WHERE type = "
                           "'deferred' AND at >= now() ORDER BY at LIMIT 1000", {})
    assert "panel_events_type_at_idx" in plan


def test_created_range_rejects_reversed_bounds(
        client_for: Callable[[str], FlaskClient]) -> None:
    response = client_for("viewer").get(
        "/jobs?created_from=2024-01-02T00:00&created_before=2024-01-01T00:00")
    assert response.status_code == 400
    assert "must be later than" in text(response)


def test_keyset_pages_walk_both_ways(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    ids = sorted((defer_job(panel) for _ in range(45)), reverse=True)
    client = client_for("viewer")
    first = text(client.get("/jobs?limit=20&status=todo"))
    assert listed_ids(first) == ids[:20]
    older = re.search(r'href="([^"]+)" rel="next"', first)
    assert older is not None
    assert "status=todo" in older.group(1)
    second = text(client.get(older.group(1).replace("&amp;", "&")))
    assert listed_ids(second) == ids[20:40]
    newer = re.search(r'href="([^"]+)" rel="prev"', second)
    assert newer is not None
    back = text(client.get(newer.group(1).replace("&amp;", "&")))
    assert listed_ids(back) == ids[:20]
    assert 'rel="prev"' not in back
    last = text(client.get(f"/jobs?limit=20&before={ids[39]}"))
    assert listed_ids(last) == ids[40:]
    assert 'rel="next"' not in last


def test_count_caps_and_estimates(panel: Flask) -> None:
    for _ in range(6):
        defer_job(panel)
    with panel.app_context():
        capped = job_service.count_jobs(job_service.JobFilters(), cap=5)
        exact = job_service.count_jobs(job_service.JobFilters(), cap=10)
    assert capped.capped is True
    assert capped.label == "5+"
    assert capped.estimate is not None
    assert exact.capped is False
    assert exact.label == "6"


def test_empty_state_links_to_clear_filters(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    defer_job(panel)
    html = text(client_for("viewer").get("/jobs?status=failed"))
    assert "No jobs match these filters" in html
    assert 'href="/jobs">Clear the filters' in html


@pytest.mark.parametrize("query", [
    "status=sleeping",
    "before=abc",
    "before=99999999999999999999999",
    "limit=7",
    "created_from=yesterday",
    "queue=" + "q" * 200,
    "task=bad%00name",
    "arg_key=category",
    "arg_value=dev",
    "arg_key=a..b&arg_value=1",
    "before=5&after=3",
])
def test_invalid_filters_answer_400(
        shared_client_for: Callable[[str], FlaskClient], query: str) -> None:
    response = shared_client_for("viewer").get(f"/jobs?{query}")
    assert response.status_code == 400
    assert "The filters are invalid" in text(response)


def test_search_box_jumps_to_job(panel: Flask,
                                 client_for: Callable[[str], FlaskClient]) -> None:
    job_id = defer_job(panel)
    client = client_for("viewer")
    response = client.get(f"/jobs?q=%23{job_id}")
    assert response.status_code == 303
    assert response.headers["Location"] == f"/jobs/{job_id}"
    wrong = client.get("/jobs?q=hello")
    assert wrong.status_code == 400
    assert "is not a job id" in text(wrong)


def test_list_keeps_filters_in_bulk_form(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    defer_job(panel)
    html = text(client_for("operator").get("/jobs?status=todo&queue=api_calls"))
    assert 'id="bulk-form"' in html
    assert '<input type="hidden" name="status" value="todo">' in html
    assert '<input type="hidden" name="queue" value="api_calls">' in html
    assert 'name="return_to" value="/jobs?status=todo&amp;queue=api_calls"' in html


def test_viewer_sees_no_bulk_actions(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    defer_job(panel)
    html = text(client_for("viewer").get("/jobs"))
    assert 'id="bulk-form"' not in html
    assert 'name="job_id"' not in html


def test_list_region_refreshes_itself(
        client_for: Callable[[str], FlaskClient]) -> None:
    html = text(client_for("viewer").get("/jobs"))
    assert re.search(r'id="jobs-region" data-refresh="\d+"', html)


def test_list_redacts_argument_preview(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    defer_job(panel, "call_api", arguments={
        "method": "POST", "path": "/x", "json": {"Token": "s3cr3t-value"}})
    html = text(client_for("viewer").get("/jobs"))
    assert "s3cr3t-value" not in html
    assert "[redacted]" in html


def test_list_error_state_keeps_filters(
        panel: Flask, client_for: Callable[[str], FlaskClient],
        monkeypatch: pytest.MonkeyPatch) -> None:
    def time_out(*args: Any) -> None:
        raise db.DatabaseUnavailable("the database did not answer in time",
                                     timed_out=True)

    monkeypatch.setattr(job_service, "list_jobs", time_out)
    response = client_for("viewer").get("/jobs?status=failed&queue=api_calls")
    html = text(response)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert 'data-state="error"' in html
    assert "took too long" in html
    assert 'value="failed" checked' in html
    assert 'name="queue" list="known-queues" value="api_calls"' in html


def test_list_says_when_count_is_unknown(
        panel: Flask, client_for: Callable[[str], FlaskClient],
        monkeypatch: pytest.MonkeyPatch) -> None:
    defer_job(panel)
    monkeypatch.setattr(job_service, "count_jobs",
                        lambda filters: job_service.JobCount(value=None,
                                                             capped=False))
    html = text(client_for("viewer").get("/jobs"))
    assert "Count unavailable: counting took too long." in html
    assert len(listed_ids(html)) == 1


def test_list_error_state_on_real_timeout(database_url: str) -> None:
    panel = build_panel(database_url, env={"WEB_REQUEST_BUDGET": "0.5"})
    try:
        client = logged_in_client(panel, "viewer")
        with psycopg.connect(database_url) as blocker:
            blocker.execute("LOCK TABLE procrastinate_jobs IN ACCESS EXCLUSIVE MODE")
            response = client.get("/jobs?status=todo")
            blocker.rollback()
        assert response.status_code == 503
        assert "took too long" in text(response)
        assert 'value="todo" checked' in text(response)
    finally:
        db.close_process_pool()
