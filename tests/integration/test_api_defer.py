"""The defer API: one job, batches all or none, 409 on queueing locks, 4xx input."""

from __future__ import annotations

import datetime
import json
import zoneinfo
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from tests.integration.test_api_fixtures import (  # noqa: F401 - fixtures
    ApiCaller,
    api_as,
    api_panel,
    job_total,
    shared_api_as,
    shared_api_panel,
    shared_tokens,
)
from tests.integration.test_jobs_fixtures import (
    audit_rows,
    defer_job,
    job_row,
    run_sql,
)

ApiAs = Callable[[str | None], ApiCaller]
UTC = datetime.timezone.utc
CALL_API = "/api/v1/tasks/call_api/jobs"
FETCH_JOKE = "/api/v1/tasks/fetch_joke/jobs"
VALID = {"arguments": {"method": "POST", "path": "/items", "json": {"a": [1]}}}


def _in(days: float, zone: datetime.tzinfo = UTC) -> datetime.datetime:
    return (datetime.datetime.now(UTC) + datetime.timedelta(days=days)).astimezone(
        zone).replace(microsecond=0)


def test_defer_creates_job(api_panel: Flask, api_as: ApiAs) -> None:
    when = _in(1)
    response = api_as("operator")("POST", CALL_API, {
        **VALID, "queue": "default", "priority": 7, "lock": "L",
        "queueing_lock": "Q", "schedule_at": when.isoformat()})
    assert response.status_code == 201
    body = response.get_json()
    job_id = body["job_id"]
    assert response.headers["Location"] == f"/api/v1/jobs/{job_id}"
    assert body["url"] == f"/api/v1/jobs/{job_id}"
    row = job_row(api_panel, job_id)
    assert row is not None
    assert row["task_name"] == "call_api"
    assert row["queue_name"] == "default"
    assert row["priority"] == 7
    assert row["lock"] == "L"
    assert row["queueing_lock"] == "Q"
    assert row["scheduled_at"] == when
    assert row["args"] == VALID["arguments"]
    entry = audit_rows(api_panel, "job_deferred")[-1]
    assert entry["job_ids"] == [job_id]
    assert entry["username"] == "operator"


def test_defer_uses_task_defaults(api_panel: Flask, api_as: ApiAs) -> None:
    response = api_as("operator")("POST", FETCH_JOKE, {})
    assert response.status_code == 201
    row = job_row(api_panel, response.get_json()["job_id"])
    assert row is not None
    assert row["queue_name"] == "api_calls"
    assert row["priority"] == 0
    assert row["scheduled_at"] is None
    assert row["args"] == {}


def test_defer_local_time_in_zone(api_panel: Flask, api_as: ApiAs) -> None:
    zone = zoneinfo.ZoneInfo("Asia/Kolkata")
    local = _in(2, zone).replace(tzinfo=None)
    response = api_as("operator")("POST", FETCH_JOKE, {
        "schedule_at": local.isoformat(), "time_zone": "Asia/Kolkata"})
    assert response.status_code == 201
    row = job_row(api_panel, response.get_json()["job_id"])
    assert row is not None
    assert row["scheduled_at"] == local.replace(tzinfo=zone)


def test_defer_z_suffix_means_utc(api_panel: Flask, api_as: ApiAs) -> None:
    when = _in(1)
    text = when.strftime("%Y-%m-%dT%H:%M:%SZ")
    response = api_as("operator")("POST", FETCH_JOKE, {"schedule_at": text})
    assert response.status_code == 201
    assert response.get_json()["schedule_at"] == when.isoformat()


@pytest.mark.parametrize(("body", "field"), [
    ({"schedule_at": "2030-01-01T09:00:00"}, "schedule_at"),
    ({"schedule_at": "tomorrow"}, "schedule_at"),
    ({"schedule_at": "2030-13-01T09:00:00Z"}, "schedule_at"),
    ({"schedule_at": "2020-01-01T09:00:00Z"}, "schedule_at"),
    ({"schedule_at": "2999-01-01T09:00:00Z"}, "schedule_at"),
    ({"schedule_at": "9999-12-31T23:59:59-05:00"}, "schedule_at"),
    ({"schedule_at": "0001-01-01T00:00:00+05:00"}, "schedule_at"),
    ({"schedule_at": "2030-01-01T09:00:00+01:00", "time_zone": "UTC"},
     "schedule_at"),
    ({"schedule_at": "2030-01-01T09:00", "time_zone": "Mars/Olympus"}, "time_zone"),
    ({"time_zone": "UTC"}, "time_zone"),
    ({"schedule_at": 1893456000}, "schedule_at"),
    ({"schedule_at": "\u0662\u0660\u0663\u0660-01-01T09:00:00Z"}, "schedule_at"),
])
def test_defer_rejects_schedule(shared_api_panel: Flask, shared_api_as: ApiAs,
                                body: dict[str, Any], field: str) -> None:
    before = job_total(shared_api_panel)
    response = shared_api_as("operator")("POST", FETCH_JOKE, body)
    assert response.status_code == 400
    assert field in response.get_json()["field_errors"]
    assert job_total(shared_api_panel) == before


def test_defer_rejects_gap_in_local_time(api_panel: Flask, api_as: ApiAs) -> None:
    zone = zoneinfo.ZoneInfo("Europe/Paris")
    year = datetime.datetime.now(UTC).year + 1
    march_last_sunday = max(
        datetime.date(year, 3, day) for day in range(25, 32)
        if datetime.date(year, 3, day).weekday() == 6)
    gap = f"{march_last_sunday.isoformat()}T02:30"
    if datetime.datetime.fromisoformat(gap).replace(tzinfo=zone) > _in(360):
        pytest.skip("the next daylight saving gap is over 365 days ahead")
    response = api_as("operator")("POST", FETCH_JOKE, {
        "schedule_at": gap, "time_zone": "Europe/Paris"})
    assert response.status_code == 400
    assert "does not exist" in response.get_json()["field_errors"]["schedule_at"]


LONG = "x" * 5000
INVALID_BODIES: list[tuple[str, dict[str, Any], str]] = [
    ("call_api", {"arguments": {"method": "GET"}}, "arguments.path"),
    ("call_api", {"arguments": {"method": "BREW", "path": "/"}}, "arguments.method"),
    ("call_api", {"arguments": {"method": "GET", "path": "no-slash"}},
     "arguments.path"),
    ("call_api", {"arguments": {"method": "GET", "path": "/" + LONG}},
     "arguments.path"),
    ("call_api", {"arguments": {"method": "GET", "path": "/a\u0000b"}},
     "arguments.path"),
    ("call_api", {"arguments": {"method": "GET", "path": "/a\u202eb"}},
     "arguments.path"),
    ("call_api", {"arguments": {"method": "GET", "path": 5}}, "arguments.path"),
    ("call_api", {"arguments": {"method": ["GET"], "path": "/"}},
     "arguments.method"),
    ("call_api", {"arguments": {"method": "GET", "path": "/",
                                "json": {"k": "a\u0007"}}}, "arguments.json"),
    ("call_api", {"arguments": {"method": "GET", "path": "/",
                                "json": "x" * 20000}}, "arguments"),
    ("call_api", {"arguments": {"method": "GET", "path": "/", "colour": 1}},
     "arguments.colour"),
    ("call_api", {"arguments": [1, 2]}, "arguments"),
    ("fetch_joke", {"arguments": {"category": "DEV"}}, "arguments.category"),
    ("fetch_joke", {"arguments": {"category": "d\u00e9v"}}, "arguments.category"),
    ("fetch_joke", {"queue": "maintenance"}, "queue"),
    ("fetch_joke", {"queue": "nope"}, "queue"),
    ("fetch_joke", {"queue": 3}, "queue"),
    ("fetch_joke", {"queue": LONG}, "queue"),
    ("fetch_joke", {"priority": 1001}, "priority"),
    ("fetch_joke", {"priority": 1.5}, "priority"),
    ("fetch_joke", {"priority": True}, "priority"),
    ("fetch_joke", {"priority": "5"}, "priority"),
    ("fetch_joke", {"lock": "k" * 129}, "lock"),
    ("fetch_joke", {"lock": {"a": 1}}, "lock"),
    ("fetch_joke", {"queueing_lock": "a\nb"}, "queueing_lock"),
    ("fetch_joke", {"queueing_lock": "\ud800"}, "queueing_lock"),
    ("fetch_joke", {"Arguments": {}}, "Arguments"),
]


@pytest.mark.parametrize(("task", "body", "field"), INVALID_BODIES)
def test_defer_rejects_invalid_field(shared_api_panel: Flask,
                                     shared_api_as: ApiAs, task: str,
                                     body: dict[str, Any], field: str) -> None:
    before = job_total(shared_api_panel)
    response = shared_api_as("operator")("POST", f"/api/v1/tasks/{task}/jobs",
                                         body)
    assert response.status_code == 400
    error = response.get_json()
    assert field in error["field_errors"], error
    assert error["error"] == "Bad Request"
    assert job_total(shared_api_panel) == before


@pytest.mark.parametrize(("raw", "content_type", "status"), [
    (b'{"arguments": ', "application/json", 400),
    (b'{"arguments": {"category": "a"}, "arguments": {"category": "b"}}',
     "application/json", 400),
    (b'{"arguments": {"category": "a", "category": "b"}}', "application/json", 400),
    (b'{"priority": NaN}', "application/json", 400),
    (b'{"priority": 1e999}', "application/json", 400),
    (b'{"priority": ' + b"9" * 5000 + b"}", "application/json", 400),
    (b"[" * 100000, "application/json", 400),
    (b'{"queue": "\xff"}', "application/json", 400),
    (b"[]", "application/json", 400),
    (b'"text"', "application/json", 400),
    (b"", "application/json", 400),
    (b"queue=default", "application/x-www-form-urlencoded", 415),
    (b"{}", "text/plain", 415),
    (b'{"a": "' + b"x" * 200000 + b'"}', "application/json", 413),
])
def test_defer_rejects_malformed_body(shared_api_panel: Flask,
                                      shared_api_as: ApiAs, raw: bytes,
                                      content_type: str, status: int) -> None:
    before = job_total(shared_api_panel)
    response = shared_api_as("operator")("POST", FETCH_JOKE, raw=raw,
                                         content_type=content_type)
    assert response.status_code == status
    assert response.get_json()["message"]
    assert job_total(shared_api_panel) == before


def test_defer_names_repeated_key(shared_api_as: ApiAs) -> None:
    raw = b'{"arguments": {"method": "POST"}, "arguments": {"method": "GET"}}'
    response = shared_api_as("operator")("POST", "/api/v1/tasks/call_api/jobs",
                                         raw=raw, content_type="application/json")
    assert response.status_code == 400
    assert "'arguments' appears twice" in response.get_json()["message"]


@pytest.mark.parametrize("task", ["health_check", "nope", "call_api%00",
                                  "%E2%80%AEcall_api", "x" * 3000])
def test_defer_unknown_task_is_404(shared_api_as: ApiAs, task: str) -> None:
    response = shared_api_as("operator")("POST", f"/api/v1/tasks/{task}/jobs", {})
    assert response.status_code == 404
    assert "fetch_joke, call_api" in response.get_json()["message"]


def test_defer_needs_operator(api_panel: Flask, api_as: ApiAs) -> None:
    response = api_as("viewer")("POST", FETCH_JOKE, {})
    assert response.status_code == 403
    assert job_total(api_panel) == 0


def test_defer_queueing_lock_conflict_is_409(api_panel: Flask,
                                             api_as: ApiAs) -> None:
    call = api_as("operator")
    first = call("POST", FETCH_JOKE, {"queueing_lock": "nightly"})
    assert first.status_code == 201
    second = call("POST", FETCH_JOKE, {"queueing_lock": " nightly "})
    assert second.status_code == 409
    body = second.get_json()
    assert body["queueing_lock"] == "nightly"
    assert "nightly" in body["message"]
    assert str(first.get_json()["job_id"]) in body["field_errors"]["queueing_lock"]
    assert job_total(api_panel) == 1


def _batch(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"jobs": items}


def test_batch_defers_all_in_one_transaction(api_panel: Flask,
                                             api_as: ApiAs) -> None:
    when = _in(1)
    items = [
        VALID,
        {"arguments": {"method": "GET", "path": "/b"}, "queue": "default",
         "priority": -3, "queueing_lock": "batch-q"},
        {"arguments": {"method": "DELETE", "path": "/c"},
         "schedule_at": when.isoformat(), "lock": "L"},
    ]
    response = api_as("operator")("POST", f"{CALL_API}/batch", _batch(items))
    assert response.status_code == 201
    body = response.get_json()
    assert body["count"] == 3
    ids = body["job_ids"]
    rows = [job_row(api_panel, job_id) for job_id in ids]
    assert [row["args"] for row in rows if row] == [item["arguments"]
                                                    for item in items]
    assert [row["queue_name"] for row in rows if row] == ["api_calls", "default",
                                                         "api_calls"]
    assert [row["priority"] for row in rows if row] == [0, -3, 0]
    assert rows[1] is not None and rows[1]["queueing_lock"] == "batch-q"
    assert rows[2] is not None and rows[2]["scheduled_at"] == when
    transactions = run_sql(api_panel, "SELECT DISTINCT xmin::text AS tx FROM "
                           "procrastinate_jobs WHERE id = ANY(%(ids)s)",
                           {"ids": ids})
    assert len(transactions) == 1
    entries = audit_rows(api_panel, "jobs_deferred_batch")
    assert len(entries) == 1
    assert entries[0]["job_ids"] == ids
    assert entries[0]["details"]["count"] == 3
    assert audit_rows(api_panel, "job_deferred") == []


def test_batch_invalid_item_rejects_all(api_panel: Flask, api_as: ApiAs) -> None:
    items = [VALID, {"arguments": {"method": "GET"}}, VALID,
             {"arguments": {"method": "GET", "path": "/"}, "priority": "high"}, 7]
    response = api_as("operator")("POST", f"{CALL_API}/batch", _batch(items))
    assert response.status_code == 400
    body = response.get_json()
    assert body["invalid_items"] == [1, 3, 4]
    assert set(body["field_errors"]) == {"jobs[1].arguments.path",
                                         "jobs[3].priority", "jobs[4]"}
    assert job_total(api_panel) == 0
    assert audit_rows(api_panel, "jobs_deferred_batch") == []


def test_batch_repeated_queueing_lock_is_400(api_panel: Flask,
                                             api_as: ApiAs) -> None:
    items = [{"queueing_lock": "k"}, {"queueing_lock": "other"},
             {"queueing_lock": "k"}]
    response = api_as("operator")("POST", f"{FETCH_JOKE}/batch", _batch(items))
    assert response.status_code == 400
    assert "jobs[0]" in response.get_json()["field_errors"]["jobs[2].queueing_lock"]
    assert job_total(api_panel) == 0


def test_batch_busy_queueing_lock_is_409(api_panel: Flask, api_as: ApiAs) -> None:
    holder = defer_job(api_panel, queueing_lock="busy")
    items = [{}, {"queueing_lock": "free"}, {"queueing_lock": "busy"}]
    response = api_as("operator")("POST", f"{FETCH_JOKE}/batch", _batch(items))
    assert response.status_code == 409
    body = response.get_json()
    assert body["queueing_locks"] == ["busy"]
    assert str(holder) in body["field_errors"]["jobs[2].queueing_lock"]
    assert job_total(api_panel) == 1


@pytest.mark.parametrize(("body", "field"), [
    ({"jobs": []}, "jobs"),
    ({"jobs": {}}, "jobs"),
    ({}, "jobs"),
    ({"jobs": [{}], "dry_run": True}, "dry_run"),
    ({"jobs": [{}] * 1001}, "jobs"),
])
def test_batch_rejects_bad_envelope(shared_api_panel: Flask, shared_api_as: ApiAs,
                                    body: dict[str, Any], field: str) -> None:
    before = job_total(shared_api_panel)
    response = shared_api_as("operator")("POST", f"{FETCH_JOKE}/batch", body)
    assert response.status_code == 400
    assert field in response.get_json()["field_errors"]
    assert job_total(shared_api_panel) == before


def test_batch_of_1000_jobs(api_panel: Flask, api_as: ApiAs) -> None:
    items = [{"arguments": {"method": "PUT", "path": f"/items/{index}",
                            "json": {"note": "n" * 200}}, "priority": index % 10}
             for index in range(1000)]
    raw = json.dumps(_batch(items)).encode()
    assert len(raw) > api_panel.config["MAX_CONTENT_LENGTH"]
    response = api_as("operator")("POST", f"{CALL_API}/batch", raw=raw)
    assert response.status_code == 201
    assert response.get_json()["count"] == 1000
    assert job_total(api_panel) == 1000


def test_batch_needs_operator(api_panel: Flask, api_as: ApiAs) -> None:
    response = api_as("viewer")("POST", f"{FETCH_JOKE}/batch", _batch([{}]))
    assert response.status_code == 403
    assert job_total(api_panel) == 0
