"""What a defer costs the database: one transaction for the job and its audit row.

A job and its audit row written in one transaction carry the same transaction id
in their ``xmin`` system column, so the tests compare those. The statement counts
come from pg_stat_statements on a server of this module's own, started like the
benchmark's (``bench.database.BenchServer``), because the session's test server
does not load it. The last test halts that server to check that the panel returns
503 while PostgreSQL is down and recovers once it is back.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient
from psycopg import pq

from bench.database import BenchServer, StatementCount
from tests.integration.test_api_fixtures import bearer, create_token
from tests.integration.test_jobs_fixtures import audit_rows, job_count, run_sql, text
from tests.support.panel import build_panel, csrf_token, logged_in_client
from webpanel import db
from webpanel.db import DatabaseUnavailable
from workers.pool_check import SyncRecentUseCheck

FORM = "/defer/fetch_joke"
BATCH = "/api/v1/tasks/fetch_joke/jobs/batch"
DEFER_SQL = "procrastinate_defer_jobs_v1"
AUDIT_SQL = "INSERT INTO audit_log"
RECOVERY_TIMEOUT = 30.0  # seconds for the panel to serve pages again after an outage
FAST_ENV = {"WEB_REQUEST_BUDGET": "2", "DB_CONNECT_TIMEOUT": "1"}

# The trigger makes every audit INSERT fail, as a full disk or a broken
# constraint would.
FAILING_AUDIT = """
CREATE FUNCTION reject_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log rejects rows in this test'
        USING ERRCODE = 'check_violation';
END $$;
CREATE TRIGGER reject_audit BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION reject_audit();
"""


def post_form(client: FlaskClient, data: dict[str, str] | None = None) -> Any:
    """Post the fetch_joke defer form with a fresh CSRF token."""
    token = csrf_token(text(client.get(FORM)))
    fields = {"csrf_token": token, "queue": "api_calls", "priority": "0",
              "timezone": "UTC", **(data or {})}
    return client.post(FORM, data=fields)


def job_id_of(response: Any) -> int:
    """Return the job id of a defer form's redirect to the job page."""
    assert response.status_code == 303, text(response)[:500]
    return int(response.headers["Location"].rstrip("/").rsplit("/", 1)[-1])


def xmin_of_job(panel: Flask, job_id: int) -> str:
    """Return the id of the transaction that inserted a job."""
    rows = run_sql(panel, "SELECT xmin::text AS xmin FROM procrastinate_jobs "
                          "WHERE id = %(id)s", {"id": job_id})
    assert len(rows) == 1
    return str(rows[0]["xmin"])


def xmins_of_audit(panel: Flask, job_id: int) -> list[str]:
    """Return the ids of the transactions that inserted a job's audit rows."""
    rows = run_sql(panel, "SELECT xmin::text AS xmin FROM audit_log "
                          "WHERE %(id)s = ANY(job_ids) ORDER BY id", {"id": job_id})
    return [str(row["xmin"]) for row in rows]


def test_form_defer_one_transaction(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    job_id = job_id_of(post_form(client_for("operator")))

    assert xmins_of_audit(panel, job_id) == [xmin_of_job(panel, job_id)]
    entry = audit_rows(panel, "job_deferred")[-1]
    assert entry["job_ids"] == [job_id]
    assert entry["result"] == "ok"


def test_form_defer_failing_audit_leaves_no_job(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    client = client_for("operator")
    run_sql(panel, FAILING_AUDIT)

    response = post_form(client)

    assert response.status_code == 500
    assert "Traceback" not in text(response)
    assert job_count(panel) == 0


def test_form_defer_busy_lock_writes_no_audit(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    client = client_for("operator")
    job_id_of(post_form(client, {"queueing_lock": "nightly"}))

    response = post_form(client, {"queueing_lock": "nightly"})

    assert response.status_code == 400
    assert "already queued or running" in text(response)
    assert job_count(panel) == 1
    assert len(audit_rows(panel, "job_deferred")) == 1


def test_api_batch_one_transaction(panel: Flask) -> None:
    headers = bearer(create_token(panel, "operator"))
    response = panel.test_client().post(
        BATCH, json={"jobs": [{"arguments": {}}, {"arguments": {}, "priority": 3}]},
        headers=headers)

    assert response.status_code == 201
    job_ids = response.get_json()["job_ids"]
    assert response.get_json()["urls"] == [f"/api/v1/jobs/{job_id}"
                                           for job_id in job_ids]
    transaction = xmin_of_job(panel, job_ids[0])
    assert xmin_of_job(panel, job_ids[1]) == transaction
    assert xmins_of_audit(panel, job_ids[0]) == [transaction]


def test_api_batch_failing_audit_leaves_no_job(panel: Flask) -> None:
    headers = bearer(create_token(panel, "operator"))
    run_sql(panel, FAILING_AUDIT)

    response = panel.test_client().post(
        BATCH, json={"jobs": [{"arguments": {}}, {"arguments": {}}]},
        headers=headers)

    assert response.status_code == 500
    assert job_count(panel) == 0


def test_fetch_leaves_pooled_connection_transactional(database_url: str) -> None:
    panel = build_panel(database_url, env={"WEB_DB_POOL_MAX_SIZE": "1"})
    try:
        with panel.app_context():
            row = db.fetch_one("SELECT 1 AS one")
            assert row == {"one": 1}
            with db.connection() as conn:
                assert conn.autocommit is False
                conn.execute("SELECT 1")
                status = conn.info.transaction_status
            assert status == pq.TransactionStatus.INTRANS
    finally:
        db.close_process_pool()


def test_fetch_in_autocommit_keeps_statement_timeout(database_url: str) -> None:
    panel = build_panel(database_url, env=FAST_ENV)
    try:
        with panel.app_context():
            row = db.fetch_one("SELECT current_setting('statement_timeout') AS value")
            assert row == {"value": "2s"}
            with pytest.raises(DatabaseUnavailable) as caught:
                db.fetch_one("SELECT pg_sleep(5)")
            assert caught.value.timed_out
    finally:
        db.close_process_pool()


def _wait_readable(conn: psycopg.Connection[Any], timeout: float) -> bool:
    poller = select.poll()
    poller.register(conn.pgconn.socket, select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))


def test_recent_use_check_detects_terminated(database_url: str) -> None:
    check = SyncRecentUseCheck(recent_use_seconds=60)
    with psycopg.connect(database_url, autocommit=True) as admin, \
            psycopg.connect(database_url) as conn:
        assert check.needs_round_trip(conn)  # never handed out
        check(conn)
        assert not check.needs_round_trip(conn)

        admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        assert _wait_readable(conn, timeout=5)

        assert check.needs_round_trip(conn)
        with pytest.raises(psycopg.OperationalError):
            check(conn)


def test_recent_use_check_runs_round_trip_after_window(database_url: str) -> None:
    check = SyncRecentUseCheck(recent_use_seconds=0)
    with psycopg.connect(database_url) as conn:
        check(conn)
        assert check.needs_round_trip(conn)


def _panel_backends(panel: Flask) -> int:
    rows = run_sql(panel, "SELECT count(*) AS n FROM pg_stat_activity "
                          "WHERE datname = current_database() "
                          "AND application_name LIKE 'web:%%'")
    return int(rows[0]["n"])


def test_terminated_connection_is_replaced_unseen(
        panel: Flask, client_for: Callable[[str], FlaskClient]) -> None:
    client = client_for("viewer")
    assert client.get("/audit").status_code == 200
    assert _panel_backends(panel) >= 1
    run_sql(panel, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                   "WHERE datname = current_database() "
                   "AND application_name LIKE 'web:%%'")
    deadline = time.monotonic() + 10
    while _panel_backends(panel) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling interval while the backends exit
    assert _panel_backends(panel) == 0

    assert client.get("/audit").status_code == 200


@pytest.fixture(scope="module")
def counted_server() -> Iterator[BenchServer]:
    """Yield a server of this module's own, with pg_stat_statements loaded."""
    with BenchServer(None) as server:
        if not server.has_statements:
            pytest.skip("pg_stat_statements is not installed for this PostgreSQL")
        yield server


@pytest.fixture
def counted_panel(counted_server: BenchServer) -> Iterator[tuple[Flask, str]]:
    """Yield a panel on a fresh database of the counted server, and its URL."""
    url = counted_server.new_database("test_costs")
    panel = build_panel(url, env=FAST_ENV)
    yield panel, url
    db.close_process_pool()


def count_statements(server: BenchServer, url: str,
                     action: Callable[[], None]) -> StatementCount:
    """Return the statements the database at ``url`` ran during ``action``."""
    server.reset_statements(url)
    action()
    return server.count_statements(url)


def calls_matching(counts: StatementCount, fragment: str) -> int:
    """Return the calls of every statement whose text contains ``fragment``."""
    return sum(calls for text_, calls in counts.calls.items() if fragment in text_)


def test_form_defer_costs_two_statements(
        counted_server: BenchServer, counted_panel: tuple[Flask, str]) -> None:
    panel, url = counted_panel
    client = logged_in_client(panel, "operator")
    token = csrf_token(text(client.get(FORM)))
    fields = {"csrf_token": token, "queue": "api_calls", "priority": "0",
              "timezone": "UTC"}
    job_id_of(client.post(FORM, data=fields))  # warms the pool

    counts = count_statements(
        counted_server, url, lambda: job_id_of(client.post(FORM, data=fields)))

    # The account check, then the defer and its audit row in one statement.
    assert counts.calls.get("BEGIN", 0) == 0
    assert counts.calls.get("COMMIT", 0) == 0
    assert calls_matching(counts, DEFER_SQL) == 1
    assert calls_matching(counts, AUDIT_SQL) == 1
    assert calls_matching(counts, "panel_users") == 1
    assert counts.total == 2, counts.calls


def test_page_reads_send_no_begin_or_commit(
        counted_server: BenchServer, counted_panel: tuple[Flask, str]) -> None:
    panel, url = counted_panel
    client = logged_in_client(panel, "viewer")
    assert client.get("/audit").status_code == 200

    def read_page() -> None:
        assert client.get("/audit").status_code == 200

    counts = count_statements(counted_server, url, read_page)

    assert counts.work >= 3
    assert counts.calls.get("BEGIN", 0) == 0
    assert counts.calls.get("COMMIT", 0) == 0


def _wait_for_page(client: FlaskClient, path: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    status = client.get(path).status_code
    while status != 200 and time.monotonic() < deadline:
        time.sleep(0.5)  # polling interval while the pool reconnects
        status = client.get(path).status_code
    return status


def test_panel_503_while_down_then_recovers(
        counted_server: BenchServer, counted_panel: tuple[Flask, str]) -> None:
    panel, _ = counted_panel
    client = logged_in_client(panel, "viewer")
    assert client.get("/audit").status_code == 200
    postgres = counted_server._server
    assert postgres is not None

    postgres.halt()
    try:
        started = time.monotonic()
        response = client.get("/audit")
        elapsed = time.monotonic() - started
        # Once a request found the server refusing, the next ones get the same
        # 503 at once instead of waiting for the pool again.
        again = client.get("/audit")
    finally:
        postgres.resume()

    assert response.status_code == 503
    assert "Database unavailable" in text(response)
    assert "cannot be reached" in text(response)
    assert "Traceback" not in text(response)
    assert elapsed < 10
    assert again.status_code == 503
    assert "cannot be reached" in text(again)
    assert _wait_for_page(client, "/audit", RECOVERY_TIMEOUT) == 200
