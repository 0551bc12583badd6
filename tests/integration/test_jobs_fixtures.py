"""Helpers for the job and defer tests: jobs in every state, on the real database.

Jobs are deferred through Procrastinate's App inside the panel's app context, then
moved between states with Procrastinate's own SQL functions, as a worker would.
The module also checks the helpers themselves, so a broken helper fails here first.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient
from psycopg.rows import dict_row

from tests.support.panel import build_panel, csrf_token, logged_in_client
from webpanel import db

UTC = datetime.timezone.utc


def database_url(panel: Flask) -> str:
    """Return the panel's database URL."""
    return panel.config["FLEET_SETTINGS"].database_url


def run_sql(panel: Flask, statement: str,
            params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run one statement on its own autocommit connection and return its rows."""
    with psycopg.connect(database_url(panel), autocommit=True,
                         row_factory=dict_row) as conn:
        cursor = conn.execute(statement, params or {})
        return cursor.fetchall() if cursor.description else []


def defer_job(panel: Flask, task: str = "fetch_joke", **options: Any) -> int:
    """Defer a job through Procrastinate; ``arguments`` contains the task's kwargs."""
    arguments = options.pop("arguments", {})
    with panel.app_context():
        app = db.procrastinate_app()
        return app.tasks[task].configure(**options).defer(**arguments)


def register_worker(panel: Flask) -> int:
    """Register a Procrastinate worker and return its id."""
    rows = run_sql(panel, "SELECT worker_id FROM procrastinate_register_worker_v1()")
    return int(rows[0]["worker_id"])


def start_job(panel: Flask, job_id: int, worker_id: int | None = None) -> None:
    """Move a waiting job to doing, held by ``worker_id`` (a new worker if None)."""
    worker = worker_id if worker_id is not None else register_worker(panel)
    run_sql(panel, "UPDATE procrastinate_jobs SET status = 'doing', worker_id = "
                   "%(worker)s WHERE id = %(id)s AND status = 'todo'",
            {"worker": worker, "id": job_id})


def finish_job(panel: Flask, job_id: int, status: str) -> None:
    """End a running job with succeeded, failed or aborted, as a worker does."""
    run_sql(panel, "SELECT procrastinate_finish_job_v1(%(id)s, %(status)s, false)",
            {"id": job_id, "status": status})


def job_in_state(panel: Flask, status: str, task: str = "fetch_joke",
                 **options: Any) -> int:
    """Defer a job and bring it into ``status``; doing jobs get a live worker."""
    job_id = defer_job(panel, task, **options)
    if status == "todo":
        return job_id
    if status == "cancelled":
        run_sql(panel, "SELECT procrastinate_cancel_job_v1(%(id)s, false, false)",
                {"id": job_id})
        return job_id
    start_job(panel, job_id)
    if status in {"succeeded", "failed", "aborted"}:
        if status == "aborted":
            run_sql(panel, "UPDATE procrastinate_jobs SET abort_requested = true "
                           "WHERE id = %(id)s", {"id": job_id})
        finish_job(panel, job_id, status)
    return job_id


def stop_heartbeats(panel: Flask, job_id: int, seconds: float = 3600) -> None:
    """Make the worker of a running job look dead: its last heartbeat is old."""
    run_sql(panel, "UPDATE procrastinate_workers SET last_heartbeat = now() - "
                   "make_interval(secs => %(seconds)s) WHERE id = (SELECT worker_id "
                   "FROM procrastinate_jobs WHERE id = %(id)s)",
            {"seconds": seconds, "id": job_id})


def job_row(panel: Flask, job_id: int) -> dict[str, Any] | None:
    """Return a job's row, status as text, or None when it is gone."""
    rows = run_sql(panel, "SELECT *, status::text AS status FROM procrastinate_jobs "
                          "WHERE id = %(id)s", {"id": job_id})
    return rows[0] if rows else None


def job_count(panel: Flask) -> int:
    """Return how many jobs exist."""
    return int(run_sql(panel, "SELECT count(*) AS n FROM procrastinate_jobs")[0]["n"])


def audit_rows(panel: Flask, action: str) -> list[dict[str, Any]]:
    """Return the audit entries of an action, oldest first."""
    return run_sql(panel, "SELECT * FROM audit_log WHERE action = %(action)s "
                          "ORDER BY id", {"action": action})


def text(response: Any) -> str:
    """Return a response body as text."""
    return response.get_data(as_text=True)


def token_for(client: FlaskClient, url: str = "/jobs") -> str:
    """Return a CSRF token taken from a page the client can see."""
    return csrf_token(text(client.get(url)))


def post_action(client: FlaskClient, job_id: int, action: str,
                next_url: str | None = None) -> Any:
    """POST one job action with a valid CSRF token."""
    data = {"csrf_token": token_for(client)}
    if next_url is not None:
        data["next"] = next_url
    return client.post(f"/jobs/{job_id}/{action}", data=data)


def flashes(client: FlaskClient) -> list[str]:
    """Return the flash messages of the next page the client loads."""
    html = text(client.get("/jobs"))
    return [re.sub(r"\s+", " ", item).strip()
            for item in re.findall(r'class="flash flash-\w+"[^>]*>(.*?)</div>', html,
                                   re.S)]


def listed_ids(html: str) -> list[int]:
    """Return the job ids of a job list page, in the order shown."""
    return [int(value) for value in re.findall(r'data-job-id="(\d+)"', html)]


@pytest.fixture(scope="module")
def shared_panel(module_database_url: str) -> Iterator[Flask]:
    """Yield one panel for a module's tests that leave the database unchanged."""
    app = build_panel(module_database_url)
    yield app
    db.close_process_pool()


@pytest.fixture
def shared_client_for(shared_panel: Flask) -> Iterator[Callable[[str], FlaskClient]]:
    """Yield a function giving clients of the shared panel; closes the pool after."""
    yield lambda role: logged_in_client(shared_panel, role)
    db.close_process_pool()


def test_job_in_state_reaches_every_status(panel: Flask) -> None:
    for status in ("todo", "doing", "succeeded", "failed", "cancelled", "aborted"):
        job_id = job_in_state(panel, status)
        row = job_row(panel, job_id)
        assert row is not None
        assert row["status"] == status


def test_stop_heartbeats_makes_worker_stale(panel: Flask) -> None:
    job_id = job_in_state(panel, "doing")
    stop_heartbeats(panel, job_id)
    rows = run_sql(panel, "SELECT last_heartbeat < now() - interval '30 minutes' AS "
                          "stale FROM procrastinate_workers w JOIN procrastinate_jobs"
                          " j ON j.worker_id = w.id WHERE j.id = %(id)s",
                   {"id": job_id})
    assert rows[0]["stale"] is True
