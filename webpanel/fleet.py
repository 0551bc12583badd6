"""The fleet: workers, stalled jobs, queues and periodic tasks.

supervisord's processes are in ``webpanel.processes``; their routes are added to this
blueprint at the end of this module so that their endpoints stay ``fleet.*``.
"""

from __future__ import annotations

import datetime
import logging
import time
from typing import Any

import procrastinate.exceptions
from croniter import croniter
from flask import (
    Blueprint,
    abort,
    flash,
    redirect,
    render_template,
    request,
    url_for,
)

from webpanel import audit, charts, dashboard, db, processes
from webpanel.auth import current_user, requires
from webpanel.queries import query
from workers.recovery import FAIL_STALLED_JOB, RECORD_LOST_ATTEMPT, RETRY_STALLED_JOB
from workers.identity import host_name
from workers.supervision import SupervisorUnavailable
from workers.tasks.catalog import TASKS

logger = logging.getLogger(__name__)

bp = Blueprint("fleet", __name__)

STOPPED_WORKERS_WINDOW = 86400  # seconds of stopped workers the workers page lists
STOPPED_WORKERS_SHOWN = 10
RUNNING_JOBS_SHOWN = 2000
STALLED_JOBS_SHOWN = 500
MAX_SELECTED_JOBS = 500
THROUGHPUT_WINDOW = 3600  # seconds
STALLED_ACTIONS = {
    "retry": ("stalled_job_retried", RETRY_STALLED_JOB, "retried"),
    "fail": ("stalled_job_failed", FAIL_STALLED_JOB, "marked failed"),
}


@bp.app_template_filter("fleet_duration")
def format_duration(seconds: float | None) -> str:
    """Format seconds as '2 h 5 min', '3 min 12 s' or '4.2 s'."""
    if seconds is None:
        return "–"
    seconds = max(0.0, float(seconds))
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


@bp.app_template_filter("fleet_time")
def format_time(moment: datetime.datetime | float | None) -> str:
    """Format a time (or a Unix timestamp) in UTC to the second."""
    if moment is None:
        return "–"
    if isinstance(moment, (int, float)):
        moment = datetime.datetime.fromtimestamp(moment, datetime.timezone.utc)
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _threshold() -> float:
    return dashboard.settings().stalled_job_threshold


def replaced_processes(rows: list[dict[str, Any]]) -> dict[int, int]:
    """Return {worker id: pid supervisord runs now} for workers whose process died.

    A killed worker's row looks live until its heartbeat is STALLED_JOB_THRESHOLD
    old, but supervisord on this host reaps the process at once. So a row of this
    host whose process supervisord now runs under another pid (0 when not
    running) is reported as exited. Rows of other hosts, and every row when supervisord
    cannot be reached, keep their heartbeat state.
    """
    local = [row for row in rows
             if row["host"] == host_name() and row["process_name"] and row["pid"]]
    if not local:
        return {}
    try:
        infos = processes.client().processes()
    except SupervisorUnavailable as exc:
        logger.debug("Could not read supervisord's process states for the "
                     "Workers page: %s", exc)
        return {}
    # Worker rows store supervisord's full name, such as "worker:worker_00".
    current = {info.name: info.pid for info in infos}
    return {
        row["worker_id"]: current[row["process_name"]]
        for row in local
        if row["process_name"] in current and current[row["process_name"]] != row["pid"]
    }


@bp.route("/workers")
def workers() -> str:
    """List the Procrastinate workers, the jobs each runs now, and recent stops."""
    rows = db.fetch_all(query("fleet", "workers"), {"threshold": _threshold()})
    running = db.fetch_all(
        query("fleet", "running_jobs"),
        {"worker_ids": [row["worker_id"] for row in rows],
         "limit": RUNNING_JOBS_SHOWN},
    )
    by_worker: dict[int, list[dict[str, Any]]] = {}
    for job in running:
        by_worker.setdefault(job["worker_id"], []).append(job)
    stopped = db.fetch_all(
        query("fleet", "recently_stopped_workers"),
        {"seconds": STOPPED_WORKERS_WINDOW, "limit": STOPPED_WORKERS_SHOWN},
    )
    replaced = replaced_processes(rows)
    for row in rows:
        row["replaced_by"] = replaced.get(row["worker_id"])
    live = [row for row in rows if not row["stale"] and row["role"] != "scheduler"
            and row["replaced_by"] is None]
    return render_template(
        "fleet_workers.html",
        workers=rows,
        jobs_by_worker=by_worker,
        running_total=len(running),
        running_truncated=len(running) >= RUNNING_JOBS_SHOWN,
        stopped=stopped,
        live_count=len(live),
        stale_count=sum(1 for row in rows if row["stale"]),
        exited_count=len(replaced),
        expected=dashboard.settings().worker_processes,
        threshold=_threshold(),
    )


def _render_stalled(message: str | None = None, status: int = 200) -> Any:
    rows = db.fetch_all(
        query("fleet", "stalled_jobs"),
        {"threshold": _threshold(), "limit": STALLED_JOBS_SHOWN},
    )
    user = current_user()
    return render_template(
        "fleet_stalled.html",
        jobs=rows,
        truncated=len(rows) >= STALLED_JOBS_SHOWN,
        threshold=_threshold(),
        check_interval=dashboard.settings().stalled_job_check_interval,
        may_act=bool(user and user.may("operator")),
        message=message,
    ), status


@bp.route("/stalled")
def stalled() -> Any:
    """List jobs held by workers that stopped heartbeating."""
    return _render_stalled()


def _selected_job_ids() -> list[int]:
    raw = request.form.getlist("job_id")
    if not raw:
        abort(400, description="select at least one job")
    if len(raw) > MAX_SELECTED_JOBS:
        abort(400, description=f"{len(raw)} jobs selected; the limit is "
                               f"{MAX_SELECTED_JOBS} per request")
    try:
        ids = sorted({int(value) for value in raw})
    except ValueError:
        abort(400, description="job_id must be a whole number")
    return ids


def act_on_stalled(action: str, job_ids: list[int]) -> tuple[list[int], list[str]]:
    """Retry or fail the jobs that are still stalled; return those and the skips.

    Each job is checked again under a row lock, so a job whose worker came back or
    that finished meanwhile is left alone and named in the skips.
    """
    _, statement, verb = STALLED_ACTIONS[action]
    threshold = _threshold()
    user = current_user()
    username = user.username if user else "anonymous"
    done: list[int] = []
    skipped: list[str] = []
    with db.connection() as conn:
        found = {
            row["id"]: row
            for row in conn.execute(query("fleet", "jobs_for_action"),
                                    {"job_ids": job_ids}).fetchall()
        }
        for job_id in job_ids:
            job = found.get(job_id)
            if job is None:
                skipped.append(f"job {job_id} does not exist")
                continue
            if job["status"] != "doing":
                skipped.append(f"job {job_id} is {job['status']}, no longer doing")
                continue
            worker = job["worker_id"] if job["worker_id"] is not None else "gone"
            changed = conn.execute(statement, {
                "job_id": job_id, "worker_id": job["worker_id"],
                "threshold": threshold,
            }).fetchall()
            if not changed:
                skipped.append(f"job {job_id} is no longer stalled: its worker "
                               f"{worker} sends heartbeats again")
                continue
            conn.execute(RECORD_LOST_ATTEMPT, {
                "job_id": job_id, "attempt": job["attempts"] + 1,
                "task_name": job["task_name"], "queue_name": job["queue_name"],
                "worker_id": job["worker_id"],
                "message": (f"{verb} by {username} from the panel: worker {worker} "
                            f"stopped heartbeating for over {threshold:g} s while "
                            "running this job; the task may have run partly"),
            })
            done.append(job_id)
    return done, skipped


@bp.route("/stalled/<action>", methods=["POST"])
@requires("operator")
def stalled_action(action: str) -> Any:
    """Retry or fail the selected stalled jobs, with one audit entry per request."""
    if action not in STALLED_ACTIONS:
        abort(404, description=f"no stalled-job action {action[:40]!r}; "
                               "expected retry or fail")
    audit_action, _, verb = STALLED_ACTIONS[action]
    job_ids = _selected_job_ids()
    done, skipped = act_on_stalled(action, job_ids)
    if done:
        result = f"ok: {verb} {len(done)} job(s)"
    else:
        result = "rejected: no selected job was still stalled"
    if skipped:
        result += "; skipped " + "; ".join(skipped)
    audit.record(audit_action, result, done or job_ids,
                 {"requested": job_ids, "skipped": skipped})
    if not done:
        return _render_stalled(
            "Nothing changed: " + "; ".join(skipped) + ".", status=409)
    flash(f"Jobs {', '.join(map(str, done))} {verb}.", "success")
    if skipped:
        flash("Skipped: " + "; ".join(skipped) + ".", "info")
    return redirect(url_for("fleet.stalled"), code=303)


@bp.route("/queues")
def queues() -> str:
    """Show each queue's jobs by status, oldest waiting job, throughput and charts."""
    names = dashboard.queue_names()
    counts = dashboard.job_counts(names)
    later = {
        row["queue_name"]: row["scheduled_later"]
        for row in db.fetch_all(query("fleet", "scheduled_later"),
                                {"queues": names, "cap": dashboard.COUNT_CAP})
    }
    throughput = {
        row["queue_name"]: row
        for row in db.fetch_all(query("fleet", "throughput_by_queue"),
                                {"seconds": THROUGHPUT_WINDOW})
    }
    workers = db.fetch_all(query("fleet", "workers"), {"threshold": _threshold()})
    # Live workers and their concurrency per queue; unrecorded workers have none.
    served = {name: {"workers": 0, "slots": 0} for name in names}
    for worker in workers:
        for queue in worker["queues"] or []:
            if not worker["stale"] and queue in served:
                served[queue]["workers"] += 1
                served[queue]["slots"] += worker["concurrency"] or 0
    return render_template(
        "fleet_queues.html",
        queues=names,
        statuses=dashboard.STATUSES,
        counts=counts,
        scheduled_later=later,
        oldest=dashboard.oldest_waiting(names),
        oldest_limit=dashboard.settings().oldest_todo_age_limit,
        throughput=throughput,
        served=served,
        cap=dashboard.COUNT_CAP,
        **charts.panel_context(request.args.get("range")),
    )


def _periodic_tasks() -> list[Any]:
    registry = db.procrastinate_app().periodic_registry
    return sorted(registry.periodic_tasks.values(),
                  key=lambda item: (item.task.name, item.periodic_id))


def _render_periodic(message: str | None = None, status: int = 200) -> Any:
    tasks = _periodic_tasks()
    defers = {
        (row["task_name"], row["periodic_id"]): row
        for row in db.fetch_all(query("fleet", "periodic_last_defers"))
    }
    latest = {
        name: db.fetch_one(query("fleet", "latest_job_of_task"), {"task": name})
        for name in {item.task.name for item in tasks}
    }
    now = time.time()
    rows = []
    for item in tasks:
        description = TASKS.get(item.task.name)
        rows.append({
            "task": item.task.name,
            "periodic_id": item.periodic_id,
            "cron": item.cron,
            "queue": item.task.queue,
            "queueing_lock": item.task.queueing_lock,
            "summary": description.summary if description else "",
            "next_run": croniter(item.cron, now).get_next(float),
            "last": defers.get((item.task.name, item.periodic_id)),
            "latest": latest.get(item.task.name),
        })
    user = current_user()
    return render_template(
        "fleet_periodic.html", tasks=rows, now=now, message=message,
        may_act=bool(user and user.may("operator")),
    ), status


@bp.route("/periodic")
def periodic() -> Any:
    """List periodic tasks with their schedule, next run and last run."""
    return _render_periodic()


def defer_periodic_now(item: Any) -> int:
    """Defer one run of a periodic task now, raising AlreadyEnqueued when it is busy.

    A job holding the task's queueing lock, waiting or running, blocks the run, so
    a second click never makes two copies run at once.
    """
    options = dict(item.configure_kwargs)
    arguments = dict(options.pop("task_kwargs", None) or {})
    arguments["timestamp"] = int(time.time())
    key = item.task.queueing_lock
    with db.connection() as conn:
        if key:
            conn.execute(query("fleet", "lock_queueing_key"), {"lock": key})
            busy = conn.execute(query("fleet", "queueing_lock_busy"),
                                {"lock": key}).fetchone()
            if busy is not None:
                raise procrastinate.exceptions.AlreadyEnqueued(
                    f"job {busy['id']} of {item.task.name}, with queueing lock "
                    f"{key}, is {busy['status']}; the task was not deferred again")
        return item.task.configure(connection=conn, **options).defer(**arguments)


@bp.route("/periodic/run", methods=["POST"])
@requires("operator")
def periodic_run() -> Any:
    """Defer a periodic task now, with the current time as its timestamp."""
    task_name = request.form.get("task", "")
    periodic_id = request.form.get("periodic_id", "")
    matches = [item for item in _periodic_tasks()
               if item.task.name == task_name and item.periodic_id == periodic_id]
    if not matches:
        abort(404, description=f"no periodic task {task_name[:80]!r} with periodic "
                               f"id {periodic_id[:80]!r}")
    details = {"task": task_name, "periodic_id": periodic_id}
    try:
        job_id = defer_periodic_now(matches[0])
    except procrastinate.exceptions.AlreadyEnqueued as exc:
        audit.record("periodic_task_run", f"rejected: {exc}", (), details)
        return _render_periodic(f"{task_name} was not run: {exc}.", status=409)
    audit.record("periodic_task_run", "ok", [job_id], details)
    flash(f"{task_name} deferred now as job {job_id}.", "success")
    return redirect(url_for("fleet.periodic"), code=303)


bp.add_url_rule("/processes", "processes", processes.index)
bp.add_url_rule("/processes/action", "process_action", processes.action,
                methods=["POST"])
