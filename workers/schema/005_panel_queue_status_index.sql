-- The job list filtered by queue and status, newest first, pages through this
-- index instead of filtering one of the two single-column indexes.
CREATE INDEX IF NOT EXISTS panel_jobs_queue_status_id_idx
    ON procrastinate_jobs (queue_name, status, id DESC);
