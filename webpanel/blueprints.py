"""The panel's blueprints, one per concept, and the login check in front of them."""

from __future__ import annotations

from flask import Flask

from webpanel import api, audit, auth, dashboard, fleet, health, jobs


NAV_ITEMS = (
    ("dashboard.index", "Dashboard"),
    ("jobs.list_jobs", "Jobs"),
    ("jobs.defer_index", "Defer"),
    ("fleet.workers", "Workers"),
    ("fleet.stalled", "Stalled"),
    ("fleet.processes", "Processes"),
    ("fleet.queues", "Queues"),
    ("fleet.periodic", "Periodic"),
    ("audit.index", "Audit"),
)


def register_blueprints(app: Flask) -> None:
    """Register every blueprint and the layout's template context."""
    for module in (auth, dashboard, jobs, fleet, health, audit, api):
        app.register_blueprint(module.bp)

    @app.context_processor
    def layout_context() -> dict[str, object]:
        return {"current_user": auth.current_user, "nav_items": NAV_ITEMS}
