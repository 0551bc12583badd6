-- Panel log-in sessions, one row per login. The session cookie carries a random
-- key, and the row's id is the key's SHA-256, so logging out ends the session on
-- the server: a copy of the cookie taken before the logout no longer logs in.
CREATE TABLE IF NOT EXISTS panel_sessions (
    id text PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES panel_users (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS panel_sessions_user_idx
    ON panel_sessions (user_id, created_at);
