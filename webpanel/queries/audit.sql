-- name: insert_entry
-- Store one operator action.
INSERT INTO audit_log (username, action, job_ids, details, result)
VALUES (%(username)s, %(action)s, %(job_ids)s, %(details)s, %(result)s)

-- name: defer_with_entry
-- Defer one job and store its job_deferred entry in one statement, so both are
-- written or neither, with no BEGIN and COMMIT around them. The job goes in
-- through Procrastinate's own function, as App.defer would insert it.
WITH job AS (
    SELECT unnest(procrastinate_defer_jobs_v1(ARRAY[ROW(
        %(queue)s, %(task_name)s, %(priority)s, %(lock)s, NULL, %(args)s,
        %(scheduled_at)s)::procrastinate_job_to_defer_v1])) AS id
), entry AS (
    INSERT INTO audit_log (username, action, job_ids, details, result)
    SELECT %(username)s, %(action)s, ARRAY[job.id], %(details)s, %(result)s
      FROM job
)
SELECT id FROM job

-- name: page_older
-- Up to %(limit)s entries matching the filters with ids below %(before)s (all
-- when NULL), newest first. Each NULL filter is folded away when the statement
-- is planned with its values, so the filtered ones use audit_log's indexes.
SELECT id, at, username, action, job_ids, details, result
  FROM audit_log
 WHERE (%(username)s::text IS NULL OR username = %(username)s::text)
   AND (%(action)s::text IS NULL OR action = %(action)s::text)
   AND (%(since)s::timestamptz IS NULL OR at >= %(since)s::timestamptz)
   AND (%(until)s::timestamptz IS NULL OR at < %(until)s::timestamptz)
   AND (%(job_id)s::bigint IS NULL OR job_ids @> ARRAY[%(job_id)s::bigint])
   AND (%(before)s::bigint IS NULL OR id < %(before)s::bigint)
 ORDER BY id DESC
 LIMIT %(limit)s

-- name: page_newer
-- Up to %(limit)s entries matching the filters with ids above %(after)s, oldest
-- first: the page before the current one, reversed by the caller.
SELECT id, at, username, action, job_ids, details, result
  FROM audit_log
 WHERE (%(username)s::text IS NULL OR username = %(username)s::text)
   AND (%(action)s::text IS NULL OR action = %(action)s::text)
   AND (%(since)s::timestamptz IS NULL OR at >= %(since)s::timestamptz)
   AND (%(until)s::timestamptz IS NULL OR at < %(until)s::timestamptz)
   AND (%(job_id)s::bigint IS NULL OR job_ids @> ARRAY[%(job_id)s::bigint])
   AND id > %(after)s::bigint
 ORDER BY id ASC
 LIMIT %(limit)s

-- name: actions
-- Every distinct action in the log, with a loose index scan on
-- audit_log_action_id_idx.
WITH RECURSIVE actions AS (
    (SELECT action FROM audit_log ORDER BY action LIMIT 1)
    UNION ALL
    SELECT (SELECT a.action FROM audit_log a WHERE a.action > actions.action
             ORDER BY a.action LIMIT 1)
      FROM actions
     WHERE actions.action IS NOT NULL
)
SELECT action FROM actions WHERE action IS NOT NULL

-- name: usernames
-- The panel's accounts, offered in the user filter.
SELECT username FROM panel_users ORDER BY username
