"""The OpenAPI 3.1 description of /api/v1, built from the task catalog.

Each deferrable task gets its own defer and batch paths, whose request schemas
come from the task's ``Argument`` descriptions in ``workers/tasks/catalog.py``:
types, ``maxLength``, ``enum`` and ``pattern``. The catalog's patterns are Python
patterns that must match the whole value. JSON Schema matches a pattern anywhere
in the value, so they are written here anchored (``^(?:...)$``). The server also
rejects control, format and unassigned characters in string arguments, which no
schema keyword expresses.
"""

from __future__ import annotations

import logging
from typing import Any

from webpanel.api_schemas import (
    ANY,
    MAX_BATCH_ITEMS,
    RESPONSE_SCHEMAS,
    nullable,
    ref,
    strict,
)
from webpanel.defer_service import (
    LOCK_MAX_LENGTH,
    PRIORITY_MAX,
    PRIORITY_MIN,
    queue_choices,
)
from webpanel.job_filters import (
    ARG_KEY_MAX_LENGTH,
    ARG_VALUE_MAX_LENGTH,
    DEFAULT_PAGE_SIZE,
    LOCK_MAX_LENGTH as FILTER_LOCK_MAX_LENGTH,
    NAME_MAX_LENGTH,
    PAGE_SIZES,
    STATUSES,
)
from webpanel.job_operations import ACTIONS
from workers.settings import Settings
from workers.tasks.catalog import Argument, TaskDescription, user_facing_tasks

logger = logging.getLogger(__name__)

OPENAPI_VERSION = "3.1.0"
API_VERSION = "1"
SCHEDULE_HELP = (
    "RFC 3339 time with an offset, such as 2027-03-01T09:00:00+01:00; or, with "
    "time_zone, a local time YYYY-MM-DDTHH:MM[:SS]. At most 5 minutes ago and at "
    "most 365 days ahead. Leave it out to run the job as soon as a worker is free."
)


def anchored(pattern: str) -> str:
    """Return a whole-value Python pattern as a JSON Schema pattern."""
    return f"^(?:{pattern})$"


def argument_entry(argument: Argument) -> dict[str, Any]:
    """Return one argument's description as the task catalog lists it."""
    return {
        "name": argument.name,
        "kind": argument.kind,
        "label": argument.label,
        "help": argument.help,
        "required": argument.required,
        "choices": list(argument.choices),
        "max_length": argument.max_length if argument.kind == "string" else None,
        "pattern": anchored(argument.pattern) if argument.pattern else None,
        "pattern_help": argument.pattern_help,
        "default": argument.default,
    }


def argument_schema(argument: Argument) -> dict[str, Any]:
    """Return the JSON Schema of one argument's value.

    An empty string or null counts as a missing argument, so an optional string
    also accepts both.
    """
    text = " ".join(part for part in (argument.label + ".", argument.help,
                                      argument.pattern_help) if part)
    schema: dict[str, Any]
    if argument.kind == "choice":
        choices: list[Any] = list(argument.choices)
        if not argument.required:
            choices += ["", None]
        schema = {"enum": choices}
    elif argument.kind == "string":
        schema = {"type": "string", "maxLength": argument.max_length}
        if argument.required:
            schema["minLength"] = 1
        if argument.pattern:
            pattern = argument.pattern if argument.required \
                else f"(?:{argument.pattern})?"
            schema["pattern"] = anchored(pattern)
        if not argument.required:
            schema = nullable(schema)
    else:
        schema = dict(ANY)
        text += " Any JSON value; null counts as missing."
    schema["description"] = text.strip()
    if argument.default is not None:
        schema["default"] = argument.default
    return schema


def arguments_schema(description: TaskDescription) -> dict[str, Any]:
    """Return the JSON Schema of a task's ``arguments`` object."""
    return {
        "type": "object",
        "properties": {argument.name: argument_schema(argument)
                       for argument in description.arguments},
        "required": [argument.name for argument in description.arguments
                     if argument.required],
        "additionalProperties": False,
    }


def schema_name(task: str, suffix: str) -> str:
    """Return the component name of a task's schema, such as CallApiDefer."""
    return "".join(part.capitalize() for part in task.split("_")) + suffix


def defer_request_schema(description: TaskDescription,
                         settings: Settings) -> dict[str, Any]:
    """Return the JSON Schema of a request that defers one job of a task."""
    required_arguments = any(argument.required for argument in description.arguments)
    queues: list[Any] = [*queue_choices(description, settings), None]
    return strict({
        "arguments": ref(schema_name(description.name, "Arguments")),
        "queue": {"type": ["string", "null"], "enum": queues,
                  "default": description.queue},
        "priority": {"type": ["integer", "null"], "minimum": PRIORITY_MIN,
                     "maximum": PRIORITY_MAX, "default": 0,
                     "description": "Higher runs first."},
        "schedule_at": {"type": ["string", "null"], "description": SCHEDULE_HELP},
        "time_zone": {"type": ["string", "null"],
                      "description": "IANA time zone of a local schedule_at, such "
                                     "as Europe/Paris."},
        "lock": {"type": ["string", "null"], "maxLength": LOCK_MAX_LENGTH,
                 "description": "Jobs with the same lock never run at once."},
        "queueing_lock": {
            "type": ["string", "null"], "maxLength": LOCK_MAX_LENGTH,
            "description": "Rejects the job (409) while a job with this key is "
                           "queued or running; also the lock when lock is empty.",
        },
    }, required=["arguments"] if required_arguments else [])


def batch_request_schema(description: TaskDescription) -> dict[str, Any]:
    """Return the JSON Schema of a batch defer request of a task."""
    return strict({"jobs": {
        "type": "array", "minItems": 1, "maxItems": MAX_BATCH_ITEMS,
        "items": ref(schema_name(description.name, "Defer")),
    }})


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": schema}}}


def _error(description: str, name: str = "Error") -> dict[str, Any]:
    return _json(ref(name), description)


COMMON_ERRORS = {
    "401": _error("No token, or an invalid or revoked token."),
    "503": _error("The database is unreachable or did not answer in time."),
}
WRITE_ERRORS = {
    **COMMON_ERRORS,
    "403": _error("The account's role may not do this."),
    "413": _error("The body is larger than the limit."),
    "415": _error("The body is not sent as application/json."),
}


def _operation(summary: str, operation_id: str, responses: dict[str, Any],
               role: str = "viewer", **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "operationId": operation_id,
            "x-required-role": role, "responses": responses, **extra}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


def _path_parameter(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _list_parameters() -> list[dict[str, Any]]:
    text = {"type": "string"}
    return [
        {**_query("status", {"type": "array", "items": {"enum": list(STATUSES)}},
                  "Repeat for several statuses."), "explode": True},
        _query("queue", {**text, "maxLength": NAME_MAX_LENGTH}, "Queue name."),
        _query("task", {**text, "maxLength": NAME_MAX_LENGTH}, "Task name."),
        _query("lock", {**text, "maxLength": FILTER_LOCK_MAX_LENGTH}, "Lock."),
        _query("queueing_lock", {**text, "maxLength": FILTER_LOCK_MAX_LENGTH},
               "Queueing lock."),
        _query("created_from", text, "ISO 8601 time; UTC when it has no offset."),
        _query("created_before", text, "ISO 8601 time; UTC when it has no offset."),
        _query("arg_key", {**text, "maxLength": ARG_KEY_MAX_LENGTH},
               "Argument name, outer.inner for nested; needs arg_value."),
        _query("arg_value", {**text, "maxLength": ARG_VALUE_MAX_LENGTH},
               "Argument value; 42 matches the number and the text."),
        _query("before", {"type": "integer", "minimum": 1},
               "Cursor: jobs with a lower id (the next page)."),
        _query("after", {"type": "integer", "minimum": 1},
               "Cursor: jobs with a higher id (the previous page)."),
        _query("limit", {"type": "integer", "enum": list(PAGE_SIZES),
                         "default": DEFAULT_PAGE_SIZE}, "Page size."),
    ]


def _job_paths() -> dict[str, Any]:
    job_id = _path_parameter("job_id", {"type": "integer", "minimum": 1})
    return {
        "/jobs": {"get": _operation(
            "List jobs newest first, with filters, a count and cursors", "listJobs",
            {"200": _json(ref("JobList"), "One page of jobs."),
             "400": _error("An invalid filter or cursor."), **COMMON_ERRORS},
            parameters=_list_parameters())},
        "/jobs/{job_id}": {"get": _operation(
            "Return one job with its timeline, retry plan and actions", "getJob",
            {"200": _json(ref("JobDetail"), "The job."),
             "404": _error("No such job."), **COMMON_ERRORS},
            parameters=[job_id])},
        "/jobs/{job_id}/{action}": {"post": _operation(
            "Apply an action to one job", "applyJobAction",
            {"200": _json(ref("ActionResult"), "The action was applied."),
             "404": _error("No such job or action.", "ActionRejected"),
             "409": _error("The job's state does not allow the action, or its "
                           "queueing lock is held.", "ActionRejected"),
             **WRITE_ERRORS},
            role="operator",
            parameters=[job_id, _path_parameter(
                "action", {"type": "string", "enum": list(ACTIONS)})])},
        "/jobs/bulk": {"post": _operation(
            "Count, then run, an action on many jobs", "bulkJobAction",
            {"200": _json({"oneOf": [ref("BulkCount"), ref("BulkResult")]},
                          "The count (without confirm_count) or the result."),
             "400": _error("An invalid request."),
             "409": _error("The count changed; nothing was changed.",
                           "BulkCountChanged"),
             "422": _error("Counting took too long; narrow the filter."),
             **WRITE_ERRORS},
            role="operator",
            requestBody={"required": True, "content": {
                "application/json": {"schema": ref("BulkRequest")}}})},
    }


def _task_paths(description: TaskDescription) -> dict[str, Any]:
    name = description.name
    lock_conflict = _error("A job with the queueing lock is queued or running; "
                           "nothing was deferred.", "QueueingLockConflict")
    return {
        f"/tasks/{name}/jobs": {"post": _operation(
            f"Defer one {name} job", f"defer_{name}",
            {"201": {**_json(ref("Created"), "The job was deferred."),
                     "headers": {"Location": {"schema": {"type": "string"},
                                              "description": "The job's URL."}}},
             "400": _error("An invalid field; nothing was deferred."),
             "404": _error("No such task."),
             "409": lock_conflict, **WRITE_ERRORS},
            role="operator", description=description.summary,
            requestBody={"required": True, "content": {"application/json": {
                "schema": ref(schema_name(name, "Defer"))}}})},
        f"/tasks/{name}/jobs/batch": {"post": _operation(
            f"Defer up to {MAX_BATCH_ITEMS} {name} jobs, all or none",
            f"defer_{name}_batch",
            {"201": _json(ref("BatchCreated"), "Every job was deferred."),
             "400": _error("An invalid item; nothing was deferred.",
                           "BatchRejected"),
             "404": _error("No such task."),
             "409": lock_conflict, **WRITE_ERRORS},
            role="operator",
            requestBody={"required": True, "content": {"application/json": {
                "schema": ref(schema_name(name, "Batch"))}}})},
    }


def _fleet_paths() -> dict[str, Any]:
    return {
        "/tasks": {"get": _operation(
            "List the task catalog", "listTasks",
            {"200": _json(ref("TaskList"), "Every task."), **COMMON_ERRORS})},
        "/queues": {"get": _operation(
            "List queues with job counts, oldest waiting job and workers",
            "listQueues",
            {"200": _json(ref("QueueList"), "Every known queue."),
             **COMMON_ERRORS})},
        "/workers": {"get": _operation(
            "List workers with their process and running jobs", "listWorkers",
            {"200": _json(ref("WorkerList"), "Every worker row."),
             **COMMON_ERRORS})},
        "/openapi.json": {"get": _operation(
            "Return this description", "getOpenApi",
            {"200": _json({"type": "object"}, "The OpenAPI document."),
             **COMMON_ERRORS})},
    }


def build_document(settings: Settings) -> dict[str, Any]:
    """Return the OpenAPI 3.1 document of /api/v1 for the running settings."""
    schemas: dict[str, Any] = dict(RESPONSE_SCHEMAS)
    paths: dict[str, Any] = {**_job_paths(), **_fleet_paths()}
    for description in user_facing_tasks():
        schemas[schema_name(description.name, "Arguments")] = \
            arguments_schema(description)
        schemas[schema_name(description.name, "Defer")] = \
            defer_request_schema(description, settings)
        schemas[schema_name(description.name, "Batch")] = \
            batch_request_schema(description)
        paths.update(_task_paths(description))
    return {
        "openapi": OPENAPI_VERSION,
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {
            "title": "Job panel API",
            "version": API_VERSION,
            "description": (
                "Jobs, actions, bulk actions and defers of the job panel. Send "
                "'Authorization: Bearer TOKEN' with a token from the account page. "
                "Viewers read; operators act and defer. Every error is JSON with "
                "error, message and field_errors."),
        },
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearerAuth": {
                "type": "http", "scheme": "bearer",
                "description": "A per-account API token (pnl_...)."}},
        },
    }
