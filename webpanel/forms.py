"""Defer forms, built from each task's description in workers/tasks/catalog.py.

One field per Argument ("choice" is a select, "string" a text input with the
argument's maxlength, "json" a textarea), then the job options: queue, priority,
schedule time with its time zone, lock and queueing lock. The forms render and
carry the operator's input; the checks are ``defer_service.validate_defer``, the
same the API runs. CSRFProtect checks every POST before the view, so the forms
carry no token field of their own.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from typing import Any

from flask_wtf import FlaskForm
from wtforms import Field, SelectField, StringField, TextAreaField
from wtforms.fields import SelectChoice

from webpanel.defer_service import (
    LOCK_MAX_LENGTH,
    PRIORITY_MAX,
    PRIORITY_MIN,
    is_time_zone,
    parse_local_time,
    parse_priority,
    time_zones,
)
from workers.tasks.catalog import Argument, TaskDescription

logger = logging.getLogger(__name__)

OPTION_FIELDS = ("queue", "priority", "schedule_at", "timezone", "lock",
                 "queueing_lock")
JSON_TEXT_MAX_CHARS = 1_048_576  # characters; larger text is rejected unparsed


class DeferOptions(FlaskForm):
    """The job options every defer form has."""

    class Meta:
        csrf = False

    queue = SelectField("Queue", choices=[])
    priority = StringField(
        "Priority", default="0",
        render_kw={"type": "number", "min": PRIORITY_MIN, "max": PRIORITY_MAX,
                   "step": 1},
        description=f"Whole number from {PRIORITY_MIN} to {PRIORITY_MAX}; higher "
                    "runs first.",
    )
    schedule_at = StringField(
        "Run at", render_kw={"type": "datetime-local", "step": 1},
        description="Leave empty to run as soon as a worker is free. At most 5 "
                    "minutes ago and at most 365 days ahead.",
    )
    timezone = SelectField("Time zone of 'Run at'", default="UTC")
    lock = StringField(
        "Lock", render_kw={"maxlength": LOCK_MAX_LENGTH},
        description="Jobs with the same lock never run at the same time.",
    )
    queueing_lock = StringField(
        "Queueing lock", render_kw={"maxlength": LOCK_MAX_LENGTH},
        description="Rejects this job while another job with the same key is "
                    "queued or running; also used as the lock when Lock is empty.",
    )


def _argument_field(argument: Argument) -> Field:
    description = argument.help
    if argument.pattern_help:
        description = f"{description} Allowed: {argument.pattern_help}.".strip()
    if argument.kind == "choice":
        choices = [SelectChoice(value=choice) for choice in argument.choices]
        if not argument.required:
            choices.insert(0, SelectChoice(value="", label="(none)"))
        return SelectField(argument.label, choices=choices, default=argument.default,
                           description=description)
    if argument.kind == "json":
        return TextAreaField(argument.label, description=description,
                             render_kw={"spellcheck": "false"})
    render_kw: dict[str, Any] = {"maxlength": argument.max_length}
    if argument.required:
        render_kw["required"] = True
    return StringField(argument.label, default=argument.default,
                       description=description, render_kw=render_kw)


@functools.cache
def time_zone_choices() -> tuple[SelectChoice, ...]:
    """Return the options of the time zone field, built once per process.

    Every form shares these objects, which WTForms only reads.
    """
    return tuple(SelectChoice(value=name) for name in time_zones())


@functools.cache
def _form_class(description: TaskDescription) -> type[DeferOptions]:
    # One class per task, built on first use like a module-level form class.
    attributes: dict[str, Any] = {}
    for argument in description.arguments:
        if argument.name in OPTION_FIELDS:
            raise ValueError(f"argument {argument.name!r} of {description.name} "
                             "clashes with a job option field; rename it")
        attributes[argument.name] = _argument_field(argument)
    return type(f"Defer_{description.name}", (DeferOptions,), attributes)


def defer_form(description: TaskDescription, queues: list[str],
               formdata: Any = None) -> DeferOptions:
    """Build the defer form of a task, bound to ``formdata`` when given."""
    form = _form_class(description)(formdata=formdata)
    form.queue.choices = [SelectChoice(value=queue) for queue in queues]
    if formdata is None:
        form.queue.data = description.queue
    form.timezone.choices = time_zone_choices()
    form.arguments_fields = [form[argument.name]
                             for argument in description.arguments]
    return form


@dataclasses.dataclass
class ParsedDefer:
    """A defer form's input as values, with the problems found while parsing."""

    arguments: dict[str, Any]
    options: dict[str, Any]
    field_errors: dict[str, str]


def _parse_json(text: str) -> Any:
    def reject_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON; use finite numbers")

    return json.loads(text, parse_constant=reject_constant)


def parse_form(description: TaskDescription, form: DeferOptions) -> ParsedDefer:
    """Read a submitted defer form into arguments and options for validate_defer."""
    errors: dict[str, str] = {}
    arguments: dict[str, Any] = {}
    for argument in description.arguments:
        raw = form[argument.name].data
        if raw is None or (isinstance(raw, str) and raw.strip() == ""):
            continue
        if argument.kind == "json":
            if len(raw) > JSON_TEXT_MAX_CHARS:
                errors[argument.name] = (f"is {len(raw)} characters long; the limit "
                                         f"is {JSON_TEXT_MAX_CHARS}")
                continue
            try:
                value = _parse_json(raw)
            except RecursionError:
                errors[argument.name] = "is nested too deeply"
                continue
            except ValueError as exc:
                errors[argument.name] = f"is not valid JSON: {exc}"
                continue
            if value is not None:
                arguments[argument.name] = value
        else:
            arguments[argument.name] = raw
    options: dict[str, Any] = {
        "queue": form.queue.data or None,
        "lock": form.lock.data,
        "queueing_lock": form.queueing_lock.data,
        "priority": 0,
        "schedule_at": None,
    }
    try:
        options["priority"] = parse_priority(form.priority.data)
    except ValueError as exc:
        errors["priority"] = str(exc)
    schedule_text = (form.schedule_at.data or "").strip()
    zone = form.timezone.data or "UTC"
    if not is_time_zone(zone):
        errors["timezone"] = f"unknown time zone {zone[:60]!r}; pick one from the list"
    elif schedule_text:
        try:
            options["schedule_at"] = parse_local_time(schedule_text, zone)
        except ValueError as exc:
            errors["schedule_at"] = str(exc)
    return ParsedDefer(arguments=arguments, options=options, field_errors=errors)
