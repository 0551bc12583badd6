-- name: worker_counts
-- Procrastinate workers by kind: live worker processes (heartbeat within
-- %(threshold)s seconds, any role but the scheduler), live schedulers, and stale
-- rows of either kind.
SELECT count(*) FILTER (WHERE fresh AND role IS DISTINCT FROM 'scheduler')::int
           AS live_workers,
       count(*) FILTER (WHERE fresh AND role = 'scheduler')::int AS live_schedulers,
       count(*) FILTER (WHERE NOT fresh)::int AS stale_workers,
       min(started_at) FILTER (WHERE fresh AND role = 'scheduler')
           AS scheduler_started_at
  FROM (SELECT w.last_heartbeat >= now() - make_interval(secs => %(threshold)s)
                   AS fresh,
               p.role, p.started_at
          FROM procrastinate_workers w
          LEFT JOIN worker_processes p ON p.worker_id = w.id) AS workers

-- name: stalled_count
-- The number of stalled jobs, by the rule of the stalled-jobs page.
SELECT count(*)::int AS stalled_jobs
  FROM procrastinate_jobs j
  LEFT JOIN procrastinate_workers w ON w.id = j.worker_id
 WHERE j.status = 'doing'
   AND (w.id IS NULL
        OR w.last_heartbeat < now() - make_interval(secs => %(threshold)s))

-- name: latest_health_check
-- The newest row the scheduler's health check stored, with its age.
SELECT id, checked_at, db_latency_ms, live_workers, oldest_todo_age_s,
       stalled_jobs, pool_size, pool_available, details,
       extract(epoch FROM now() - checked_at) AS age_s
  FROM health_checks
 ORDER BY id DESC
 LIMIT 1

-- name: schema_state_table
-- Whether the table of recorded schema versions exists.
SELECT to_regclass('fleet_schema_state') IS NOT NULL AS has_state_table

-- name: schema_version_rows
-- The recorded Procrastinate and project schema versions.
SELECT
    (SELECT value FROM fleet_schema_state WHERE key = 'procrastinate_version')
        AS procrastinate_version,
    (SELECT value FROM fleet_schema_state WHERE key = 'project_schema_version')
        AS project_version

-- name: attempt_outcomes
-- Attempts that ended in the last %(seconds)s seconds, per queue, task and
-- outcome, from job_attempts_ended_at_idx.
SELECT queue_name, task_name, outcome, count(*)::bigint AS attempts
  FROM job_attempts
 WHERE ended_at >= now() - make_interval(secs => %(seconds)s)
 GROUP BY queue_name, task_name, outcome
 ORDER BY queue_name, task_name, outcome

-- name: attempt_duration_buckets
-- Per queue, the attempts that ended in the last %(seconds)s seconds counted
-- into cumulative duration buckets (upper bounds in seconds), with their sum.
SELECT queue_name,
       array_agg(bucket_count ORDER BY bound) AS counts,
       max(total) AS total,
       max(sum_s) AS sum_s
  FROM (SELECT a.queue_name, b.bound,
               count(*) FILTER (WHERE a.duration_ms / 1000.0 <= b.bound)
                   AS bucket_count,
               count(*) AS total,
               sum(a.duration_ms) / 1000.0 AS sum_s
          FROM job_attempts a
         CROSS JOIN unnest(%(bounds)s::float8[]) AS b(bound)
         WHERE a.ended_at >= now() - make_interval(secs => %(seconds)s)
           AND a.duration_ms IS NOT NULL
         GROUP BY a.queue_name, b.bound) AS per_bound
 GROUP BY queue_name
 ORDER BY queue_name
