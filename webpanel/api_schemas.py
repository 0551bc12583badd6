"""JSON Schemas (2020-12, as OpenAPI 3.1 uses them) of the API's responses.

``webpanel.openapi`` puts these under ``components/schemas``; the request schemas
that depend on the task catalog are built there.
"""

from __future__ import annotations

from typing import Any

from webpanel.job_bulk import MAX_SELECTED
from webpanel.job_filters import PAGE_SIZES, STATUSES
from webpanel.job_operations import ACTIONS

MAX_BATCH_ITEMS = 1000  # defer requests one batch call may carry

STRING = {"type": "string"}
INTEGER = {"type": "integer"}
NUMBER = {"type": "number"}
BOOLEAN = {"type": "boolean"}
TIME = {"type": "string", "format": "date-time"}
ANY: dict[str, Any] = {}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """Return ``schema`` also accepting null."""
    kind = schema.get("type")
    if isinstance(kind, str):
        widened = {**schema, "type": [kind, "null"]}
        if "enum" in schema:
            widened["enum"] = [*schema["enum"], None]
        return widened
    return {"anyOf": [schema, {"type": "null"}]}


def ref(name: str) -> dict[str, str]:
    """Return a reference to a schema under components/schemas."""
    return {"$ref": f"#/components/schemas/{name}"}


def strict(properties: dict[str, Any], required: list[str] | None = None,
           description: str = "") -> dict[str, Any]:
    """Return an object schema that allows only ``properties``."""
    schema: dict[str, Any] = {
        "type": "object", "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }
    if description:
        schema["description"] = description
    return schema


def open_object(properties: dict[str, Any], required: list[str] | None = None,
                description: str = "") -> dict[str, Any]:
    """Return an object schema with ``properties`` that allows others too."""
    schema = strict(properties, required, description)
    schema.pop("additionalProperties")
    return schema


STATUS = {"type": "string", "enum": list(STATUSES)}
ACTION = {"type": "string", "enum": list(ACTIONS)}

ERROR = open_object({
    "error": {**STRING, "description": "The HTTP status phrase, such as 'Not Found'."},
    "message": {**STRING, "description": "What failed and what to do next."},
    "field_errors": {
        "type": "object", "additionalProperties": STRING,
        "description": "Message per invalid field; batch items are named like "
                       "jobs[3].arguments.path.",
    },
}, required=["error", "message"], description="Every 4xx and 5xx response.")

JOB_SUMMARY = strict({
    "id": INTEGER, "queue_name": STRING, "task_name": STRING, "priority": INTEGER,
    "lock": nullable(STRING), "queueing_lock": nullable(STRING),
    "args": {**ANY, "description": "Arguments, with REDACTED_ARGUMENT_KEYS hidden."},
    "status": STATUS, "scheduled_at": nullable(TIME), "attempts": INTEGER,
    "abort_requested": BOOLEAN, "worker_id": nullable(INTEGER),
    "created_at": nullable(TIME),
    "worker_dead": nullable({**BOOLEAN, "description": "A doing job whose worker "
                             "stopped heartbeating."}),
})

CURSOR_NEXT = strict({"before": INTEGER, "url": STRING},
                     description="The next (older) page.")
CURSOR_PREV = strict({"after": INTEGER, "url": STRING},
                     description="The previous (newer) page.")

JOB_LIST = strict({
    "jobs": {"type": "array", "items": ref("JobSummary")},
    "count": strict({
        "value": nullable({**INTEGER, "description": "null when counting timed "
                           "out"}),
        "capped": {**BOOLEAN, "description": "true when more than value jobs match"},
        "estimate": nullable({**INTEGER, "description": "the planner's estimate "
                              "when capped"}),
        "label": STRING,
    }),
    "limit": {"type": "integer", "enum": list(PAGE_SIZES)},
    "next": nullable(CURSOR_NEXT),
    "prev": nullable(CURSOR_PREV),
    "filters": {"type": "object", "description": "The filters applied."},
})

JOB_DETAIL = strict({
    "job": open_object({
        "id": INTEGER, "queue_name": STRING, "task_name": STRING,
        "priority": INTEGER, "lock": nullable(STRING),
        "queueing_lock": nullable(STRING), "status": STATUS,
        "scheduled_at": nullable(TIME), "attempts": INTEGER,
        "abort_requested": BOOLEAN, "worker_id": nullable(INTEGER),
        "created_at": nullable(TIME), "worker_dead": nullable(BOOLEAN),
    }),
    "arguments": ANY,
    "result": ANY,
    "result_stored_at": nullable(TIME),
    "timeline": {"type": "array", "items": strict({
        "at": nullable(TIME),
        "kind": {"type": "string", "enum": ["event", "attempt", "audit"]},
        "title": STRING, "data": {"type": "object"}, "future": BOOLEAN,
    })},
    "schedule": nullable({**open_object({
        "next_number": INTEGER, "next_at": TIME, "waiting_for_worker": BOOLEAN,
        "later": {"type": "array", "items": strict({
            "number": INTEGER, "earliest": TIME, "latest": TIME})},
        "jitter": BOOLEAN, "max_attempts": nullable(INTEGER),
        "retry_after_max": NUMBER,
    }), "description": "The attempts ahead of a waiting job."}),
    "actions": {
        "type": "object", "additionalProperties": nullable(STRING),
        "description": "null when the action applies, else why it does not.",
    },
})

ACTION_RESULT = strict({
    "job_id": INTEGER, "action": ACTION, "done": BOOLEAN,
    "reason": {"type": "string",
               "enum": ["done", "not_found", "wrong_state", "queueing_lock"]},
    "message": STRING, "status_before": nullable(STATUS),
    "status_after": nullable(STATUS), "conflicting_job_id": nullable(INTEGER),
})

ACTION_REJECTED = {"allOf": [ref("Error"), open_object({
    "job_id": INTEGER, "action": ACTION, "done": {"const": False},
    "reason": {"type": "string", "enum": ["not_found", "wrong_state",
                                          "queueing_lock"]},
    "status_before": nullable(STATUS), "status_after": nullable(STATUS),
    "conflicting_job_id": nullable(INTEGER),
}, required=[], description="An unknown action has none of these fields.")]}

FILTER = strict({
    "status": {"anyOf": [STATUS, {"type": "array", "items": STATUS}]},
    "queue": STRING, "task": STRING, "lock": STRING, "queueing_lock": STRING,
    "created_from": {**STRING, "description": "ISO 8601; UTC when no offset"},
    "created_before": {**STRING, "description": "ISO 8601; UTC when no offset"},
    "arg_key": {**STRING, "description": "Argument name; outer.inner for nested"},
    "arg_value": {**STRING, "description": "Matches the typed value or the text"},
}, required=[], description="The filters of GET /jobs; {} selects every job.")

BULK_REQUEST = {
    **strict({
        "action": ACTION,
        "job_ids": {"type": "array", "minItems": 1, "maxItems": MAX_SELECTED,
                    "items": {"type": "integer", "minimum": 1}},
        "filter": ref("JobFilter"),
        "snapshot_id": {"type": "integer", "minimum": 0,
                        "description": "From the counting call; jobs with a higher "
                                       "id are left alone."},
        "confirm_count": {"type": "integer", "minimum": 0,
                          "description": "The count of the counting call; "
                                         "present means run the action."},
    }, required=["action"]),
    "oneOf": [{"required": ["job_ids"]}, {"required": ["filter"]}],
}

BULK_COUNT_FIELDS: dict[str, Any] = {
    "action": ACTION, "snapshot_id": INTEGER,
    "count": {**INTEGER, "description": "Jobs the action applies to: send it back "
                                        "as confirm_count."},
    "matched": {**INTEGER, "description": "Jobs selected, in any state."},
    "by_status": {"type": "object", "additionalProperties": INTEGER},
}

BULK_COUNT = strict({**BULK_COUNT_FIELDS, "performed": {"const": False}})

BULK_RESULT = strict({
    **BULK_COUNT_FIELDS,
    "performed": {"const": True},
    "complete": {**BOOLEAN, "description": "false when the request ran out of "
                                           "time; continue from resume"},
    "done": {"type": "array", "items": INTEGER},
    "wrong_state": {"type": "array", "items": INTEGER},
    "missing": {"type": "array", "items": INTEGER},
    "conflicts": {"type": "array", "items": strict({
        "job_id": INTEGER, "held_by": nullable(INTEGER)})},
    "resume": nullable(strict({"snapshot_id": INTEGER})),
    "summary": STRING,
})

BULK_CHANGED = {"allOf": [ref("Error"), open_object(
    {**BULK_COUNT_FIELDS, "performed": {"const": False}})]}

CREATED = strict({
    "job_id": INTEGER, "url": STRING, "task": STRING, "queue": STRING,
    "priority": INTEGER, "schedule_at": nullable(TIME), "lock": nullable(STRING),
    "queueing_lock": nullable(STRING),
})

BATCH_CREATED = strict({
    "task": STRING, "count": INTEGER,
    "job_ids": {"type": "array", "items": INTEGER},
    "urls": {"type": "array", "items": STRING},
})

BATCH_REJECTED = {"allOf": [ref("Error"), open_object({
    "invalid_items": {"type": "array", "items": INTEGER,
                      "description": "Indexes of the items that failed; missing "
                                     "when the body is not JSON."},
}, required=[])]}

LOCK_CONFLICT = {"allOf": [ref("Error"), open_object({
    "queueing_lock": {**nullable(STRING), "description": "The key (single defer)."},
    "queueing_locks": {"type": "array", "items": STRING,
                       "description": "Every key held by another job."},
}, required=["queueing_locks"])]}

ARGUMENT_ENTRY = strict({
    "name": STRING, "kind": {"type": "string", "enum": ["string", "choice", "json"]},
    "label": STRING, "help": STRING, "required": BOOLEAN,
    "choices": {"type": "array", "items": STRING},
    "max_length": nullable(INTEGER), "pattern": nullable(STRING),
    "pattern_help": STRING, "default": ANY,
})

TASK = strict({
    "name": STRING, "summary": STRING, "deferrable": BOOLEAN, "periodic": BOOLEAN,
    "queue": STRING, "queues": {"type": "array", "items": STRING},
    "timeout_s": NUMBER,
    "retry": strict({
        "max_attempts": nullable(INTEGER), "base_delay_s": NUMBER,
        "max_delay_s": NUMBER, "jitter": BOOLEAN, "retry_after_max_s": NUMBER,
    }),
    "arguments": {"type": "array", "items": ref("Argument")},
    "arguments_schema": {"type": "object",
                         "description": "JSON Schema of the arguments object."},
})

COUNT = strict({"value": INTEGER,
                "kind": {"type": "string",
                         "enum": ["exact", "estimate", "at_least"]}})

QUEUE = strict({
    "name": STRING,
    "jobs": {"type": "object", "properties": {status: COUNT for status in STATUSES},
             "required": list(STATUSES), "additionalProperties": False},
    "count_cap": INTEGER, "scheduled_later": INTEGER,
    "oldest_waiting": nullable(strict({"job_id": INTEGER,
                                       "age_s": nullable(NUMBER)})),
    "finished_last_hour": strict({"succeeded": INTEGER, "failed": INTEGER}),
    "live_workers": INTEGER, "slots": INTEGER,
})

RUNNING_JOB = strict({
    "id": INTEGER, "task_name": STRING, "queue_name": STRING, "attempts": INTEGER,
    "priority": INTEGER, "abort_requested": BOOLEAN,
    "started_at": nullable(TIME), "running_s": nullable(NUMBER),
})

WORKER = open_object({
    "worker_id": INTEGER, "last_heartbeat": TIME,
    "heartbeat_age_s": NUMBER, "stale": BOOLEAN,
    "host": nullable(STRING), "pid": nullable(INTEGER),
    "process_name": nullable(STRING), "role": nullable(STRING),
    "queues": nullable({"type": "array", "items": STRING}),
    "concurrency": nullable(INTEGER), "started_at": nullable(TIME),
    "uptime_s": nullable(NUMBER),
    "jobs": {"type": "array", "items": ref("RunningJob")},
})

RESPONSE_SCHEMAS: dict[str, Any] = {
    "Error": ERROR,
    "JobSummary": JOB_SUMMARY,
    "JobList": JOB_LIST,
    "JobDetail": JOB_DETAIL,
    "ActionResult": ACTION_RESULT,
    "ActionRejected": ACTION_REJECTED,
    "JobFilter": FILTER,
    "BulkRequest": BULK_REQUEST,
    "BulkCount": BULK_COUNT,
    "BulkResult": BULK_RESULT,
    "BulkCountChanged": BULK_CHANGED,
    "Created": CREATED,
    "BatchCreated": BATCH_CREATED,
    "BatchRejected": BATCH_REJECTED,
    "QueueingLockConflict": LOCK_CONFLICT,
    "Argument": ARGUMENT_ENTRY,
    "Task": TASK,
    "TaskList": strict({"tasks": {"type": "array", "items": ref("Task")}}),
    "Queue": QUEUE,
    "QueueList": strict({"queues": {"type": "array", "items": ref("Queue")}}),
    "RunningJob": RUNNING_JOB,
    "WorkerList": strict({
        "workers": {"type": "array", "items": ref("Worker")},
        "stale_after_s": NUMBER, "running_jobs_truncated": BOOLEAN,
    }),
    "Worker": WORKER,
}
