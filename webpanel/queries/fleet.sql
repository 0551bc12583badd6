-- name: scheduled_later
-- Waiting jobs of each queue scheduled for later, not yet due, from
-- panel_jobs_todo_scheduled_idx; the count stops at %(cap)s.
SELECT q.queue_name,
       (SELECT count(*) FROM (SELECT 1 FROM procrastinate_jobs j
                               WHERE j.queue_name = q.queue_name
                                 AND j.status = 'todo'
                                 AND j.scheduled_at > now()
                               LIMIT %(cap)s) AS later)::bigint AS scheduled_later
  FROM unnest(%(queues)s::text[]) AS q(queue_name)

-- name: throughput_by_queue
-- Jobs that succeeded or failed per queue over the last %(seconds)s seconds: the
-- events come from panel_events_type_at_idx or panel_events_at_idx (at 1,000,000
-- seeded jobs PostgreSQL 15 picks the second and filters on type), and each one's
-- queue from a primary key lookup, so the jobs table is not scanned.
SELECT queue_name,
       count(*) FILTER (WHERE type = 'succeeded')::bigint AS succeeded,
       count(*) FILTER (WHERE type = 'failed')::bigint AS failed
  FROM (SELECT e.type,
               (SELECT j.queue_name FROM procrastinate_jobs j
                 WHERE j.id = e.job_id) AS queue_name
          FROM procrastinate_events e
         WHERE e.type IN ('succeeded', 'failed')
           AND e.at >= now() - make_interval(secs => %(seconds)s)) AS finished
 GROUP BY queue_name

-- name: workers
-- Every Procrastinate worker row with our record of its process; a heartbeat
-- older than %(threshold)s seconds makes it stale.
SELECT w.id AS worker_id,
       w.last_heartbeat,
       extract(epoch FROM now() - w.last_heartbeat) AS heartbeat_age_s,
       w.last_heartbeat < now() - make_interval(secs => %(threshold)s) AS stale,
       p.host, p.pid, p.process_name, p.role, p.queues, p.concurrency,
       p.started_at,
       extract(epoch FROM now() - p.started_at) AS uptime_s
  FROM procrastinate_workers w
  LEFT JOIN worker_processes p ON p.worker_id = w.id
 ORDER BY p.role = 'scheduler', p.process_name NULLS LAST, w.id

-- name: running_jobs
-- The jobs the given workers run now, from Procrastinate's partial index on
-- doing jobs by worker_id, with the time each attempt started. PostgreSQL 15 does
-- not compute an aggregate with FILTER by walking an index on the events' time
-- (checked with EXPLAIN), so each max() reads the job's few events by job_id.
SELECT j.id, j.worker_id, j.task_name, j.queue_name, j.attempts, j.priority,
       j.abort_requested, st.started_at,
       extract(epoch FROM now() - st.started_at) AS running_s
  FROM procrastinate_jobs j
  LEFT JOIN LATERAL (
       SELECT max(e.at) FILTER (WHERE e.type = 'started') AS started_at
         FROM procrastinate_events e WHERE e.job_id = j.id
  ) AS st ON true
 WHERE j.status = 'doing' AND j.worker_id = ANY(%(worker_ids)s::bigint[])
 ORDER BY j.worker_id, j.id
 LIMIT %(limit)s

-- name: recently_stopped_workers
-- Process records whose Procrastinate worker row is gone, newest first: stopped
-- cleanly (stopped_at set) or lost (killed, its row pruned) in the last day.
(SELECT p.worker_id, p.host, p.pid, p.process_name, p.role, p.queues,
        p.started_at, p.stopped_at, p.stopped_at AS ended_at
   FROM worker_processes p
  WHERE p.stopped_at >= now() - make_interval(secs => %(seconds)s)
  ORDER BY p.stopped_at DESC
  LIMIT %(limit)s)
UNION ALL
(SELECT p.worker_id, p.host, p.pid, p.process_name, p.role, p.queues,
        p.started_at, NULL, p.started_at AS ended_at
   FROM worker_processes p
  WHERE p.started_at >= now() - make_interval(secs => %(seconds)s)
    AND p.stopped_at IS NULL
    AND NOT EXISTS (SELECT 1 FROM procrastinate_workers w
                     WHERE w.id = p.worker_id)
  ORDER BY p.started_at DESC
  LIMIT %(limit)s)
ORDER BY ended_at DESC
LIMIT %(limit)s

-- name: stalled_jobs
-- Doing jobs whose worker has not sent a heartbeat for %(threshold)s seconds or
-- whose worker row is gone: the rule of Procrastinate's
-- select_stalled_jobs_by_heartbeat and of the scheduler's recovery sweep.
SELECT j.id, j.task_name, j.queue_name, j.attempts, j.priority, j.worker_id,
       w.last_heartbeat,
       extract(epoch FROM now() - w.last_heartbeat) AS heartbeat_age_s,
       p.process_name, p.host, p.pid, p.stopped_at,
       st.started_at,
       extract(epoch FROM now() - st.started_at) AS running_s
  FROM procrastinate_jobs j
  LEFT JOIN procrastinate_workers w ON w.id = j.worker_id
  LEFT JOIN worker_processes p ON p.worker_id = j.worker_id
  LEFT JOIN LATERAL (
       SELECT max(e.at) FILTER (WHERE e.type = 'started') AS started_at
         FROM procrastinate_events e WHERE e.job_id = j.id
  ) AS st ON true
 WHERE j.status = 'doing'
   AND (w.id IS NULL
        OR w.last_heartbeat < now() - make_interval(secs => %(threshold)s))
 ORDER BY j.id
 LIMIT %(limit)s

-- name: jobs_for_action
-- The jobs an operator selected, as they are now.
SELECT id, task_name, queue_name, status::text AS status, attempts, worker_id
  FROM procrastinate_jobs
 WHERE id = ANY(%(job_ids)s::bigint[])
 ORDER BY id

-- name: periodic_last_defers
-- The latest scheduled tick of each periodic task and the job it created.
SELECT DISTINCT ON (p.task_name, p.periodic_id)
       p.task_name, p.periodic_id, p.defer_timestamp, p.job_id,
       j.status::text AS status, j.attempts
  FROM procrastinate_periodic_defers p
  LEFT JOIN procrastinate_jobs j ON j.id = p.job_id
 ORDER BY p.task_name, p.periodic_id, p.defer_timestamp DESC

-- name: latest_job_of_task
-- The newest job of one task, scheduled or run by hand, with the time of its
-- latest event and the outcome of its latest attempt. One statement per task, so
-- the task name is known when the statement is planned. For a task without jobs
-- the planner then picks panel_jobs_task_id_idx instead of walking the primary
-- key backwards.
SELECT j.id, j.status::text AS status, j.attempts,
       ev.at AS last_event_at, a.outcome, a.error_message, a.ended_at
  FROM procrastinate_jobs j
  LEFT JOIN LATERAL (
       SELECT max(e.at) FILTER (WHERE e.at IS NOT NULL) AS at
         FROM procrastinate_events e WHERE e.job_id = j.id
  ) AS ev ON true
  LEFT JOIN LATERAL (
       SELECT ja.outcome, ja.error_message, ja.ended_at FROM job_attempts ja
        WHERE ja.job_id = j.id
        ORDER BY ja.id DESC
        LIMIT 1
  ) AS a ON true
 WHERE j.task_name = %(task)s
 ORDER BY j.id DESC
 LIMIT 1

-- name: lock_queueing_key
-- Serialise defers that use the same queueing lock until the transaction ends.
-- The key is the one the defer forms take, so both wait for each other.
SELECT pg_advisory_xact_lock(
       hashtextextended('panel queueing lock ' || %(lock)s, 0)) AS locked

-- name: queueing_lock_busy
-- A waiting or running job with a queueing lock (panel_jobs_queueing_lock_idx).
SELECT id, status::text AS status FROM procrastinate_jobs
 WHERE queueing_lock = %(lock)s AND status IN ('todo', 'doing')
 ORDER BY id
 LIMIT 1
