"""/healthz against the real database: each check, its failure and its JSON."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from flask import Flask
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tests.support.panel import TEST_SECRET_KEY, build_panel
from webpanel import db
from workers.settings import load_settings

RUNNING = {"web": "RUNNING", "worker:worker_00": "RUNNING",
           "worker:worker_01": "RUNNING", "scheduler": "RUNNING", "setup": "EXITED"}


@pytest.fixture
def sql(database_url: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """Yield an autocommit connection to the test database."""
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


def add_worker(sql: psycopg.Connection[dict[str, Any]], name: str,
               role: str = "worker", age: float = 0.0) -> int:
    """Register a Procrastinate worker with a heartbeat ``age`` seconds old."""
    row = sql.execute("INSERT INTO procrastinate_workers (last_heartbeat) VALUES "
                      "(now() - make_interval(secs => %s)) RETURNING id",
                      (age,)).fetchone()
    assert row is not None
    sql.execute("INSERT INTO worker_processes (worker_id, host, pid, process_name, "
                "role, queues, concurrency) VALUES (%s, 'h', 1, %s, %s, "
                "'{default}', 10)", (row["id"], name, role))
    return int(row["id"])


def add_health_row(sql: psycopg.Connection[dict[str, Any]], age: float = 5.0,
                   control: dict[str, Any] | None = None,
                   **details: Any) -> None:
    """Store a health check row ``age`` seconds old."""
    process_control = control if control is not None else {
        "reachable": True, "processes": RUNNING}
    sql.execute(
        "INSERT INTO health_checks (checked_at, db_latency_ms, live_workers, "
        "stalled_jobs, details) VALUES (now() - make_interval(secs => %s), 1.0, 2, "
        "0, %s)", (age, Jsonb({"process_control": process_control, **details})))


@pytest.fixture
def healthy(sql: psycopg.Connection[dict[str, Any]]) -> None:
    """Make a fleet that passes every check: 2 workers, a scheduler, a fresh row."""
    add_worker(sql, "worker:worker_00")
    add_worker(sql, "worker:worker_01")
    add_worker(sql, "scheduler", role="scheduler")
    add_health_row(sql)


def healthz(panel: Flask) -> tuple[int, dict[str, Any]]:
    """GET /healthz anonymously and return its status and JSON body."""
    response = panel.test_client().get("/healthz")
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert isinstance(body, dict)
    return response.status_code, body


def test_healthz_passes_on_healthy_fleet(panel: Flask, healthy: None) -> None:
    status, body = healthz(panel)

    assert status == 200, body
    assert body["status"] == "ok"
    assert body["failing"] == []
    checks = body["checks"]
    assert checks["database"]["latency_ms"] >= 0
    assert checks["schema"]["ok"]
    assert checks["live_workers"] == {"ok": True, "live": 2, "expected": 2,
                                      "stale": 0}
    assert checks["process_control"]["state"] == "reachable"
    assert checks["processes"]["states"]["worker:worker_01"] == "RUNNING"


def test_healthz_names_every_failing_check_on_empty_fleet(panel: Flask) -> None:
    status, body = healthz(panel)

    assert status == 503
    assert body["status"] == "failing"
    assert "live_workers" in body["failing"]
    assert "scheduler" in body["failing"]
    assert "database" not in body["failing"]
    assert body["checks"]["live_workers"]["message"] == (
        "0 of 2 worker processes sent a heartbeat in the last 60 s")
    assert body["checks"]["process_control"]["state"] == "unknown"


def test_healthz_counts_stale_worker_as_missing(
    panel: Flask, healthy: None, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    sql.execute("UPDATE procrastinate_workers SET last_heartbeat = now() - "
                "interval '1 hour' WHERE id = (SELECT worker_id FROM worker_processes"
                " WHERE process_name = 'worker:worker_01')")

    status, body = healthz(panel)

    assert status == 503
    assert body["failing"] == ["live_workers"]
    assert body["checks"]["live_workers"]["stale"] == 1


def test_healthz_reports_old_waiting_job(
    panel: Flask, healthy: None, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    row = sql.execute("INSERT INTO procrastinate_jobs (queue_name, task_name, args)"
                      " VALUES ('api_calls', 'fetch_joke', '{}') RETURNING id"
                      ).fetchone()
    assert row is not None
    sql.execute("UPDATE procrastinate_events SET at = now() - interval '11 minutes'"
                " WHERE job_id = %s", (row["id"],))

    status, body = healthz(panel)

    assert status == 503
    assert body["failing"] == ["oldest_waiting_job"]
    check = body["checks"]["oldest_waiting_job"]
    assert check["job_id"] == row["id"]
    assert check["queue"] == "api_calls"
    assert check["age_s"] > 600


def test_healthz_ignores_job_scheduled_for_later(
    panel: Flask, healthy: None, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    sql.execute("INSERT INTO procrastinate_jobs (queue_name, task_name, args, "
                "scheduled_at) VALUES ('default', 'fetch_joke', '{}', "
                "now() + interval '1 day')")
    sql.execute("UPDATE procrastinate_events SET at = now() - interval '1 hour'")

    status, body = healthz(panel)

    assert status == 200, body


def test_healthz_reports_stalled_jobs(
    panel: Flask, healthy: None, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    sql.execute("INSERT INTO procrastinate_jobs (queue_name, task_name, args, "
                "status) VALUES ('default', 'fetch_joke', '{}', 'doing')")

    status, body = healthz(panel)

    assert status == 503
    assert body["failing"] == ["stalled_jobs"]
    assert body["checks"]["stalled_jobs"]["count"] == 1


def test_healthz_reports_silent_scheduler(
    panel: Flask, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    add_worker(sql, "worker:worker_00")
    add_worker(sql, "worker:worker_01")
    add_health_row(sql, age=1000)

    status, body = healthz(panel)

    assert status == 503
    assert body["failing"] == ["scheduler"]
    assert "no health check for 1000 s" in body["checks"]["scheduler"]["message"]


def test_healthz_gives_new_scheduler_time(
    panel: Flask, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    add_worker(sql, "worker:worker_00")
    add_worker(sql, "worker:worker_01")
    add_worker(sql, "scheduler", role="scheduler")

    status, body = healthz(panel)

    assert status == 200, body
    assert "no health check yet" in body["checks"]["scheduler"]["message"]


def test_healthz_unreachable_control_is_its_own_state(
    panel: Flask, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    add_worker(sql, "worker:worker_00")
    add_worker(sql, "worker:worker_01")
    message = "cannot reach supervisord at var/supervisor.sock: permission denied"
    add_health_row(sql, control={"reachable": False, "error": message})

    status, body = healthz(panel)

    assert status == 503
    assert body["failing"] == ["process_control"]
    control = body["checks"]["process_control"]
    assert control["state"] == "unreachable"
    assert control["message"] == message
    assert body["checks"]["live_workers"]["ok"]


def test_healthz_shows_stopped_worker_as_stopped(
    panel: Flask, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    add_worker(sql, "worker:worker_00")
    add_worker(sql, "worker:worker_01")
    add_health_row(sql, control={"reachable": True, "processes": {
        **RUNNING, "worker:worker_01": "STOPPED"}})

    status, body = healthz(panel)

    assert status == 503
    assert body["failing"] == ["processes"]
    assert body["checks"]["process_control"]["state"] == "reachable"
    assert body["checks"]["processes"]["message"] == "worker:worker_01 is STOPPED"


def test_healthz_reports_pools_below_minimum(
    panel: Flask, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    add_worker(sql, "worker:worker_00")
    add_worker(sql, "worker:worker_01")
    add_health_row(sql, pools_below_min=["worker:worker_00"])

    status, body = healthz(panel)

    assert status == 503
    assert body["failing"] == ["database_pools"]


def test_healthz_reports_schema_behind_code(
    panel: Flask, healthy: None, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    sql.execute("DROP FUNCTION procrastinate_fetch_job_v2(character varying[], "
                "bigint)")

    status, body = healthz(panel)

    assert status == 503
    assert body["failing"] == ["schema"]
    message = body["checks"]["schema"]["message"]
    assert "behind the code" in message
    assert "procrastinate_fetch_job_v2" in message


def test_healthz_reports_schema_not_applied(
    panel: Flask, healthy: None, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    sql.execute("DELETE FROM fleet_schema_state")

    status, body = healthz(panel)

    assert status == 503
    assert "schema" in body["failing"]
    assert "has not been applied" in body["checks"]["schema"]["message"]


@pytest.fixture
def refused_url() -> Iterator[str]:
    """Yield a database URL whose port is bound by this test but never listens."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as reserved:
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
        yield f"postgresql://nobody:secret@127.0.0.1:{port}/none"


@pytest.fixture
def panel_without_database(database_url: str, refused_url: str) -> Iterator[Flask]:
    """Yield a panel whose DATABASE_URL reaches no server, with a 1 s budget."""
    app = build_panel(database_url)  # creates the accounts on the real database
    db.close_process_pool()
    app.config["FLEET_SETTINGS"] = load_settings({
        "DATABASE_URL": refused_url, "SECRET_KEY": TEST_SECRET_KEY,
        "API_BASE_URL": "http://127.0.0.1:9", "WEB_REQUEST_BUDGET": "1",
        "DB_CONNECT_TIMEOUT": "1"})
    yield app
    db.close_process_pool()


def test_healthz_database_down_is_503_json(panel_without_database: Flask) -> None:
    started = time.monotonic()
    status, body = healthz(panel_without_database)

    assert status == 503
    assert body["failing"] == ["database"]
    assert "database" in body["checks"]["database"]["message"]
    assert "Traceback" not in str(body)
    assert time.monotonic() - started < 5
