"""The job page: fields, redaction, stored result, one timeline, the retry plan."""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Callable

from flask import Flask
from flask.testing import FlaskClient
from psycopg.types.json import Jsonb

from tests.integration.test_jobs_fixtures import (
    defer_job,
    job_in_state,
    register_worker,
    run_sql,
    start_job,
    text,
)
from tests.support.panel import build_panel, log_in
from webpanel import db, job_service

UTC = datetime.timezone.utc

ATTEMPT = """
INSERT INTO job_attempts (job_id, attempt, task_name, queue_name, started_at,
    ended_at, duration_ms, host, pid, process_name, worker_id, outcome, error_type,
    error_message, traceback, http_status, retry_after, next_attempt_at)
VALUES (%(job_id)s, %(attempt)s, 'call_api', 'api_calls', %(started)s, %(ended)s,
    1500, 'host-a', 4242, 'worker:worker_00', 7, %(outcome)s, %(error_type)s,
    %(message)s, %(traceback)s, %(http_status)s, %(retry_after)s, NULL)
"""


def test_page_shows_fields_and_worker(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    job_id = defer_job(panel, "call_api", queue="default", priority=7, lock="L1",
                       queueing_lock="Q1",
                       arguments={"method": "GET", "path": "/items/1"})
    worker = register_worker(panel)
    run_sql(panel, "INSERT INTO worker_processes (worker_id, host, pid, "
                   "process_name, role, queues, concurrency) VALUES (%(w)s, "
                   "'host-b', 99, 'worker:worker_01', 'worker', '{default}', 10)",
            {"w": worker})
    start_job(panel, job_id, worker)
    html = text(client_for("viewer").get(f"/jobs/{job_id}"))
    assert 'data-job-status="doing"' in html
    assert "call_api" in html
    assert ">default</a>" in html
    assert "<dd>7</dd>" in html
    assert "<code>L1</code>" in html
    assert "<code>Q1</code>" in html
    assert "worker:worker_01 on host-b (pid 99)" in html


def test_page_redacts_arguments_at_any_depth(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    job_id = defer_job(panel, "call_api", arguments={
        "method": "POST", "path": "/login",
        "json": {"user": "ann", "Password": "pw-1",
                 "nested": [{"api_key": "key-2"}, {"deep": {"token": "tok-3"}}]}})
    html = text(client_for("viewer").get(f"/jobs/{job_id}"))
    for secret in ("pw-1", "key-2", "tok-3"):
        assert secret not in html
    assert html.count("[redacted]") == 3
    assert "ann" in html


def test_page_redacts_with_configured_keys(database_url: str) -> None:
    panel = build_panel(database_url, env={"REDACTED_ARGUMENT_KEYS": "path"})
    try:
        job_id = defer_job(panel, "call_api", arguments={
            "method": "GET", "path": "/private/thing"})
        with panel.app_context():
            detail = job_service.get_job(job_id)
        assert detail is not None
        assert detail.arguments == {"method": "GET", "path": "[redacted]"}
    finally:
        db.close_process_pool()


def test_page_shows_joke_of_fetch_joke(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    job_id = job_in_state(panel, "succeeded")
    run_sql(panel, "INSERT INTO job_results (job_id, task_name, result) VALUES "
                   "(%(id)s, 'fetch_joke', %(result)s)",
            {"id": job_id, "result": Jsonb({"joke": "Chuck counted to infinity.",
                                            "joke_id": "x1", "http_status": 200})})
    html = text(client_for("viewer").get(f"/jobs/{job_id}"))
    assert re.search(r'<blockquote class="joke"[^>]*>Chuck counted to infinity.',
                     html)


def test_page_redacts_result(panel: Flask,
                             client_for: Callable[[str], FlaskClient]) -> None:
    job_id = job_in_state(panel, "succeeded", "call_api",
                          arguments={"method": "GET", "path": "/x"})
    run_sql(panel, "INSERT INTO job_results (job_id, task_name, result) VALUES "
                   "(%(id)s, 'call_api', %(result)s)",
            {"id": job_id, "result": Jsonb({"http_status": 200,
                                            "body": {"secret": "shh-9"}})})
    html = text(client_for("viewer").get(f"/jobs/{job_id}"))
    assert "shh-9" not in html
    assert "[redacted]" in html


def test_timeline_merges_events_attempts_and_audit(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    job_id = job_in_state(panel, "failed", "call_api",
                          arguments={"method": "GET", "path": "/x"})
    run_sql(panel, "UPDATE procrastinate_events SET at = %(at)s WHERE job_id = "
                   "%(id)s AND type = 'deferred'",
            {"at": datetime.datetime(2024, 3, 1, 10, 0, tzinfo=UTC), "id": job_id})
    run_sql(panel, "UPDATE procrastinate_events SET at = %(at)s WHERE job_id = "
                   "%(id)s AND type = 'started'",
            {"at": datetime.datetime(2024, 3, 1, 10, 1, tzinfo=UTC), "id": job_id})
    run_sql(panel, "UPDATE procrastinate_events SET at = %(at)s WHERE job_id = "
                   "%(id)s AND type = 'failed'",
            {"at": datetime.datetime(2024, 3, 1, 10, 3, tzinfo=UTC), "id": job_id})
    run_sql(panel, ATTEMPT, {
        "job_id": job_id, "attempt": 1,
        "started": datetime.datetime(2024, 3, 1, 10, 1, 1, tzinfo=UTC),
        "ended": datetime.datetime(2024, 3, 1, 10, 1, 2, tzinfo=UTC),
        "outcome": "failed", "error_type": "UpstreamHTTPError",
        "message": "not retryable: HTTP 429 from /x",
        "traceback": "Traceback (most recent call last):\n  boom-line",
        "http_status": 429, "retry_after": "120"})
    run_sql(panel, "INSERT INTO audit_log (at, username, action, job_ids, result) "
                   "VALUES (%(at)s, 'ann', 'job_retried', ARRAY[%(id)s::bigint], "
                   "'ok')",
            {"at": datetime.datetime(2024, 3, 1, 10, 2, tzinfo=UTC), "id": job_id})
    html = text(client_for("viewer").get(f"/jobs/{job_id}"))
    kinds = re.findall(r'data-kind="(\w+)"', html)
    assert kinds == ["event", "event", "attempt", "audit", "event"]
    assert "HTTP 429" in html
    assert "Retry-After: <code>120</code>" in html
    assert "<summary>Traceback</summary><pre>Traceback (most recent call last):" \
        in html
    assert "worker:worker_00 on host-a (pid 4242)" in html
    assert "after 1.5 s" in html
    assert "Job retried by ann" in html


def test_retry_plan_with_jitter_shows_ranges(database_url: str) -> None:
    panel = build_panel(database_url, env={
        "RETRY_MAX_ATTEMPTS": "4", "RETRY_BASE_DELAY": "10",
        "RETRY_MAX_DELAY": "25", "RETRY_JITTER": "full"})
    try:
        when = datetime.datetime.now(UTC) + datetime.timedelta(hours=1)
        job_id = defer_job(panel, schedule_at=when)
        run_sql(panel, "UPDATE procrastinate_jobs SET attempts = 1 WHERE id = "
                       "%(id)s", {"id": job_id})
        with panel.app_context():
            detail = job_service.get_job(job_id)
        assert detail is not None and detail.schedule is not None
        plan = detail.schedule
        assert plan.next_number == 2
        assert abs((plan.next_at - when).total_seconds()) < 0.01
        assert [item.number for item in plan.later] == [3, 4]
        assert [(item.earliest - when).total_seconds() for item in plan.later] \
            == [0, 0]
        assert [round((item.latest - when).total_seconds()) for item in plan.later] \
            == [20, 45]
        assert plan.jitter is True
    finally:
        db.close_process_pool()


def test_retry_plan_without_jitter_shows_times(database_url: str) -> None:
    panel = build_panel(database_url, env={
        "RETRY_MAX_ATTEMPTS": "3", "RETRY_BASE_DELAY": "5", "RETRY_JITTER": "none"})
    try:
        job_id = defer_job(panel)
        client = panel.test_client()
        log_in(client, "viewer")
        html = text(client.get(f"/jobs/{job_id}"))
        assert "runs as soon as a worker of queue api_calls is free" in html
        assert "at the times below (no jitter)" in html
        assert re.findall(r'data-attempt="(\d+)"', html) == ["2", "3"]
        with panel.app_context():
            detail = job_service.get_job(job_id)
        assert detail is not None and detail.schedule is not None
        gaps = [(item.latest - item.earliest).total_seconds()
                for item in detail.schedule.later]
        assert gaps == [0, 0]
        offsets = [(item.latest - detail.schedule.next_at).total_seconds()
                   for item in detail.schedule.later]
        assert offsets == [5, 15]
    finally:
        db.close_process_pool()


def test_retry_plan_only_for_waiting_jobs(panel: Flask) -> None:
    failed = job_in_state(panel, "failed")
    with panel.app_context():
        detail = job_service.get_job(failed)
    assert detail is not None
    assert detail.schedule is None


def test_unknown_job_is_404(client_for: Callable[[str], FlaskClient]) -> None:
    client = client_for("viewer")
    response = client.get("/jobs/987654")
    assert response.status_code == 404
    assert "Job 987654 not found" in text(response)
    huge = client.get(f"/jobs/{2**70}")
    assert huge.status_code == 404


def test_page_offers_only_actions_of_the_state(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    failed = job_in_state(panel, "failed")
    html = text(client_for("operator").get(f"/jobs/{failed}"))
    offered = re.findall(r'data-action="(\w+)"', html)
    assert offered == ["retry", "delete"]
    viewer_html = text(client_for("viewer").get(f"/jobs/{failed}"))
    assert "data-action=" not in viewer_html


def test_detail_and_page_serialise_for_api(panel: Flask) -> None:
    job_id = job_in_state(panel, "failed", "call_api", arguments={
        "method": "POST", "path": "/x", "json": {"token": "t-1"}})
    with panel.test_request_context():
        detail = job_service.get_job(job_id)
        page = job_service.list_jobs(job_service.JobFilters(),
                                     job_service.Position(limit=20))
    assert detail is not None
    data = detail.to_dict()
    assert data["job"]["status"] == "failed"
    assert data["arguments"]["json"]["token"] == "[redacted]"
    assert data["actions"]["retry"] is None
    assert [entry["kind"] for entry in data["timeline"]] == ["event"] * 3
    listed = page.to_dict()
    assert [job["id"] for job in listed["jobs"]] == [job_id]
    assert listed["jobs"][0]["args"]["json"]["token"] == "[redacted]"
    assert listed["older"] is None
    assert "t-1" not in json.dumps(listed)
