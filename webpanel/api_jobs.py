"""API routes for jobs: the filtered list, one job, actions and bulk actions.

The list takes the filters and keyset cursors of the /jobs page. A bulk action
takes two calls: the first, without ``confirm_count``, returns the exact count and
a snapshot id; the second sends both back and runs only when the count is the
same, else it gets a 409 with the new count and changes nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any
from urllib.parse import urlencode

from flask import request, url_for
from werkzeug.datastructures import MultiDict
from werkzeug.wrappers import Response

from webpanel import job_service
from webpanel.api import (
    ApiError,
    bp,
    json_response,
    json_type,
    read_json_object,
    shown_name,
)
from webpanel.auth import requires
from webpanel.job_bulk import MAX_SELECTED
from webpanel.job_filters import FILTER_FIELDS, MAX_JOB_ID

logger = logging.getLogger(__name__)

POSITION_FIELDS = ("before", "after", "limit")
LIST_PARAMETERS = FILTER_FIELDS + POSITION_FIELDS
BULK_FIELDS = ("action", "job_ids", "filter", "snapshot_id", "confirm_count")
ACTION_STATUS = {"done": 200, "not_found": 404, "wrong_state": 409,
                 "queueing_lock": 409}


def _filter_error(exc: job_service.FilterError, prefix: str = "") -> ApiError:
    errors = {f"{prefix}{name}": message
              for name, message in exc.field_errors.items()}
    return ApiError(400, "the filters are invalid; fix the fields in "
                         "field_errors", errors)


def parse_filters(args: Any, prefix: str = "") -> job_service.JobFilters:
    """Read job filters, raising ApiError naming each invalid field."""
    try:
        return job_service.parse_filters(args, job_service.redacted_keys())
    except job_service.FilterError as exc:
        raise _filter_error(exc, prefix) from None
    except OverflowError:
        # A time such as 0001-01-01T00:00+01:00 lies outside the datetime range
        # once converted to UTC.
        raise ApiError(400, "a created_from or created_before time is out of "
                            "range; use a year from 2 to 9998", {
                                f"{prefix}created_from": "may be out of range",
                                f"{prefix}created_before": "may be out of range",
                            }) from None


def _list_url(filters: job_service.JobFilters, limit: int, **cursor: int) -> str:
    pairs = filters.query_items() + [("limit", str(limit))]
    pairs += [(name, str(value)) for name, value in cursor.items()]
    return url_for("api.list_jobs") + "?" + urlencode(pairs)


@bp.route("/jobs", methods=["GET"])
def list_jobs() -> Response:
    """List jobs newest first, with the /jobs filters, a count and cursors."""
    unknown = [name for name in request.args if name not in LIST_PARAMETERS]
    if unknown:
        raise ApiError(400, "unknown query parameters; the list accepts "
                            f"{', '.join(LIST_PARAMETERS)}",
                       {shown_name(name): "is not a parameter of the job list"
                        for name in unknown[:20]})
    filters = parse_filters(request.args)
    try:
        position = job_service.parse_position(request.args)
    except job_service.FilterError as exc:
        raise _filter_error(exc) from None
    page = job_service.list_jobs(filters, position)
    count = job_service.count_jobs(filters)
    data = page.to_dict()
    next_cursor = prev_cursor = None
    if data["older"] is not None:
        before = data["older"]["before"]
        next_cursor = {"before": before,
                       "url": _list_url(filters, position.limit, before=before)}
    if data["newer"] is not None:
        after = data["newer"]["after"]
        prev_cursor = {"after": after,
                       "url": _list_url(filters, position.limit, after=after)}
    return json_response({
        "jobs": data["jobs"],
        "count": {"value": count.value, "capped": count.capped,
                  "estimate": count.estimate, "label": count.label},
        "limit": position.limit,
        "next": next_cursor,
        "prev": prev_cursor,
        "filters": dict(_grouped(filters.query_items())),
    })


def _grouped(items: list[tuple[str, str]]) -> dict[str, list[str] | str]:
    grouped: dict[str, list[str] | str] = {}
    for name, value in items:
        if name == "status":
            statuses = grouped.setdefault("status", [])
            assert isinstance(statuses, list)
            statuses.append(value)
        else:
            grouped[name] = value
    return grouped


@bp.route("/jobs/<int:job_id>", methods=["GET"])
def get_job(job_id: int) -> Response:
    """Return one job: fields, redacted arguments and result, timeline, actions."""
    detail = job_service.get_job(job_id)
    if detail is None:
        raise ApiError(404, f"job {job_id} does not exist; it may have been "
                            "deleted")
    return json_response(detail.to_dict())


def _outcome_body(outcome: job_service.ActionOutcome) -> dict[str, Any]:
    return {
        "job_id": outcome.job_id, "action": outcome.action, "done": outcome.done,
        "reason": outcome.reason, "message": outcome.message,
        "status_before": outcome.status_before,
        "status_after": outcome.status_after,
        "conflicting_job_id": outcome.conflicting_job_id,
    }


@bp.route("/jobs/<int:job_id>/<action>", methods=["POST"])
@requires("operator")
def job_action(job_id: int, action: str) -> Response:
    """Retry, cancel, abort, run now or delete one job; audited either way."""
    if action not in job_service.ACTIONS:
        raise ApiError(404, f"unknown job action {action[:40]!r}; expected one of "
                            f"{', '.join(job_service.ACTIONS)}")
    outcome = job_service.apply_action(action, job_id)
    body = _outcome_body(outcome)
    if outcome.done:
        return json_response(body)
    raise ApiError(ACTION_STATUS[outcome.reason], outcome.message, **{
        key: value for key, value in body.items() if key != "message"})


def _job_ids(raw: Any, errors: dict[str, str]) -> tuple[int, ...]:
    if not isinstance(raw, list):
        errors["job_ids"] = f"must be an array of job ids, not a {json_type(raw)}"
        return ()
    if not raw:
        errors["job_ids"] = "is empty; name at least one job id, or send a filter"
        return ()
    if len(raw) > MAX_SELECTED:
        errors["job_ids"] = (f"names {len(raw)} jobs; the limit is {MAX_SELECTED}; "
                             "send a filter instead")
        return ()
    ids: list[int] = []
    for index, value in enumerate(raw):
        if isinstance(value, bool) or not isinstance(value, int) \
                or not 0 < value <= MAX_JOB_ID:
            errors[f"job_ids[{index}]"] = (f"{str(value)[:40]!r} is not a job id; "
                                           "send a positive whole number")
        elif value not in ids:
            ids.append(value)
    return tuple(ids)


def _filter_args(raw: Any, errors: dict[str, str]) -> MultiDict[str, str] | None:
    if not isinstance(raw, dict):
        errors["filter"] = (f"must be an object of filters, not a "
                            f"{json_type(raw)}")
        return None
    args: MultiDict[str, str] = MultiDict()
    for name, value in raw.items():
        if name not in FILTER_FIELDS:
            errors[f"filter.{shown_name(name)}"] = (
                f"is not a filter; expected {', '.join(FILTER_FIELDS)}")
            continue
        values = value if name == "status" and isinstance(value, list) else [value]
        for item in values:
            if not isinstance(item, str):
                errors[f"filter.{name}"] = (f"must be a string, not a "
                                            f"{json_type(item)}")
                break
            args.add(name, item)
    return args


def _positive_int(body: dict[str, Any], name: str, errors: dict[str, str],
                  minimum: int = 1) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) \
            or not minimum <= value <= MAX_JOB_ID:
        errors[name] = (f"{str(value)[:40]!r} is invalid; send a whole number from "
                        f"{minimum} to {MAX_JOB_ID}")
        return None
    return value


def read_bulk_request(body: dict[str, Any]) -> tuple[
        str, job_service.Selection, int | None]:
    """Read a bulk request: the action, the selection and the confirmed count."""
    errors: dict[str, str] = {}
    for name in body:
        if name not in BULK_FIELDS:
            errors[shown_name(name)] = (f"is not a field of a bulk request; expected "
                                        f"{', '.join(BULK_FIELDS)}")
    action = body.get("action")
    if not isinstance(action, str) or action not in job_service.ACTIONS:
        errors["action"] = (f"{str(action)[:40]!r} is not an action; expected one "
                            f"of {', '.join(job_service.ACTIONS)}")
    has_ids, has_filter = "job_ids" in body, "filter" in body
    if has_ids == has_filter:
        errors["job_ids"] = "send either job_ids or filter, exactly one of them"
    snapshot = _positive_int(body, "snapshot_id", errors, minimum=0)
    confirm_count = _positive_int(body, "confirm_count", errors, minimum=0)
    if confirm_count is not None and snapshot is None and "snapshot_id" not in errors:
        errors["snapshot_id"] = ("is required with confirm_count; send the "
                                 "snapshot_id of the counting call")
    selection: job_service.Selection | None = None
    if has_ids and not has_filter:
        ids = _job_ids(body["job_ids"], errors)
        selection = job_service.Selection(scope="selected", job_ids=ids,
                                          at_most=snapshot)
    elif has_filter and not has_ids:
        args = _filter_args(body["filter"], errors)
        if args is not None and not any(key.startswith("filter") for key in errors):
            try:
                filters = parse_filters(args, prefix="filter.")
            except ApiError as exc:
                errors.update(exc.field_errors)
            else:
                selection = job_service.Selection(scope="filter", filters=filters,
                                                  at_most=snapshot)
    if errors or selection is None:
        raise ApiError(400, "the bulk request is invalid; nothing was changed",
                       errors)
    assert isinstance(action, str)
    return action, selection, confirm_count


def _count_body(action: str, selection: job_service.Selection,
                counted: job_service.SelectionCount) -> dict[str, Any]:
    return {"action": action, "snapshot_id": selection.at_most,
            "count": counted.applicable, "matched": counted.matched,
            "by_status": counted.by_status}


@bp.route("/jobs/bulk", methods=["POST"])
@requires("operator")
def bulk_action() -> Response:
    """Count a bulk action, or run it once the caller confirms the exact count."""
    action, selection, confirm_count = read_bulk_request(read_json_object())
    if selection.at_most is None:
        selection = dataclasses.replace(selection, at_most=job_service.snapshot_id())
    try:
        counted = job_service.count_selection(action, selection)
    except job_service.CountTooSlow as exc:
        raise ApiError(422, f"nothing was changed: {exc}") from None
    if confirm_count is None:
        return json_response({**_count_body(action, selection, counted),
                              "performed": False})
    if confirm_count != counted.applicable:
        logger.info("API bulk %s not run: %s jobs confirmed, %s now", action,
                    confirm_count, counted.applicable,
                    extra={"action": "bulk_count_changed"})
        raise ApiError(
            409,
            f"the jobs changed: {action} now applies to {counted.applicable} of "
            f"{counted.matched} jobs, not {confirm_count}; nothing was changed; "
            "check the new count and confirm it",
            **_count_body(action, selection, counted), performed=False)
    report = job_service.run_bulk(action, selection)
    resume = None
    if not report.complete:
        resume = {"snapshot_id": report.resume_at_most}
    return json_response({
        **_count_body(action, selection, counted),
        "performed": True,
        "complete": report.complete,
        "done": report.done,
        "wrong_state": report.wrong_state,
        "missing": report.missing,
        "conflicts": [{"job_id": item.job_id, "held_by": item.conflicting_job_id}
                      for item in report.conflicts],
        "resume": resume,
        "summary": report.summary(),
    })
