"""The database objects this release calls, and which of them a database lacks.

The version rows in ``fleet_schema_state`` say which migrations ran, but an object
can still be missing: a Procrastinate release whose migrations were skipped, or a
table dropped by hand. Processes therefore look for every versioned Procrastinate
function that the installed release's queries call, and for every table, column and
trigger that the project's migration files create, before they fetch a job.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import psycopg

MIGRATIONS_DIR = Path(__file__).parent


def _procrastinate_queries() -> Path:
    # Found without importing Procrastinate, which a starting process loads only
    # after this check.
    spec = importlib.util.find_spec("procrastinate")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent / "sql" / "queries.sql"


PROCRASTINATE_QUERIES = _procrastinate_queries()
PROCRASTINATE_TABLES = (
    "procrastinate_jobs",
    "procrastinate_workers",
    "procrastinate_events",
    "procrastinate_periodic_defers",
)

_FUNCTION = re.compile(r"\b(procrastinate_[a-z0-9_]+_v[0-9]+)\s*\(")
_CREATE_TABLE = re.compile(
    r"CREATE TABLE (?:IF NOT EXISTS )?(\w+) \((.*?)\n\);", re.IGNORECASE | re.DOTALL
)
_ADD_COLUMN = re.compile(
    r"ALTER TABLE (?:IF EXISTS )?(?:ONLY )?(\w+)\s+"
    r"ADD COLUMN (?:IF NOT EXISTS )?(\w+)",
    re.IGNORECASE,
)
_CREATE_TRIGGER = re.compile(r"CREATE TRIGGER (\w+)", re.IGNORECASE)
_NOT_COLUMNS = frozenset(
    {"PRIMARY", "UNIQUE", "CONSTRAINT", "CHECK", "FOREIGN", "EXCLUDE", "LIKE"}
)


def required_functions() -> list[str]:
    """Return the versioned SQL functions the installed Procrastinate calls."""
    text = PROCRASTINATE_QUERIES.read_text(encoding="utf-8")
    return sorted(set(_FUNCTION.findall(text)))


def required_columns() -> dict[str, set[str]]:
    """Return each project table with the columns its migration files create."""
    tables: dict[str, set[str]] = {}
    for path in sorted(MIGRATIONS_DIR.glob("[0-9][0-9][0-9]_*.sql")):
        text = re.sub(r"--[^\n]*", "", path.read_text(encoding="utf-8"))
        for name, body in _CREATE_TABLE.findall(text):
            columns = tables.setdefault(name.lower(), set())
            for line in body.splitlines():
                words = line.strip().split()
                if words and words[0].upper() not in _NOT_COLUMNS:
                    columns.add(words[0].strip('"').lower())
        for table, column in _ADD_COLUMN.findall(text):
            tables.setdefault(table.lower(), set()).add(column.lower())
    return tables


def required_triggers() -> list[str]:
    """Return the triggers the project's migration files create."""
    names: set[str] = set()
    for path in sorted(MIGRATIONS_DIR.glob("[0-9][0-9][0-9]_*.sql")):
        text = re.sub(r"--[^\n]*", "", path.read_text(encoding="utf-8"))
        names.update(name.lower() for name in _CREATE_TRIGGER.findall(text))
    return sorted(names)


def missing_objects(conn: psycopg.Connection) -> list[str]:
    """Return a description of each required object the database lacks."""
    missing = []
    functions = required_functions()
    found = {
        row[0]
        for row in conn.execute(
            "SELECT proname FROM pg_proc WHERE proname = ANY(%s) "
            "AND pg_function_is_visible(oid)",
            (functions,),
        )
    }
    missing += [f"function {name}" for name in functions if name not in found]

    columns = required_columns()
    tables = sorted(set(PROCRASTINATE_TABLES) | set(columns))
    present: dict[str, set[str]] = {}
    rows = conn.execute(
        "SELECT c.relname, a.attname FROM pg_class c "
        "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 "
        "AND NOT a.attisdropped "
        "WHERE c.relname = ANY(%s) AND pg_table_is_visible(c.oid)",
        (tables,),
    )
    for table, column in rows:
        present.setdefault(table, set()).add(column)
    for table in tables:
        if table not in present:
            missing.append(f"table {table}")
            continue
        for column in sorted(columns.get(table, set()) - present[table]):
            missing.append(f"column {table}.{column}")

    triggers = required_triggers()
    found = {
        row[0]
        for row in conn.execute(
            "SELECT tgname FROM pg_trigger WHERE tgname = ANY(%s)", (triggers,)
        )
    }
    missing += [f"trigger {name}" for name in triggers if name not in found]
    return missing
