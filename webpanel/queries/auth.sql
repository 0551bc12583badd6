-- name: user_by_name
-- The account with this user name, for login.
SELECT id, username, password_hash, role, disabled
  FROM panel_users WHERE username = %(username)s

-- name: user_by_id
-- The account of a session.
SELECT id, username, role, disabled FROM panel_users WHERE id = %(id)s

-- name: upsert_user
-- Create an account, or update the password and role of an existing one.
INSERT INTO panel_users (username, password_hash, role)
VALUES (%(username)s, %(password_hash)s, %(role)s)
ON CONFLICT (username) DO UPDATE
   SET password_hash = excluded.password_hash, role = excluded.role,
       disabled = false
RETURNING id

-- name: list_users
-- Every account, for the users command.
SELECT id, username, role, disabled, created_at FROM panel_users ORDER BY username

-- name: login_lock
-- The lock state of the login throttle keys of one attempt.
SELECT key, failures, locked_until, locked_until > now() AS locked
  FROM login_failures WHERE key = ANY(%(keys)s)

-- name: record_login_failure
-- Count a failed login for one key; lock the key when it reached the limit.
INSERT INTO login_failures AS f (key, failures, first_failure_at)
VALUES (%(key)s, 1, now())
ON CONFLICT (key) DO UPDATE SET
    failures = CASE WHEN f.first_failure_at < now() - make_interval(secs => %(window)s)
                    THEN 1 ELSE f.failures + 1 END,
    first_failure_at = CASE
        WHEN f.first_failure_at < now() - make_interval(secs => %(window)s)
        THEN now() ELSE f.first_failure_at END
RETURNING failures

-- name: lock_login_key
-- Lock a throttle key until the given number of seconds from now.
UPDATE login_failures SET locked_until = now() + make_interval(secs => %(seconds)s)
 WHERE key = %(key)s

-- name: clear_login_failures
-- Forget the failures of an account after a successful login.
DELETE FROM login_failures WHERE key = ANY(%(keys)s)
