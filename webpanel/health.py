"""/healthz (JSON, public) and /metrics (Prometheus text format).

/healthz returns 200 when every check passes and 503 naming each failing check,
with a JSON body in both cases, the database being down included. Fleet numbers
are measured on the spot; the supervisord process states come from the newest row
of the scheduler's health check, because the panel may run where supervisord's
socket cannot be reached.

/metrics builds a fresh registry per scrape from the database, so every gunicorn
worker returns the same numbers. It needs a logged-in user, or the bearer token
METRICS_TOKEN when that is set.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import psycopg_pool
from flask import Blueprint, Response, current_app, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from psycopg.rows import tuple_row

from webpanel import dashboard, db
from webpanel.auth import current_user, public
from webpanel.db import DatabaseUnavailable
from webpanel.queries import query
from workers.errors import SchemaMismatchError
from workers.schema import check_schema_rows, installed_procrastinate_version
from workers.schema.objects import missing_objects
from workers.settings import Settings

logger = logging.getLogger(__name__)

bp = Blueprint("health", __name__)

DATABASE_ERRORS = (DatabaseUnavailable, psycopg.OperationalError,
                   psycopg_pool.PoolTimeout)
# States that are normal for a process: a one-shot setup program ends EXITED.
NORMAL_STATES = {"setup": {"EXITED", "STOPPED", "RUNNING", "STARTING"}}
DEFAULT_NORMAL_STATES = {"RUNNING", "STARTING"}
METRICS_WINDOW = 3600  # seconds of attempts the attempt metrics cover
# Upper bounds, in seconds, of the attempt duration buckets.
DURATION_BOUNDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                   600.0)


def _settings() -> Settings:
    return current_app.config["FLEET_SETTINGS"]


def _check_database() -> dict[str, Any]:
    with db.connection() as conn:
        started = time.perf_counter()
        conn.execute("SELECT 1")
        latency_ms = (time.perf_counter() - started) * 1000
    return {"ok": True, "latency_ms": round(latency_ms, 3)}


def _check_schema() -> dict[str, Any]:
    with db.connection() as conn:
        table = conn.execute(query("health", "schema_state_table")).fetchone()
        try:
            if not table or not table["has_state_table"]:
                check_schema_rows(None, None)
            row = conn.execute(query("health", "schema_version_rows")).fetchone()
            assert row is not None
            check_schema_rows(row["procrastinate_version"], row["project_version"])
        except SchemaMismatchError as exc:
            return {"ok": False, "message": str(exc)}
        conn.row_factory = tuple_row  # type: ignore[assignment]
        missing = missing_objects(conn)  # type: ignore[arg-type]
    if missing:
        return {"ok": False, "message": (
            "the database schema is behind the code: missing "
            + ", ".join(missing)
            + ". Apply Procrastinate's migrations up to "
            f"{installed_procrastinate_version()} (pre-migrations before deploying "
            "new code, post-migrations after), then run "
            "`python -m workers.schema apply`")}
    return {"ok": True}


def _check_workers(settings: Settings) -> dict[str, Any]:
    row = db.fetch_one(query("health", "worker_counts"),
                       {"threshold": settings.stalled_job_threshold})
    assert row is not None
    live, expected = row["live_workers"], settings.worker_processes
    check = {"ok": live >= expected, "live": live, "expected": expected,
             "stale": row["stale_workers"]}
    if live < expected:
        check["message"] = (f"{live} of {expected} worker processes sent a heartbeat "
                            f"in the last {settings.stalled_job_threshold:g} s")
    return check


def _check_oldest_waiting(settings: Settings) -> dict[str, Any]:
    oldest = dashboard.oldest_waiting(dashboard.queue_names())
    rows = [row for row in oldest.values() if row["age_s"] is not None]
    limit = settings.oldest_todo_age_limit
    if not rows:
        return {"ok": True, "age_s": None, "limit_s": limit}
    worst = max(rows, key=lambda row: row["age_s"])
    age = float(worst["age_s"])
    check = {"ok": age <= limit, "age_s": round(age, 3), "limit_s": limit,
             "queue": worst["queue_name"], "job_id": worst["job_id"]}
    if age > limit:
        check["message"] = (f"job {worst['job_id']} on queue {worst['queue_name']} "
                            f"has waited {age:.0f} s; the limit is {limit:g} s")
    return check


def _check_stalled(settings: Settings) -> dict[str, Any]:
    row = db.fetch_one(query("health", "stalled_count"),
                       {"threshold": settings.stalled_job_threshold})
    count = row["stalled_jobs"] if row else 0
    check: dict[str, Any] = {"ok": count == 0, "count": count}
    if count:
        check["message"] = (f"{count} job(s) are doing on workers without a "
                            f"heartbeat for {settings.stalled_job_threshold:g} s")
    return check


def _check_scheduler(settings: Settings, latest: dict[str, Any] | None
                     ) -> dict[str, Any]:
    limit = settings.scheduler_silence_limit
    if latest is not None:
        age = float(latest["age_s"])
        check = {"ok": age <= limit, "last_health_check_at":
                 latest["checked_at"].isoformat(), "age_s": round(age, 3),
                 "limit_s": limit}
        if age > limit:
            check["message"] = (f"the scheduler stored no health check for "
                                f"{age:.0f} s; the limit is {limit:g} s")
        return check
    row = db.fetch_one(query("health", "worker_counts"),
                       {"threshold": settings.stalled_job_threshold})
    started = row["scheduler_started_at"] if row else None
    if started is not None:
        age = time.time() - started.timestamp()
        if age <= limit:
            return {"ok": True, "age_s": None, "limit_s": limit,
                    "message": f"no health check yet; the scheduler started "
                               f"{age:.0f} s ago"}
    return {"ok": False, "age_s": None, "limit_s": limit,
            "message": "the scheduler has stored no health check yet"}


def _process_checks(latest: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Return the process_control and processes checks from a health check row."""
    if latest is None:
        unknown = {"ok": True, "state": "unknown",
                   "message": "no health check row yet"}
        return {"process_control": unknown}
    control = (latest["details"] or {}).get("process_control") or {}
    as_of = latest["checked_at"].isoformat()
    if not control.get("reachable"):
        return {"process_control": {
            "ok": False, "state": "unreachable", "as_of": as_of,
            "message": control.get("error") or "supervisord could not be reached",
        }}
    states: dict[str, str] = control.get("processes") or {}
    unexpected = {
        name: state for name, state in sorted(states.items())
        if state not in NORMAL_STATES.get(name, DEFAULT_NORMAL_STATES)
    }
    processes: dict[str, Any] = {"ok": not unexpected, "states": states,
                                 "as_of": as_of}
    if unexpected:
        processes["message"] = ", ".join(
            f"{name} is {state}" for name, state in unexpected.items())
    return {
        "process_control": {"ok": True, "state": "reachable", "as_of": as_of},
        "processes": processes,
    }


def _pools_check(latest: dict[str, Any] | None) -> dict[str, Any]:
    below = ((latest or {}).get("details") or {}).get("pools_below_min") or []
    check: dict[str, Any] = {"ok": not below, "below_minimum": below}
    if below:
        check["message"] = ("database pools below their minimum size for 2 health "
                            "checks in a row: " + ", ".join(below))
    return check


def _guarded(name: str, checks: dict[str, Any], run: Callable[[], Any]) -> None:
    """Run one check, turning a query failure into a failing check of its own."""
    try:
        checks[name] = run()
    except DATABASE_ERRORS:
        raise
    except psycopg.Error as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        checks[name] = {"ok": False, "message": f"could not run: {first_line}"}


def run_checks(settings: Settings) -> dict[str, dict[str, Any]]:
    """Run every check and return them by name, raising when the database is down."""
    checks: dict[str, dict[str, Any]] = {"database": _check_database()}
    _guarded("schema", checks, _check_schema)
    _guarded("live_workers", checks, lambda: _check_workers(settings))
    _guarded("oldest_waiting_job", checks, lambda: _check_oldest_waiting(settings))
    _guarded("stalled_jobs", checks, lambda: _check_stalled(settings))
    latest = None
    try:
        latest = db.fetch_one(query("health", "latest_health_check"))
    except DATABASE_ERRORS:
        raise
    except psycopg.Error as exc:
        checks["scheduler"] = {"ok": False, "message": f"could not run: {exc}"}
    if "scheduler" not in checks:
        _guarded("scheduler", checks, lambda: _check_scheduler(settings, latest))
    checks.update(_process_checks(latest))
    checks["database_pools"] = _pools_check(latest)
    if latest is not None:
        checks["latest_health_check"] = {
            "ok": True,
            "checked_at": latest["checked_at"].isoformat(),
            "db_latency_ms": latest["db_latency_ms"],
            "live_workers": latest["live_workers"],
            "stalled_jobs": latest["stalled_jobs"],
            "oldest_todo_age_s": latest["oldest_todo_age_s"],
            "pool_size": latest["pool_size"],
            "pool_available": latest["pool_available"],
        }
    return checks


@bp.route("/healthz")
@public
def healthz() -> Any:
    """Report the database, schema, workers, queues, scheduler and processes."""
    try:
        checks = run_checks(_settings())
    except DATABASE_ERRORS as exc:
        message = str(exc) if isinstance(exc, DatabaseUnavailable) \
            else "the database cannot be reached"
        checks = {"database": {"ok": False, "message": message}}
    except Exception as exc:  # noqa: BLE001 - /healthz returns JSON, never a page
        incident = uuid.uuid4().hex[:12]
        logger.error("Health check failed, incident %s", incident, exc_info=exc,
                     extra={"action": "healthz_failed", "incident": incident})
        checks = {"healthz": {"ok": False, "message": (
            f"the health check itself failed ({type(exc).__name__}); the log has "
            f"the details under incident {incident}")}}
    failing = [name for name, check in checks.items() if not check["ok"]]
    body = {"status": "failing" if failing else "ok", "failing": failing,
            "checks": checks}
    response = jsonify(body)
    response.status_code = 503 if failing else 200
    response.headers["Cache-Control"] = "no-store"
    return response


class FleetCollector(Collector):
    """Read the fleet's numbers from the database once per scrape."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[GaugeMetricFamily | GaugeHistogramMetricFamily]:
        """Yield every metric family, reading the database on each call."""
        yield from self._jobs()
        yield from self._workers()
        yield from self._attempts()

    def _jobs(self) -> Iterator[GaugeMetricFamily]:
        queues = dashboard.queue_names()
        jobs = GaugeMetricFamily(
            "procrastinate_jobs",
            f"Jobs by queue and status; counts above {dashboard.COUNT_CAP} per "
            "queue and status are the planner's estimate",
            labels=["queue", "status"])
        for queue, per_status in dashboard.job_counts(queues).items():
            for status, count in per_status.items():
                jobs.add_metric([queue, status], count.value)
        yield jobs
        oldest = GaugeMetricFamily(
            "procrastinate_queue_oldest_waiting_seconds",
            "Seconds the longest-waiting due job of each queue has waited; 0 when "
            "none waits", labels=["queue"])
        for queue, row in dashboard.oldest_waiting(queues).items():
            oldest.add_metric([queue], float(row["age_s"] or 0.0))
        yield oldest

    def _workers(self) -> Iterator[GaugeMetricFamily]:
        threshold = self.settings.stalled_job_threshold
        row = db.fetch_one(query("health", "worker_counts"), {"threshold": threshold})
        stalled = db.fetch_one(query("health", "stalled_count"),
                               {"threshold": threshold})
        assert row is not None and stalled is not None
        workers = GaugeMetricFamily(
            "procrastinate_workers",
            f"Procrastinate workers; stale ones sent no heartbeat for {threshold:g} s",
            labels=["role", "state"])
        workers.add_metric(["worker", "live"], row["live_workers"])
        workers.add_metric(["scheduler", "live"], row["live_schedulers"])
        workers.add_metric(["any", "stale"], row["stale_workers"])
        yield workers
        yield GaugeMetricFamily(
            "procrastinate_workers_expected",
            "Worker processes configured (WORKER_PROCESSES)",
            value=self.settings.worker_processes)
        yield GaugeMetricFamily(
            "procrastinate_stalled_jobs",
            "Doing jobs whose worker stopped heartbeating or is gone",
            value=stalled["stalled_jobs"])
        latest = db.fetch_one(query("health", "latest_health_check"))
        if latest is not None:
            yield GaugeMetricFamily(
                "procrastinate_health_check_age_seconds",
                "Seconds since the scheduler stored its latest health check",
                value=float(latest["age_s"]))

    def _attempts(self) -> Iterator[GaugeMetricFamily | GaugeHistogramMetricFamily]:
        outcomes = GaugeMetricFamily(
            "procrastinate_job_attempts_last_hour",
            "Attempts that ended in the last hour by queue, task and outcome",
            labels=["queue", "task", "outcome"])
        for row in db.fetch_all(query("health", "attempt_outcomes"),
                                {"seconds": METRICS_WINDOW}):
            outcomes.add_metric(
                [row["queue_name"], row["task_name"], row["outcome"]],
                row["attempts"])
        yield outcomes
        durations = GaugeHistogramMetricFamily(
            "procrastinate_job_attempt_duration_seconds",
            "Run time of the attempts that ended in the last hour, by queue",
            labels=["queue"])
        for row in db.fetch_all(query("health", "attempt_duration_buckets"),
                                {"seconds": METRICS_WINDOW,
                                 "bounds": list(DURATION_BOUNDS)}):
            buckets = [(floatToGoString(bound), count)
                       for bound, count in zip(DURATION_BOUNDS, row["counts"])]
            buckets.append(("+Inf", row["total"]))
            durations.add_metric([row["queue_name"]], buckets,
                                 float(row["sum_s"] or 0.0))
        yield durations


def _metrics_refusal() -> Response | None:
    """Return a 401 response unless the request may read /metrics."""
    token = _settings().metrics_token
    header = request.headers.get("Authorization", "")
    scheme, _, credentials = header.partition(" ")
    if token and scheme.lower() == "bearer":
        if hmac.compare_digest(credentials.strip().encode(), token.encode()):
            return None
        message = "invalid bearer token for /metrics\n"
    elif current_user() is not None:
        return None
    elif token:
        message = "send Authorization: Bearer <METRICS_TOKEN>, or log in\n"
    else:
        message = ("log in to read /metrics, or set METRICS_TOKEN and send it as "
                   "a bearer token\n")
    response = Response(message, status=401, mimetype="text/plain")
    response.headers["WWW-Authenticate"] = 'Bearer realm="metrics"'
    return response


@bp.route("/metrics")
@public
def metrics() -> Response:
    """Expose the fleet's numbers in Prometheus text format."""
    refusal = _metrics_refusal()
    if refusal is not None:
        return refusal
    registry = CollectorRegistry()
    registry.register(FleetCollector(_settings()))
    try:
        body = generate_latest(registry)
    except DATABASE_ERRORS as exc:
        logger.warning("Metrics unavailable: %s", exc,
                       extra={"action": "metrics_unavailable"})
        response = Response("the database cannot be reached or did not respond in "
                            "time\n", status=503, mimetype="text/plain")
        response.headers["Retry-After"] = "5"
        return response
    return Response(body, mimetype=CONTENT_TYPE_LATEST)
