-- name: window_start
-- The start of the chart window: %(buckets)s buckets of %(bucket)s seconds that
-- end with the bucket holding the database's current time.
SELECT to_timestamp(
           floor(extract(epoch FROM now()) / %(bucket)s) * %(bucket)s
           - %(bucket)s * (%(buckets)s - 1)
       ) AS since

-- name: throughput
-- Jobs that succeeded and failed per bucket since %(since)s, from the events
-- index panel_events_type_at_idx (type, at).
SELECT floor(extract(epoch FROM at) / %(bucket)s)::bigint * %(bucket)s AS bucket,
       count(*) FILTER (WHERE type = 'succeeded')::int AS succeeded,
       count(*) FILTER (WHERE type = 'failed')::int AS failed
  FROM procrastinate_events
 WHERE type IN ('succeeded', 'failed') AND at >= %(since)s
 GROUP BY 1

-- name: run_time
-- Median and 95th percentile run time (finished - started) of the attempts that
-- ended per bucket since %(since)s, from job_attempts_ended_at_idx. Attempts of
-- lost workers have no measured duration and are left out.
SELECT floor(extract(epoch FROM ended_at) / %(bucket)s)::bigint * %(bucket)s
           AS bucket,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) / 1000.0 AS p50_s,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) / 1000.0 AS p95_s,
       count(*)::int AS attempts
  FROM job_attempts
 WHERE ended_at >= %(since)s AND duration_ms IS NOT NULL
 GROUP BY 1

-- name: wait_time
-- Median and 95th percentile waiting time of the attempts that started per bucket
-- since %(since)s: from the moment the job became due (deferred, given back for a
-- retry, retried by hand, or its scheduled time) to its 'started' event. Starts
-- come from panel_events_type_at_idx, each job's earlier events from the index
-- on job_id. PostgreSQL 15 does not turn an aggregate with FILTER into an index
-- walk on (at) (checked with EXPLAIN), so the FILTER keeps it from scanning other
-- jobs' events.
SELECT floor(extract(epoch FROM s.at) / %(bucket)s)::bigint * %(bucket)s AS bucket,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY w.wait_s) AS p50_s,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY w.wait_s) AS p95_s,
       count(*)::int AS starts
  FROM procrastinate_events s
 CROSS JOIN LATERAL (
       SELECT greatest(extract(epoch FROM s.at - max(e.at) FILTER (
                  WHERE e.type IN ('deferred', 'deferred_for_retry', 'retried',
                                   'scheduled'))), 0) AS wait_s
         FROM procrastinate_events e
        WHERE e.job_id = s.job_id AND e.at <= s.at
 ) AS w
 WHERE s.type = 'started' AND s.at >= %(since)s AND w.wait_s IS NOT NULL
 GROUP BY 1
