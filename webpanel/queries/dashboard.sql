-- name: known_queues
-- Every queue name that has jobs, read with a loose index scan on
-- panel_jobs_queue_id_idx, so it costs one index probe per queue.
WITH RECURSIVE queues AS (
    (SELECT queue_name FROM procrastinate_jobs ORDER BY queue_name LIMIT 1)
    UNION ALL
    SELECT (SELECT j.queue_name FROM procrastinate_jobs j
             WHERE j.queue_name > queues.queue_name
             ORDER BY j.queue_name LIMIT 1)
      FROM queues
     WHERE queues.queue_name IS NOT NULL
)
SELECT queue_name FROM queues WHERE queue_name IS NOT NULL

-- name: capped_counts
-- Jobs per queue and status, each count stopping at %(cap)s rows, from the index
-- panel_jobs_queue_status_idx; a count equal to the cap means "at least".
SELECT q.queue_name, s.status::text AS status, c.count
  FROM unnest(%(queues)s::text[]) AS q(queue_name)
 CROSS JOIN unnest(%(statuses)s::procrastinate_job_status[]) AS s(status)
 CROSS JOIN LATERAL (
       SELECT count(*)::bigint AS count
         FROM (SELECT 1 FROM procrastinate_jobs j
                WHERE j.queue_name = q.queue_name AND j.status = s.status
                LIMIT %(cap)s) AS capped
 ) AS c

-- name: estimate_count
-- The planner's estimate of the jobs in one queue and status, from the table
-- statistics; used only when the capped count reached its cap.
EXPLAIN (FORMAT JSON)
SELECT 1 FROM procrastinate_jobs
 WHERE queue_name = %(queue)s AND status = %(status)s::procrastinate_job_status

-- name: oldest_waiting
-- Per queue, the job that has waited longest since it became due: the lowest id
-- among jobs deferred without a schedule, and the earliest due scheduled job.
-- With a FILTER, PostgreSQL 15 does not compute min() by walking the events'
-- (type, at) index from the oldest event (checked with EXPLAIN). It reads the
-- job's few events by job_id instead.
SELECT q.queue_name,
       CASE WHEN s.due_at IS NULL OR u.deferred_at <= s.due_at
            THEN u.id ELSE s.id END AS job_id,
       extract(epoch FROM now() - least(u.deferred_at, s.due_at)) AS age_s
  FROM unnest(%(queues)s::text[]) AS q(queue_name)
  LEFT JOIN LATERAL (
       SELECT j.id,
              coalesce((SELECT min(e.at) FILTER (WHERE e.type = 'deferred')
                          FROM procrastinate_events e WHERE e.job_id = j.id),
                       now()) AS deferred_at
         FROM procrastinate_jobs j
        WHERE j.queue_name = q.queue_name
          AND j.status = 'todo'
          AND j.scheduled_at IS NULL
        ORDER BY j.id
        LIMIT 1
  ) AS u ON true
  LEFT JOIN LATERAL (
       SELECT j.id, j.scheduled_at AS due_at
         FROM procrastinate_jobs j
        WHERE j.queue_name = q.queue_name
          AND j.status = 'todo'
          AND j.scheduled_at <= now()
        ORDER BY j.scheduled_at
        LIMIT 1
  ) AS s ON true
