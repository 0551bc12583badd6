"""API routes that read the catalog and the fleet: tasks, queues, workers, OpenAPI."""

from __future__ import annotations

import logging
from typing import Any

from flask import current_app
from werkzeug.wrappers import Response

from webpanel import dashboard, db, openapi
from webpanel.api import bp, json_response
from webpanel.defer_service import queue_choices
from webpanel.queries import query
from workers.app import retry_strategy
from workers.settings import Settings
from workers.tasks.catalog import TASKS, TaskDescription

logger = logging.getLogger(__name__)

THROUGHPUT_WINDOW = 3600  # seconds of finished jobs counted per queue
RUNNING_JOBS_LISTED = 2000  # running jobs listed across all workers


def _settings() -> Settings:
    return current_app.config["FLEET_SETTINGS"]


def task_entry(description: TaskDescription, settings: Settings) -> dict[str, Any]:
    """Return one task of the catalog: queue, retry policy and argument schema."""
    strategy = retry_strategy(settings, description)
    return {
        "name": description.name,
        "summary": description.summary,
        "deferrable": description.user_facing,
        "periodic": description.periodic,
        "queue": description.queue,
        "queues": queue_choices(description, settings)
        if description.user_facing else [description.queue],
        "timeout_s": description.timeout if description.timeout is not None
        else settings.job_timeout,
        "retry": {
            "max_attempts": strategy.max_attempts,
            "base_delay_s": strategy.base_delay,
            "max_delay_s": strategy.max_delay,
            "jitter": strategy.jitter,
            "retry_after_max_s": strategy.retry_after_max,
        },
        "arguments": [openapi.argument_entry(argument)
                      for argument in description.arguments],
        "arguments_schema": openapi.arguments_schema(description),
    }


@bp.route("/tasks", methods=["GET"])
def list_tasks() -> Response:
    """List the task catalog; only tasks marked deferrable accept defers."""
    settings = _settings()
    return json_response({"tasks": [task_entry(description, settings)
                                    for description in TASKS.values()]})


@bp.route("/queues", methods=["GET"])
def list_queues() -> Response:
    """List each queue: jobs by status, oldest waiting job, throughput, workers."""
    names = dashboard.queue_names()
    counts = dashboard.job_counts(names)
    oldest = dashboard.oldest_waiting(names)
    later = {row["queue_name"]: int(row["scheduled_later"])
             for row in db.fetch_all(query("fleet", "scheduled_later"),
                                     {"queues": names, "cap": dashboard.COUNT_CAP})}
    throughput = {row["queue_name"]: row
                  for row in db.fetch_all(query("fleet", "throughput_by_queue"),
                                          {"seconds": THROUGHPUT_WINDOW})}

    # Live workers and their concurrency per queue; unrecorded workers have none.
    workers = db.fetch_all(query("fleet", "workers"),
                           {"threshold": _settings().stalled_job_threshold})
    served = {name: {"workers": 0, "slots": 0} for name in names}
    for worker in workers:
        for queue in worker["queues"] or []:
            if not worker["stale"] and queue in served:
                served[queue]["workers"] += 1
                served[queue]["slots"] += worker["concurrency"] or 0

    queues = []
    for name in names:
        waiting = oldest.get(name) or {}
        finished = throughput.get(name) or {}
        queues.append({
            "name": name,
            "jobs": {status: {"value": count.value, "kind": count.kind}
                     for status, count in counts[name].items()},
            "count_cap": dashboard.COUNT_CAP,
            "scheduled_later": later.get(name, 0),
            "oldest_waiting": {"job_id": waiting.get("job_id"),
                               "age_s": waiting.get("age_s")}
            if waiting.get("job_id") is not None else None,
            "finished_last_hour": {"succeeded": int(finished.get("succeeded") or 0),
                                   "failed": int(finished.get("failed") or 0)},
            "live_workers": served[name]["workers"],
            "slots": served[name]["slots"],
        })
    return json_response({"queues": queues})


@bp.route("/workers", methods=["GET"])
def list_workers() -> Response:
    """List Procrastinate's workers with their process and the jobs they run."""
    rows = db.fetch_all(query("fleet", "workers"),
                        {"threshold": _settings().stalled_job_threshold})
    running = db.fetch_all(query("fleet", "running_jobs"), {
        "worker_ids": [row["worker_id"] for row in rows],
        "limit": RUNNING_JOBS_LISTED})
    by_worker: dict[int, list[dict[str, Any]]] = {}
    for job in running:
        by_worker.setdefault(job["worker_id"], []).append({
            "id": job["id"], "task_name": job["task_name"],
            "queue_name": job["queue_name"], "attempts": job["attempts"],
            "priority": job["priority"], "abort_requested": job["abort_requested"],
            "started_at": job["started_at"], "running_s": job["running_s"],
        })
    workers = [{**row, "jobs": by_worker.get(row["worker_id"], [])} for row in rows]
    return json_response({
        "workers": workers,
        "stale_after_s": _settings().stalled_job_threshold,
        "running_jobs_truncated": len(running) >= RUNNING_JOBS_LISTED,
    })


@bp.route("/openapi.json", methods=["GET"])
def openapi_document() -> Response:
    """Return the OpenAPI 3.1 description of this API."""
    return json_response(openapi.build_document(_settings()))
