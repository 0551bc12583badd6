"""Job actions: one job from its page, many from the list after a confirmation.

A bulk action is a GET confirmation page (nothing changes) showing the exact count,
then a POST that recounts. When the count changed since the operator looked, the
page shows the new count and asks again. Otherwise the jobs are changed in batches
and the operator is sent back to the list they came from, with its filters and
position.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any
from urllib.parse import urlsplit

from flask import abort, flash, redirect, render_template, request, url_for

from webpanel import job_service
from webpanel.auth import requires
from webpanel.job_filters import MAX_JOB_ID, QueryArgs, parse_job_id
from webpanel.job_bulk import MAX_SELECTED, CountTooSlow, Selection
from webpanel.job_operations import ACTION_LABELS, ACTIONS, PAST_TENSE
from webpanel.jobs import bp

logger = logging.getLogger(__name__)

SCOPES = ("selected", "filter")


def safe_return(target: str | None, fallback: str) -> str:
    """Return ``target`` when it is a path on this site, else ``fallback``."""
    if not target:
        return fallback
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") \
            or target.startswith("//") or "\\" in target:
        return fallback
    return target


@bp.route("/jobs/<int:job_id>/<action>", methods=["POST"])
@requires("operator")
def job_action(job_id: int, action: str) -> Any:
    """Retry, cancel, abort, run now or delete one job, then go back."""
    if action not in ACTIONS:
        abort(404, description=f"unknown job action {action[:40]!r}; expected one of "
                               f"{', '.join(ACTIONS)}")
    outcome = job_service.apply_action(action, job_id)
    flash(outcome.message[0].upper() + outcome.message[1:],
          "success" if outcome.done else "error")
    if outcome.done and action == "delete":
        fallback = url_for("jobs.list_jobs")
    else:
        fallback = url_for("jobs.job_page", job_id=job_id)
    target = safe_return(request.form.get("next"), fallback)
    if outcome.done and action == "delete" and target.startswith(
            url_for("jobs.job_page", job_id=job_id)):
        target = url_for("jobs.list_jobs")
    return redirect(target, code=303)


class BulkInputError(ValueError):
    """A bulk request names no jobs, an unknown action or invalid filters."""


def _read_selection(source: QueryArgs) -> tuple[str, Selection]:
    action = (source.get("action") or "").strip()
    if action not in ACTIONS:
        raise BulkInputError(f"pick an action ({', '.join(ACTIONS)}) before applying "
                             "it")
    scope = (source.get("scope") or "").strip()
    if scope not in SCOPES:
        raise BulkInputError(f"unknown scope {scope[:20]!r}; expected selected or "
                             "filter")
    errors: dict[str, str] = {}
    at_most = parse_job_id(source.get("at_most"), "at_most", errors)
    if scope == "selected":
        ids: list[int] = []
        for raw in source.getlist("job_id"):
            job_id = parse_job_id(raw, "job_id", errors)
            if job_id is not None and job_id not in ids:
                ids.append(job_id)
        if errors:
            raise BulkInputError("; ".join(errors.values()))
        if not ids:
            raise BulkInputError("select at least one job, or apply the action to "
                                 "all jobs matching the filter")
        if len(ids) > MAX_SELECTED:
            raise BulkInputError(f"{len(ids)} jobs are selected; the limit is "
                                 f"{MAX_SELECTED}; use the filter instead")
        return action, Selection(scope=scope, job_ids=tuple(ids), at_most=at_most)
    try:
        filters = job_service.parse_filters(source, job_service.redacted_keys())
    except job_service.FilterError as exc:
        raise BulkInputError(f"the filters are invalid: {exc}") from None
    if errors:
        raise BulkInputError("; ".join(errors.values()))
    return action, Selection(scope=scope, filters=filters, at_most=at_most)


def _confirm_page(action: str, selection: Selection, return_to: str,
                  counted: job_service.SelectionCount, changed: str | None,
                  status: int) -> Any:
    return render_template(
        "jobs_bulk_confirm.html", action=action, label=ACTION_LABELS[action],
        past=PAST_TENSE[action], selection=selection, counted=counted,
        return_to=return_to, changed=changed,
    ), status


@bp.route("/jobs/bulk", methods=["GET"])
@requires("operator")
def bulk_confirm() -> Any:
    """Show the exact count of a bulk action before the operator confirms it."""
    return_to = safe_return(request.args.get("return_to"), url_for("jobs.list_jobs"))
    try:
        action, selection = _read_selection(request.args)
        if selection.at_most is None:
            selection = dataclasses.replace(selection,
                                            at_most=job_service.snapshot_id())
        counted = job_service.count_selection(action, selection)
    except (BulkInputError, CountTooSlow) as exc:
        logger.info("Bulk confirmation not shown: %s", exc,
                    extra={"action": "bulk_action_rejected"})
        flash(f"Nothing was changed: {exc}.", "error")
        return redirect(return_to, code=303)
    return _confirm_page(action, selection, return_to, counted, None, 200)


def _confirmed_count(name: str) -> int | None:
    raw = (request.form.get(name) or "").strip()
    if not raw.isascii() or not raw.isdigit() or int(raw) > MAX_JOB_ID:
        return None
    return int(raw)


@bp.route("/jobs/bulk", methods=["POST"])
@requires("operator")
def bulk_run() -> Any:
    """Apply a confirmed bulk action, unless the count changed since it was shown."""
    return_to = safe_return(request.form.get("return_to"), url_for("jobs.list_jobs"))
    try:
        action, selection = _read_selection(request.form)
        if selection.at_most is None:
            raise BulkInputError("the confirmation is incomplete; start the bulk "
                                 "action again from the list")
        counted = job_service.count_selection(action, selection)
    except (BulkInputError, CountTooSlow) as exc:
        logger.info("Bulk action rejected: %s", exc,
                    extra={"action": "bulk_action_rejected"})
        flash(f"Nothing was changed: {exc}.", "error")
        return redirect(return_to, code=303)

    shown = _confirmed_count("count")
    shown_matched = _confirmed_count("matched")
    if shown != counted.applicable or shown_matched != counted.matched:
        logger.info("Bulk %s not run: %s of %s jobs confirmed, %s of %s now",
                    action, shown, shown_matched, counted.applicable,
                    counted.matched, extra={"action": "bulk_count_changed"})
        changed = (
            f"The jobs changed since you looked: {ACTION_LABELS[action].lower()} "
            f"now applies to {counted.applicable:,} of {counted.matched:,} jobs "
            f"instead of {shown if shown is not None else '?'} of "
            f"{shown_matched if shown_matched is not None else '?'}. Nothing was "
            "changed. Check the new count and confirm again."
        )
        return _confirm_page(action, selection, return_to, counted, changed, 409)

    report = job_service.run_bulk(action, selection)
    if report.complete:
        flash(report.summary(), "success" if report.done else "info")
        return redirect(return_to, code=303)

    continue_selection = Selection(
        scope=selection.scope, job_ids=selection.job_ids, filters=selection.filters,
        at_most=report.resume_at_most)
    return render_template(
        "jobs_bulk_result.html", report=report, action=action,
        label=ACTION_LABELS[action], selection=continue_selection,
        return_to=return_to,
    )
