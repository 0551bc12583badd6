"""Processes check the database schema at start and refuse one behind the code."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.faults import (
    WorkerProcess,
    defer_job,
    events,
    fleet_environment,
    fleet_settings,
    job,
    query,
)
from workers.errors import SchemaMismatchError
from workers.schema import (
    PROJECT_SCHEMA_VERSION,
    SchemaNotApplied,
    apply_schema,
    check_schema,
)
from workers.schema.objects import (
    required_columns,
    required_functions,
    required_triggers,
)
from workers.startup import EXIT_CONFIG

UPSTREAM = "http://127.0.0.1:9"


def test_current_schema_passes(database_url: str) -> None:
    check_schema(database_url)


def test_apply_is_idempotent(database_url: str) -> None:
    assert apply_schema(database_url) is False
    check_schema(database_url)


def test_required_objects_listed() -> None:
    functions = required_functions()
    assert "procrastinate_fetch_job_v2" in functions
    assert "procrastinate_retry_job_v2" in functions
    columns = required_columns()
    assert {"job_id", "attempt", "outcome", "http_status"} <= columns["job_attempts"]
    assert "pool_available" in columns["worker_processes"]
    assert "primary" not in columns["job_attempts"]
    assert required_triggers() == ["fleet_jobs_lock_from_queueing_lock"]


def test_missing_function_named(database_url: str) -> None:
    query(database_url, "DROP FUNCTION procrastinate_fetch_job_v2")
    with pytest.raises(SchemaMismatchError) as raised:
        check_schema(database_url)
    message = str(raised.value)
    assert "missing function procrastinate_fetch_job_v2" in message
    assert "python -m workers.schema apply" in message
    assert "pre-migrations" in message


def test_missing_column_named(database_url: str) -> None:
    query(database_url, "ALTER TABLE job_attempts DROP COLUMN http_status")
    with pytest.raises(SchemaMismatchError) as raised:
        check_schema(database_url)
    assert "missing column job_attempts.http_status" in str(raised.value)


def test_missing_table_named(database_url: str) -> None:
    query(database_url, "DROP TABLE job_results")
    with pytest.raises(SchemaMismatchError) as raised:
        check_schema(database_url)
    assert "missing table job_results" in str(raised.value)


def test_older_project_schema_waits(database_url: str) -> None:
    query(
        database_url,
        "UPDATE fleet_schema_state SET value = '1' "
        "WHERE key = 'project_schema_version'",
    )
    with pytest.raises(SchemaNotApplied) as raised:
        check_schema(database_url)
    assert f"this release expects {PROJECT_SCHEMA_VERSION}" in str(raised.value)


def test_newer_project_schema_rejected(database_url: str) -> None:
    query(
        database_url,
        "UPDATE fleet_schema_state SET value = '999' "
        "WHERE key = 'project_schema_version'",
    )
    with pytest.raises(SchemaMismatchError) as raised:
        check_schema(database_url)
    assert not isinstance(raised.value, SchemaNotApplied)
    assert "deploy the newer release" in str(raised.value)


@pytest.mark.parametrize("role", ["worker", "scheduler"])
def test_process_exits_on_missing_function(
    database_url: str, tmp_path: Path, role: str
) -> None:
    settings = fleet_settings(database_url, UPSTREAM)
    job_id = defer_job(settings, "fetch_joke")
    before = events(database_url, job_id)
    query(database_url, "DROP FUNCTION procrastinate_fetch_job_v2")

    environment = fleet_environment(database_url, UPSTREAM)
    started = time.monotonic()
    with WorkerProcess(environment, tmp_path, role=role) as process:
        code = process.wait(30)
    assert code == EXIT_CONFIG
    # supervisord's startsecs for workers is 5: exiting sooner counts as a failed
    # start, so the program ends FATAL instead of restarting forever.
    assert time.monotonic() - started < 5
    log = process.log()
    assert "procrastinate_fetch_job_v2" in log
    assert "python -m workers.schema apply" in log
    assert "Traceback" not in log

    row = job(database_url, job_id)
    assert row["status"] == "todo"
    assert row["attempts"] == 0
    assert events(database_url, job_id) == before
    assert query(database_url, "SELECT * FROM procrastinate_workers") == []
