"""Logging for every process: one line per event on standard output, text or JSON."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import psycopg

from workers.settings import Settings, redact_url

# Attributes every LogRecord has; anything else was passed through ``extra=``.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()
) | {"message", "asctime", "taskName"}

# Procrastinate's own per-job lines, replaced by the job middleware's lines, which
# carry the attempt, the worker process name and the retry decision.
_REPLACED_WORKER_ACTIONS = frozenset(
    {"start_job", "job_success", "job_error", "job_error_retry", "job_aborted",
     "job_aborted_retry", "loaded_job_info", "finish_task"}
)
# Procrastinate logs a periodic tick skipped by its queueing lock at DEBUG; operators
# need to see it, so it is raised to INFO.
_RAISED_TO_INFO = frozenset({"skip_periodic_task_queueing_lock"})
# Side tasks (listener, heartbeat, periodic deferrer, abort poll) fail when the
# database goes away, and Procrastinate logs each failure again as the worker
# stops. The runner logs the outage at WARNING and supervisord starts the process
# again. These lines are therefore lowered to WARNING without a traceback when
# their error is a database error. Any other failure stays ERROR.
_LOWERED_TO_WARNING = frozenset(
    {
        "side_task_failed",
        "listener_error",
        "update_heartbeats_error",
        "deferrer_error",
        "poll_jobs_to_abort_error",
    }
)


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _STANDARD_ATTRS and not key.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object with its ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": redact_url(record.getMessage()),
        }
        for key, value in _extra_fields(record).items():
            payload[key] = value
        if record.exc_info:
            payload["traceback"] = redact_url(self.formatException(record.exc_info))
        return json.dumps(payload, default=str)


class TextFormatter(logging.Formatter):
    """Format a record as one text line followed by its job ids."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = redact_url(super().format(record))
        fields = _extra_fields(record)
        keys = ("job_id", "task", "queue", "attempt", "process_name", "worker_id")
        shown = [f"{key}={fields[key]}" for key in keys if fields.get(key) is not None]
        if shown and "\n" not in line:
            line = f"{line} [{' '.join(shown)}]"
        elif shown:
            first, rest = line.split("\n", 1)
            line = f"{first} [{' '.join(shown)}]\n{rest}"
        return line


def _is_database_error(record: logging.LogRecord) -> bool:
    # Imported here so that configuring logging does not load Procrastinate.
    import psycopg_pool
    from procrastinate.exceptions import ConnectorException

    error = record.exc_info[1] if record.exc_info else None
    return isinstance(
        error, (ConnectorException, psycopg.Error, psycopg_pool.PoolTimeout)
    )


class ProcrastinateNoiseFilter(logging.Filter):
    """Drop Procrastinate's per-job lines and adjust the level of a few others."""

    def __init__(self, min_level: int) -> None:
        super().__init__()
        self.min_level = min_level

    def filter(self, record: logging.LogRecord) -> bool:
        action = getattr(record, "action", None)
        # The job middleware's own lines use some of the same action names
        # ("job_error", "job_aborted"), so only Procrastinate's lines are dropped.
        if action in _REPLACED_WORKER_ACTIONS and record.name.startswith(
            "procrastinate."
        ):
            return False
        if action in _RAISED_TO_INFO and record.levelno < logging.INFO:
            record.levelno = logging.INFO
            record.levelname = "INFO"
        if (
            action in _LOWERED_TO_WARNING
            and record.levelno > logging.WARNING
            and _is_database_error(record)
        ):
            record.levelno = logging.WARNING
            record.levelname = "WARNING"
            record.exc_info = None
            record.exc_text = None
        return record.levelno >= self.min_level


def configure_logging(settings: Settings, process_name: str) -> None:
    """Send every log record to standard output in the configured format."""
    handler = logging.StreamHandler(sys.stdout)
    formatter = JsonFormatter() if settings.log_format == "json" else TextFormatter()
    handler.setFormatter(formatter)
    level = logging.getLevelName(settings.log_level.upper())
    handler.addFilter(ProcrastinateNoiseFilter(min_level=level))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The periodic module's skipped-tick line is DEBUG at the source; let it reach
    # the handler, whose filter raises it to INFO.
    logging.getLogger("procrastinate.periodic").setLevel(logging.DEBUG)
    for noisy in ("httpx", "httpcore", "psycopg.pool"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    logging.getLogger(__name__).debug(
        "Logging configured", extra={"action": "logging_configured",
                                     "process_name": process_name}
    )
