"""The benchmark's set-based seeding, at a tiny scale, on the test database."""

from __future__ import annotations

import psycopg
import pytest

from bench.seed import seed_jobs

JOBS = 1_000


@pytest.fixture(scope="module")
def seeded(module_database_url: str) -> str:
    """Return the URL of a database seeded once with JOBS jobs."""
    seed_jobs(module_database_url, JOBS)
    return module_database_url


def _rows(url: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()


def _one(url: str, sql: str) -> object:
    return _rows(url, sql)[0][0]


def test_seed_writes_every_job(seeded: str) -> None:
    assert _one(seeded, "SELECT count(*) FROM procrastinate_jobs") == JOBS
    assert _one(seeded, "SELECT max(id) FROM procrastinate_jobs") == JOBS


def test_seed_moves_the_job_sequence(seeded: str) -> None:
    next_id = _one(seeded, "SELECT nextval(pg_get_serial_sequence("
                           "'procrastinate_jobs', 'id'))")
    assert next_id == JOBS + 1


def test_seed_mixes_statuses(seeded: str) -> None:
    statuses = {row[0] for row in _rows(
        seeded, "SELECT DISTINCT status::text FROM procrastinate_jobs")}
    assert {"todo", "succeeded", "failed", "cancelled", "aborted"} <= statuses


def test_seed_mixes_queues_and_tasks(seeded: str) -> None:
    pairs = {(row[0], row[1]) for row in _rows(
        seeded, "SELECT DISTINCT queue_name, task_name FROM procrastinate_jobs")}
    assert ("api_calls", "fetch_joke") in pairs
    assert ("default", "call_api") in pairs
    assert ("maintenance", "health_check") in pairs


def test_seed_gives_every_job_a_deferred_event(seeded: str) -> None:
    assert _one(seeded, "SELECT count(DISTINCT job_id) FROM procrastinate_events "
                        "WHERE type = 'deferred'") == JOBS


def test_seed_starts_once_per_attempt(seeded: str) -> None:
    mismatches = _one(seeded, """
        SELECT count(*) FROM procrastinate_jobs j
         WHERE j.status IN ('succeeded', 'failed', 'aborted')
           AND j.attempts <> (SELECT count(*) FROM procrastinate_events e
                               WHERE e.job_id = j.id AND e.type = 'started')""")
    assert mismatches == 0


def test_seed_records_one_attempt_row_per_attempt(seeded: str) -> None:
    mismatches = _one(seeded, """
        SELECT count(*) FROM procrastinate_jobs j
         WHERE j.status IN ('succeeded', 'failed', 'aborted')
           AND j.attempts <> (SELECT count(*) FROM job_attempts a
                               WHERE a.job_id = j.id)""")
    assert mismatches == 0


def test_seed_attempt_waits_match_events(seeded: str) -> None:
    # The wait the worker would store: from the latest due event before the start.
    mismatches = _one(seeded, """
        SELECT count(*) FROM job_attempts a
         WHERE coalesce(abs(a.wait_ms - (
                   SELECT greatest(extract(epoch FROM a.started_at - max(e.at)), 0)
                          * 1000
                     FROM procrastinate_events e
                    WHERE e.job_id = a.job_id AND e.at <= a.started_at
                      AND e.type IN ('deferred', 'deferred_for_retry', 'retried',
                                     'scheduled'))) > 0.01, true)""")
    assert mismatches == 0


def test_seed_attempt_waits_follow_backoff(seeded: str) -> None:
    rows = _rows(seeded, """
        SELECT attempt = 1 AS first, min(wait_ms), max(wait_ms) FROM job_attempts
         GROUP BY 1 ORDER BY 1 DESC""")
    first, later = rows
    assert first[0] is True
    assert first[1] >= 4
    assert first[2] <= 404
    assert later[0] is False
    assert later[1] > 4000


def test_seed_event_ids_follow_time_within_each_job(seeded: str) -> None:
    out_of_order = _one(seeded, """
        SELECT count(*) FROM (
            SELECT at < lag(at) OVER (PARTITION BY job_id ORDER BY id) AS back
              FROM procrastinate_events WHERE type <> 'scheduled') e
         WHERE back""")
    assert out_of_order == 0


def test_seed_starts_scheduled_jobs_after_their_time(seeded: str) -> None:
    early = _one(seeded, """
        SELECT count(*) FROM procrastinate_jobs j
          JOIN procrastinate_events e ON e.job_id = j.id AND e.type = 'started'
         WHERE j.status <> 'todo' AND e.at < j.scheduled_at""")
    assert early == 0


def test_seed_writes_no_event_in_the_future(seeded: str) -> None:
    assert _one(seeded, "SELECT count(*) FROM procrastinate_events "
                        "WHERE type <> 'scheduled' AND at > now()") == 0


def test_seed_stores_results_of_succeeded_api_jobs(seeded: str) -> None:
    missing = _one(seeded, """
        SELECT count(*) FROM procrastinate_jobs j
         WHERE j.status = 'succeeded' AND j.task_name IN ('fetch_joke', 'call_api')
           AND NOT EXISTS (SELECT 1 FROM job_results r WHERE r.job_id = j.id)""")
    assert missing == 0


def test_seed_argument_shapes_follow_the_catalog(seeded: str) -> None:
    keys = {row[0] for row in _rows(
        seeded, "SELECT DISTINCT jsonb_object_keys(args) FROM procrastinate_jobs")}
    assert keys == {"category", "method", "path", "json", "timestamp"}


def test_seed_keeps_secondary_indexes(seeded: str) -> None:
    names = {row[0] for row in _rows(
        seeded, "SELECT indexname FROM pg_indexes "
                "WHERE tablename = 'procrastinate_jobs'")}
    assert "panel_jobs_args_idx" in names
    assert "procrastinate_jobs_priority_idx_v1" in names


def test_seed_turns_triggers_back_on(seeded: str) -> None:
    with psycopg.connect(seeded) as conn:
        conn.execute("INSERT INTO procrastinate_jobs (queue_name, task_name) "
                     "VALUES ('default', 'fetch_joke')")
        row = conn.execute(
            "SELECT count(*) FROM procrastinate_events e JOIN procrastinate_jobs j "
            "ON j.id = e.job_id WHERE j.id > %s", (JOBS,)).fetchone()
        conn.rollback()
    assert row is not None
    assert row[0] == 1


def test_seed_of_zero_jobs_is_rejected(module_database_url: str) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        seed_jobs(module_database_url, 0)
