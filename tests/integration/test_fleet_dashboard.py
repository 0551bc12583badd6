"""The dashboard's counts, fleet cards and health row, against the real database."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from webpanel import dashboard


@pytest.fixture
def sql(database_url: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """Yield an autocommit connection to the test database."""
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


def add_jobs(sql: psycopg.Connection[dict[str, Any]], queue: str, status: str,
             count: int) -> None:
    """Insert ``count`` jobs with a status, without events."""
    sql.execute(
        "INSERT INTO procrastinate_jobs (queue_name, task_name, args, status) "
        "SELECT %s, 'fetch_joke', '{}', %s::procrastinate_job_status "
        "FROM generate_series(1, %s)", (queue, status, count))


def stat(body: str, status: str) -> str:
    """Return the text of the dashboard card of one status."""
    match = re.search(rf'data-status="{status}"[^>]*>([^<]*)<', body)
    assert match, f"no card for {status}"
    return match.group(1)


def test_dashboard_counts_exactly_below_cap(
    client_for: Callable[[str], FlaskClient],
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    add_jobs(sql, "default", "todo", 3)
    add_jobs(sql, "api_calls", "succeeded", 2)
    add_jobs(sql, "reports", "failed", 1)

    body = client_for("viewer").get("/").get_data(as_text=True)

    assert stat(body, "todo") == "3"
    assert stat(body, "succeeded") == "2"
    assert stat(body, "failed") == "1"
    assert stat(body, "doing") == "0"
    assert 'data-exact="no"' not in body
    assert ">reports</a>" in body
    assert 'id="dashboard-counts" data-refresh="5"' in body
    assert 'id="dashboard-charts" data-refresh="60"' in body


def test_dashboard_estimates_above_cap(
    client_for: Callable[[str], FlaskClient],
    sql: psycopg.Connection[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dashboard, "COUNT_CAP", 50)
    add_jobs(sql, "default", "succeeded", 400)
    add_jobs(sql, "default", "todo", 5)
    sql.execute("ANALYZE procrastinate_jobs")

    body = client_for("viewer").get("/").get_data(as_text=True)

    assert stat(body, "succeeded").startswith("about ")
    assert stat(body, "todo") == "5"
    assert "estimated from table statistics" in body


def test_job_counts_without_statistics_give_lower_bound(
    panel: Flask,
    sql: psycopg.Connection[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dashboard, "COUNT_CAP", 4)
    monkeypatch.setattr(dashboard, "_estimates", lambda pairs: {})
    add_jobs(sql, "default", "failed", 9)

    with panel.test_request_context():
        counts = dashboard.job_counts(["default"])

    assert counts["default"]["failed"] == dashboard.Count(4, "at_least")
    assert str(counts["default"]["failed"]) == "4 or more"


def test_job_counts_estimate_each_capped_pair(
    panel: Flask,
    sql: psycopg.Connection[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dashboard, "COUNT_CAP", 50)
    add_jobs(sql, "default", "succeeded", 900)
    add_jobs(sql, "default", "failed", 300)
    add_jobs(sql, "reports", "succeeded", 150)
    add_jobs(sql, "reports", "todo", 7)
    sql.execute("ANALYZE procrastinate_jobs")

    with panel.test_request_context():
        counts = dashboard.job_counts(["default", "reports"])

    # ANALYZE reads every row of a table this small, so the estimates are exact.
    assert counts["default"]["succeeded"] == dashboard.Count(900, "estimate")
    assert counts["default"]["failed"] == dashboard.Count(300, "estimate")
    assert counts["reports"]["succeeded"] == dashboard.Count(150, "estimate")
    assert counts["reports"]["todo"] == dashboard.Count(7)
    assert counts["reports"]["failed"] == dashboard.Count(0)


def test_estimates_read_in_one_statement(
    panel: Flask,
    sql: psycopg.Connection[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dashboard, "COUNT_CAP", 5)
    add_jobs(sql, "default", "succeeded", 40)
    add_jobs(sql, "default", "failed", 20)
    add_jobs(sql, "reports", "cancelled", 30)
    sql.execute("ANALYZE procrastinate_jobs")
    statements: list[str] = []
    fetch_one = dashboard.db.fetch_one

    def counting_fetch_one(text: str, params: Any = None) -> Any:
        statements.append(text)
        return fetch_one(text, params)

    monkeypatch.setattr(dashboard.db, "fetch_one", counting_fetch_one)

    with panel.test_request_context():
        counts = dashboard.job_counts(["default", "reports"])

    explains = [text for text in statements if text.startswith("EXPLAIN")]
    assert len(explains) == 1
    assert counts["reports"]["cancelled"] == dashboard.Count(30, "estimate")
    assert counts["default"]["failed"] == dashboard.Count(20, "estimate")


@pytest.mark.parametrize(("left", "right", "kind"), [
    (dashboard.Count(1), dashboard.Count(2), "exact"),
    (dashboard.Count(1), dashboard.Count(2, "at_least"), "at_least"),
    (dashboard.Count(1, "estimate"), dashboard.Count(2, "at_least"), "estimate"),
])
def test_count_addition_keeps_weakest_kind(
    left: dashboard.Count, right: dashboard.Count, kind: str
) -> None:
    total = left + right
    assert total.value == 3
    assert total.kind == kind


def test_count_text_rounds_estimates() -> None:
    assert str(dashboard.Count(1234567, "estimate")) == "about 1,200,000"
    assert str(dashboard.Count(1234567)) == "1,234,567"


def test_dashboard_fleet_cards(
    client_for: Callable[[str], FlaskClient],
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    worker = sql.execute("INSERT INTO procrastinate_workers DEFAULT VALUES "
                         "RETURNING id").fetchone()
    assert worker is not None
    sql.execute("INSERT INTO worker_processes (worker_id, host, pid, process_name, "
                "role, queues, concurrency) VALUES (%s, 'h', 1, 'worker:worker_00', "
                "'worker', '{default}', 10)", (worker["id"],))
    sql.execute("INSERT INTO procrastinate_jobs (queue_name, task_name, args, "
                "status) VALUES ('default', 'fetch_joke', '{}', 'doing')")
    waiting = sql.execute("INSERT INTO procrastinate_jobs (queue_name, task_name, "
                          "args) VALUES ('default', 'fetch_joke', '{}') "
                          "RETURNING id").fetchone()
    assert waiting is not None
    sql.execute("UPDATE procrastinate_events SET at = now() - interval '20 minutes'"
                " WHERE job_id = %s", (waiting["id"],))

    body = client_for("viewer").get("/").get_data(as_text=True)

    assert re.search(r'data-fleet="live-workers">1 / 2<', body)
    assert re.search(r'data-fleet="stalled-jobs">1<', body)
    assert re.search(r'data-fleet="oldest-waiting">20 min', body)
    assert f"job {waiting['id']}</a>" in body


def test_dashboard_shows_latest_health_check(
    client_for: Callable[[str], FlaskClient],
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    details = {"process_control": {"reachable": True, "processes": {
        "worker:worker_00": "RUNNING", "worker:worker_01": "STOPPED",
        "setup": "EXITED"}}}
    sql.execute("INSERT INTO health_checks (db_latency_ms, live_workers, "
                "stalled_jobs, pool_size, pool_available, details) "
                "VALUES (1.5, 1, 0, 4, 3, %s)", (Jsonb(details),))

    body = client_for("viewer").get("/").get_data(as_text=True)

    card = body[body.index('data-fleet="health-check"'):]
    card = card[:card.index("<h2>By queue</h2>")]
    assert "database 1.5 ms" in card
    assert "processes: worker:worker_01 STOPPED" in card
    assert "setup" not in card


def test_dashboard_health_card_reports_unreachable_control(
    client_for: Callable[[str], FlaskClient],
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    details = {"process_control": {
        "reachable": False,
        "error": "cannot reach supervisord at var/supervisor.sock: permission denied"}}
    sql.execute("INSERT INTO health_checks (db_latency_ms, live_workers, "
                "stalled_jobs, details) VALUES (1, 2, 0, %s)", (Jsonb(details),))

    body = client_for("viewer").get("/").get_data(as_text=True)

    assert "process control unreachable: cannot reach supervisord" in body
