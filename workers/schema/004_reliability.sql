-- Pool counters that each worker and scheduler process stores every heartbeat
-- interval, read by the health check. Every statement is idempotent.

ALTER TABLE worker_processes ADD COLUMN IF NOT EXISTS pool_min_size integer;
ALTER TABLE worker_processes ADD COLUMN IF NOT EXISTS pool_max_size integer;
ALTER TABLE worker_processes ADD COLUMN IF NOT EXISTS pool_size integer;
ALTER TABLE worker_processes ADD COLUMN IF NOT EXISTS pool_available integer;
ALTER TABLE worker_processes ADD COLUMN IF NOT EXISTS pool_requests_waiting integer;
ALTER TABLE worker_processes ADD COLUMN IF NOT EXISTS pool_stats_at timestamptz;

-- The retention sweep deletes stopped process records and old health rows by age.
CREATE INDEX IF NOT EXISTS worker_processes_stopped_at_idx
    ON worker_processes (stopped_at) WHERE stopped_at IS NOT NULL;

-- A queueing lock alone keeps a second job with the same key out of the queue only
-- while the first one waits in todo; once a worker has fetched the first, a second
-- defer is accepted and both could run at once. Every job deferred with a
-- queueing lock and no lock therefore takes the queueing lock as its lock too, so
-- that jobs with one key never run at the same time, whichever way they were
-- deferred (panel, API, periodic deferrer or code).
CREATE OR REPLACE FUNCTION fleet_lock_from_queueing_lock() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    IF NEW.queueing_lock IS NOT NULL AND NEW.lock IS NULL THEN
        NEW.lock := NEW.queueing_lock;
    END IF;
    RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS fleet_jobs_lock_from_queueing_lock ON procrastinate_jobs;
CREATE TRIGGER fleet_jobs_lock_from_queueing_lock
    BEFORE INSERT ON procrastinate_jobs
    FOR EACH ROW EXECUTE PROCEDURE fleet_lock_from_queueing_lock();
