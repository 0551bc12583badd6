"""The panel on a database whose schema is behind the code: 503s, never a 500.

Each test applies the current schema, defers a job, then removes one object the
code needs, as an older schema would lack it: a versioned Procrastinate function,
or a column or table of the project's own migrations. ``/healthz`` must then name
the schema as the failing check, and no page may return a 500.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from flask import Flask, url_for

from tests.integration.panel_worker_support import post_with_token
from tests.integration.test_api_fixtures import bearer, create_token
from tests.support.panel import build_panel, logged_in_client
from webpanel import db
from webpanel.blueprints import NAV_ITEMS

# Each removal an older schema could show, and the name /healthz gives it.
REMOVALS = {
    "fetch-function": (
        "DROP FUNCTION procrastinate_fetch_job_v2(character varying[], bigint)",
        "function procrastinate_fetch_job_v2"),
    "attempt-column": ("ALTER TABLE job_attempts DROP COLUMN next_attempt_at",
                       "column job_attempts.next_attempt_at"),
    "worker-column": ("ALTER TABLE worker_processes DROP COLUMN process_name",
                      "column worker_processes.process_name"),
    "results-table": ("DROP TABLE job_results", "table job_results"),
}
API_PATHS = ("/api/v1/jobs", "/api/v1/queues", "/api/v1/workers", "/api/v1/tasks")


def _sql(database_url: str, statement: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        cursor = conn.execute(statement)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description else []


@pytest.fixture(params=sorted(REMOVALS))
def behind(request: pytest.FixtureRequest, database_url: str
           ) -> Iterator[tuple[Flask, int, str]]:
    """Yield a panel, a waiting job's id and the missing object's name."""
    statement, missing = REMOVALS[request.param]
    app = build_panel(database_url)
    with app.app_context():
        job_id = db.procrastinate_app().tasks["fetch_joke"].defer()
    db.close_process_pool()
    _sql(database_url, statement)
    yield app, job_id, missing
    db.close_process_pool()


def _page_urls(app: Flask, job_id: int) -> list[str]:
    with app.test_request_context():
        urls = [url_for(endpoint) for endpoint, _ in NAV_ITEMS]
    bulk = "/jobs/bulk?action=cancel&scope=filter&status=todo"
    return [*urls, f"/jobs/{job_id}", "/jobs?status=todo", "/defer/call_api",
            "/defer/fetch_joke", "/account", "/metrics", bulk]


def _check_answer(response: Any, url: str) -> None:
    body = response.get_data(as_text=True)
    assert response.status_code != 500, f"{url}: {body[:800]}"
    assert response.status_code in {200, 303, 400, 404, 503}, f"{url}: {body[:800]}"
    assert "Traceback" not in body, url
    assert "Internal Server Error" not in body, url
    if response.status_code == 503:
        assert "schema" in body.lower(), f"{url}: {body[:800]}"


def test_healthz_names_schema_behind_code(behind: tuple[Flask, int, str]) -> None:
    app, _, missing = behind
    response = app.test_client().get("/healthz")
    body = response.get_json()
    assert response.status_code == 503
    assert "schema" in body["failing"]
    message = body["checks"]["schema"]["message"]
    assert "the database schema is behind the code" in message
    assert missing in message
    assert "python -m workers.schema apply" in message


def test_pages_never_return_500(behind: tuple[Flask, int, str]) -> None:
    app, job_id, _ = behind
    client = logged_in_client(app, "admin")
    for url in _page_urls(app, job_id):
        _check_answer(client.get(url), url)


def test_api_never_returns_500(behind: tuple[Flask, int, str]) -> None:
    app, job_id, _ = behind
    headers = bearer(create_token(app, "operator"))
    client = app.test_client()
    for url in (*API_PATHS, f"/api/v1/jobs/{job_id}"):
        _check_answer(client.get(url, headers=headers), url)


def test_actions_never_return_500(behind: tuple[Flask, int, str]) -> None:
    app, job_id, _ = behind
    client = logged_in_client(app, "operator")
    page = f"/jobs/{job_id}"
    defer = post_with_token(client, "/defer/fetch_joke", "/defer/fetch_joke",
                            {"queue": "api_calls", "priority": "0",
                             "timezone": "UTC"})
    _check_answer(defer, "POST /defer/fetch_joke")
    cancel = post_with_token(client, f"/jobs/{job_id}/cancel", page)
    _check_answer(cancel, f"POST /jobs/{job_id}/cancel")


def test_waiting_job_left_unchanged(behind: tuple[Flask, int, str],
                                    database_url: str) -> None:
    app, job_id, _ = behind
    client = logged_in_client(app, "viewer")
    for url in _page_urls(app, job_id):
        client.get(url)
    rows = _sql(database_url, f"SELECT status::text, attempts FROM procrastinate_jobs "
                              f"WHERE id = {job_id}")
    assert rows == [("todo", 0)]
    events = _sql(database_url, f"SELECT type::text FROM procrastinate_events "
                                f"WHERE job_id = {job_id} ORDER BY id")
    assert [event for (event,) in events] == ["deferred"]

