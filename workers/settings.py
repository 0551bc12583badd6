"""One settings object for every process, read from the environment and validated once.

Each setting is declared once in ``SETTINGS`` with its environment variable, its
default, its unit and a parser. ``.env.example`` documents the same list, and a test
keeps the two in step.
"""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from croniter import croniter

from workers.errors import ConfigurationError

PROJECT_DIR = Path(__file__).resolve().parent.parent

# Passwords that the panel refuses for the admin account outside the local setup.
WEAK_PASSWORDS = frozenset(
    {"admin", "password", "changeme", "secret", "123456", "12345678", "procrastinate"}
)
MIN_SECRET_KEY_LENGTH = 32  # characters
MIN_ADMIN_PASSWORD_LENGTH = 12  # characters
# Seconds during which a worker keeps trying to write the end state of its jobs
# after the first failed write of a database outage (workers/end_state.py).
# supervisord's stopwaitsecs for workers and the scheduler includes it.
END_STATE_WINDOW = 30.0


def _parse_int(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"expected a whole number from {low} to {high}") from None
        if not low <= value <= high:
            raise ValueError(f"expected a whole number from {low} to {high}")
        return value

    return parse


def _parse_float(low: float, high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"expected a number from {low:g} to {high:g}") from None
        if not low <= value <= high:
            raise ValueError(f"expected a number from {low:g} to {high:g}")
        return value

    return parse


def _parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return parse


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("expected true or false")


def _parse_text(raw: str) -> str:
    return raw.strip()


def _parse_optional_text(raw: str) -> str | None:
    return raw.strip() or None


def _parse_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _parse_database_url(raw: str) -> str | None:
    value = raw.strip()
    if not value:
        return None
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in {"postgresql", "postgres"}:
        raise ValueError(
            "expected a URL such as postgresql://USER:PASSWORD@HOST:5432/DBNAME"
        )
    return value


def _parse_http_url(raw: str) -> str:
    value = raw.strip().rstrip("/")
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in {"http", "https"} or not parsed.hostname:
        raise ValueError("expected an http:// or https:// URL with a host")
    if parsed.query or parsed.fragment or parsed.username or parsed.password:
        raise ValueError("expected a URL without query, fragment or credentials")
    return value


def _parse_cron(raw: str) -> str:
    value = raw.strip()
    if not croniter.is_valid(value):
        raise ValueError("expected a cron expression such as '*/5 * * * *'")
    return value


def _parse_bind(raw: str) -> str:
    value = raw.strip()
    if value.startswith("unix:"):
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected HOST:PORT such as 127.0.0.1:8000, or unix:PATH")
    return value


@dataclasses.dataclass(frozen=True)
class Setting:
    """The declaration of one environment variable."""

    name: str
    default: str | None
    parse: Callable[[str], Any]
    help: str
    secret: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting("DATABASE_URL", "", _parse_database_url,
            "PostgreSQL URL; empty means the project-local database in var/postgres",
            secret=True),
    Setting("SECRET_KEY", "", _parse_optional_text,
            f"key that signs sessions and forms, at least {MIN_SECRET_KEY_LENGTH} "
            "characters; the local setup keeps one in var/secret_key",
            secret=True),
    Setting("SECRET_KEY_FALLBACKS", "", _parse_list,
            "comma-separated earlier keys still accepted while a key rotates",
            secret=True),
    Setting("ADMIN_USERNAME", "admin", _parse_text,
            "account created or updated with ADMIN_PASSWORD at setup"),
    Setting("ADMIN_PASSWORD", "", _parse_optional_text,
            "password of ADMIN_USERNAME; the local setup generates one into "
            "var/admin_password", secret=True),
    Setting("WEB_BIND", "127.0.0.1:8000", _parse_bind,
            "address gunicorn listens on, HOST:PORT or unix:PATH"),
    Setting("WEB_WORKERS", "2", _parse_int(1, 64), "gunicorn worker processes"),
    Setting("WEB_TIMEOUT", "30", _parse_int(5, 600),
            "seconds gunicorn lets one request run before it kills the worker"),
    Setting("WEB_GRACEFUL_TIMEOUT", "20", _parse_int(1, 600),
            "seconds a stopping gunicorn waits for requests in progress"),
    Setting("WEB_REQUEST_BUDGET", "10", _parse_float(0.5, 120),
            "seconds a panel request may wait on the database before it answers 503"),
    Setting("TRUSTED_PROXIES", "0", _parse_int(0, 10),
            "reverse proxies in front of the panel whose X-Forwarded-* headers "
            "are trusted"),
    Setting("WORKER_PROCESSES", "2", _parse_int(1, 64),
            "worker processes supervisord runs (worker:worker_00, ...)"),
    Setting("WORKER_CONCURRENCY", "10", _parse_int(1, 1000),
            "jobs one worker process runs at the same time"),
    Setting("WORKER_QUEUES", "default,api_calls", _parse_list,
            "comma-separated queues the worker processes serve"),
    Setting("WORKER_SHUTDOWN_TIMEOUT", "30", _parse_float(0, 3600),
            "seconds a stopping worker waits for running jobs before it aborts them"),
    Setting("SCHEDULER_SHUTDOWN_TIMEOUT", "20", _parse_float(0, 3600),
            "seconds a stopping scheduler waits for its maintenance jobs"),
    Setting("JOB_TIMEOUT", "300", _parse_float(0.1, 86400),
            "seconds one attempt of a job may run; tasks may set their own"),
    Setting("WORKER_POLL_INTERVAL", "1", _parse_float(0.1, 600),
            "seconds an idle worker waits between two fetches when no NOTIFY "
            "arrives; bounds how late a retry scheduled for later starts"),
    Setting("HEARTBEAT_INTERVAL", "10", _parse_float(0.5, 600),
            "seconds between worker heartbeats"),
    Setting("STALLED_JOB_THRESHOLD", "60", _parse_float(1, 86400),
            "seconds without a worker heartbeat before its jobs count as stalled; "
            "at least 3 heartbeat intervals"),
    Setting("STALLED_JOB_CHECK_INTERVAL", "60", _parse_int(1, 86400),
            "seconds between recovery sweeps; divides 60 when under a minute, "
            "else a whole number of minutes dividing 60, or hours dividing 24"),
    Setting("HEALTH_CHECK_CRON", "* * * * *", _parse_cron,
            "cron schedule of the health check"),
    Setting("JOB_RETENTION_DAYS", "30", _parse_int(1, 3650),
            "days finished jobs and their attempt records are kept"),
    Setting("DB_POOL_MAX_SIZE", "10", _parse_int(2, 200),
            "maximum connections in each worker or scheduler process's pool"),
    Setting("WEB_DB_POOL_MAX_SIZE", "4", _parse_int(1, 100),
            "maximum connections in each gunicorn worker's pool"),
    Setting("DB_CONNECT_TIMEOUT", "5", _parse_int(1, 120),
            "seconds to wait for a new database connection"),
    Setting("API_BASE_URL", "http://127.0.0.1:8001", _parse_http_url,
            "base URL of the upstream API; call_api reaches only paths under it"),
    Setting("HTTP_TIMEOUT", "10", _parse_float(0.1, 3600),
            "seconds for each connect, read, write and pool wait of an upstream call"),
    Setting("HTTP_MAX_REDIRECTS", "5", _parse_int(0, 20),
            "same-host 307/308 redirects an upstream call follows"),
    Setting("RETRY_BASE_DELAY", "2", _parse_float(0, 3600),
            "seconds before the first retry; doubles with each attempt"),
    Setting("RETRY_MAX_DELAY", "300", _parse_float(0, 86400),
            "seconds, the cap on the delay between two attempts"),
    Setting("RETRY_MAX_ATTEMPTS", "5", _parse_int(1, 1000),
            "attempts of a job, the first run included, before it fails"),
    Setting("RETRY_JITTER", "full", _parse_choice("full", "none"),
            "'full' draws each delay at random between 0 and the computed delay"),
    Setting("RETRY_AFTER_MAX", "3600", _parse_float(0, 86400),
            "seconds, the cap on a Retry-After header honoured by the retry policy"),
    Setting("OLDEST_TODO_AGE_LIMIT", "600", _parse_float(1, 86400 * 30),
            "seconds a waiting job may wait before /healthz reports it"),
    Setting("SCHEDULER_SILENCE_LIMIT", "900", _parse_float(10, 86400 * 30),
            "seconds without a health check row before /healthz reports the scheduler"),
    Setting("REDACTED_ARGUMENT_KEYS", "password,token,secret,api_key,authorization",
            _parse_list, "argument keys whose values the panel and logs hide"),
    Setting("MAX_ARGUMENTS_BYTES", "16384", _parse_int(256, 1048576),
            "bytes, the largest JSON arguments a deferred job may carry"),
    Setting("METRICS_TOKEN", "", _parse_optional_text,
            "bearer token that opens /metrics without a login; empty means login",
            secret=True),
    Setting("LOG_LEVEL", "INFO", _parse_choice("debug", "info", "warning", "error"),
            "lowest level logged"),
    Setting("LOG_FORMAT", "text", _parse_choice("text", "json"),
            "'json' writes one JSON object per line"),
    Setting("VAR_DIR", "var", _parse_text,
            "folder for the socket, logs, keys and the local database, "
            "relative to the project"),
    Setting("SUPERVISOR_SOCKET", "", _parse_optional_text,
            "supervisord's unix socket; empty means VAR_DIR/supervisor.sock"),
    Setting("LOCAL_DATABASE", "false", _parse_bool,
            "set by make run when it runs the project-local PostgreSQL"),
    Setting("DEMO_API", "false", _parse_bool,
            "serve the demo upstream on API_BASE_URL; make run sets it when "
            "API_BASE_URL is unset"),
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated settings; attribute names are the variables in lower case."""

    values: Mapping[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name.upper()]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def var_dir(self) -> Path:
        """Return the absolute path of VAR_DIR."""
        path = Path(self.values["VAR_DIR"])
        return path if path.is_absolute() else PROJECT_DIR / path

    @property
    def supervisor_socket(self) -> Path:
        """Return the path of supervisord's unix socket."""
        configured = self.values["SUPERVISOR_SOCKET"]
        if configured:
            path = Path(configured)
            return path if path.is_absolute() else PROJECT_DIR / path
        return self.var_dir / "supervisor.sock"

    @property
    def stalled_check_cron(self) -> str:
        """Return the cron expression for STALLED_JOB_CHECK_INTERVAL."""
        return interval_to_cron(self.values["STALLED_JOB_CHECK_INTERVAL"])

    def public_items(self) -> dict[str, Any]:
        """Return every setting with secret values replaced by a mask."""
        masked = {}
        for setting in SETTINGS:
            value = self.values[setting.name]
            masked[setting.name] = "****" if setting.secret and value else value
        return masked


def interval_to_cron(seconds: int) -> str:
    """Express an interval in seconds as a cron expression, seconds field included."""
    if seconds < 60 and 60 % seconds == 0:
        return f"* * * * * */{seconds}"
    if seconds % 60 == 0 and seconds < 3600 and 60 % (seconds // 60) == 0:
        return f"*/{seconds // 60} * * * *"
    if seconds % 3600 == 0 and 24 % (seconds // 3600) == 0:
        return f"0 */{seconds // 3600} * * *"
    raise ValueError(
        "expected seconds dividing 60 (1-30), minutes dividing 60 (60-1800), "
        "or hours dividing 24 (3600-86400)"
    )


def _check_consistency(values: dict[str, Any]) -> list[str]:
    problems = []
    threshold = values["STALLED_JOB_THRESHOLD"]
    heartbeat = values["HEARTBEAT_INTERVAL"]
    for name in ("WORKER_SHUTDOWN_TIMEOUT", "SCHEDULER_SHUTDOWN_TIMEOUT"):
        # A stopping worker stops heartbeating before it waits for its jobs, so a
        # wait longer than this makes the sweep take its running jobs for stalled
        # and run them a second time while the first run goes on.
        limit = threshold - heartbeat
        if values[name] >= limit:
            problems.append(
                f"{name}={values[name]:g} is not less than STALLED_JOB_THRESHOLD "
                f"minus HEARTBEAT_INTERVAL ({limit:g} s), so jobs of a stopping "
                f"process would be recovered while they still run; lower {name} or "
                "raise STALLED_JOB_THRESHOLD"
            )
    if threshold < 3 * heartbeat:
        problems.append(
            f"STALLED_JOB_THRESHOLD={threshold:g} is less than 3 heartbeat intervals "
            f"(HEARTBEAT_INTERVAL={heartbeat:g}); set it to at least {3 * heartbeat:g}"
        )
    try:
        interval_to_cron(values["STALLED_JOB_CHECK_INTERVAL"])
    except ValueError as exc:
        problems.append(
            f"STALLED_JOB_CHECK_INTERVAL={values['STALLED_JOB_CHECK_INTERVAL']} "
            f"is invalid: {exc}"
        )
    if values["RETRY_MAX_DELAY"] < values["RETRY_BASE_DELAY"]:
        problems.append(
            f"RETRY_MAX_DELAY={values['RETRY_MAX_DELAY']:g} is less than "
            f"RETRY_BASE_DELAY={values['RETRY_BASE_DELAY']:g}; raise RETRY_MAX_DELAY"
        )
    if not values["WORKER_QUEUES"]:
        problems.append("WORKER_QUEUES is empty; name at least one queue")
    elif "maintenance" in values["WORKER_QUEUES"]:
        problems.append(
            "WORKER_QUEUES contains 'maintenance', which only the scheduler serves; "
            "remove it"
        )
    return problems


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate every setting, raising ConfigurationError listing all problems."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    problems: list[str] = []

    for setting in SETTINGS:
        raw = environ.get(setting.name)
        if raw is None or raw == "":
            raw = setting.default or ""
        try:
            values[setting.name] = setting.parse(raw)
        except ValueError as exc:
            shown = "****" if setting.secret else repr(raw)
            problems.append(f"{setting.name}={shown} is invalid: {exc}")

    if not problems:
        problems.extend(_check_consistency(values))
    if problems:
        raise ConfigurationError("invalid settings:\n  " + "\n  ".join(problems))
    return Settings(values=values)


def check_web_secrets(settings: Settings) -> None:
    """Reject a missing or short SECRET_KEY and a weak admin password."""
    problems = []
    key = settings.secret_key
    if not key:
        problems.append(
            "SECRET_KEY is not set; set it to a random string of at least "
            f"{MIN_SECRET_KEY_LENGTH} characters, for example the output of "
            "`python -c 'import secrets; print(secrets.token_urlsafe(48))'`"
        )
    elif len(key) < MIN_SECRET_KEY_LENGTH:
        problems.append(
            f"SECRET_KEY is {len(key)} characters long; use at least "
            f"{MIN_SECRET_KEY_LENGTH}"
        )
    for index, fallback in enumerate(settings.secret_key_fallbacks, start=1):
        if len(fallback) < MIN_SECRET_KEY_LENGTH or fallback == key:
            problems.append(
                f"SECRET_KEY_FALLBACKS entry {index} is shorter than "
                f"{MIN_SECRET_KEY_LENGTH} characters or equal to SECRET_KEY; list "
                "only earlier keys"
            )
    password = settings.admin_password
    if password and not settings.local_database:
        if password.lower() in WEAK_PASSWORDS:
            problems.append(
                "ADMIN_PASSWORD is a well-known default; choose another password"
            )
        elif len(password) < MIN_ADMIN_PASSWORD_LENGTH:
            problems.append(
                f"ADMIN_PASSWORD is shorter than {MIN_ADMIN_PASSWORD_LENGTH} "
                "characters; choose a longer password"
            )
    if problems:
        raise ConfigurationError("invalid settings:\n  " + "\n  ".join(problems))


def database_host(url: str) -> str:
    """Return HOST:PORT of a database URL, without user or password, for logs."""
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname or "localhost"
    query = urllib.parse.parse_qs(parsed.query)
    if "host" in query:
        host = query["host"][0]
    return f"{host}:{parsed.port or 5432}"


_CREDENTIALS = re.compile(r"(://[^:/@\s]+:)[^@\s]+@")


def redact_url(text: str) -> str:
    """Replace passwords in any URL inside ``text`` with a mask."""
    return _CREDENTIALS.sub(r"\1****@", text)
