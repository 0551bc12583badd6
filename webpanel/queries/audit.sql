-- name: insert_entry
-- Store one operator action.
INSERT INTO audit_log (username, action, job_ids, details, result)
VALUES (%(username)s, %(action)s, %(job_ids)s, %(details)s, %(result)s)
