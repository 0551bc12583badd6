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

-- name: capped_count_arm
-- The jobs of one queue and status, counting at most %(cap)s rows. A count equal
-- to the cap means "at least". {index} is the pair's position in the list of
-- pairs. job_counts joins one arm per pair with UNION ALL, so that the planner
-- plans each pair with its own values and row estimate, and reads a rare pair
-- through panel_jobs_queue_status_idx. One generic plan for every pair (a LATERAL
-- over the pairs) could pick a sequential scan that stops after %(cap)s rows.
-- For a pair with few jobs, that scan reads the whole table.
SELECT {index} AS pair, count(*)::bigint AS count
  FROM (SELECT 1 FROM procrastinate_jobs
         WHERE queue_name = %(queue_{index})s
           AND status = %(status_{index})s::procrastinate_job_status
         LIMIT %(cap)s) AS capped

-- name: estimate_counts
-- The planner's estimates of the jobs in several queues and statuses, from the
-- table statistics and the joint statistics panel_jobs_queue_status_stats, with
-- no rows read. {arms} is estimate_count_arm once per pair, joined by UNION ALL.
-- VERBOSE shows each arm's output, the pair's position, next to its estimate.
EXPLAIN (FORMAT JSON, VERBOSE)
{arms}

-- name: estimate_count_arm
-- One pair of estimate_counts. {index} is its position in the list of pairs.
SELECT {index} AS pair FROM procrastinate_jobs
 WHERE queue_name = %(queue_{index})s
   AND status = %(status_{index})s::procrastinate_job_status

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
