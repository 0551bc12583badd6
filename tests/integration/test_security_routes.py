"""Every route in the URL map, walked anonymously and per role, against a real database.

The walk reads ``app.url_map``, so routes added later are covered without changes
here. A snapshot of the job, audit, account and token tables before and after
each walk shows whether any request changed state.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient
from psycopg import sql
from werkzeug.routing import Rule
from werkzeug.test import TestResponse

from tests.support.panel import build_panel, csrf_token, logged_in_client
from webpanel import db, tokens
from webpanel.auth import UNSAFE_METHODS, user_id_by_name

# Tables whose rows an anonymous or read-only request must never change.
STATE_TABLES = (
    "procrastinate_jobs",
    "procrastinate_events",
    "procrastinate_periodic_defers",
    "job_attempts",
    "job_results",
    "worker_processes",
    "health_checks",
    "panel_users",
    "api_tokens",
    "audit_log",
)
# Anonymous requests may read these pages; everything else needs an account.
PUBLIC_PATHS = ("/login", "/healthz")
# Views every account may use to change its own session and tokens.
SELF_SERVICE_ENDPOINTS = {"auth.logout", "auth.create_token", "auth.revoke_token"}
# Form fields sent with every walked state change, so that a view that accepts
# the request has what it needs to act.
FORM_FIELDS = {
    "job_id": "1", "job_ids": "1", "ids": "1", "confirm": "yes", "name": "walk",
    "username": "walk", "password": "walk-password-1", "queue": "default",
    "reason": "walk", "task": "fetch_joke",
}
BOGUS_BEARER = {"Authorization": "Bearer pnl_" + "A" * 43}


@dataclass(frozen=True)
class Call:
    """One request of a walk."""

    method: str
    path: str
    rule: Rule


# Values tried for plain string parts of a URL, so that an action route is
# reached with names its view acts on.
STRING_PLACEHOLDERS = ("retry", "cancel", "delete", "abort", "restart", "stop",
                       "fetch_joke", "worker:worker_00")


def _placeholders(rule: Rule, name: str) -> list[object]:
    converter = rule._converters[name]  # noqa: SLF001 - werkzeug keeps them here
    kind = type(converter).__name__
    if "Integer" in kind or "Bigint" in kind:
        return [1]
    if "Float" in kind:
        return [1.0]
    if "UUID" in kind:
        return [uuid.UUID(int=1)]
    if "Any" in kind:
        return sorted(getattr(converter, "items", ["x"]))
    if "Path" in kind:
        return ["app.css"]
    return list(STRING_PLACEHOLDERS)


def walk_calls(app: Flask, methods: set[str] | None = None) -> list[Call]:
    """Return the calls for every route and method, with placeholder values."""
    calls = []
    for rule in app.url_map.iter_rules():
        names = sorted(rule.arguments)
        choices = [_placeholders(rule, name) for name in names]
        for combination in itertools.product(*choices):
            values = dict(zip(names, combination))
            built = rule.build(values, append_unknown=False)
            assert built is not None, f"cannot build {rule.rule} from {values}"
            for method in sorted(rule.methods or ()):
                if methods is None or method in methods:
                    calls.append(Call(method, built[1], rule))
    return calls


def table_snapshot(database_url: str) -> dict[str, str]:
    """Return a digest of every row of each state table."""
    snapshot = {}
    with psycopg.connect(database_url) as conn:
        for table in STATE_TABLES:
            row = conn.execute(sql.SQL(
                "SELECT count(*)::text || ':' || "
                "coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') "
                "FROM {} t").format(sql.Identifier(table))).fetchone()
            assert row is not None
            snapshot[table] = row[0]
    return snapshot


def _seed(app: Flask) -> None:
    with app.app_context():
        job_app = db.procrastinate_app()
        for _ in range(3):
            job_app.configure_task("fetch_joke").defer()
        db.execute("INSERT INTO audit_log (username, action, job_ids, result) "
                   "VALUES ('admin', 'seed', '{1}', 'ok')")
        admin_id = user_id_by_name("admin")
        assert admin_id is not None
        tokens.create_token(admin_id, "seed")


@pytest.fixture
def walk_panel(database_url: str) -> Iterator[Flask]:
    """Yield the panel with jobs, an audit entry and an admin token in place."""
    app = build_panel(database_url)
    _seed(app)
    yield app
    db.close_process_pool()


def send(client: FlaskClient, call: Call, token: str | None = None,
         headers: dict[str, str] | None = None) -> TestResponse:
    """Send one walked call, with a CSRF token in form and header when given."""
    all_headers = dict(headers or {})
    data: dict[str, str] | None = None
    if call.method in UNSAFE_METHODS:
        data = dict(FORM_FIELDS)
        if token is not None:
            data["csrf_token"] = token
            all_headers["X-CSRFToken"] = token
    response = client.open(call.path, method=call.method, data=data,
                           headers=all_headers)
    response.get_data()  # read and close, so static files release their handle
    response.close()
    return response


def _describe(call: Call, response: TestResponse) -> str:
    return (f"{call.method} {call.path} ({call.rule.endpoint}) answered "
            f"{response.status_code}: {response.get_data(as_text=True)[:200]!r}")


def _is_public(call: Call) -> bool:
    return call.path in PUBLIC_PATHS or call.rule.endpoint == "static"


def _check_anonymous(call: Call, response: TestResponse) -> None:
    status = response.status_code
    assert status < 500 or _is_healthz_verdict(call, response), \
        _describe(call, response)
    if 300 <= status < 400:
        location = response.headers.get("Location", "")
        assert location.startswith("/login"), _describe(call, response)
    if 200 <= status < 300 and not _is_public(call):
        empty_options = call.method == "OPTIONS" and not response.get_data()
        assert empty_options, _describe(call, response)


def test_walk_covers_every_route(walk_panel: Flask) -> None:
    calls = walk_calls(walk_panel)
    endpoints = {call.rule.endpoint for call in calls}
    assert endpoints == {rule.endpoint for rule in walk_panel.url_map.iter_rules()}
    assert {"auth.login", "auth.logout", "dashboard.index", "static"} <= endpoints


def test_anonymous_walk_reads_and_changes_nothing(
    walk_panel: Flask, database_url: str
) -> None:
    before = table_snapshot(database_url)
    client = walk_panel.test_client()
    for call in walk_calls(walk_panel):
        _check_anonymous(call, send(client, call))
    assert table_snapshot(database_url) == before


def test_anonymous_walk_with_csrf_token_changes_nothing(
    walk_panel: Flask, database_url: str
) -> None:
    before = table_snapshot(database_url)
    client = walk_panel.test_client()
    token = csrf_token(client.get("/login").get_data(as_text=True))
    for call in walk_calls(walk_panel):
        _check_anonymous(call, send(client, call, token=token))
    assert table_snapshot(database_url) == before


def test_anonymous_walk_with_bogus_bearer_changes_nothing(
    walk_panel: Flask, database_url: str
) -> None:
    before = table_snapshot(database_url)
    client = walk_panel.test_client()
    for call in walk_calls(walk_panel):
        response = send(client, call, headers=BOGUS_BEARER)
        _check_anonymous(call, response)
        if call.path.startswith("/api/"):
            assert response.status_code == 401, _describe(call, response)
    assert table_snapshot(database_url) == before


def test_anonymous_walk_sees_login_page_only(walk_panel: Flask) -> None:
    client = walk_panel.test_client()
    for call in walk_calls(walk_panel, methods={"GET"}):
        if _is_public(call):
            continue
        response = client.get(call.path, follow_redirects=True)
        if 200 <= response.status_code < 300:
            assert response.request.path == "/login", _describe(call, response)
            assert 'name="password"' in response.get_data(as_text=True)
        else:
            assert response.status_code in {401, 403}, _describe(call, response)


def _is_healthz_verdict(call: Call, response: TestResponse) -> bool:
    # /healthz answers 503 while the fleet it checks is not running.
    return call.path == "/healthz" and response.status_code == 503


def test_admin_reads_change_nothing(walk_panel: Flask, database_url: str) -> None:
    client = logged_in_client(walk_panel, "admin")
    before = table_snapshot(database_url)
    for call in walk_calls(walk_panel, methods={"GET", "HEAD", "OPTIONS"}):
        response = send(client, call)
        assert response.status_code < 500 or _is_healthz_verdict(call, response), \
            _describe(call, response)
    assert table_snapshot(database_url) == before


def test_viewer_walk_changes_nothing(walk_panel: Flask, database_url: str) -> None:
    client = logged_in_client(walk_panel, "viewer")
    token = csrf_token(client.get("/account").get_data(as_text=True))
    before = table_snapshot(database_url)
    for call in walk_calls(walk_panel, methods=set(UNSAFE_METHODS)):
        if call.rule.endpoint in {"auth.logout", "auth.create_token"}:
            continue  # they change only the viewer's own session and tokens
        if _is_public(call):
            continue  # the login form, checked on its own
        response = send(client, call, token=token)
        if call.rule.endpoint in SELF_SERVICE_ENDPOINTS:
            # Token 1 belongs to admin, so a viewer cannot revoke it.
            assert response.status_code == 404, _describe(call, response)
        else:
            assert response.status_code == 403, _describe(call, response)
    assert table_snapshot(database_url) == before
    assert client.get("/account").status_code == 200


def test_weaker_roles_get_403_on_stronger_actions(walk_panel: Flask) -> None:
    roles = ("viewer", "operator", "admin")
    clients = {role: logged_in_client(walk_panel, role) for role in roles[:2]}
    tokens_by_role = {
        role: csrf_token(client.get("/account").get_data(as_text=True))
        for role, client in clients.items()
    }
    checked = 0
    for call in walk_calls(walk_panel, methods=set(UNSAFE_METHODS)):
        if call.rule.endpoint in SELF_SERVICE_ENDPOINTS:
            continue
        view = walk_panel.view_functions[call.rule.endpoint]
        if getattr(view, "is_public", False):
            continue
        needed = getattr(view, "required_role", "admin")
        for role in roles[:roles.index(needed)]:
            response = send(clients[role], call, token=tokens_by_role[role])
            assert response.status_code == 403, f"{role}: {_describe(call, response)}"
            checked += 1
    assert checked >= 0  # grows with the actions other views declare


def test_undeclared_action_is_admin_only(walk_panel: Flask) -> None:
    from flask import Blueprint

    probe = Blueprint("probe", __name__)
    hits: list[str] = []

    @probe.route("/probe-action", methods=["POST"])
    def probe_action() -> str:
        hits.append("called")
        return "done"

    walk_panel.register_blueprint(probe)
    for role, status in (("viewer", 403), ("operator", 403), ("admin", 200)):
        client = logged_in_client(walk_panel, role)
        token = csrf_token(client.get("/account").get_data(as_text=True))
        response = client.post("/probe-action", data={"csrf_token": token})
        assert response.status_code == status, role
    assert hits == ["called"]


@pytest.fixture
def metrics_panel(database_url: str) -> Iterator[Flask]:
    """Yield the panel with METRICS_TOKEN set."""
    app = build_panel(database_url, env={"METRICS_TOKEN": "metrics-token-" + "m" * 30})
    yield app
    db.close_process_pool()


def test_metrics_open_only_with_token(metrics_panel: Flask) -> None:
    client = metrics_panel.test_client()
    token = metrics_panel.config["FLEET_SETTINGS"].metrics_token
    opened = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert opened.status_code == 200, opened.get_data(as_text=True)[:800]
    for headers in ({}, {"Authorization": "Bearer wrong-token"},
                    {"Authorization": f"Basic {token}"}):
        response = client.get("/metrics", headers=headers)
        assert response.status_code in {302, 401}, headers
        assert b"# TYPE" not in response.get_data()


def test_head_takes_the_get_path(walk_panel: Flask, database_url: str) -> None:
    client = logged_in_client(walk_panel, "admin")
    before = table_snapshot(database_url)
    get = client.get("/account")
    head = client.head("/account")
    assert head.status_code == get.status_code == 200
    assert head.get_data() == b""
    assert head.headers["Content-Type"] == get.headers["Content-Type"]
    for call in walk_calls(walk_panel, methods={"HEAD"}):
        head = send(client, call)
        get = send(client, Call("GET", call.path, call.rule))
        assert head.status_code == get.status_code, _describe(call, head)
    assert table_snapshot(database_url) == before


def test_bad_token_changes_nothing_and_explains(
    walk_panel: Flask, database_url: str
) -> None:
    client = logged_in_client(walk_panel, "admin")
    client.get("/account")
    before = table_snapshot(database_url)
    for call in walk_calls(walk_panel, methods=set(UNSAFE_METHODS)):
        if call.rule.endpoint == "auth.logout":
            continue
        response = send(client, call, token="forged-token")
        body = response.get_data(as_text=True)
        if call.path.startswith("/api/"):
            assert response.status_code == 400, _describe(call, response)
            assert response.is_json, _describe(call, response)
        elif response.status_code == 303:
            page = client.get(response.headers["Location"])
            assert "nothing was changed" in page.get_data(as_text=True), \
                _describe(call, response)
        else:
            # A form view shows itself again with the values and the message.
            assert response.status_code in {400, 404}, _describe(call, response)
            assert "<form" in body or response.status_code == 404, \
                _describe(call, response)
    assert table_snapshot(database_url) == before
    assert client.get("/account").status_code == 200
