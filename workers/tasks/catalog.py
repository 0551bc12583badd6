"""One description per task: its queue, policy and arguments.

The panel builds its defer forms from these descriptions and the API validates
against them, so a task's arguments are declared in one place.
"""

from __future__ import annotations

import dataclasses
import json
import re
import unicodedata
from typing import Any

from workers.errors import InvalidTaskArguments

MAX_STRING_LENGTH = 500  # characters, for string arguments without their own limit
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


@dataclasses.dataclass(frozen=True)
class Argument:
    """One argument of a task as the panel and the API accept it."""

    name: str
    kind: str  # "string", "choice" or "json"
    label: str
    help: str = ""
    required: bool = False
    choices: tuple[str, ...] = ()
    max_length: int = MAX_STRING_LENGTH
    pattern: str | None = None
    pattern_help: str = ""
    default: Any = None
    relative_path: bool = False  # checked as a path relative to API_BASE_URL


@dataclasses.dataclass(frozen=True)
class TaskDescription:
    """A task's name, queue, retry policy overrides and arguments."""

    name: str
    summary: str
    queue: str
    arguments: tuple[Argument, ...] = ()
    user_facing: bool = True
    timeout: float | None = None  # seconds; None means JOB_TIMEOUT
    max_attempts: int | None = None  # None means RETRY_MAX_ATTEMPTS
    base_delay: float | None = None  # seconds; None means RETRY_BASE_DELAY
    max_delay: float | None = None  # seconds; None means RETRY_MAX_DELAY
    periodic: bool = False


FETCH_JOKE = TaskDescription(
    name="fetch_joke",
    summary="Fetch a random joke from the upstream API and store it.",
    queue="api_calls",
    arguments=(
        Argument(
            name="category",
            kind="string",
            label="Category",
            help="Optional category, lower-case letters only, such as 'dev'.",
            max_length=40,
            pattern=r"[a-z]+",
            pattern_help="lower-case letters a-z only",
        ),
    ),
)

CALL_API = TaskDescription(
    name="call_api",
    summary="Send one request to a path under API_BASE_URL and store the answer.",
    queue="api_calls",
    arguments=(
        Argument(
            name="method", kind="choice", label="Method", required=True,
            choices=HTTP_METHODS, default="GET",
        ),
        Argument(
            name="path", kind="string", label="Path", required=True,
            help="Path under API_BASE_URL starting with '/', such as /items/42.",
            max_length=2000,
            pattern=r"/[\x21-\x7e]*",
            pattern_help="a path starting with '/' made of printable ASCII",
            relative_path=True,
        ),
        Argument(
            name="json", kind="json", label="JSON body",
            help="Optional JSON sent as the request body.",
        ),
    ),
)

HEALTH_CHECK = TaskDescription(
    name="health_check",
    summary="Measure the fleet and store a health row.",
    queue="maintenance",
    user_facing=False,
    timeout=60,
    max_attempts=1,
    periodic=True,
)

RETRY_STALLED_JOBS = TaskDescription(
    name="retry_stalled_jobs",
    summary="Give jobs held by dead workers back to the queue.",
    queue="maintenance",
    user_facing=False,
    timeout=120,
    max_attempts=1,
    periodic=True,
)

PRUNE_OLD_JOBS = TaskDescription(
    name="prune_old_jobs",
    summary="Delete finished jobs older than JOB_RETENTION_DAYS, in small batches.",
    queue="maintenance",
    user_facing=False,
    timeout=600,
    max_attempts=1,
    periodic=True,
)

TASKS: dict[str, TaskDescription] = {
    description.name: description
    for description in (FETCH_JOKE, CALL_API, HEALTH_CHECK, RETRY_STALLED_JOBS,
                        PRUNE_OLD_JOBS)
}


def user_facing_tasks() -> list[TaskDescription]:
    """Return the tasks an operator may defer from the panel or the API."""
    return [task for task in TASKS.values() if task.user_facing]


def _check_text(argument: Argument, value: str) -> str | None:
    if len(value) > argument.max_length:
        return (
            f"is {len(value)} characters long; the limit is {argument.max_length}"
        )
    for character in value:
        category = unicodedata.category(character)
        if category in {"Cc", "Cf", "Cs", "Co", "Cn"}:
            return (
                f"contains the invisible or control character U+{ord(character):04X}; "
                "remove it"
            )
    if argument.pattern and not re.fullmatch(argument.pattern, value):
        return f"{value[:60]!r} is invalid: expected {argument.pattern_help}"
    return None


def _check_path(value: str) -> str | None:
    from workers.http import check_relative_path

    try:
        check_relative_path(value)
    except InvalidTaskArguments as exc:
        return str(exc).removeprefix("path ")
    return None


def _check_json_strings(value: Any) -> str | None:
    if isinstance(value, str):
        for character in value:
            if unicodedata.category(character) in {"Cc", "Cs"} and character not in \
                    "\t\n\r":
                return (
                    f"contains the control character U+{ord(character):04X} in a "
                    "string; remove it"
                )
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            problem = _check_json_strings(key) or _check_json_strings(item)
            if problem:
                return problem
    if isinstance(value, list):
        for item in value:
            problem = _check_json_strings(item)
            if problem:
                return problem
    return None


def format_bytes(size: int) -> str:
    """Format a byte count as '900 bytes', '16 KiB' or '2.0 MiB'."""
    if size < 1024:
        return f"{size} bytes"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB".replace(".0 KiB", " KiB")
    return f"{size / (1024 * 1024):.1f} MiB"


def arguments_too_large(size: int | None, max_bytes: int) -> str:
    """Return the message for job arguments over MAX_ARGUMENTS_BYTES."""
    measured = f"are {format_bytes(size)} of JSON" if size is not None \
        else "are too large"
    return (
        f"{measured}; the limit is {format_bytes(max_bytes)} "
        f"(MAX_ARGUMENTS_BYTES = {max_bytes} bytes). Send a smaller JSON body, or "
        "store large data elsewhere and pass a reference to it"
    )


def validate_arguments(
    task_name: str, raw: dict[str, Any], max_bytes: int
) -> dict[str, Any]:
    """Return the cleaned arguments of a job, or raise InvalidTaskArguments.

    The exception's ``field_errors`` maps each rejected argument to its message.
    """
    description = TASKS.get(task_name)
    if description is None or not description.user_facing:
        known = ", ".join(task.name for task in user_facing_tasks())
        raise InvalidTaskArguments(
            f"unknown task {task_name[:80]!r}; expected one of {known}"
        )
    errors: dict[str, str] = {}
    cleaned: dict[str, Any] = {}
    known_names = {argument.name for argument in description.arguments}
    for name in raw:
        if name not in known_names:
            errors[str(name)[:80]] = (
                f"unknown argument; {task_name} accepts "
                f"{', '.join(sorted(known_names)) or 'no arguments'}"
            )

    for argument in description.arguments:
        value = raw.get(argument.name)
        if value is None or value == "":
            if argument.required:
                errors[argument.name] = "is required"
            continue
        problem = _validate_one(argument, value)
        if problem:
            errors[argument.name] = problem
        else:
            cleaned[argument.name] = value

    if not errors:
        try:
            encoded = json.dumps(cleaned, ensure_ascii=False, allow_nan=False)
        except ValueError:
            encoded = ""
            errors["json"] = "must be finite JSON; NaN and Infinity are not JSON"
        size = len(encoded.encode("utf-8"))
        if size > max_bytes:
            errors["arguments"] = arguments_too_large(size, max_bytes)
    if errors:
        exc = InvalidTaskArguments(
            "invalid arguments: "
            + "; ".join(f"{name} {message}" for name, message in errors.items())
        )
        exc.field_errors = errors  # type: ignore[attr-defined]
        raise exc
    return cleaned


def _validate_one(argument: Argument, value: Any) -> str | None:
    if argument.kind == "choice":
        if value not in argument.choices:
            return (
                f"{str(value)[:40]!r} is invalid; expected one of "
                f"{', '.join(argument.choices)}"
            )
        return None
    if argument.kind == "string":
        if not isinstance(value, str):
            return f"must be a string, not {type(value).__name__}"
        problem = _check_text(argument, value)
        if problem is None and argument.relative_path:
            problem = _check_path(value)
        return problem
    if argument.kind == "json":
        return _check_json_strings(value)
    return f"has an unsupported kind {argument.kind!r}"
