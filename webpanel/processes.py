"""supervisord's processes: their states, and start, stop and restart for admins.

Every action is a POST with a CSRF token that first returns a confirmation page,
and is carried out only when that page is submitted. The state that results
is read back from supervisord and reported. An action that has not finished within
60 % of WEB_REQUEST_BUDGET is reported as still going, never as done.

Two targets are special. Stopping the process that serves the panel (``web`` under
supervisord) or the project-local ``postgres`` would cut the panel off, so those
stops are rejected. Restarting the panel's own process sends it TERM instead: it
finishes the requests in progress and exits, and supervisord starts it again
because conf/supervisord.conf gives it ``autorestart=true``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any

from flask import (
    Flask,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    url_for,
)
from psycopg.types.json import Jsonb

from webpanel import audit, db
from webpanel.auth import current_user, requires
from webpanel.queries import query
from workers.settings import Settings
from workers.supervision import (
    ACTIONS,
    DEFAULT_TIMEOUT,
    ProcessActionFailed,
    ProcessActionPending,
    ProcessInfo,
    SupervisorClient,
    SupervisorUnavailable,
)

logger = logging.getLogger(__name__)

AUDIT_ACTIONS = {
    "start": "process_started",
    "stop": "process_stopped",
    "restart": "process_restarted",
}
# A process name as supervisorctl prints it, or a group pattern such as worker:*.
TARGET_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,100}(:([A-Za-z0-9_.-]{1,100}|\*))?")
RESTART_FINISH_LIMIT = 900.0  # seconds a restart finished in the background may take
LOCAL_DATABASE_PROCESS = "postgres"

_background: list[threading.Thread] = []
_background_lock = threading.Lock()


def _settings() -> Settings:
    return current_app.config["FLEET_SETTINGS"]


def timings(settings: Settings) -> tuple[float, float]:
    """Return the timeout of one XML-RPC call and the wait of an action, in seconds.

    An action polls for 60 % of WEB_REQUEST_BUDGET, enough for a worker's 3 s
    startsecs with the default budget of 10 s, and each call may take 15 % (at most
    DEFAULT_TIMEOUT). Even with two slow calls under way at the deadline the
    request then ends within 90 % of the budget.
    """
    budget = settings.web_request_budget
    return min(DEFAULT_TIMEOUT, budget * 0.15), budget * 0.6


def client() -> SupervisorClient:
    """Return a client for the configured socket with the panel's timeout."""
    settings = _settings()
    rpc_timeout, _ = timings(settings)
    return SupervisorClient(settings.supervisor_socket, timeout=rpc_timeout)


def own_process_name() -> str | None:
    """Return supervisord's name for the process serving the panel, if it has one."""
    name = os.environ.get("SUPERVISOR_PROCESS_NAME")
    group = os.environ.get("SUPERVISOR_GROUP_NAME")
    if not name:
        return None
    return name if not group or group == name else f"{group}:{name}"


def _worker_ids() -> dict[str, int]:
    """Return the live Procrastinate worker id of each supervisord process name."""
    rows = db.fetch_all(query("fleet", "workers"),
                        {"threshold": _settings().stalled_job_threshold})
    return {row["process_name"]: row["worker_id"]
            for row in rows if row["process_name"] and not row["stale"]}


def _groups(infos: list[ProcessInfo]) -> list[dict[str, Any]]:
    groups: dict[str, list[ProcessInfo]] = {}
    for info in infos:
        if ":" in info.name:
            groups.setdefault(info.group, []).append(info)
    result = []
    for group, members in sorted(groups.items()):
        states: dict[str, int] = {}
        for info in members:
            states[info.state] = states.get(info.state, 0) + 1
        result.append({"target": f"{group}:*", "size": len(members),
                       "states": sorted(states.items())})
    return result


def _render(message: str | None = None, category: str = "error",
            status: int = 200, unreachable: str | None = None) -> Any:
    """Render the process list; ``unreachable`` skips asking supervisord again."""
    infos: list[ProcessInfo] = []
    error = unreachable
    if error is None:
        try:
            infos = client().processes()
        except SupervisorUnavailable as exc:
            error = str(exc)
    user = current_user()
    return render_template(
        "processes.html",
        processes=sorted(infos, key=lambda info: info.name),
        groups=_groups(infos),
        worker_ids=_worker_ids() if infos else {},
        error=error,
        message=message,
        category=category,
        may_act=bool(user and user.may("admin")),
        actions=ACTIONS,
        own_name=own_process_name(),
        socket=str(_settings().supervisor_socket),
    ), status


def index() -> Any:
    """List supervisord's processes with state, pid, uptime and exit status."""
    return _render()


def _form_target() -> tuple[str, str]:
    action = request.form.get("action", "")
    target = request.form.get("target", "").strip()
    if action not in ACTIONS:
        abort(400, description=f"unknown action {action[:40]!r}; expected one of "
                               f"{', '.join(ACTIONS)}")
    if not TARGET_PATTERN.fullmatch(target):
        abort(400, description=f"{target[:120]!r} is not a process name such as "
                               "worker:worker_00, web, or a group such as worker:*")
    return action, target


def _protection(action: str, names: list[str]) -> str | None:
    """Return why the panel rejects this action on these processes, or None."""
    own = own_process_name()
    if own in names and action == "stop":
        return (f"{own} serves this panel, so stopping it from here would leave no "
                f"way to start it again; use `supervisorctl stop {own}`")
    if own in names and action == "restart" and len(names) > 1:
        return (f"this group includes {own}, which serves this panel; restart {own} "
                "on its own, then the other processes")
    if action == "stop" and _settings().local_database \
            and LOCAL_DATABASE_PROCESS in names:
        return ("postgres runs the database of this panel, so the panel cannot stop "
                "it; use `supervisorctl stop postgres`")
    return None


def _running_jobs(names: list[str]) -> int:
    targets = set(names)
    ids = [worker_id for name, worker_id in _worker_ids().items() if name in targets]
    if not ids:
        return 0
    rows = db.fetch_all(query("fleet", "running_jobs"),
                        {"worker_ids": ids, "limit": 100000})
    return len(rows)


def _states_text(infos: list[ProcessInfo], before: dict[str, ProcessInfo]) -> str:
    parts = []
    for info in infos:
        text = f"{info.name} {info.state}"
        if info.pid:
            text += f", pid {info.pid}"
        old = before.get(info.name)
        if old is not None and old.pid and old.pid != info.pid:
            text += f" (was {old.pid})"
        elif old is not None and old.state == info.state and old.pid == info.pid:
            text += " (unchanged)"
        parts.append(text)
    return "; ".join(parts)


def _finish_restart(app: Flask, supervisor: SupervisorClient,
                    pending: ProcessActionPending, target: str,
                    username: str) -> None:
    """Start the processes of a restart once they stopped, then audit the outcome."""
    try:
        infos = supervisor.finish_restart(pending.names, pending.before,
                                          RESTART_FINISH_LIMIT)
        result = "ok: " + _states_text(infos, pending.before)
        logger.info("Restart of %s finished: %s", target, result,
                    extra={"action": "process_restarted", "target": target})
    except (ProcessActionFailed, SupervisorUnavailable) as exc:
        result = f"failed: {exc}"
        logger.error("Restart of %s failed: %s", target, exc,
                     extra={"action": "process_restart_failed", "target": target})
    with app.app_context():
        try:
            db.execute(query("audit", "insert_entry"), {
                "username": username, "action": "process_restarted",
                "job_ids": [], "result": result[:2000],
                "details": Jsonb({"target": target, "finished_in_background": True}),
            })
        except Exception as exc:  # noqa: BLE001 - the thread has no one to tell
            logger.warning("Could not audit the restart of %s: %s", target, exc,
                           extra={"action": "audit_failed", "target": target})


def _start_background(pending: ProcessActionPending, supervisor: SupervisorClient,
                      target: str) -> None:
    # NOTE: the thread lives in this gunicorn worker. If the worker exits before
    # the processes have stopped, they stay STOPPED, as the processes page shows.
    user = current_user()
    thread = threading.Thread(
        target=_finish_restart,
        args=(current_app._get_current_object(),  # type: ignore[attr-defined]
              SupervisorClient(supervisor.socket_path, supervisor.timeout),
              pending, target, user.username if user else "anonymous"),
        name=f"restart {target}",
        daemon=True,
    )
    with _background_lock:
        _background[:] = [item for item in _background if item.is_alive()]
        _background.append(thread)
    thread.start()


def wait_for_background(timeout: float) -> bool:
    """Wait for the restarts finishing in the background; tell whether all ended."""
    with _background_lock:
        threads = list(_background)
    for thread in threads:
        thread.join(timeout)
    return not any(thread.is_alive() for thread in threads)


@requires("admin")
def action() -> Any:
    """Start, stop or restart a process or group after a confirmation, and audit it."""
    action_name, target = _form_target()
    confirmed = request.form.get("confirmed") == "yes"
    supervisor = client()
    try:
        names = supervisor.resolve(target)
    except (ProcessActionFailed, SupervisorUnavailable) as exc:
        if confirmed:
            audit.record(AUDIT_ACTIONS[action_name], f"failed: {exc}", (),
                         {"target": target})
        if isinstance(exc, SupervisorUnavailable):
            return _render(str(exc), status=503, unreachable=str(exc))
        return _render(str(exc), status=404)
    rejected = _protection(action_name, names)
    if rejected:
        audit.record(AUDIT_ACTIONS[action_name], f"rejected: {rejected}", (),
                     {"target": target})
        return _render(f"Not done: {rejected}.", status=409)

    if not confirmed:
        return render_template(
            "processes_confirm.html", action=action_name, target=target,
            names=names, running_jobs=_running_jobs(names),
            own_name=own_process_name(), settings=_settings(),
        )
    if action_name == "restart" and names == [own_process_name()]:
        return _restart_self(supervisor, target)
    return _act(supervisor, action_name, target)


def _restart_self(supervisor: SupervisorClient, target: str) -> Any:
    try:
        supervisor.signal(target, "TERM")
    except (ProcessActionFailed, SupervisorUnavailable) as exc:
        audit.record("process_restarted", f"failed: {exc}", (), {"target": target})
        unreachable = isinstance(exc, SupervisorUnavailable)
        return _render(f"Restart of {target} failed: {exc}",
                       status=503 if unreachable else 409,
                       unreachable=str(exc) if unreachable else None)
    result = (f"requested: {target} was sent TERM; it finishes the requests in "
              "progress, exits, and supervisord starts it again")
    audit.record("process_restarted", result, (), {"target": target})
    flash(f"{target} is restarting: it finishes the requests in progress and "
          "supervisord starts it again. This is not confirmed yet; reload in a few "
          "seconds and check its new pid.", "info")
    return redirect(url_for("fleet.processes"), code=303)


def _act(supervisor: SupervisorClient, action_name: str, target: str) -> Any:
    _, wait = timings(_settings())
    audit_action = AUDIT_ACTIONS[action_name]
    details: dict[str, Any] = {"target": target}
    try:
        before = {info.name: info for info in supervisor.processes()}
        infos = supervisor.act(action_name, target, wait=wait)
    except ProcessActionPending as exc:
        text = str(exc)
        if exc.phase == "stopping" and action_name == "restart":
            _start_background(exc, supervisor, target)
            text += ("; the panel starts the processes again once they have "
                     "stopped")
        audit.record(audit_action, f"pending: {text}", (), details)
        flash(f"Not finished yet: {text}.", "info")
        return redirect(url_for("fleet.processes"), code=303)
    except ProcessActionFailed as exc:
        audit.record(audit_action, f"failed: {exc}", (), details)
        status = 404 if str(exc).startswith("no such process") else 409
        return _render(f"{action_name.capitalize()} failed: {exc}", status=status)
    except SupervisorUnavailable as exc:
        audit.record(audit_action, f"failed: {exc}", (), details)
        return _render(f"{action_name.capitalize()} failed: {exc}", status=503,
                       unreachable=str(exc))
    result = _states_text(infos, before)
    audit.record(audit_action, f"ok: {result}", (), details)
    flash(f"{action_name.capitalize()} of {target} done: {result}.", "success")
    return redirect(url_for("fleet.processes"), code=303)
