"""Throughput and latency charts: queries, buckets and SVG, on the real database."""

from __future__ import annotations

import datetime
import weakref
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient
from psycopg.rows import dict_row

from webpanel import charts
from workers.middleware import RECORD_ATTEMPT

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture
def sql(database_url: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """Yield an autocommit connection to the test database."""
    with psycopg.connect(database_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


_anchors: weakref.WeakKeyDictionary[Any, datetime.datetime] = (
    weakref.WeakKeyDictionary())


def _current_minute(sql: psycopg.Connection[dict[str, Any]]) -> datetime.datetime:
    row = sql.execute("SELECT date_trunc('minute', now()) AS t").fetchone()
    assert row is not None
    return row["t"]


def finished_job(
    sql: psycopg.Connection[dict[str, Any]],
    minutes_ago: float,
    outcome: str = "succeeded",
    wait_s: float = 2.0,
    run_s: float = 3.0,
) -> int:
    """Insert a job that waited wait_s, ran run_s and ended minutes_ago, with events.

    The end is the middle of a minute, counted from the minute of the connection's
    first job, so jobs given the same minutes_ago always share a bucket.
    """
    row = sql.execute(
        "INSERT INTO procrastinate_jobs (queue_name, task_name, args) "
        "VALUES ('default', 'fetch_joke', '{}') RETURNING id").fetchone()
    assert row is not None
    job_id = row["id"]
    sql.execute("UPDATE procrastinate_jobs SET status = 'doing' WHERE id = %s",
                (job_id,))
    sql.execute("UPDATE procrastinate_jobs SET status = %s WHERE id = %s",
                (outcome, job_id))
    anchor = _anchors.get(sql) or _anchors.setdefault(sql, _current_minute(sql))
    end = (f"'{anchor.isoformat()}'::timestamptz "
           f"- make_interval(secs => {minutes_ago * 60 - 30})")
    sql.execute(
        f"UPDATE procrastinate_events SET at = CASE type "
        f"WHEN 'deferred' THEN {end} - make_interval(secs => %(wait)s + %(run)s) "
        f"WHEN 'started' THEN {end} - make_interval(secs => %(run)s) "
        f"ELSE {end} END WHERE job_id = %(job)s",
        {"wait": wait_s, "run": run_s, "job": job_id})
    sql.execute(
        f"INSERT INTO job_attempts (job_id, attempt, task_name, queue_name, "
        f"started_at, ended_at, duration_ms, outcome) VALUES (%(job)s, 1, "
        f"'fetch_joke', 'default', {end} - make_interval(secs => %(run)s), {end}, "
        f"%(ms)s, %(outcome)s)",
        {"job": job_id, "run": run_s, "ms": run_s * 1000,
         "outcome": "succeeded" if outcome == "succeeded" else "failed"})
    return int(job_id)


def test_load_hour_buckets_per_minute(
    panel: Flask, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    finished_job(sql, minutes_ago=5, wait_s=2, run_s=3)
    finished_job(sql, minutes_ago=5, wait_s=4, run_s=5)
    finished_job(sql, minutes_ago=5, outcome="failed")
    finished_job(sql, minutes_ago=120)

    with panel.test_request_context():
        data = charts.load(charts.RANGES["hour"])

    assert len(data.starts) == 60
    assert (data.starts[1] - data.starts[0]).total_seconds() == 60
    assert sum(data.succeeded) == 2
    assert sum(data.failed) == 1
    index = data.succeeded.index(2)
    assert data.failed[index] == 1
    assert data.wait_p50[index] == pytest.approx(2.0, abs=0.01)
    assert data.run_p50[index] == pytest.approx(3.0, abs=0.01)
    assert data.run_p95[index] == pytest.approx(4.8, abs=0.01)
    assert not data.empty


def test_load_day_buckets_per_quarter_hour(
    panel: Flask, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    finished_job(sql, minutes_ago=120)
    finished_job(sql, minutes_ago=23 * 60)
    finished_job(sql, minutes_ago=25 * 60)

    with panel.test_request_context():
        data = charts.load(charts.RANGES["day"])

    assert len(data.starts) == 96
    assert (data.starts[1] - data.starts[0]).total_seconds() == 900
    assert sum(data.succeeded) == 2


def test_load_waiting_time_counts_from_schedule(
    panel: Flask, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    job = finished_job(sql, minutes_ago=3, wait_s=600, run_s=1)
    # Scheduled for 20 s before it started: the wait counts from then, not from
    # the defer 600 s earlier.
    sql.execute(
        "INSERT INTO procrastinate_events (job_id, type, at) SELECT job_id, "
        "'scheduled', at - interval '20 seconds' FROM procrastinate_events "
        "WHERE job_id = %s AND type = 'started'", (job,))

    with panel.test_request_context():
        data = charts.load(charts.RANGES["hour"])

    waits = [value for value in data.wait_p50 if value is not None]
    assert waits == [pytest.approx(20.0, abs=0.01)]


def test_load_wait_prefers_stored_value(
    panel: Flask, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    job = finished_job(sql, minutes_ago=3, wait_s=600, run_s=1)
    sql.execute("UPDATE job_attempts SET wait_ms = 7000 WHERE job_id = %s", (job,))

    with panel.test_request_context():
        data = charts.load(charts.RANGES["hour"])

    waits = [value for value in data.wait_p50 if value is not None]
    assert waits == [pytest.approx(7.0, abs=0.01)]


def test_load_wait_mixes_stored_and_computed(
    panel: Flask, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    stored = finished_job(sql, minutes_ago=3, wait_s=600, run_s=1)
    finished_job(sql, minutes_ago=3, wait_s=4, run_s=1)
    sql.execute("UPDATE job_attempts SET wait_ms = 2000 WHERE job_id = %s",
                (stored,))

    with panel.test_request_context():
        data = charts.load(charts.RANGES["hour"])

    waits = [value for value in data.wait_p50 if value is not None]
    assert waits == [pytest.approx(3.0, abs=0.01)]


def test_load_lost_attempt_without_run_time(
    panel: Flask, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    job = finished_job(sql, minutes_ago=3, wait_s=6, run_s=1)
    sql.execute("UPDATE job_attempts SET duration_ms = NULL WHERE job_id = %s",
                (job,))

    with panel.test_request_context():
        data = charts.load(charts.RANGES["hour"])

    index = data.succeeded.index(1)
    assert data.wait_p50[index] == pytest.approx(6.0, abs=0.01)
    assert data.run_p50[index] is None
    assert data.run_p95[index] is None


def record_attempt(sql: psycopg.Connection[dict[str, Any]], job_id: int) -> float:
    """Write an attempt row with the worker's INSERT and return its wait_ms."""
    now = datetime.datetime.now(datetime.timezone.utc)
    row = {
        "job_id": job_id, "attempt": 9, "task_name": "fetch_joke",
        "queue_name": "default", "started_at": now, "ended_at": now,
        "duration_ms": 1.0, "host": "h", "pid": 1, "process_name": "worker",
        "worker_id": None, "outcome": "succeeded", "error_type": None,
        "error_message": None, "traceback": None, "http_status": None,
        "retry_after": None, "next_attempt_at": None,
    }
    sql.execute(RECORD_ATTEMPT, row)
    stored = sql.execute(
        "SELECT wait_ms FROM job_attempts WHERE job_id = %s AND attempt = 9",
        (job_id,)).fetchone()
    assert stored is not None
    return float(stored["wait_ms"])


def test_attempt_insert_wait_from_schedule(
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    job = finished_job(sql, minutes_ago=3, wait_s=600, run_s=1)
    sql.execute(
        "INSERT INTO procrastinate_events (job_id, type, at) SELECT job_id, "
        "'scheduled', at - interval '20 seconds' FROM procrastinate_events "
        "WHERE job_id = %s AND type = 'started'", (job,))

    assert record_attempt(sql, job) == pytest.approx(20_000, abs=1)


def test_attempt_insert_wait_of_latest_start(
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    job = finished_job(sql, minutes_ago=3, wait_s=600, run_s=1)
    # A second attempt: given back for a retry at the first one's end and
    # started 5 s later. A due event after that start does not count.
    sql.execute(
        "INSERT INTO procrastinate_events (job_id, type, at) "
        "SELECT e.job_id, t.type::procrastinate_job_event_type, e.at + t.delay "
        "FROM procrastinate_events e, (VALUES "
        "('deferred_for_retry', interval '0 seconds'), "
        "('started', interval '5 seconds'), "
        "('scheduled', interval '60 seconds')) AS t(type, delay) "
        "WHERE e.job_id = %s AND e.type = 'succeeded'", (job,))

    assert record_attempt(sql, job) == pytest.approx(5_000, abs=1)


def test_empty_window_is_empty(panel: Flask) -> None:
    with panel.test_request_context():
        data = charts.load(charts.RANGES["hour"])
    assert data.empty
    assert data.finished == 0


def parse(svg: str) -> ElementTree.Element:
    """Parse an SVG string, failing the test when it is not well-formed XML."""
    return ElementTree.fromstring(svg)


def test_throughput_svg_draws_stacked_bars(
    panel: Flask, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    finished_job(sql, minutes_ago=2)
    finished_job(sql, minutes_ago=2, outcome="failed")

    with panel.test_request_context():
        svg = str(charts.throughput_svg(charts.load(charts.RANGES["hour"])))

    root = parse(svg)
    ok = root.findall(f".//{SVG}rect[@class='chart-succeeded']")
    failed = root.findall(f".//{SVG}rect[@class='chart-failed']")
    assert len(ok) == 1
    assert len(failed) == 1
    assert float(ok[0].get("height", "0")) > 0
    titles = [element.text or "" for element in root.iter(f"{SVG}title")]
    assert any("1 succeeded, 1 failed" in title for title in titles)
    assert "style=" not in svg
    assert "<script" not in svg


def test_latency_svg_draws_lines_and_points(
    panel: Flask, sql: psycopg.Connection[dict[str, Any]]
) -> None:
    finished_job(sql, minutes_ago=4, wait_s=1, run_s=2)
    finished_job(sql, minutes_ago=3, wait_s=1, run_s=2)

    with panel.test_request_context():
        svg = str(charts.latency_svg(charts.load(charts.RANGES["hour"])))

    root = parse(svg)
    lines = root.findall(f".//{SVG}polyline")
    points = root.findall(f".//{SVG}circle")
    assert {line.get("class") for line in lines} >= {
        "chart-line chart-wait", "chart-line chart-run"}
    assert len(points) == 8
    assert "style=" not in svg


@pytest.mark.parametrize(("maximum", "step"), [
    (0, 1.0), (4, 1.0), (7, 2.0), (35, 10.0), (0.3, 0.1), (1200, 500.0),
])
def test_nice_step_covers_maximum(maximum: float, step: float) -> None:
    assert charts.nice_step(maximum) == pytest.approx(step)
    assert charts.nice_step(maximum) * charts.Y_TICKS >= maximum


@pytest.mark.parametrize(("seconds", "unit"), [
    (0.2, "ms"), (5, "s"), (600, "min"), (10000, "h"),
])
def test_duration_unit_fits_range(seconds: float, unit: str) -> None:
    assert charts.duration_unit(seconds)[0] == unit


def test_range_for_unknown_name_is_hour() -> None:
    assert charts.range_for("year").name == "hour"
    assert charts.range_for(None).name == "hour"
    assert charts.range_for("day").name == "day"


def test_dashboard_charts_empty_state(
    client_for: Callable[[str], FlaskClient],
) -> None:
    body = client_for("viewer").get("/").get_data(as_text=True)
    assert "no jobs finished in this period" in body
    assert '<svg class="chart"' not in body


def test_queues_page_switches_to_day_range(
    client_for: Callable[[str], FlaskClient],
    sql: psycopg.Connection[dict[str, Any]],
) -> None:
    finished_job(sql, minutes_ago=300)
    client = client_for("viewer")

    hour = client.get("/queues").get_data(as_text=True)
    day = client.get("/queues?range=day").get_data(as_text=True)

    assert "no jobs finished in this period" in hour
    assert 'id="chart-throughput-day-title"' in day
    assert 'id="chart-latency-day-title"' in day
    assert "per 15 minutes" in day
