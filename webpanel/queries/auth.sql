-- name: user_by_name
-- The account with this user name, for login.
SELECT id, username, password_hash, role, disabled
  FROM panel_users WHERE username = %(username)s

-- name: user_by_id
-- The account of a session; the hash lets a password change end old sessions.
SELECT id, username, password_hash, role, disabled
  FROM panel_users WHERE id = %(id)s

-- name: upsert_user
-- Create an account, or update the password and role of an existing one.
INSERT INTO panel_users (username, password_hash, role)
VALUES (%(username)s, %(password_hash)s, %(role)s)
ON CONFLICT (username) DO UPDATE
   SET password_hash = excluded.password_hash, role = excluded.role,
       disabled = false
RETURNING id

-- name: set_password_hash
-- Replace the password hash of an account.
UPDATE panel_users SET password_hash = %(password_hash)s
 WHERE username = %(username)s
RETURNING id

-- name: set_role
-- Change the role of an account.
UPDATE panel_users SET role = %(role)s WHERE username = %(username)s
RETURNING id

-- name: set_disabled
-- Disable or enable an account; a disabled account can neither log in nor use
-- its API tokens.
UPDATE panel_users SET disabled = %(disabled)s WHERE username = %(username)s
RETURNING id

-- name: list_users
-- Every account, for the users command.
SELECT id, username, role, disabled, created_at FROM panel_users ORDER BY username

-- name: login_lock
-- The throttle keys of one attempt that are locked now, with the seconds left.
SELECT key, ceil(extract(epoch FROM locked_until - now()))::integer AS seconds_left
  FROM login_failures
 WHERE key = ANY(%(keys)s) AND locked_until > now()

-- name: record_login_failure
-- Count a failed login for one key, restarting the count when the window has
-- passed, and lock the key when this failure reaches the limit. One statement,
-- so concurrent failures in several web workers all count.
INSERT INTO login_failures AS f (key, failures, first_failure_at, locked_until)
VALUES (%(key)s, 1, now(),
        CASE WHEN %(limit)s <= 1 THEN now() + make_interval(secs => %(lock)s) END)
ON CONFLICT (key) DO UPDATE SET
    failures = CASE
        WHEN f.first_failure_at < now() - make_interval(secs => %(window)s) THEN 1
        ELSE f.failures + 1 END,
    first_failure_at = CASE
        WHEN f.first_failure_at < now() - make_interval(secs => %(window)s)
        THEN now() ELSE f.first_failure_at END,
    locked_until = CASE
        WHEN f.first_failure_at >= now() - make_interval(secs => %(window)s)
         AND f.failures + 1 >= %(limit)s
        THEN now() + make_interval(secs => %(lock)s)
        ELSE f.locked_until END
RETURNING failures, locked_until > now() AS locked

-- name: purge_login_failures
-- Forget up to 100 counts whose window has passed and whose lock has ended.
DELETE FROM login_failures WHERE key IN (
    SELECT key FROM login_failures
     WHERE first_failure_at < now() - make_interval(secs => %(window)s)
       AND (locked_until IS NULL OR locked_until < now())
     LIMIT 100)

-- name: clear_login_failures
-- Forget the failures of an account after a successful login.
DELETE FROM login_failures WHERE key = ANY(%(keys)s)

-- name: count_tokens
-- How many API tokens an account has.
SELECT count(*) AS count FROM api_tokens WHERE user_id = %(user_id)s

-- name: insert_token
-- Store the hash of a new API token.
INSERT INTO api_tokens (user_id, name, token_hash)
VALUES (%(user_id)s, %(name)s, %(token_hash)s)
RETURNING id, user_id, name, created_at, last_used_at

-- name: tokens_of_user
-- The API tokens of one account, newest first.
SELECT id, user_id, name, created_at, last_used_at
  FROM api_tokens WHERE user_id = %(user_id)s ORDER BY id DESC

-- name: delete_token
-- Revoke a token; when user_id is given, only if the token belongs to it.
DELETE FROM api_tokens
 WHERE id = %(id)s
   AND (%(user_id)s::bigint IS NULL OR user_id = %(user_id)s::bigint)

-- name: user_for_token
-- The account of a token hash, marking the token as used when its last use is
-- older than the given number of seconds.
WITH touched AS (
    UPDATE api_tokens SET last_used_at = now()
     WHERE token_hash = %(token_hash)s
       AND (last_used_at IS NULL
            OR last_used_at < now() - make_interval(secs => %(resolution)s))
    RETURNING id
)
SELECT u.id, u.username, u.role, u.disabled
  FROM api_tokens t JOIN panel_users u ON u.id = t.user_id
 WHERE t.token_hash = %(token_hash)s

-- name: user_by_session
-- The account of a live session: its row exists and is younger than the session
-- lifetime. The hash lets a password change end old sessions.
SELECT u.id, u.username, u.password_hash, u.role, u.disabled
  FROM panel_sessions s
  JOIN panel_users u ON u.id = s.user_id
 WHERE s.id = %(session_id)s
   AND s.created_at > now() - make_interval(secs => %(lifetime)s)

-- name: open_session
-- Record a new session, removing the account's expired ones in the same statement.
WITH expired AS (
    DELETE FROM panel_sessions
     WHERE user_id = %(user_id)s
       AND created_at <= now() - make_interval(secs => %(lifetime)s)
)
INSERT INTO panel_sessions (id, user_id) VALUES (%(session_id)s, %(user_id)s)

-- name: close_session
-- End one session at logout.
DELETE FROM panel_sessions WHERE id = %(session_id)s
