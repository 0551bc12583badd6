"""Job list filters: parsed from a query string, turned into indexed SQL conditions.

Every filter lives in the URL (repeated ``status``, ``queue``, ``task``, ``lock``,
``queueing_lock``, ``created_from``, ``created_before``, ``arg_key`` and
``arg_value``), so a filtered list can be bookmarked and shared. ``where()`` builds
the conditions from the named fragments in ``queries/jobs.sql``; no user input is
ever put into SQL text.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from psycopg.types.json import Jsonb

from webpanel import db
from webpanel.queries import query

logger = logging.getLogger(__name__)

STATUSES = ("todo", "doing", "succeeded", "failed", "cancelled", "aborted")
FINISHED_STATUSES = ("succeeded", "failed", "cancelled", "aborted")
PAGE_SIZES = (20, 50, 100, 200)
DEFAULT_PAGE_SIZE = 50
MAX_JOB_ID = 2**63 - 1  # procrastinate_jobs.id is a bigint
NAME_MAX_LENGTH = 128  # queue_name and task_name are varchar(128)
LOCK_MAX_LENGTH = 1000  # characters of a lock filter
ARG_KEY_MAX_LENGTH = 200
ARG_VALUE_MAX_LENGTH = 1000
FILTER_FIELDS = ("status", "queue", "task", "lock", "queueing_lock", "created_from",
                 "created_before", "arg_key", "arg_value")
_EARLIEST = datetime.datetime(1, 1, 2, tzinfo=datetime.timezone.utc)
_LATEST = datetime.datetime(9999, 12, 30, tzinfo=datetime.timezone.utc)


class QueryArgs(Protocol):
    """A multi-valued mapping such as ``request.args`` or ``request.form``."""

    def get(self, key: str, default: Any = None) -> Any:
        """Return the first value of ``key``."""

    def getlist(self, key: str) -> list[str]:
        """Return every value of ``key``."""


class FilterError(ValueError):
    """Invalid filters or list position; ``field_errors`` maps field to message."""

    def __init__(self, field_errors: Mapping[str, str]) -> None:
        self.field_errors = dict(field_errors)
        super().__init__("; ".join(f"{name}: {message}"
                                   for name, message in self.field_errors.items()))


@dataclasses.dataclass(frozen=True)
class JobFilters:
    """The filters of a job list or of a bulk action."""

    statuses: tuple[str, ...] = ()
    queue: str | None = None
    task: str | None = None
    lock: str | None = None
    queueing_lock: str | None = None
    created_from: datetime.datetime | None = None
    created_before: datetime.datetime | None = None
    arg_key: str | None = None
    arg_value: str | None = None

    def is_empty(self) -> bool:
        """Tell whether no filter is set."""
        return self == JobFilters()

    def query_items(self) -> list[tuple[str, str]]:
        """Return the filters as query-string pairs, in a stable order."""
        items = [("status", status) for status in self.statuses]
        for name in ("queue", "task", "lock", "queueing_lock"):
            value = getattr(self, name)
            if value is not None:
                items.append((name, value))
        for name in ("created_from", "created_before"):
            value = getattr(self, name)
            if value is not None:
                items.append((name, format_utc(value)))
        if self.arg_key is not None and self.arg_value is not None:
            items.extend([("arg_key", self.arg_key), ("arg_value", self.arg_value)])
        return items

    def describe(self) -> str:
        """Return the filters as a short phrase, such as 'status failed, queue q'."""
        parts = []
        if self.statuses:
            parts.append("status " + " or ".join(self.statuses))
        for name, label in (("queue", "queue"), ("task", "task"), ("lock", "lock"),
                            ("queueing_lock", "queueing lock")):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{label} {value}")
        if self.created_from is not None:
            parts.append(f"created from {format_utc(self.created_from)} UTC")
        if self.created_before is not None:
            parts.append(f"created before {format_utc(self.created_before)} UTC")
        if self.arg_key is not None:
            parts.append(f"argument {self.arg_key} = {self.arg_value}")
        return ", ".join(parts) or "all jobs"


@dataclasses.dataclass(frozen=True)
class Position:
    """Where a page of the newest-first list starts: keyset bounds and page size."""

    before: int | None = None
    after: int | None = None
    limit: int = DEFAULT_PAGE_SIZE


@dataclasses.dataclass
class Where:
    """SQL conditions joined by AND, with their parameters."""

    clauses: list[str] = dataclasses.field(default_factory=list)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)

    def add(self, fragment: str, **params: Any) -> Where:
        """Return a copy with the named fragment of jobs.sql added."""
        return Where(self.clauses + [query("jobs", fragment)],
                     {**self.params, **params})

    def sql(self) -> str:
        """Return the conditions as one SQL expression."""
        return " AND ".join(f"({clause})" for clause in self.clauses) or "true"


def format_utc(value: datetime.datetime) -> str:
    """Return a UTC time as YYYY-MM-DDTHH:MM:SS, the form datetime-local inputs use."""
    return value.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def _clean_text(raw: str | None, field: str, limit: int,
                errors: dict[str, str]) -> str | None:
    if raw is None:
        return None
    value = raw.strip()
    if not value:
        return None
    if len(value) > limit:
        errors[field] = f"is {len(value)} characters long; the limit is {limit}"
        return None
    for character in value:
        if unicodedata.category(character) in {"Cc", "Cf", "Cs", "Co", "Cn"}:
            errors[field] = (f"contains the invisible or control character "
                             f"U+{ord(character):04X}; remove it")
            return None
    return value


def _parse_time(raw: str | None, field: str,
                errors: dict[str, str]) -> datetime.datetime | None:
    if raw is None or not raw.strip():
        return None
    text = raw.strip()
    try:
        value = datetime.datetime.fromisoformat(text)
    except ValueError:
        errors[field] = (f"{text[:40]!r} is not a time; use YYYY-MM-DDTHH:MM in UTC, "
                         "such as 2024-05-01T09:30")
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    try:
        return value.astimezone(datetime.timezone.utc)
    except OverflowError:
        errors[field] = f"{text[:40]!r} is out of range; use a time between years 1 and 9999"
        return None


def parse_job_id(raw: str | None, field: str, errors: dict[str, str]) -> int | None:
    """Parse a job id from text, recording a message in ``errors`` when invalid."""
    if raw is None or not raw.strip():
        return None
    text = raw.strip().lstrip("#")
    if not text.isascii() or not text.isdigit() or not 0 < int(text) <= MAX_JOB_ID:
        errors[field] = f"{raw.strip()[:40]!r} is not a job id; enter a whole number"
        return None
    return int(text)


def _parse_arguments(key: str | None, value: str | None, redacted: Iterable[str],
                     errors: dict[str, str]) -> tuple[str | None, str | None]:
    if key is None and value is None:
        return None, None
    if key is None:
        errors["arg_key"] = "is required to search arguments by value"
        return None, None
    if value is None:
        errors["arg_value"] = ("is required to search arguments by key; enter the "
                               "value, such as dev or 42")
        return None, None
    segments = key.split(".")
    if any(not segment for segment in segments):
        errors["arg_key"] = (f"{key[:60]!r} has an empty part; write nested keys as "
                             "outer.inner")
        return None, None
    hidden = {item.lower() for item in redacted}
    for segment in segments:
        if segment.lower() in hidden:
            errors["arg_key"] = (f"values under {segment!r} are redacted "
                                 "(REDACTED_ARGUMENT_KEYS), so they cannot be searched")
            return None, None
    return key, value


def parse_filters(args: QueryArgs, redacted_keys: Iterable[str] = ()) -> JobFilters:
    """Read the filters of a query string, raising FilterError naming each bad field."""
    errors: dict[str, str] = {}
    statuses: list[str] = []
    for raw in args.getlist("status"):
        status = raw.strip().lower()
        if not status:
            continue
        if status not in STATUSES:
            errors["status"] = (f"{raw[:40]!r} is not a status; expected "
                                f"{', '.join(STATUSES)}")
        elif status not in statuses:
            statuses.append(status)
    queue = _clean_text(args.get("queue"), "queue", NAME_MAX_LENGTH, errors)
    task = _clean_text(args.get("task"), "task", NAME_MAX_LENGTH, errors)
    lock = _clean_text(args.get("lock"), "lock", LOCK_MAX_LENGTH, errors)
    queueing_lock = _clean_text(args.get("queueing_lock"), "queueing_lock",
                                LOCK_MAX_LENGTH, errors)
    created_from = _parse_time(args.get("created_from"), "created_from", errors)
    created_before = _parse_time(args.get("created_before"), "created_before", errors)
    if created_from and created_before and created_from >= created_before:
        errors["created_before"] = "must be later than 'created from'"
    arg_key = _clean_text(args.get("arg_key"), "arg_key", ARG_KEY_MAX_LENGTH, errors)
    raw_value = args.get("arg_value")
    arg_value = None
    if raw_value is not None and raw_value.strip():
        arg_value = _clean_text(raw_value, "arg_value", ARG_VALUE_MAX_LENGTH, errors)
    if "arg_key" not in errors and "arg_value" not in errors:
        arg_key, arg_value = _parse_arguments(arg_key, arg_value, redacted_keys,
                                              errors)
    if errors:
        raise FilterError(errors)
    return JobFilters(
        statuses=tuple(statuses), queue=queue, task=task, lock=lock,
        queueing_lock=queueing_lock, created_from=created_from,
        created_before=created_before, arg_key=arg_key, arg_value=arg_value,
    )


def parse_position(args: QueryArgs) -> Position:
    """Read ``before``, ``after`` and ``limit``, raising FilterError when invalid."""
    errors: dict[str, str] = {}
    before = parse_job_id(args.get("before"), "before", errors)
    after = parse_job_id(args.get("after"), "after", errors)
    if before is not None and after is not None:
        errors["after"] = "cannot be combined with 'before'; use one of them"
    limit = DEFAULT_PAGE_SIZE
    raw_limit = (args.get("limit") or "").strip()
    if raw_limit:
        if not raw_limit.isdigit() or int(raw_limit) not in PAGE_SIZES:
            errors["limit"] = (f"{raw_limit[:20]!r} is not a page size; expected one "
                               f"of {', '.join(map(str, PAGE_SIZES))}")
        else:
            limit = int(raw_limit)
    if errors:
        raise FilterError(errors)
    return Position(before=before, after=after, limit=limit)


def _nest(path: Sequence[str], value: Any) -> dict[str, Any]:
    document: Any = value
    for segment in reversed(path):
        document = {segment: document}
    return document


def argument_documents(key: str, value: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the JSON documents an argument search looks for: typed and as text.

    ``arg_value=42`` finds both ``{"key": 42}`` and ``{"key": "42"}``; a dotted key
    such as ``json.name`` looks inside nested objects.
    """
    path = key.split(".")
    try:
        typed: Any = json.loads(value)
    except ValueError:
        typed = value
    return _nest(path, typed), _nest(path, value)


def _created_bounds(filters: JobFilters) -> tuple[int, int] | None:
    # NOTE: ids follow defer order only roughly. The bounds take the extreme id
    # among 1000 boundary events, so a job whose id lies further out of order is
    # missed. Jobs inserted without a 'deferred' event never match a time range.
    low, high = 1, MAX_JOB_ID
    if filters.created_from is not None:
        row = db.fetch_one(query("jobs", "first_created_id"),
                           {"at": filters.created_from})
        if row is None or row["id"] is None:
            return None
        low = row["id"]
    if filters.created_before is not None:
        row = db.fetch_one(query("jobs", "last_created_id"),
                           {"at": filters.created_before})
        if row is None or row["id"] is None:
            return None
        high = row["id"]
    return low, high


def where(filters: JobFilters) -> Where:
    """Return the SQL conditions of ``filters``, looking up created-time id bounds."""
    clauses = Where()
    if len(filters.statuses) == 1:
        clauses = clauses.add("where_status", status=filters.statuses[0])
    elif filters.statuses:
        clauses = clauses.add("where_statuses", statuses=list(filters.statuses))
    for name in ("queue", "task", "lock", "queueing_lock"):
        value = getattr(filters, name)
        if value is not None:
            clauses = clauses.add(f"where_{name}", **{name: value})
    if filters.arg_key is not None and filters.arg_value is not None:
        typed, text = argument_documents(filters.arg_key, filters.arg_value)
        clauses = clauses.add("where_args", args_typed=Jsonb(typed),
                              args_text=Jsonb(text))
    if filters.created_from is not None or filters.created_before is not None:
        bounds = _created_bounds(filters)
        low, high = bounds if bounds is not None else (1, 0)
        clauses = clauses.add(
            "where_created", created_min_id=low, created_max_id=high,
            created_from=filters.created_from or _EARLIEST,
            created_before=filters.created_before or _LATEST,
        )
    return clauses
