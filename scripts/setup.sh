#!/usr/bin/env bash
# supervisord's setup program: applies the database schema (waiting for the
# database), then creates or updates the ADMIN_USERNAME account. Exits 0 when
# both are done. Any other exit leaves the program EXITED in supervisorctl
# status, with the reason in this log; supervisord does not restart it.
set -euo pipefail

PROJECT_DIR=${PROJECT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
cd "$PROJECT_DIR"

echo "setup: applying the database schema"
"$PROJECT_DIR/.venv/bin/python" -m workers.schema apply

if [[ -z ${ADMIN_PASSWORD:-} ]]; then
    echo "setup: ADMIN_PASSWORD is not set, so the admin account was left as it is"
else
    echo "setup: creating or updating the admin account"
    "$PROJECT_DIR/.venv/bin/flask" --app wsgi users sync-admin
fi
echo "setup: done"
