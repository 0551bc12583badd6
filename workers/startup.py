"""Start-up steps shared by every process: settings, database and schema checks.

A process that starts while PostgreSQL is down waits for it here, retrying with a
capped backoff and one WARNING per attempt, so that supervisord never marks it FATAL
for an outage. A schema that does not match this release stops the process instead.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from types import FrameType

import psycopg

from workers.errors import ConfigurationError, SchemaMismatchError
from workers.schema import SchemaNotApplied, check_schema
from workers.settings import Settings, database_host

logger = logging.getLogger(__name__)

RECONNECT_FIRST_DELAY = 0.25  # seconds
RECONNECT_MAX_DELAY = 1.0  # seconds; short so that work resumes soon after an outage
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h: settings or schema are wrong


def require_database_url(settings: Settings) -> str:
    """Return DATABASE_URL or raise ConfigurationError saying how to set it."""
    if not settings.database_url:
        raise ConfigurationError(
            "DATABASE_URL is not set; set it to postgresql://USER:PASSWORD@HOST:PORT/DB "
            "or start the stack with `make run`, which runs a local database"
        )
    return settings.database_url


class StopRequested(Exception):
    """A stop signal arrived while the process was still starting."""


class _StartupSignals:
    """Turn SIGTERM and SIGINT into StopRequested while the process starts."""

    def __init__(self) -> None:
        self.stop = threading.Event()

    def __enter__(self) -> _StartupSignals:
        self._previous = {
            signum: signal.signal(signum, self._handle)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.stop.set()


def wait_for_database(
    url: str, settings: Settings, role: str, *, check: bool = True
) -> None:
    """Block until the database accepts connections and, with ``check``, matches."""
    where = database_host(url)
    attempt = 0
    delay = RECONNECT_FIRST_DELAY
    in_main_thread = threading.current_thread() is threading.main_thread()
    guard = _StartupSignals() if in_main_thread else None
    if guard:
        guard.__enter__()
    try:
        while True:
            attempt += 1
            try:
                with psycopg.connect(
                    url, connect_timeout=settings.db_connect_timeout,
                    application_name=f"{role}-startup",
                ) as conn:
                    conn.execute("SELECT 1")
                if check:
                    check_schema(url)
            except SchemaNotApplied as exc:
                problem = str(exc)
            except SchemaMismatchError:
                raise
            except psycopg.Error as exc:
                problem = str(exc).strip().splitlines()[0] if str(exc) else repr(exc)
            else:
                logger.info(
                    "Connected to the database at %s", where,
                    extra={"action": "database_connected", "database": where},
                )
                return
            logger.warning(
                "Database at %s not ready (attempt %d): %s; retrying in %.2f s",
                where, attempt, problem, delay,
                extra={"action": "database_wait", "attempt": attempt,
                       "database": where},
            )
            if guard and guard.stop.wait(delay):
                raise StopRequested()
            if not guard:
                time.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_DELAY)
    finally:
        if guard:
            guard.__exit__(None, None, None)


def fail_fast(exc: Exception) -> None:
    """Print a configuration or schema error and exit so supervisord stops retrying.

    The process ends with ``os._exit`` after flushing its output, skipping the
    interpreter's teardown: exiting within supervisord's ``startsecs`` is what
    makes it count the start as failed and go FATAL instead of restarting it.
    """
    print(f"error: {exc}", file=sys.stderr, flush=True)
    logger.critical("%s", exc, extra={"action": "startup_failed"})
    logging.shutdown()
    sys.stdout.flush()
    os._exit(EXIT_CONFIG)


def prepare_process(role: str) -> Settings:
    """Load the settings, set up logging and wait for a database that matches.

    Exits with EXIT_CONFIG on invalid settings or a schema behind the code, and
    with 0 on a stop signal received meanwhile. It imports neither Procrastinate
    nor httpx, so that these checks finish soon after the process starts.
    """
    from workers.identity import process_name
    from workers.logs import configure_logging
    from workers.settings import load_settings

    try:
        settings = load_settings()
    except ConfigurationError as exc:
        fail_fast(exc)
        raise  # not reached: fail_fast exits
    configure_logging(settings, process_name=process_name(role))
    try:
        url = require_database_url(settings)
        wait_for_database(url, settings, role=role)
    except (ConfigurationError, SchemaMismatchError) as exc:
        fail_fast(exc)
    except StopRequested:
        logger.info("Stopped while waiting for the database",
                    extra={"action": "stopped_during_startup"})
        sys.exit(0)
    return settings
