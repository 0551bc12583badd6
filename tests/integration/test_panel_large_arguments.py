"""One limit on job arguments (MAX_ARGUMENTS_BYTES) for the form, the API and defers.

A body over the limit is rejected with a page or JSON that names the limit, and no
job row appears. Arguments over PostgreSQL's 8000-byte NOTIFY limit but under
ours run to the end, while every notification the database sends stays small.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.integration.panel_worker_support import defer_from_form, panel_for_upstream
from tests.integration.test_api_fixtures import bearer, create_token
from tests.support.faults import (
    InProcessWorker,
    attempts,
    defer_job,
    events,
    fleet_settings,
    insert_job,
    query,
    wait_for_status,
)
from tests.support.forms import form_fields
from tests.support.panel import logged_in_client
from tests.support.upstream import Upstream
from webpanel import db
from workers.errors import InvalidTaskArguments
from workers.tasks.catalog import format_bytes

MAX_ARGUMENTS_BYTES = 16384  # the documented default of the setting
LIMIT_TEXT = "the limit is 16 KiB (MAX_ARGUMENTS_BYTES = 16384 bytes)"
NOTIFY_LIMIT = 8000  # bytes, PostgreSQL's limit on one NOTIFY payload
PAYLOAD_LIMIT = 1024  # bytes a payload of this product may carry
# The functions that call pg_notify, and the keys their payloads carry. A new
# notifying function fails the channel test until this test listens to it too.
NOTIFYING_FUNCTIONS = {"procrastinate_notify_queue_job_inserted_v1",
                       "procrastinate_notify_queue_abort_job_v1"}
PAYLOAD_KEYS = {"type", "job_id"}
CALL_API_PATH = "/api/v1/tasks/call_api/jobs"


def _json_body(size: int) -> str:
    """Return a JSON object of about ``size`` bytes."""
    return json.dumps({"blob": "x" * size})


def _job_count(database_url: str) -> int:
    # Only jobs an operator can defer: a running worker adds periodic jobs.
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM procrastinate_jobs WHERE "
                           "task_name IN ('call_api', 'fetch_joke')").fetchone()
    assert row is not None
    return int(row[0])


def _text(response: Any) -> str:
    page = response.get_data(as_text=True)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


@pytest.fixture
def panel(database_url: str, upstream: Upstream) -> Iterator[Flask]:
    """Yield the panel on the test database, with the default argument limit."""
    app = panel_for_upstream(database_url, upstream.url)
    assert app.config["FLEET_SETTINGS"].max_arguments_bytes == MAX_ARGUMENTS_BYTES
    yield app
    db.close_process_pool()


@pytest.fixture
def operator(panel: Flask) -> FlaskClient:
    """Return a client logged in as an operator."""
    return logged_in_client(panel, "operator")


def _form_values(client: FlaskClient, body: str) -> dict[str, str]:
    fields = form_fields(client.get("/defer/call_api").get_data(as_text=True))
    fields.update({"method": "POST", "path": "/items", "json": body,
                   "priority": "7", "lock": "items-lock"})
    return fields


def test_form_rejects_2mb_body_naming_limit(
    panel: Flask, operator: FlaskClient, database_url: str
) -> None:
    response = operator.post("/defer/call_api",
                             data=_form_values(operator, _json_body(2 * 1024 * 1024)))
    text = _text(response)
    assert response.status_code == 413
    assert "The request body is 2.0 MiB" in text
    assert LIMIT_TEXT in text
    assert "Nothing was deferred" in text
    page = response.get_data(as_text=True)
    assert 'href="/defer/call_api" data-link="back"' in page
    assert 'href="/jobs"' in page
    assert _job_count(database_url) == 0


def test_form_rejects_large_body_keeping_input(
    panel: Flask, operator: FlaskClient, database_url: str
) -> None:
    body = _json_body(60 * 1024)
    response = operator.post("/defer/call_api", data=_form_values(operator, body))
    page = response.get_data(as_text=True)
    text = _text(response)
    assert response.status_code == 400
    arguments = {"method": "POST", "path": "/items", "json": json.loads(body)}
    size = len(json.dumps(arguments, ensure_ascii=False).encode())
    assert f"arguments are {format_bytes(size)} of JSON" in text
    assert LIMIT_TEXT in text
    assert 'value="/items"' in page
    assert re.search(r'<option[^>]*selected[^>]*value="POST"', page)
    assert 'value="7"' in page
    assert 'value="items-lock"' in page
    textarea = re.search(r'<textarea[^>]*name="json"[^>]*>(.*?)</textarea>', page,
                         re.S)
    assert textarea is not None
    assert html.unescape(textarea.group(1)).strip() == body
    assert _job_count(database_url) == 0


def test_api_rejects_large_bodies_naming_limit(
    panel: Flask, database_url: str
) -> None:
    client = panel.test_client()
    headers = bearer(create_token(panel, "operator"))
    for size, status in ((2 * 1024 * 1024, 413), (60 * 1024, 400)):
        body = {"arguments": {"method": "POST", "path": "/items",
                              "json": {"blob": "x" * size}}}
        response = client.post(CALL_API_PATH, json=body, headers=headers)
        answer = response.get_json()
        assert response.status_code == status, answer
        assert LIMIT_TEXT in json.dumps(answer), answer
    batch = [{"arguments": {"method": "POST", "path": "/items",
                            "json": {"blob": "x" * (1024 * 1024)}}}]
    response = client.post(f"{CALL_API_PATH}/batch", json={"jobs": batch},
                           headers=headers)
    assert response.status_code == 400, response.get_json()
    assert LIMIT_TEXT in json.dumps(response.get_json())
    assert _job_count(database_url) == 0


def test_direct_defer_over_limit_rejected(
    database_url: str, upstream: Upstream
) -> None:
    settings = fleet_settings(database_url, upstream.url)
    with pytest.raises(InvalidTaskArguments) as raised:
        defer_job(settings, "call_api", method="POST", path="/items",
                  json={"blob": "x" * (60 * 1024)})

    assert LIMIT_TEXT in str(raised.value)
    assert query(database_url, "SELECT count(*) AS n FROM procrastinate_jobs"
                 )[0]["n"] == 0


def test_inserted_job_over_limit_fails_without_request(
    database_url: str, upstream: Upstream
) -> None:
    # A job written by SQL skips the defer's check; the task checks it again.
    settings = fleet_settings(database_url, upstream.url)
    job_id = insert_job(database_url, "call_api", {
        "method": "POST", "path": "/items", "json": {"blob": "x" * (60 * 1024)}})

    with InProcessWorker(settings):
        wait_for_status(database_url, job_id, "failed", timeout=20)

    (attempt,) = attempts(database_url, job_id)
    assert attempt["outcome"] == "failed"
    assert LIMIT_TEXT in attempt["error_message"]
    assert upstream.count("/items") == 0


def _notifying_functions(conn: psycopg.Connection[Any]) -> set[str]:
    rows = conn.execute(
        "SELECT p.proname FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang "
        "WHERE l.lanname IN ('plpgsql', 'sql') AND p.prosrc ILIKE '%pg_notify%'"
    ).fetchall()
    return {row[0] for row in rows}


def _channels(settings_queues: list[str]) -> list[str]:
    # Procrastinate notifies one channel per queue and one for every queue.
    queues = {"api_calls", "maintenance", *settings_queues}
    return ["procrastinate_any_queue_v1",
            *(f"procrastinate_queue_v1#{queue}" for queue in sorted(queues))]


def test_9kb_body_runs_with_small_notifications(
    panel: Flask, operator: FlaskClient, database_url: str, upstream: Upstream
) -> None:
    upstream.respond("/items", status=201, json={"id": 1}, method="POST")
    settings = fleet_settings(database_url, upstream.url)
    body = _json_body(9 * 1024)
    assert NOTIFY_LIMIT < len(body.encode()) < MAX_ARGUMENTS_BYTES

    with psycopg.connect(database_url, autocommit=True) as listener:
        assert _notifying_functions(listener) == NOTIFYING_FUNCTIONS
        for channel in _channels(list(settings.worker_queues)):
            listener.execute(f'LISTEN "{channel}"')

        too_large = operator.post(
            "/defer/call_api",
            data=_form_values(operator, _json_body(2 * 1024 * 1024)))
        assert too_large.status_code == 413
        job_id = defer_from_form(operator, "call_api",
                                 {"method": "POST", "path": "/items", "json": body})
        with InProcessWorker(settings):
            wait_for_status(database_url, job_id, "succeeded", timeout=30)
        payloads = [(note.channel, note.payload)
                    for note in listener.notifies(timeout=1.0)]

    assert _job_count(database_url) == 1
    (request,) = upstream.requests("/items")
    assert request.method == "POST"
    assert request.json() == json.loads(body)
    assert [event["type"] for event in events(database_url, job_id)] == [
        "deferred", "started", "succeeded"]
    # The worker also defers periodic jobs, whose notifications arrive here too.
    job_ids = set()
    for channel, payload in payloads:
        assert len(payload.encode()) < PAYLOAD_LIMIT, (channel, payload[:200])
        message = json.loads(payload)
        assert set(message) <= PAYLOAD_KEYS, (channel, message)
        assert isinstance(message["job_id"], int), (channel, message)
        job_ids.add(message["job_id"])
    assert job_id in job_ids, payloads
