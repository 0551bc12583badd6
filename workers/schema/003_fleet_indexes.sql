-- Indexes for the panel's fleet, dashboard, metrics and audit queries.
-- Every statement is idempotent.

-- Job counts per queue and status, each capped, read from the index alone.
CREATE INDEX IF NOT EXISTS panel_jobs_queue_status_idx
    ON procrastinate_jobs (queue_name, status);

-- The oldest waiting job of a queue among jobs deferred without a schedule: their
-- ids grow in the order they were deferred.
CREATE INDEX IF NOT EXISTS panel_jobs_todo_unscheduled_idx
    ON procrastinate_jobs (queue_name, id)
    WHERE status = 'todo' AND scheduled_at IS NULL;

-- The audit page filters by user or action and pages by id.
CREATE INDEX IF NOT EXISTS audit_log_username_id_idx ON audit_log (username, id);
CREATE INDEX IF NOT EXISTS audit_log_action_id_idx ON audit_log (action, id);
