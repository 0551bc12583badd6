-- The waiting time of each attempt, in milliseconds: from the moment its job
-- became due (its latest deferred, deferred_for_retry, retried or scheduled event)
-- to its started event. The worker computes it when it writes the attempt row, so
-- the latency chart reads it with the row instead of looking up every start's
-- events. Rows written before this column existed have NULL here.
-- Every statement is idempotent.
ALTER TABLE job_attempts ADD COLUMN IF NOT EXISTS wait_ms double precision;

-- Joint statistics of queue and status, so that the planner's estimate of the jobs
-- in one queue and status follows their real combination. Without it the planner
-- multiplies the two columns' frequencies, which is far off when one queue
-- contains most of the waiting jobs. ANALYZE and autovacuum fill it.
CREATE STATISTICS IF NOT EXISTS panel_jobs_queue_status_stats (mcv)
    ON queue_name, status FROM procrastinate_jobs;

