-- name: counts_by_queue_and_status
-- Job counts per queue and status for the dashboard.
SELECT queue_name, status::text AS status, count(*)::int AS count
  FROM procrastinate_jobs
 GROUP BY queue_name, status
 ORDER BY queue_name
