-- name: list_page
-- One page of jobs matching {where}, ordered by id {order}.
-- created_at is the time of the job's 'deferred' event.
-- worker_dead marks doing jobs whose worker row is gone or silent for %(threshold)s s.
SELECT j.id, j.queue_name, j.task_name, j.priority, j.lock, j.queueing_lock,
       j.args, j.status::text AS status, j.scheduled_at, j.attempts,
       j.abort_requested, j.worker_id,
       (SELECT e.at FROM procrastinate_events e
         WHERE e.job_id = j.id AND e.type = 'deferred'
         ORDER BY e.id LIMIT 1) AS created_at,
       (j.status = 'doing' AND NOT EXISTS (
           SELECT 1 FROM procrastinate_workers w
            WHERE w.id = j.worker_id
              AND w.last_heartbeat >= now() - make_interval(secs => %(threshold)s)
       )) AS worker_dead
  FROM procrastinate_jobs j
 WHERE {where}
 ORDER BY j.id {order}
 LIMIT %(limit)s

-- name: exists_beyond
-- Whether a job matching {where} lies beyond the current page.
SELECT EXISTS (SELECT 1 FROM procrastinate_jobs j WHERE {where}) AS found

-- name: count_capped
-- The number of jobs matching {where}, counting at most %(cap)s rows.
SELECT count(*)::bigint AS count
  FROM (SELECT 1 FROM procrastinate_jobs j WHERE {where} LIMIT %(cap)s) AS capped

-- name: count_exact
-- The exact number of jobs matching {where}.
SELECT count(*)::bigint AS count FROM procrastinate_jobs j WHERE {where}

-- name: count_estimate
-- The planner's estimate of the jobs matching {where}; no rows are read.
EXPLAIN (FORMAT JSON) SELECT 1 FROM procrastinate_jobs j WHERE {where}

-- name: count_by_status
-- The exact number of jobs matching {where}, by the facts that decide which
-- actions apply: status, a dead worker, a later schedule, an abort request.
SELECT j.status::text AS status,
       (j.status = 'doing' AND NOT EXISTS (
           SELECT 1 FROM procrastinate_workers w
            WHERE w.id = j.worker_id
              AND w.last_heartbeat >= now() - make_interval(secs => %(threshold)s)
       )) AS worker_dead,
       (j.status = 'todo' AND j.scheduled_at > now()) IS TRUE AS scheduled_later,
       j.abort_requested,
       count(*)::bigint AS count
  FROM procrastinate_jobs j
 WHERE {where}
 GROUP BY 1, 2, 3, 4

-- name: max_job_id
-- The highest job id in use, the upper end of a bulk action's snapshot.
SELECT coalesce(max(id), 0)::bigint AS id FROM procrastinate_jobs

-- name: ids_page
-- The next batch of job ids matching {where}, highest first, for bulk actions.
SELECT j.id FROM procrastinate_jobs j WHERE {where} ORDER BY j.id DESC LIMIT %(limit)s

-- name: where_status
-- Filter: one status (uses panel_jobs_status_id_idx in id order).
j.status = %(status)s::procrastinate_job_status

-- name: where_statuses
-- Filter: any of several statuses.
j.status = ANY(%(statuses)s::procrastinate_job_status[])

-- name: where_queue
-- Filter: the queue.
j.queue_name = %(queue)s

-- name: where_task
-- Filter: the task name.
j.task_name = %(task)s

-- name: where_lock
-- Filter: the lock.
j.lock = %(lock)s

-- name: where_queueing_lock
-- Filter: the queueing lock.
j.queueing_lock = %(queueing_lock)s

-- name: where_args
-- Filter: arguments containing one of two JSON documents (GIN panel_jobs_args_idx).
(j.args @> %(args_typed)s OR j.args @> %(args_text)s)

-- name: where_created
-- Filter: created (deferred) in [created_from, created_before). The id range comes
-- from the (type, at) index on events; the subquery makes the bounds exact. It is
-- a lookup of one job's events through their job_id index, row by row. An EXISTS
-- here was planned as a hash join over every deferred event of the range.
j.id BETWEEN %(created_min_id)s AND %(created_max_id)s
AND (SELECT min(e.at) FROM procrastinate_events e
      WHERE e.job_id = j.id AND e.type = 'deferred')
    <@ tstzrange(%(created_from)s, %(created_before)s)

-- name: where_before
-- Position: ids below a job id.
j.id < %(before)s

-- name: where_after
-- Position: ids above a job id.
j.id > %(after)s

-- name: where_at_most
-- Position: ids at or below a job id (the snapshot of a bulk action).
j.id <= %(at_most)s

-- name: where_ids
-- Selection: explicit job ids.
j.id = ANY(%(ids)s::bigint[])

-- name: first_created_id
-- A lower id bound for jobs deferred at or after %(at)s: the smallest id among the
-- first deferred events, so that ids assigned slightly out of time order still fit.
SELECT min(job_id)::bigint AS id
  FROM (SELECT job_id FROM procrastinate_events
         WHERE type = 'deferred' AND at >= %(at)s
         ORDER BY at LIMIT 1000) AS first_events

-- name: last_created_id
-- An upper id bound for jobs deferred before %(at)s, symmetrical to first_created_id.
SELECT max(job_id)::bigint AS id
  FROM (SELECT job_id FROM procrastinate_events
         WHERE type = 'deferred' AND at < %(at)s
         ORDER BY at DESC LIMIT 1000) AS last_events

-- name: job_by_id
-- One job with its worker's process and heartbeat.
SELECT j.id, j.queue_name, j.task_name, j.priority, j.lock, j.queueing_lock,
       j.args, j.status::text AS status, j.scheduled_at, j.attempts,
       j.abort_requested, j.worker_id,
       w.last_heartbeat, wp.process_name, wp.host, wp.pid, wp.stopped_at,
       (SELECT e.at FROM procrastinate_events e
         WHERE e.job_id = j.id AND e.type = 'deferred'
         ORDER BY e.id LIMIT 1) AS created_at,
       (j.status = 'doing' AND (w.id IS NULL OR w.last_heartbeat
           < now() - make_interval(secs => %(threshold)s))) AS worker_dead
  FROM procrastinate_jobs j
  LEFT JOIN procrastinate_workers w ON w.id = j.worker_id
  LEFT JOIN worker_processes wp ON wp.worker_id = j.worker_id
 WHERE j.id = %(id)s

-- name: job_events
-- Procrastinate's events of one job, oldest first.
SELECT id, type::text AS type, at
  FROM procrastinate_events
 WHERE job_id = %(id)s
 ORDER BY at NULLS FIRST, id
 LIMIT 2000

-- name: job_attempts
-- The attempt records of one job, oldest first.
SELECT id, attempt, started_at, ended_at, duration_ms, host, pid, process_name,
       worker_id, outcome, error_type, error_message, traceback, http_status,
       retry_after, next_attempt_at
  FROM job_attempts
 WHERE job_id = %(id)s
 ORDER BY id
 LIMIT 2000

-- name: job_audit
-- Audit entries naming one job (GIN audit_log_job_ids_idx), oldest first.
SELECT id, at, username, action, details, result, cardinality(job_ids) AS job_count
  FROM audit_log
 WHERE job_ids @> ARRAY[%(id)s::bigint]
 ORDER BY at, id
 LIMIT 500

-- name: job_result
-- The stored result of one job.
SELECT result, stored_at FROM job_results WHERE job_id = %(id)s

-- name: lock_job
-- One job locked for a state change, with whether its worker is dead.
SELECT j.id, j.status::text AS status, j.task_name, j.queue_name, j.attempts,
       j.scheduled_at, j.queueing_lock, j.abort_requested, j.worker_id,
       j.scheduled_at > now() AS scheduled_later,
       (j.status = 'doing' AND NOT EXISTS (
           SELECT 1 FROM procrastinate_workers w
            WHERE w.id = j.worker_id
              AND w.last_heartbeat >= now() - make_interval(secs => %(threshold)s)
       )) AS worker_dead
  FROM procrastinate_jobs j
 WHERE j.id = %(id)s
   FOR UPDATE OF j

-- name: job_status
-- The status of one job after a change.
SELECT status::text AS status FROM procrastinate_jobs WHERE id = %(id)s

-- name: queueing_lock_holder
-- The waiting job that holds a queueing lock (procrastinate_jobs_queueing_lock_idx_v1).
SELECT id FROM procrastinate_jobs
 WHERE queueing_lock = %(queueing_lock)s AND status = 'todo' AND id <> %(id)s
 LIMIT 1

-- name: queueing_lock_busy
-- A waiting or running job with a queueing lock (panel_jobs_queueing_lock_idx).
SELECT id, status::text AS status FROM procrastinate_jobs
 WHERE queueing_lock = %(queueing_lock)s AND status IN ('todo', 'doing')
 ORDER BY id
 LIMIT 1

-- name: lock_queueing_key
-- Serialise defers that use the same queueing lock until the transaction ends.
SELECT pg_advisory_xact_lock(
       hashtextextended('panel queueing lock ' || %(queueing_lock)s, 0)) AS locked

-- name: run_now
-- Make a waiting job runnable at once.
UPDATE procrastinate_jobs SET scheduled_at = now()
 WHERE id = %(id)s AND status = 'todo'

-- name: unlink_periodic_defers
-- Detach periodic-defer records from a job that is about to be deleted.
UPDATE procrastinate_periodic_defers SET job_id = NULL WHERE job_id = %(id)s

-- name: delete_finished_job
-- Delete a finished job; events, attempt records and results go by cascade.
DELETE FROM procrastinate_jobs
 WHERE id = %(id)s AND status IN ('succeeded', 'failed', 'cancelled', 'aborted')

-- name: set_count_timeout
-- Limit the statements of this transaction, for counts that may be slow.
SELECT set_config('statement_timeout', %(timeout)s, true) AS timeout
