"""The database schema: Procrastinate's tables and the project's own, applied once.

``apply_schema`` takes a transaction-level advisory lock, so two processes that apply
at the same time run one after the other, and the second finds nothing to do.
Procrastinate's schema is applied only when its tables are missing, because its SQL
fails on a database that already has them.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

import psycopg

from workers.errors import SchemaMismatchError
from workers.schema.objects import missing_objects

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent
# Arbitrary constant shared by every process that applies the schema.
SCHEMA_LOCK_ID = 7_316_402_118



def _migrations() -> list[tuple[int, Path]]:
    """Return the project's migration files with their numbers, in order."""
    found = [
        (int(path.name[:3]), path)
        for path in MIGRATIONS_DIR.glob("[0-9][0-9][0-9]_*.sql")
    ]
    return sorted(found)


# The highest migration number: the project schema version this release expects.
PROJECT_SCHEMA_VERSION = max((number for number, _ in _migrations()), default=0)


def installed_procrastinate_version() -> str:
    """Return the installed Procrastinate version, such as '3.10.0'."""
    return importlib.metadata.version("procrastinate")


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def apply_schema(conninfo: str) -> bool:
    """Apply missing parts of the schema; return True when anything was applied."""
    # Imported here: processes check the schema at start before they import
    # Procrastinate, so that a mismatch exits well within supervisord's startsecs.
    from procrastinate.schema import SchemaManager

    applied = False
    with psycopg.connect(conninfo, autocommit=False) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_ID,))
        exists = conn.execute(
            "SELECT to_regclass('procrastinate_jobs') IS NOT NULL"
        ).fetchone()
        if not exists or not exists[0]:
            logger.info(
                "Applying Procrastinate's schema",
                extra={"action": "schema_apply_procrastinate"},
            )
            conn.execute(SchemaManager.get_schema().encode())
            applied = True

        current = _project_version(conn)
        for number, path in _migrations():
            if number <= current:
                continue
            logger.info(
                "Applying migration %s",
                path.name,
                extra={"action": "schema_apply_migration", "migration": path.name},
            )
            conn.execute(path.read_text(encoding="utf-8").encode())
            applied = True

        _record(conn, "project_schema_version", str(PROJECT_SCHEMA_VERSION))
        if applied or _read(conn, "procrastinate_version") is None:
            _record(conn, "procrastinate_version", installed_procrastinate_version())
        conn.commit()
    return applied


def _project_version(conn: psycopg.Connection) -> int:
    table = conn.execute("SELECT to_regclass('fleet_schema_state')").fetchone()
    if not table or table[0] is None:
        return 0
    value = _read(conn, "project_schema_version")
    return int(value) if value else 0


def _read(conn: psycopg.Connection, key: str) -> str | None:
    table = conn.execute("SELECT to_regclass('fleet_schema_state')").fetchone()
    if not table or table[0] is None:
        return None
    row = conn.execute(
        "SELECT value FROM fleet_schema_state WHERE key = %s", (key,)
    ).fetchone()
    return row[0] if row else None


def _record(conn: psycopg.Connection, key: str, value: str) -> None:
    conn.execute(
        """
        INSERT INTO fleet_schema_state (key, value) VALUES (%s, %s)
        ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = now()
        """,
        (key, value),
    )


class SchemaNotApplied(SchemaMismatchError):
    """The schema has not been applied yet; `python -m workers.schema apply` does it."""


def check_schema_rows(
    procrastinate_version: str | None, project_version: str | None
) -> None:
    """Raise when the recorded schema versions do not match this release."""
    if procrastinate_version is None or project_version is None:
        raise SchemaNotApplied(
            "the database schema has not been applied; run "
            "`python -m workers.schema apply` (make run does it at start)"
        )
    installed = installed_procrastinate_version()
    if _minor(procrastinate_version) != _minor(installed):
        raise SchemaMismatchError(
            f"the database holds Procrastinate's schema {procrastinate_version} but "
            f"Procrastinate {installed} is installed; apply Procrastinate's "
            "migrations for that upgrade, then run `python -m workers.schema apply`"
        )
    if int(project_version) < PROJECT_SCHEMA_VERSION:
        # The setup program applies the project's migrations at start, so an
        # older project schema is waited for rather than rejected.
        raise SchemaNotApplied(
            f"the database holds project schema version {project_version} but this "
            f"release expects {PROJECT_SCHEMA_VERSION}; run "
            "`python -m workers.schema apply` (the setup program does it at start)"
        )
    if int(project_version) > PROJECT_SCHEMA_VERSION:
        raise SchemaMismatchError(
            f"the database holds project schema version {project_version} but this "
            f"release expects {PROJECT_SCHEMA_VERSION}; deploy the newer release of "
            "this project"
        )


CHECK_QUERY = """
SELECT
    (SELECT value FROM fleet_schema_state WHERE key = 'procrastinate_version'),
    (SELECT value FROM fleet_schema_state WHERE key = 'project_schema_version')
"""


def check_schema(conninfo: str) -> None:
    """Raise SchemaMismatchError unless the database matches this release."""
    with psycopg.connect(conninfo) as conn:
        table = conn.execute("SELECT to_regclass('fleet_schema_state')").fetchone()
        if not table or table[0] is None:
            check_schema_rows(None, None)
        row = conn.execute(CHECK_QUERY).fetchone()
        assert row is not None
        check_schema_rows(row[0], row[1])
        missing = missing_objects(conn)
    if missing:
        raise SchemaMismatchError(
            "the database schema is behind the code: missing "
            + ", ".join(missing)
            + f". Apply Procrastinate's migrations up to "
            f"{installed_procrastinate_version()} (pre-migrations before deploying "
            "new code, post-migrations after), then run "
            "`python -m workers.schema apply`"
        )
