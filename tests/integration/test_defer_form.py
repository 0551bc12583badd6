"""Defer forms: built from the task catalog, checked like the API, never a 500."""

from __future__ import annotations

import datetime
import html as html_module
import json
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

from tests.integration.test_jobs_fixtures import (
    audit_rows,
    defer_job,
    job_count,
    job_in_state,
    job_row,
    shared_client_for,  # noqa: F401 - a fixture
    shared_panel,  # noqa: F401 - a fixture
    text,
)
from tests.support.panel import TEST_SECRET_KEY, csrf_token
from webpanel.errors import EXPIRED_FORM_MESSAGE

UTC = datetime.timezone.utc
CALL_API = {"method": "POST", "path": "/items", "json": '{"name": "a"}',
            "queue": "api_calls", "priority": "5", "timezone": "UTC"}


def _post(client: FlaskClient, task: str, data: dict[str, str]) -> Any:
    token = csrf_token(text(client.get(f"/defer/{task}")))
    return client.post(f"/defer/{task}", data={"csrf_token": token, **data})


def _field_error(page: str, field: str) -> str:
    match = re.search(rf'class="field-error"[^>]*data-field="{field}">(.*?)</div>',
                      page, re.S)
    if match is None:
        match = re.search(rf'<li data-field="{field}"><strong>{field}</strong>(.*?)'
                          r"</li>", page, re.S)
    assert match is not None, f"no message for {field}"
    return html_module.unescape(match.group(1)).strip()


def _local(days: float = 1) -> str:
    when = datetime.datetime.now(UTC) + datetime.timedelta(days=days)
    return when.strftime("%Y-%m-%dT%H:%M")


def test_defer_index_lists_user_facing_tasks(
        client_for: Callable[[str], FlaskClient]) -> None:
    page = text(client_for("viewer").get("/defer"))
    assert re.findall(r'data-task="(\w+)"', page) == ["fetch_joke", "call_api"]
    assert "health_check" not in page


def test_form_has_one_field_per_argument(
        client_for: Callable[[str], FlaskClient]) -> None:
    page = text(client_for("operator").get("/defer/call_api"))
    assert re.search(r'<select[^>]*id="arg-method"[^>]*name="method"', page)
    assert re.search(r'<input[^>]*id="arg-path"[^>]*maxlength="2000"', page)
    assert re.search(r'<textarea[^>]*id="arg-json"', page)
    queues = re.search(r'<select[^>]*name="queue"[^>]*>(.*?)</select>', page, re.S)
    assert queues is not None
    assert re.findall(r'value="([^"]+)"', queues.group(1)) == ["api_calls",
                                                               "default"]
    assert re.search(r'<input[^>]*name="schedule_at"[^>]*type="datetime-local"',
                     page)
    assert re.search(r'<option selected value="UTC">UTC</option>', page)


def test_defer_creates_job_and_redirects(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    client = client_for("operator")
    when = datetime.datetime.now(UTC) + datetime.timedelta(days=3)
    local = when.astimezone(datetime.timezone(datetime.timedelta(hours=9)))
    response = _post(client, "call_api", {
        **CALL_API, "json": '{"name": "a", "password": "pw"}',
        "schedule_at": local.strftime("%Y-%m-%dT%H:%M:%S"),
        "timezone": "Asia/Tokyo", "queueing_lock": "items-a"})
    assert response.status_code == 303
    job_id = int(response.headers["Location"].rsplit("/", 1)[1])
    row = job_row(panel, job_id)
    assert row is not None
    assert row["task_name"] == "call_api"
    assert row["queue_name"] == "api_calls"
    assert row["priority"] == 5
    assert row["args"] == {"method": "POST", "path": "/items",
                           "json": {"name": "a", "password": "pw"}}
    assert abs((row["scheduled_at"] - when).total_seconds()) < 1
    assert row["queueing_lock"] == "items-a"
    assert row["lock"] == "items-a"
    entries = audit_rows(panel, "job_deferred")
    assert [entry["job_ids"] for entry in entries] == [[job_id]]
    assert entries[0]["details"]["arguments"]["json"]["password"] == "[redacted]"


def test_defer_keeps_explicit_lock(panel: Flask,
                                   client_for: Callable[[str], FlaskClient]) -> None:
    response = _post(client_for("operator"), "fetch_joke", {
        "category": "dev", "queue": "api_calls", "lock": "L", "queueing_lock": "Q"})
    job_id = int(response.headers["Location"].rsplit("/", 1)[1])
    row = job_row(panel, job_id)
    assert row is not None
    assert (row["lock"], row["queueing_lock"]) == ("L", "Q")


@pytest.mark.parametrize("state", ["todo", "doing"])
def test_defer_rejects_busy_queueing_lock(
        panel: Flask, client_for: Callable[[str], FlaskClient], state: str) -> None:
    holder = job_in_state(panel, state, queueing_lock="only-one")
    before = job_count(panel)
    response = _post(client_for("operator"), "call_api",
                     {**CALL_API, "queueing_lock": "only-one"})
    page = text(response)
    assert response.status_code == 400
    assert _field_error(page, "queueing_lock").startswith(
        "a job with queueing lock only-one is already queued or running")
    assert f"job {holder} is {state}" in _field_error(page, "queueing_lock")
    assert job_count(panel) == before
    assert 'value="/items"' in page


def test_defer_accepts_key_again_after_job_ended(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    job_in_state(panel, "succeeded", queueing_lock="again")
    response = _post(client_for("operator"), "call_api",
                     {**CALL_API, "queueing_lock": "again"})
    assert response.status_code == 303


BAD_INPUT = [
    ("json", {"json": '{"name":'}, "is not valid JSON"),
    ("json", {"json": '{"n": NaN}'}, "is not valid JSON"),
    ("json", {"json": "[" * 100 + "]" * 100}, "nested more than 64"),
    ("json", {"json": '{"a": "x\\u0000y"}'}, "control character U+0000"),
    ("method", {"method": "FETCH"}, "expected one of GET"),
    ("path", {"path": "items"}, "expected a path starting with '/'"),
    ("path", {"path": ""}, "is required"),
    ("path", {"path": "/a\x07b"}, "control character U+0007"),
    ("path", {"path": "/" + "p" * 2000}, "the limit is 2000"),
    ("path", {"path": "/caf\u00e9"}, "printable ASCII"),
    ("path", {"path": "/a\u202eb"}, "U+202E"),
    ("queue", {"queue": "nope"}, "is not a known queue"),
    ("queue", {"queue": "maintenance"}, "is not a known queue"),
    ("priority", {"priority": "abc"}, "expected a whole number from -1000 to 1000"),
    ("priority", {"priority": "5000"}, "expected a whole number"),
    ("priority", {"priority": "1.5"}, "expected a whole number"),
    ("schedule_at", {"schedule_at": "2000-01-01T00:00"}, "is in the past"),
    ("schedule_at", {"schedule_at": _local(400)}, "more than 365 days ahead"),
    ("schedule_at", {"schedule_at": "tomorrow"}, "is not a date and time"),
    ("schedule_at", {"schedule_at": "2030-03-31T02:30",
                     "timezone": "Europe/Berlin"}, "does not exist in Europe/Berlin"),
    ("schedule_at", {"schedule_at": "2030-10-27T02:30",
                     "timezone": "Europe/Berlin"}, "is ambiguous in Europe/Berlin"),
    ("timezone", {"schedule_at": _local(), "timezone": "Mars/Base"},
     "unknown time zone"),
    ("lock", {"lock": "a\x01b"}, "unprintable character U+0001"),
    ("lock", {"lock": "k" * 129}, "the limit is 128"),
    ("queueing_lock", {"queueing_lock": "q\u200bq"}, "unprintable character U+200B"),
    ("arguments", {"json": json.dumps({"blob": "x" * 20000})}, "MAX_ARGUMENTS_BYTES"),
]


@pytest.mark.parametrize(("field", "change", "message"), BAD_INPUT,
                         ids=[f"{field}-{index}" for index, (field, _, _)
                              in enumerate(BAD_INPUT)])
def test_bad_input_is_rejected_with_field_message(
        shared_panel: Flask, shared_client_for: Callable[[str], FlaskClient],
        field: str, change: dict[str, str], message: str) -> None:
    response = _post(shared_client_for("operator"), "call_api",
                     {**CALL_API, **change})
    page = text(response)
    assert response.status_code == 400
    assert message in _field_error(page, field)
    assert job_count(shared_panel) == 0
    if field != "path":
        assert 'value="/items"' in page
    assert "The job was not deferred" in page


def test_bad_category_of_fetch_joke(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    client = client_for("operator")
    for value, message in [("Dev", "lower-case letters"),
                           ("d\u0301ev", "lower-case letters"),
                           ("x" * 41, "the limit is 40")]:
        response = _post(client, "fetch_joke", {"category": value})
        assert response.status_code == 400
        assert message in _field_error(text(response), "category")
    assert job_count(panel) == 0


def test_odd_unicode_in_json_is_kept_intact(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    body = {"name": "Zoë 🦊 \u05e9\u05dc\u05d5\u05dd e\u0301"}
    response = _post(client_for("operator"), "call_api",
                     {**CALL_API, "json": json.dumps(body, ensure_ascii=False)})
    assert response.status_code == 303
    job_id = int(response.headers["Location"].rsplit("/", 1)[1])
    row = job_row(panel, job_id)
    assert row is not None
    assert row["args"]["json"] == body


def test_every_problem_is_reported_at_once(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    response = _post(client_for("operator"), "call_api", {
        **CALL_API, "path": "nope", "json": "{", "priority": "x", "queue": "zzz"})
    page = text(response)
    for field in ("path", "json", "priority", "queue"):
        assert _field_error(page, field)
    assert 'value="nope"' in page
    assert 'value="x"' in page
    assert job_count(panel) == 0


def test_unknown_task_is_404(panel: Flask,
                             client_for: Callable[[str], FlaskClient]) -> None:
    client = client_for("operator")
    assert client.get("/defer/no_such_task").status_code == 404
    assert client.get("/defer/health_check").status_code == 404
    token = csrf_token(text(client.get("/defer")))
    response = client.post("/defer/health_check", data={"csrf_token": token})
    assert response.status_code == 404
    assert job_count(panel) == 0


def test_viewer_cannot_defer(panel: Flask,
                             client_for: Callable[[str], FlaskClient]) -> None:
    client = client_for("viewer")
    assert client.get("/defer/call_api").status_code == 403
    token = csrf_token(text(client.get("/defer")))
    response = client.post("/defer/call_api", data={"csrf_token": token, **CALL_API})
    assert response.status_code == 403
    assert job_count(panel) == 0


class _PastSigner(TimestampSigner):
    def get_timestamp(self) -> int:
        return int(time.time()) - 2 * 3600


def test_expired_form_is_shown_again_with_values(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    client = client_for("operator")
    client.get("/defer/call_api")
    with client.session_transaction() as session:
        raw = session["csrf_token"]
    expired = URLSafeTimedSerializer(TEST_SECRET_KEY, salt="wtf-csrf-token",
                                     signer=_PastSigner).dumps(raw)
    response = client.post("/defer/call_api",
                           data={"csrf_token": expired, **CALL_API})
    page = text(response)
    assert response.status_code == 400
    assert EXPIRED_FORM_MESSAGE in page
    assert re.search(r'<option selected value="POST">', page)
    assert 'value="/items"' in page
    assert "{&#34;name&#34;: &#34;a&#34;}</textarea>" in page
    queues = re.search(r'<select[^>]*name="queue"[^>]*>(.*?)</select>', page, re.S)
    assert queues is not None
    assert '<option selected value="api_calls">' in queues.group(1)
    assert re.search(r'name="priority"[^>]*value="5"', page)
    assert job_count(panel) == 0
    resubmitted = client.post("/defer/call_api", data={
        "csrf_token": csrf_token(page), **CALL_API})
    assert resubmitted.status_code == 303
    assert job_count(panel) == 1


def test_defer_does_not_touch_existing_jobs(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    existing = defer_job(panel)
    before = job_row(panel, existing)
    assert _post(client_for("operator"), "fetch_joke", {}).status_code == 303
    assert job_row(panel, existing) == before
    assert job_count(panel) == 2
