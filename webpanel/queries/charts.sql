-- name: window_start
-- The start of the chart window: %(buckets)s buckets of %(bucket)s seconds that
-- end with the bucket holding the database's current time.
SELECT to_timestamp(
           floor(extract(epoch FROM now()) / %(bucket)s) * %(bucket)s
           - %(bucket)s * (%(buckets)s - 1)
       ) AS since

-- name: throughput
-- Jobs that succeeded and failed per bucket since %(since)s, from the events
-- index panel_events_type_at_idx (type, at). Buckets are computed in double
-- precision with date_part: extract(epoch ...) returns numeric, whose arithmetic
-- made the day's chart queries about twice as slow.
SELECT floor(date_part('epoch', at) / %(bucket)s)::bigint * %(bucket)s AS bucket,
       count(*) FILTER (WHERE type = 'succeeded')::int AS succeeded,
       count(*) FILTER (WHERE type = 'failed')::int AS failed
  FROM procrastinate_events
 WHERE type IN ('succeeded', 'failed') AND at >= %(since)s
 GROUP BY 1

-- name: latency
-- Median and 95th percentile run time and waiting time of the attempts that ended
-- per bucket since %(since)s, read in one pass over job_attempts_ended_at_idx.
-- Run time is finished - started. Attempts of lost workers have no measured
-- duration, and percentile_cont leaves their NULL out. Waiting time runs from the
-- moment the job became due (deferred, given back for a retry, retried by hand,
-- or its scheduled time) to the attempt's start. The worker stores it in wait_ms.
-- For rows without it (written before that column existed, or by the stalled-job
-- sweep) it is computed from the job's events through their job_id index, and
-- coalesce runs that lookup only for those rows. An attempt still running is
-- counted once it ends.
SELECT floor(date_part('epoch', a.ended_at) / %(bucket)s)::bigint * %(bucket)s
           AS bucket,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY a.duration_ms) / 1000.0
           AS run_p50_s,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY a.duration_ms) / 1000.0
           AS run_p95_s,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY w.wait_s) AS wait_p50_s,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY w.wait_s) AS wait_p95_s
  FROM job_attempts a
 CROSS JOIN LATERAL (
       SELECT coalesce(a.wait_ms / 1000.0, (
                  SELECT greatest(date_part('epoch', a.started_at - max(e.at)), 0)
                    FROM procrastinate_events e
                   WHERE e.job_id = a.job_id AND e.at <= a.started_at
                     AND e.type IN ('deferred', 'deferred_for_retry', 'retried',
                                    'scheduled'))) AS wait_s
 ) AS w
 WHERE a.ended_at >= %(since)s
 GROUP BY 1
