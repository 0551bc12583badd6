"""Seed a database with N realistic jobs, their events and records, set-based.

Every row comes from ``INSERT ... SELECT`` over ``generate_series``, with row
triggers off (``session_replication_role = replica`` for a superuser, else the
jobs table's own triggers are disabled), so 1,000,000 jobs take well under a
minute. The rows follow the product's catalog: the queues, tasks and argument shapes of
fetch_joke, call_api and the maintenance tasks. The newest 3% of jobs are mostly
waiting and older ones mostly finished. A retried job has one started event and
one job_attempts row per attempt, with timings that follow each other. Job i is
created at ``now - SPAN + (i - 1) * SPAN / N``, so ids and times grow together.

The values come from ``bench_u(id, k)``, a hash of the job id giving a number in
[0, 1) for each attribute k, so a seed of the same size is the same every time.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import time
from collections.abc import Callable

import psycopg

logger = logging.getLogger(__name__)

SPAN_DAYS = 30  # jobs are spread over the default JOB_RETENTION_DAYS
NEWEST_SHARE = 0.97  # jobs above this share of N are the recent, mostly todo, ones
LIVE_WORKERS = 4
AUDIT_ROWS_PER_1000_JOBS = 20
CATEGORIES = ("dev", "animal", "food", "science", "sport", "travel", "money",
              "music")

# Times are computed as epoch seconds in double precision and converted once with
# to_timestamp: numeric and interval arithmetic cost several times more per row.
HELPERS = """
DROP SCHEMA IF EXISTS bench_seed CASCADE;
CREATE SCHEMA bench_seed;
CREATE OR REPLACE FUNCTION bench_seed.bench_u(id bigint, k integer)
    RETURNS double precision LANGUAGE sql IMMUTABLE AS $$
    SELECT ((id * 2654435761 + k * 40503 + (id % 7919) * k * 97) % 1000003)::float8
           / 1000003::float8
$$;
CREATE OR REPLACE FUNCTION bench_seed.bench_epoch(id bigint)
    RETURNS double precision LANGUAGE sql IMMUTABLE AS $$
    SELECT %(origin)s::float8 + (id - 1) * %(step)s::float8
$$;
CREATE OR REPLACE FUNCTION bench_seed.bench_run(queue text, id bigint, k integer)
    RETURNS double precision LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN queue = 'maintenance'
                THEN 0.01 + bench_seed.bench_u(id, 21 + k) * 0.2
                ELSE 0.05 + bench_seed.bench_u(id, 21 + k) * 2.0 END
$$;
"""

# Columns: id, task, queue, status, attempts. Status and attempts follow the age.
JOBS = """
INSERT INTO procrastinate_jobs (
    id, queue_name, task_name, priority, lock, queueing_lock, args, status,
    scheduled_at, attempts, abort_requested, worker_id)
SELECT id, queue_name, task_name,
       CASE WHEN bench_seed.bench_u(id, 9) < 0.05 THEN 10 ELSE 0 END,
       CASE WHEN with_lock THEN 'customer-' || (id %% 5000) END,
       CASE WHEN with_lock THEN 'customer-' || id END,
       args, status::procrastinate_job_status,
       CASE WHEN status = 'todo' AND attempts > 0
                THEN to_timestamp(%(now)s + 5 + bench_seed.bench_u(id, 10) * 600)
            WHEN bench_seed.bench_u(id, 11) < 0.05
                THEN to_timestamp(least(bench_seed.bench_epoch(id)
                                        + bench_seed.bench_u(id, 12) * 600,
                                        %(now)s - 60))
       END,
       attempts, false,
       CASE WHEN status = 'doing' THEN 1 + id %% %(live_workers)s END
FROM (
    SELECT id, task_name, queue_name, status, with_lock,
           CASE
               WHEN status = 'succeeded' THEN
                   CASE WHEN u_attempts < 0.90 THEN 1
                        WHEN u_attempts < 0.97 THEN 2 ELSE 3 END
               WHEN status = 'failed' THEN
                   CASE WHEN u_attempts < 0.60 THEN 5 ELSE 1 END
               WHEN status = 'aborted' THEN 1
               WHEN status = 'todo' AND id <= %(newest)s THEN
                   CASE WHEN u_attempts < 0.5 THEN 1 ELSE 2 END
               ELSE 0
           END AS attempts,
           CASE
               WHEN task_name = 'fetch_joke' AND bench_seed.bench_u(id, 5) < 0.5
                   THEN '{}'::jsonb
               WHEN task_name = 'fetch_joke' THEN jsonb_build_object(
                   'category', (%(categories)s::text[])[1 + id %% 8])
               WHEN task_name = 'call_api' AND bench_seed.bench_u(id, 6) < 0.6
                   THEN jsonb_build_object('method', 'GET',
                                           'path', '/items/' || id %% 50000)
               WHEN task_name = 'call_api' THEN jsonb_build_object(
                   'method', (ARRAY['POST', 'PUT', 'PATCH', 'DELETE'])[1 + id %% 4],
                   'path', '/orders/' || id %% 20000,
                   'json', jsonb_build_object(
                       'name', 'item-' || id %% 997, 'quantity', 1 + id %% 12,
                       'tags', jsonb_build_array('bench', 'tag-' || id %% 31)))
               ELSE jsonb_build_object(
                   'timestamp', floor(bench_seed.bench_epoch(id))::bigint)
           END AS args
    FROM (
        SELECT id, task_name, with_lock,
               CASE WHEN task_name IN ('fetch_joke', 'call_api')
                    THEN CASE WHEN bench_seed.bench_u(id, 3) < 0.85
                              THEN 'api_calls' ELSE 'default' END
                    ELSE 'maintenance' END AS queue_name,
               CASE
                   WHEN id > %(newest)s AND id %% 1500 = 0 THEN 'doing'
                   WHEN id > %(newest)s THEN
                       CASE WHEN u_status < 0.85 THEN 'todo'
                            WHEN u_status < 0.95 THEN 'succeeded'
                            WHEN u_status < 0.98 THEN 'failed'
                            ELSE 'cancelled' END
                   WHEN u_status < 0.88 THEN 'succeeded'
                   WHEN u_status < 0.94 THEN 'failed'
                   WHEN u_status < 0.97 THEN 'cancelled'
                   WHEN u_status < 0.98 THEN 'aborted'
                   WHEN u_status < 0.985 THEN 'todo'
                   ELSE 'succeeded'
               END AS status,
               u_attempts
        FROM (
            SELECT id,
                   CASE WHEN u_task < 0.45 THEN 'fetch_joke'
                        WHEN u_task < 0.88 THEN 'call_api'
                        WHEN u_task < 0.95 THEN 'health_check'
                        WHEN u_task < 0.99 THEN 'retry_stalled_jobs'
                        ELSE 'prune_old_jobs' END AS task_name,
                   u_task >= 0.02 AND u_task < 0.04 AS with_lock,
                   u_status, u_attempts
            FROM (
                SELECT id, bench_seed.bench_u(id, 1) AS u_task,
                       bench_seed.bench_u(id, 2) AS u_status,
                       bench_seed.bench_u(id, 4) AS u_attempts
                FROM generate_series(1, %(n)s::bigint) AS id
            ) draws
        ) tasks
    ) statuses
) jobs
"""

# One row per attempt k of every job that started at least once, with the times
# that events and job_attempts share: attempt k starts after the queue wait plus
# the earlier attempts' run and backoff time. The job is due at its defer or
# scheduled time for attempt 1 and at the end of attempt k - 1 (its
# deferred_for_retry event) for later ones, which gives each attempt's wait_ms.
ATTEMPT_TIMES = """
CREATE UNLOGGED TABLE bench_seed.attempts AS
SELECT j.id AS job_id, k AS attempt, j.status::text AS status, j.task_name,
       j.queue_name, j.attempts, j.scheduled_at,
       to_timestamp(least(started, %(now)s)) AS started_at,
       to_timestamp(least(started + run, %(now)s)) AS ended_at,
       run,
       greatest(least(started, %(now)s) - least(due, %(now)s), 0) * 1000 AS wait_ms
FROM procrastinate_jobs j
CROSS JOIN LATERAL generate_series(
    1, j.attempts + CASE WHEN j.status = 'doing' THEN 1 ELSE 0 END) AS k
CROSS JOIN LATERAL (
    SELECT CASE WHEN j.scheduled_at IS NOT NULL AND j.status <> 'todo'
                THEN extract(epoch FROM j.scheduled_at)::float8
                ELSE bench_seed.bench_epoch(j.id) END AS due_first,
           0.004 + bench_seed.bench_u(j.id, 20) * 0.4 AS first_wait
) base
CROSS JOIN LATERAL (
    SELECT base.due_first + base.first_wait + (k - 1) * (2.5 + 2::float8 ^ k)
               AS started,
           bench_seed.bench_run(j.queue_name, j.id, k) AS run,
           CASE WHEN k = 1 THEN base.due_first
                ELSE base.due_first + base.first_wait
                     + (k - 2) * (2.5 + 2::float8 ^ (k - 1))
                     + bench_seed.bench_run(j.queue_name, j.id, k - 1) END AS due
) times
"""

# Each job's events come from one branch, in the order they happened: jobs that
# never started from the first, the others from their attempt rows, which are in
# job and attempt order already. So event ids follow time within every job
# without sorting millions of rows.
EVENTS = """
INSERT INTO procrastinate_events (job_id, type, at)
SELECT job_id, type::procrastinate_job_event_type, at FROM (
    SELECT j.id AS job_id, e.type, e.at
      FROM procrastinate_jobs j
     CROSS JOIN LATERAL (VALUES
         ('deferred', to_timestamp(bench_seed.bench_epoch(j.id)), true),
         ('scheduled', j.scheduled_at, j.scheduled_at IS NOT NULL),
         ('cancelled', to_timestamp(bench_seed.bench_epoch(j.id) + 3),
          j.status = 'cancelled')
     ) AS e (type, at, wanted)
     WHERE j.attempts = 0 AND j.status <> 'doing' AND e.wanted
    UNION ALL
    SELECT a.job_id, e.type, e.at
      FROM bench_seed.attempts a
     CROSS JOIN LATERAL (VALUES
         ('deferred', to_timestamp(bench_seed.bench_epoch(a.job_id)), a.attempt = 1),
         ('scheduled', a.scheduled_at,
          a.attempt = 1 AND a.scheduled_at IS NOT NULL AND a.status <> 'todo'),
         ('started', a.started_at, true),
         ('abort_requested', a.started_at + a.run / 2 * interval '1 second',
          a.status = 'aborted' AND a.attempt = a.attempts),
         ('deferred_for_retry', a.ended_at,
          a.attempt < a.attempts OR (a.status = 'todo' AND a.attempt = a.attempts)),
         (a.status, a.ended_at,
          a.status IN ('succeeded', 'failed', 'aborted') AND a.attempt = a.attempts),
         -- A retry waiting for its time: Procrastinate records the new schedule
         -- as a 'scheduled' event whose time is the future retry time.
         ('scheduled', a.scheduled_at, a.status = 'todo' AND a.attempt = a.attempts)
     ) AS e (type, at, wanted)
     WHERE e.wanted
) events
"""

ATTEMPTS = """
INSERT INTO job_attempts (
    job_id, attempt, task_name, queue_name, started_at, ended_at, duration_ms,
    host, pid, process_name, worker_id, outcome, error_type, error_message,
    traceback, http_status, retry_after, next_attempt_at, wait_ms)
SELECT job_id, attempt, task_name, queue_name, started_at, ended_at,
       run * 1000, 'bench-host', 1000 + job_id %% 4, 'worker:worker_0' || job_id %% 2,
       NULL, outcome,
       CASE WHEN outcome IN ('error', 'failed') THEN 'UpstreamHTTPError' END,
       CASE WHEN outcome = 'error'
                THEN 'upstream returned status 503 Service Unavailable'
            WHEN outcome = 'failed' AND attempts > 1
                THEN 'gave up after ' || attempts || ' attempts; last error: '
                     || 'upstream returned status 503 Service Unavailable'
            WHEN outcome = 'failed'
                THEN 'not retryable: upstream returned status 404 Not Found'
            WHEN outcome = 'aborted' THEN 'aborted on request' END,
       CASE WHEN outcome IN ('error', 'failed') THEN
            'Traceback (most recent call last):' || E'\\n'
            || '  File "/srv/workers/tasks/api.py", line 52, in call_api' || E'\\n'
            || '    response = await client.request(method, url, json=body)'
            || E'\\n' || 'workers.retry.UpstreamHTTPError: upstream returned status '
            || CASE WHEN attempts > 1 OR outcome = 'error' THEN '503' ELSE '404'
               END END,
       CASE WHEN outcome IN ('error', 'failed')
            THEN CASE WHEN attempts > 1 OR outcome = 'error' THEN 503 ELSE 404 END
            WHEN outcome = 'succeeded' AND queue_name <> 'maintenance' THEN 200 END,
       NULL,
       CASE WHEN outcome = 'error'
            THEN ended_at + 2::float8 ^ attempt * interval '1 second' END,
       wait_ms
FROM (
    SELECT a.*,
           CASE WHEN a.attempt < a.attempts OR a.status = 'todo' THEN 'error'
                ELSE a.status END AS outcome
      FROM bench_seed.attempts a
     WHERE a.status <> 'doing'
) attempts
"""

RESULTS = """
INSERT INTO job_results (job_id, task_name, result, stored_at)
SELECT a.job_id, a.task_name,
       CASE WHEN a.task_name = 'fetch_joke' THEN jsonb_build_object(
                'id', a.job_id, 'value',
                'A job retried so often that the queue gave it a loyalty card.')
            ELSE jsonb_build_object('status', 200, 'body', jsonb_build_object(
                'id', a.job_id %% 50000, 'ok', true)) END,
       a.ended_at
FROM bench_seed.attempts a
WHERE a.status = 'succeeded' AND a.attempt = a.attempts
  AND a.task_name IN ('fetch_joke', 'call_api')
"""

SMALL_TABLES = """
INSERT INTO procrastinate_workers (id, last_heartbeat)
OVERRIDING SYSTEM VALUE
SELECT w, now() FROM generate_series(1, %(live_workers)s) AS w;

INSERT INTO worker_processes (worker_id, host, pid, process_name, role, queues,
                              concurrency, started_at, stopped_at)
SELECT w, 'bench-host', 1000 + w,
       CASE WHEN w <= %(live_workers)s - 1 THEN 'worker:worker_0' || (w - 1)
            ELSE 'scheduler' END,
       CASE WHEN w <= %(live_workers)s - 1 THEN 'worker' ELSE 'scheduler' END,
       ARRAY['default', 'api_calls'], 10, now() - interval '2 hours', NULL
FROM generate_series(1, %(live_workers)s) AS w;

INSERT INTO health_checks (checked_at, db_latency_ms, live_workers,
                           oldest_todo_age_s, stalled_jobs, pool_size,
                           pool_available, details)
SELECT now() - make_interval(mins => 5 * h), 0.4 + (h %% 7) * 0.1,
       %(live_workers)s, (h %% 13) * 4.5, 0, 4, 3, '{}'::jsonb
FROM generate_series(0, %(span)s / 300 - 1) AS h;

INSERT INTO audit_log (at, username, action, job_ids, details, result)
SELECT to_timestamp(bench_seed.bench_epoch(least(g * 50, %(n)s))),
       (ARRAY['admin', 'operator', 'alice'])[1 + g %% 3],
       (ARRAY['defer', 'retry_jobs', 'cancel_jobs', 'abort_job'])[1 + g %% 4],
       ARRAY[least(g * 50, %(n)s)]::bigint[], '{}'::jsonb, 'ok'
FROM generate_series(1, %(audit_rows)s) AS g;

INSERT INTO procrastinate_periodic_defers (task_name, defer_timestamp, job_id,
                                           periodic_id)
SELECT task_name, extract(epoch FROM now())::bigint, max(id), task_name
  FROM procrastinate_jobs
 WHERE task_name IN ('health_check', 'retry_stalled_jobs', 'prune_old_jobs')
 GROUP BY task_name;
"""

SEQUENCES = """
SELECT setval(pg_get_serial_sequence('procrastinate_jobs', 'id'), %(n)s);
SELECT setval(pg_get_serial_sequence('procrastinate_events', 'id'),
              (SELECT max(id) FROM procrastinate_events));
SELECT setval(pg_get_serial_sequence('job_attempts', 'id'),
              greatest((SELECT max(id) FROM job_attempts), 1));
"""

# Tables whose secondary indexes are dropped during the load and built again after,
# as pg_restore does, because one index build is far cheaper than a million
# index insertions (the GIN index on args above all).
BULK_TABLES = ("procrastinate_jobs", "procrastinate_events", "job_attempts",
               "job_results")
ANALYZED_TABLES = ("procrastinate_jobs", "procrastinate_events", "job_attempts",
                   "job_results", "audit_log", "health_checks", "worker_processes",
                   "procrastinate_workers", "procrastinate_periodic_defers")


@dataclasses.dataclass
class SeedReport:
    """Rows written per table and the seconds each step took."""

    rows: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def insert_seconds(self) -> float:
        """Return the seconds spent writing rows, VACUUM ANALYZE excluded."""
        return sum(value for key, value in self.seconds.items() if key != "vacuum")


def _disable_triggers(conn: psycopg.Connection) -> Callable[[], None]:
    """Turn off the triggers for this session, or for the jobs table as a fallback."""
    try:
        conn.execute("SET session_replication_role = replica")
        conn.commit()
        return lambda: None
    except psycopg.errors.InsufficientPrivilege:
        conn.rollback()
    conn.execute("ALTER TABLE procrastinate_jobs DISABLE TRIGGER USER")
    conn.commit()

    def restore() -> None:
        conn.execute("ALTER TABLE procrastinate_jobs ENABLE TRIGGER USER")
        conn.commit()

    return restore


def _drop_indexes(conn: psycopg.Connection) -> list[str]:
    """Drop the secondary indexes of the bulk-loaded tables; return their DDL."""
    rows = conn.execute(
        "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) "
        "FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid "
        "WHERE t.relname = ANY(%s) AND NOT EXISTS ("
        "    SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)",
        (list(BULK_TABLES),),
    ).fetchall()
    for name, _definition in rows:
        conn.execute(f"DROP INDEX {name}")
    return [definition for _name, definition in rows]


def seed_jobs(url: str, n: int) -> SeedReport:
    """Insert ``n`` jobs with events, attempts, results and panel rows into ``url``.

    The job tables must be empty. The jobs and the attempt times come first. Then
    the events load on one connection while the attempt rows, results and small
    tables load on another, and the indexes are built one per CPU at a time.
    VACUUM ANALYZE runs at the end, as autovacuum would after a bulk load, so that
    plans and index-only scans are realistic.
    """
    if n < 1:
        raise ValueError(f"cannot seed {n} jobs; seed at least 1")
    report = SeedReport()
    span = SPAN_DAYS * 86400
    params = {
        "n": n, "span": span, "newest": int(n * NEWEST_SHARE),
        "live_workers": LIVE_WORKERS, "categories": list(CATEGORIES),
        "audit_rows": max(1, n * AUDIT_ROWS_PER_1000_JOBS // 1000),
    }
    with psycopg.connect(url) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute("SET work_mem = '256MB'")
        restore = _disable_triggers(conn)
        try:
            began = time.perf_counter()
            indexes = _drop_indexes(conn)
            report.seconds["drop indexes"] = time.perf_counter() - began
            now = conn.execute("SELECT extract(epoch FROM now())::float8").fetchone()
            assert now is not None
            params["now"] = now[0]
            conn.execute(HELPERS.replace("%(origin)s", repr(now[0] - span))
                         .replace("%(step)s", repr(span / n)))
            _run_steps(conn, (("procrastinate_jobs", JOBS),
                              ("attempt times", ATTEMPT_TIMES)), params, report)
            conn.commit()
            _in_parallel(url, [
                (("procrastinate_events", EVENTS),),
                (("job_attempts", ATTEMPTS), ("job_results", RESULTS),
                 ("small tables", SMALL_TABLES)),
            ], params, report)
            _run_steps(conn, (("sequences", SEQUENCES),), params, report)
            conn.execute("DROP SCHEMA bench_seed CASCADE")
            conn.commit()
            began = time.perf_counter()
            _one_per_cpu(url, indexes)
            report.seconds["build indexes"] = time.perf_counter() - began
        finally:
            conn.rollback()
            restore()
    began = time.perf_counter()
    _one_per_cpu(url, [f"VACUUM (ANALYZE) {table}" for table in ANALYZED_TABLES])
    report.seconds["vacuum"] = time.perf_counter() - began
    return report


Step = tuple[str, str]


def _run_steps(conn: psycopg.Connection, steps: tuple[Step, ...],
               params: dict[str, object], report: SeedReport) -> None:
    for name, statement in steps:
        began = time.perf_counter()
        for part in _statements(statement):
            cursor = conn.execute(part, params)
            report.rows[name] = report.rows.get(name, 0) + max(cursor.rowcount, 0)
        report.seconds[name] = time.perf_counter() - began


def _load_on_own_connection(url: str, steps: tuple[Step, ...],
                            params: dict[str, object], report: SeedReport) -> None:
    with psycopg.connect(url) as conn:
        _disable_triggers(conn)
        conn.execute("SET synchronous_commit = off")
        conn.execute("SET work_mem = '256MB'")
        _run_steps(conn, steps, params, report)
        conn.commit()


def _in_parallel(url: str, groups: list[tuple[Step, ...]],
                 params: dict[str, object], report: SeedReport) -> None:
    """Run each group of steps on its own connection, the groups side by side."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(groups)) as pool:
        futures = [pool.submit(_load_on_own_connection, url, group, params, report)
                   for group in groups]
        for future in futures:
            future.result()


def _run_alone(url: str, statement: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '512MB'")
        conn.execute(statement)


def _one_per_cpu(url: str, statements: list[str]) -> None:
    """Run maintenance statements side by side, one connection per CPU.

    An index build or a VACUUM is CPU-bound in one backend, so on a server with
    more than one core several connections finish sooner than one.
    """
    workers = max(1, min(len(statements), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(_run_alone, url, statement)
                       for statement in statements]:
            future.result()


def _statements(text: str) -> list[str]:
    return [part.strip() for part in text.split(";\n") if part.strip()]
