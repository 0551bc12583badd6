"""/metrics against the real database: access rules and the exposed numbers."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from psycopg.rows import dict_row

from tests.support.panel import TEST_SECRET_KEY, build_panel, logged_in_client
from webpanel import db
from workers.settings import load_settings

TOKEN = "metrics-token-" + "x" * 30


@pytest.fixture
def sql(database_url: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """Yield an autocommit connection to the test database."""
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


@pytest.fixture
def token_panel(database_url: str) -> Iterator[Flask]:
    """Yield a panel with METRICS_TOKEN set."""
    app = build_panel(database_url, env={"METRICS_TOKEN": TOKEN})
    yield app
    db.close_process_pool()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse Prometheus text into {(sample name, sorted labels): value}."""
    result = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            result[(sample.name, labels)] = sample.value
    return result


def test_metrics_rejects_anonymous_without_token(panel: Flask) -> None:
    response = panel.test_client().get("/metrics")

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "log in" in response.get_data(as_text=True)


def test_metrics_for_logged_in_user(
    client_for: Callable[[str], FlaskClient],
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    sql.execute("INSERT INTO procrastinate_jobs (queue_name, task_name, args) "
                "SELECT 'default', 'fetch_joke', '{}' FROM generate_series(1, 2)")
    row = sql.execute("INSERT INTO procrastinate_jobs (queue_name, task_name, args, "
                      "status) VALUES ('api_calls', 'call_api', '{}', 'succeeded') "
                      "RETURNING id").fetchone()
    assert row is not None
    for duration_ms, outcome in ((40, "succeeded"), (3000, "error"),
                                 (700000, "timeout")):
        sql.execute(
            "INSERT INTO job_attempts (job_id, attempt, task_name, queue_name, "
            "started_at, ended_at, duration_ms, outcome) VALUES (%s, 1, "
            "'call_api', 'api_calls', now() - interval '1 minute', now(), %s, %s)",
            (row["id"], duration_ms, outcome))
    worker = sql.execute("INSERT INTO procrastinate_workers DEFAULT VALUES "
                         "RETURNING id").fetchone()
    assert worker is not None
    sql.execute("INSERT INTO worker_processes (worker_id, host, pid, process_name, "
                "role, queues, concurrency) VALUES (%s, 'h', 1, 'worker:worker_00', "
                "'worker', '{default}', 10)", (worker["id"],))

    response = client_for("viewer").get("/metrics")

    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    values = samples(response.get_data(as_text=True))
    assert values[("procrastinate_jobs",
                   (("queue", "default"), ("status", "todo")))] == 2
    assert values[("procrastinate_jobs",
                   (("queue", "api_calls"), ("status", "succeeded")))] == 1
    assert values[("procrastinate_jobs",
                   (("queue", "maintenance"), ("status", "todo")))] == 0
    assert values[("procrastinate_queue_oldest_waiting_seconds",
                   (("queue", "default"),))] >= 0
    assert values[("procrastinate_workers",
                   (("role", "worker"), ("state", "live")))] == 1
    assert values[("procrastinate_workers_expected", ())] == 2
    assert values[("procrastinate_stalled_jobs", ())] == 0
    outcome = ("procrastinate_job_attempts_last_hour",
               (("outcome", "error"), ("queue", "api_calls"), ("task", "call_api")))
    assert values[outcome] == 1
    bucket = "procrastinate_job_attempt_duration_seconds_bucket"
    assert values[(bucket, (("le", "0.05"), ("queue", "api_calls")))] == 1
    assert values[(bucket, (("le", "5.0"), ("queue", "api_calls")))] == 2
    assert values[(bucket, (("le", "600.0"), ("queue", "api_calls")))] == 2
    assert values[(bucket, (("le", "+Inf"), ("queue", "api_calls")))] == 3
    gsum = ("procrastinate_job_attempt_duration_seconds_gsum",
            (("queue", "api_calls"),))
    assert values[gsum] == pytest.approx(703.04)


def test_metrics_accepts_bearer_token(token_panel: Flask) -> None:
    response = token_panel.test_client().get(
        "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})

    assert response.status_code == 200
    assert "procrastinate_jobs" in response.get_data(as_text=True)


@pytest.mark.parametrize("header", [
    f"Bearer {TOKEN}x", "Bearer ", f"Basic {TOKEN}", "Bearer wrong",
])
def test_metrics_rejects_wrong_credentials(token_panel: Flask, header: str) -> None:
    response = token_panel.test_client().get(
        "/metrics", headers={"Authorization": header})

    assert response.status_code == 401
    assert "procrastinate_jobs" not in response.get_data(as_text=True)


def test_metrics_with_token_set_still_open_to_logged_in_user(
    token_panel: Flask,
) -> None:
    client = logged_in_client(token_panel, "viewer")
    assert client.get("/metrics").status_code == 200


def test_metrics_with_token_set_rejects_anonymous(token_panel: Flask) -> None:
    response = token_panel.test_client().get("/metrics")

    assert response.status_code == 401
    assert "Bearer <METRICS_TOKEN>" in response.get_data(as_text=True)


@pytest.fixture
def unreachable_token_panel(database_url: str) -> Iterator[Flask]:
    """Yield a token panel whose database port is bound here but never listens."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as reserved:
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
        app = build_panel(database_url)
        db.close_process_pool()
        app.config["FLEET_SETTINGS"] = load_settings({
            "DATABASE_URL": f"postgresql://nobody:secret@127.0.0.1:{port}/none",
            "SECRET_KEY": TEST_SECRET_KEY, "API_BASE_URL": "http://127.0.0.1:9",
            "WEB_REQUEST_BUDGET": "1", "METRICS_TOKEN": TOKEN})
        yield app
        db.close_process_pool()


def test_metrics_database_down_is_503_text(unreachable_token_panel: Flask) -> None:
    response = unreachable_token_panel.test_client().get(
        "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})

    assert response.status_code == 503
    assert response.mimetype == "text/plain"
    assert "database" in response.get_data(as_text=True)
