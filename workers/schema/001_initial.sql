-- The project's own tables, beside Procrastinate's. Every statement is idempotent.

CREATE TABLE IF NOT EXISTS fleet_schema_state (
    key text PRIMARY KEY,
    value text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- One row per attempt of a job, written once when the attempt ends.
CREATE TABLE IF NOT EXISTS job_attempts (
    id bigserial PRIMARY KEY,
    job_id bigint NOT NULL REFERENCES procrastinate_jobs (id) ON DELETE CASCADE,
    attempt integer NOT NULL,
    task_name text NOT NULL,
    queue_name text NOT NULL,
    started_at timestamptz NOT NULL,
    ended_at timestamptz,
    duration_ms double precision,
    host text,
    pid integer,
    process_name text,
    worker_id bigint,
    outcome text NOT NULL,
    error_type text,
    error_message text,
    traceback text,
    http_status integer,
    retry_after text,
    next_attempt_at timestamptz
);
CREATE INDEX IF NOT EXISTS job_attempts_job_id_idx ON job_attempts (job_id, id);
CREATE INDEX IF NOT EXISTS job_attempts_ended_at_idx ON job_attempts (ended_at);

-- The effect of a job, keyed by its id so that a second run stores nothing new.
CREATE TABLE IF NOT EXISTS job_results (
    job_id bigint PRIMARY KEY REFERENCES procrastinate_jobs (id) ON DELETE CASCADE,
    task_name text NOT NULL,
    result jsonb NOT NULL,
    stored_at timestamptz NOT NULL DEFAULT now()
);

-- Our record of each Procrastinate worker: who runs it, where, and how.
CREATE TABLE IF NOT EXISTS worker_processes (
    worker_id bigint PRIMARY KEY,
    host text NOT NULL,
    pid integer NOT NULL,
    process_name text NOT NULL,
    role text NOT NULL,
    queues text[] NOT NULL,
    concurrency integer NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    stopped_at timestamptz
);
CREATE INDEX IF NOT EXISTS worker_processes_started_at_idx
    ON worker_processes (started_at);

-- One row per health check run by the scheduler.
CREATE TABLE IF NOT EXISTS health_checks (
    id bigserial PRIMARY KEY,
    checked_at timestamptz NOT NULL DEFAULT now(),
    db_latency_ms double precision NOT NULL,
    live_workers integer NOT NULL,
    oldest_todo_age_s double precision,
    stalled_jobs integer NOT NULL,
    pool_size integer,
    pool_available integer,
    details jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS health_checks_checked_at_idx ON health_checks (checked_at);

CREATE TABLE IF NOT EXISTS panel_users (
    id bigserial PRIMARY KEY,
    username text NOT NULL UNIQUE,
    password_hash text NOT NULL,
    role text NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    disabled boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS api_tokens (
    id bigserial PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES panel_users (id) ON DELETE CASCADE,
    name text NOT NULL,
    token_hash text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz
);

-- Failed logins counted per account and per address, shared by every web worker.
CREATE TABLE IF NOT EXISTS login_failures (
    key text PRIMARY KEY,
    failures integer NOT NULL DEFAULT 0,
    first_failure_at timestamptz NOT NULL DEFAULT now(),
    locked_until timestamptz
);

CREATE TABLE IF NOT EXISTS audit_log (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    username text NOT NULL,
    action text NOT NULL,
    job_ids bigint[] NOT NULL DEFAULT '{}',
    details jsonb NOT NULL DEFAULT '{}',
    result text NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_log_at_idx ON audit_log (at);
CREATE INDEX IF NOT EXISTS audit_log_job_ids_idx ON audit_log USING gin (job_ids);

-- Indexes for the panel's queries on Procrastinate's tables.
CREATE INDEX IF NOT EXISTS panel_jobs_status_id_idx
    ON procrastinate_jobs (status, id DESC);
CREATE INDEX IF NOT EXISTS panel_jobs_queue_id_idx
    ON procrastinate_jobs (queue_name, id DESC);
CREATE INDEX IF NOT EXISTS panel_jobs_task_id_idx
    ON procrastinate_jobs (task_name, id DESC);
CREATE INDEX IF NOT EXISTS panel_jobs_lock_idx
    ON procrastinate_jobs (lock) WHERE lock IS NOT NULL;
CREATE INDEX IF NOT EXISTS panel_jobs_queueing_lock_idx
    ON procrastinate_jobs (queueing_lock) WHERE queueing_lock IS NOT NULL;
CREATE INDEX IF NOT EXISTS panel_jobs_args_idx
    ON procrastinate_jobs USING gin (args jsonb_path_ops);
CREATE INDEX IF NOT EXISTS panel_jobs_todo_scheduled_idx
    ON procrastinate_jobs (queue_name, scheduled_at) WHERE status = 'todo';
CREATE INDEX IF NOT EXISTS panel_events_type_at_idx
    ON procrastinate_events (type, at);
CREATE INDEX IF NOT EXISTS panel_events_at_idx ON procrastinate_events (at);
