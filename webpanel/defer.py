"""Defer forms: the list of user-facing tasks and one form per task.

A rejected form returns 400 with a message on each field and every value the
operator typed; nothing is deferred. An expired form (its CSRF token timed out) is
shown again the same way with ``EXPIRED_FORM_MESSAGE``. A defer that passes goes
straight to the database, with no upstream call, and redirects to the job page.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import abort, current_app, g, redirect, render_template, request, url_for

from webpanel import job_service
from webpanel.auth import current_user, requires
from webpanel.errors import EXPIRED_FORM_MESSAGE, keeps_input_when_expired
from webpanel.forms import defer_form, parse_form
from webpanel.jobs import bp
from workers.app import retry_strategy
from workers.tasks.catalog import TaskDescription, user_facing_tasks

logger = logging.getLogger(__name__)


def _description_or_404(task: str) -> TaskDescription:
    try:
        return job_service.deferrable_task(task)
    except job_service.UnknownTask:
        known = ", ".join(item.name for item in user_facing_tasks())
        abort(404, description=f"no task named {task[:80]!r} can be deferred; "
                               f"the tasks are {known}")


@bp.route("/defer")
def defer_index() -> str:
    """List the tasks an operator may defer, with their queue and retry policy."""
    settings = current_app.config["FLEET_SETTINGS"]
    tasks = [(description, retry_strategy(settings, description))
             for description in user_facing_tasks()]
    user = current_user()
    return render_template("defer_index.html", tasks=tasks,
                           may_defer=bool(user and user.may("operator")))


def _render(description: TaskDescription, form: Any, errors: dict[str, str],
            message: str | None, status: int) -> Any:
    general = {name: text for name, text in errors.items()
               if name not in form._fields}
    return render_template(
        "defer_form.html", description=description, form=form, errors=errors,
        general_errors=general, message=message,
    ), status


@bp.route("/defer/<task>", methods=["GET", "POST"])
@requires("operator")
@keeps_input_when_expired
def defer_task(task: str) -> Any:
    """Show a task's defer form and defer a job from it."""
    description = _description_or_404(task)
    settings = current_app.config["FLEET_SETTINGS"]
    queues = job_service.queue_choices(description, settings)
    if request.method == "GET":
        return _render(description, defer_form(description, queues), {}, None, 200)
    form = defer_form(description, queues, formdata=request.form)
    if g.get("csrf_expired"):
        logger.info("Defer form for %s expired; shown again", task,
                    extra={"action": "defer_form_expired"})
        return _render(description, form, {}, EXPIRED_FORM_MESSAGE, 400)
    parsed = parse_form(description, form)
    try:
        checked = job_service.validate_defer(
            task, parsed.arguments, field_errors=parsed.field_errors,
            **parsed.options)
        job_id = job_service.defer(checked)
    except job_service.DeferRejected as exc:
        logger.info("Defer of %s rejected: %s", task, exc,
                    extra={"action": "defer_rejected", "task": task,
                           "fields": sorted(exc.field_errors)})
        return _render(description, form, exc.field_errors,
                       "The job was not deferred; fix the fields below.", 400)
    return redirect(url_for("jobs.job_page", job_id=job_id), code=303)
