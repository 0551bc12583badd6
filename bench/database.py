"""The benchmark's PostgreSQL server, its databases and the statement counters.

Without BENCH_DATABASE_URL the run starts a throw-away server with
``tests.support.postgres.PostgresServer`` (durability off, as in the tests) and
adds pg_stat_statements and auto_explain to it, so that statements can be counted
and the panel's plans captured. With BENCH_DATABASE_URL it creates its databases on
that server, whose role needs CREATEDB; statement counts and plans then need
pg_stat_statements and auto_explain to be loaded there already.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
from pathlib import Path
from types import TracebackType

import psycopg

from tests.support.postgres import (
    PostgresServer,
    create_database,
    database_name,
    drop_database,
    unique_name,
)
from workers.schema import apply_schema

logger = logging.getLogger(__name__)

# Appended to the throw-away server's postgresql.conf. max_wal_size keeps the bulk
# seeding from forcing a checkpoint every few seconds.
EXTRA_SERVER_CONF = """
pg_stat_statements.max = 10000
pg_stat_statements.track_utility = on
max_wal_size = '4GB'
maintenance_work_mem = '256MB'
"""
PRELOADED = ("pg_stat_statements", "auto_explain")

# Tables a drain, defer or recovery run empties before it starts.
RESET_TABLES = (
    "procrastinate_jobs", "procrastinate_events", "procrastinate_periodic_defers",
    "procrastinate_workers", "job_attempts", "job_results", "worker_processes",
    "audit_log", "health_checks",
)


class BenchPostgresServer(PostgresServer):
    """The test suite's throw-away server with the statement and plan extensions."""

    def _initdb(self) -> None:
        super()._initdb()
        assert self.directory is not None
        libraries = available_libraries(self.bindir)
        missing = sorted(set(PRELOADED) - set(libraries))
        if missing:
            logger.warning("PostgreSQL's %s is not installed, so statement counts or "
                           "plans are skipped", ", ".join(missing))
        with open(self.directory / "data" / "postgresql.conf", "a") as conf:
            conf.write(EXTRA_SERVER_CONF)
            conf.write(f"shared_preload_libraries = '{','.join(libraries)}'\n")

    @property
    def log_path(self) -> Path | None:
        """Return the server's log file, where auto_explain writes plans."""
        return self._log_file


def available_libraries(bindir: Path) -> list[str]:
    """Return the PRELOADED libraries whose shared objects the server can load."""
    folders = [bindir.parent / "lib"]
    pg_config = bindir / "pg_config"
    if pg_config.is_file():
        result = subprocess.run([str(pg_config), "--pkglibdir"], capture_output=True,
                                text=True, check=False)
        if result.returncode == 0:
            folders.insert(0, Path(result.stdout.strip()))
    return [name for name in PRELOADED
            if any((folder / f"{name}.so").is_file() for folder in folders)]


@dataclasses.dataclass
class StatementCount:
    """Statements one database ran between a reset and a read, by query text."""

    calls: dict[str, int]

    @property
    def total(self) -> int:
        """Return every statement, transaction control included."""
        return sum(self.calls.values())

    @property
    def work(self) -> int:
        """Return the statements other than BEGIN, COMMIT and ROLLBACK."""
        return sum(calls for text, calls in self.calls.items()
                   if not _is_transaction_control(text))


def _is_transaction_control(text: str) -> bool:
    return text.strip().upper().rstrip(";") in {"BEGIN", "COMMIT", "ROLLBACK"}


class BenchServer:
    """The server the run uses, started here or given by BENCH_DATABASE_URL."""

    def __init__(self, server_url: str | None) -> None:
        self._given_url = server_url
        self._server: BenchPostgresServer | None = None
        self._databases: list[str] = []
        self.url = ""

    def __enter__(self) -> BenchServer:
        if self._given_url:
            self.url = self._given_url
        else:
            self._server = BenchPostgresServer()
            self.url = self._server.start()
        self.has_statements = self._enable_statements()
        self.has_plans = "auto_explain" in self._setting("shared_preload_libraries")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for name in self._databases:
            try:
                drop_database(self.url, name)
            except psycopg.Error as error:
                logger.warning("could not drop database %s: %s", name, error)
        if self._server is not None:
            self._server.stop()

    @property
    def server_pid(self) -> int | None:
        """Return the postmaster's pid for a server started here, else None."""
        if self._server is None or self._server._process is None:
            return None
        return self._server._process.pid

    @property
    def log_path(self) -> Path | None:
        """Return the log file of a server started here, else None."""
        return self._server.log_path if self._server is not None else None

    def server_version(self) -> str:
        """Return the server's version string, such as '15.8'."""
        return self._setting("server_version")

    def _setting(self, name: str) -> str:
        with psycopg.connect(self.url) as conn:
            row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
        assert row is not None
        return str(row[0])

    def new_database(self, prefix: str) -> str:
        """Create a database with the project's schema and return its URL."""
        name = unique_name(prefix)
        url = create_database(self.url, name)
        self._databases.append(name)
        apply_schema(url)
        return url

    def _enable_statements(self) -> bool:
        try:
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                conn.execute("SELECT count(*) FROM pg_stat_statements")
        except psycopg.Error as error:
            logger.warning("pg_stat_statements is unavailable (%s); statement "
                           "counts are skipped", str(error).strip())
            return False
        return True

    def reset_statements(self, database: str) -> None:
        """Forget the statements counted so far for the database at ``database``."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_stat_statements_reset(0, d.oid, 0) FROM pg_database d "
                "WHERE d.datname = %s", (database_name(database),)
            )

    def count_statements(self, database: str) -> StatementCount:
        """Return the statements the database at ``database`` ran since the reset."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT s.query, sum(s.calls)::bigint FROM pg_stat_statements s "
                "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s "
                "GROUP BY s.query", (database_name(database),)
            ).fetchall()
        return StatementCount({str(text): int(calls) for text, calls in rows})


def reset_jobs(url: str) -> None:
    """Empty every job table, so that each run starts from the same state."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "TRUNCATE " + ", ".join(RESET_TABLES) + " RESTART IDENTITY CASCADE"
        )
