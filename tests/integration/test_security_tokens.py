"""API tokens and account commands against the real database.

The token hook is tried on a probe blueprint under /api/ mounted with
``security.exempt_api``, the way the API blueprint mounts it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import psycopg
import pytest
from flask import Blueprint, Flask, g, jsonify
from flask.testing import FlaskClient, FlaskCliRunner

from tests.support.panel import PASSWORDS, build_panel, csrf_token, log_in
from webpanel import auth, db, security, tokens
from webpanel.auth import current_user, requires


def _probe_blueprint() -> Blueprint:
    probe = Blueprint("probe", __name__, url_prefix="/api/probe")

    @probe.route("/whoami")
    def whoami() -> object:
        user = current_user()
        assert user is not None
        return jsonify(username=user.username, role=user.role,
                       by_token=g.get("api_user") is not None)

    @probe.route("/act", methods=["POST"])
    @requires("operator")
    def act() -> object:
        return jsonify(done=True)

    security.exempt_api(probe)
    return probe


@pytest.fixture
def api_panel(database_url: str) -> Iterator[Flask]:
    """Yield the panel with a probe API blueprint."""
    app = build_panel(database_url)
    app.register_blueprint(_probe_blueprint())
    yield app
    db.close_process_pool()


@pytest.fixture
def runner(api_panel: Flask) -> FlaskCliRunner:
    """Return a runner for the panel's flask commands."""
    return api_panel.test_cli_runner()


def new_token(app: Flask, username: str, name: str = "probe") -> tuple[int, str]:
    """Create a token for ``username``; return its id and the token."""
    with app.app_context():
        user_id = auth.user_id_by_name(username)
        assert user_id is not None
        info, token = tokens.create_token(user_id, name)
    return info.id, token


def bearer(token: str) -> dict[str, str]:
    """Return the Authorization header for ``token``."""
    return {"Authorization": f"Bearer {token}"}


def stored_tokens(database_url: str) -> list[tuple[int, str, str]]:
    """Return id, name and stored hash of every token."""
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            "SELECT id, name, token_hash FROM api_tokens ORDER BY id").fetchall()


def last_used(database_url: str, token_id: int) -> object:
    """Return the last_used_at of one token."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT last_used_at FROM api_tokens WHERE id = %s",
                           (token_id,)).fetchone()
    assert row is not None
    return row[0]


def test_token_stored_as_sha256_only(api_panel: Flask, database_url: str) -> None:
    token_id, token = new_token(api_panel, "operator")
    rows = stored_tokens(database_url)
    assert rows == [(token_id, "probe", hashlib.sha256(token.encode()).hexdigest())]
    with psycopg.connect(database_url) as conn:
        dump = conn.execute("SELECT api_tokens::text FROM api_tokens").fetchone()
    assert dump is not None
    assert token not in dump[0]


def test_token_authenticates_with_its_role(api_panel: Flask) -> None:
    _, token = new_token(api_panel, "viewer")
    response = api_panel.test_client().get("/api/probe/whoami",
                                           headers=bearer(token))
    assert response.status_code == 200
    assert response.get_json() == {"username": "viewer", "role": "viewer",
                                   "by_token": True}


def test_token_post_needs_no_csrf(api_panel: Flask) -> None:
    _, token = new_token(api_panel, "operator")
    response = api_panel.test_client().post("/api/probe/act", headers=bearer(token))
    assert response.status_code == 200
    assert response.get_json() == {"done": True}


def test_viewer_token_cannot_act(api_panel: Flask) -> None:
    _, token = new_token(api_panel, "viewer")
    response = api_panel.test_client().post("/api/probe/act", headers=bearer(token))
    assert response.status_code == 403
    assert "operator role" in response.get_json()["message"]


def test_token_wins_over_session(api_panel: Flask) -> None:
    client = api_panel.test_client()
    log_in(client, "admin")
    _, token = new_token(api_panel, "viewer")
    response = client.post("/api/probe/act", headers=bearer(token))
    assert response.status_code == 403


@pytest.mark.parametrize("header", [
    "Bearer pnl_not-a-real-token",
    "Bearer ",
    "Basic dXNlcjpwYXNz",
    "Bearer \u00e9t\u00e9",
    "Token abc",
])
def test_bad_token_gets_401(api_panel: Flask, header: str) -> None:
    response = api_panel.test_client().get(
        "/api/probe/whoami", headers={"Authorization": header.encode(
            "utf-8").decode("latin-1")})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].lower().startswith("bearer")
    assert "users token create" in response.get_json()["message"]


def test_anonymous_api_gets_401(api_panel: Flask) -> None:
    response = api_panel.test_client().get("/api/probe/whoami")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].lower().startswith("bearer")


def test_session_api_post_needs_csrf(api_panel: Flask) -> None:
    client = api_panel.test_client()
    log_in(client, "operator")
    without = client.post("/api/probe/act")
    assert without.status_code == 400
    assert without.is_json
    token = csrf_token(client.get("/account").get_data(as_text=True))
    with_token = client.post("/api/probe/act", headers={"X-CSRFToken": token})
    assert with_token.status_code == 200


def test_token_ignored_outside_api(api_panel: Flask) -> None:
    _, token = new_token(api_panel, "admin")
    response = api_panel.test_client().get("/account", headers=bearer(token))
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/login")


def test_revoked_token_gets_401(api_panel: Flask, runner: FlaskCliRunner) -> None:
    token_id, token = new_token(api_panel, "operator")
    result = runner.invoke(args=["users", "token", "revoke", str(token_id)])
    assert result.exit_code == 0, result.output
    response = api_panel.test_client().get("/api/probe/whoami",
                                           headers=bearer(token))
    assert response.status_code == 401


def test_disabled_account_token_gets_401(
    api_panel: Flask, runner: FlaskCliRunner
) -> None:
    _, token = new_token(api_panel, "operator")
    assert runner.invoke(args=["users", "disable", "operator"]).exit_code == 0
    client = api_panel.test_client()
    assert client.get("/api/probe/whoami", headers=bearer(token)).status_code == 401
    assert runner.invoke(args=["users", "enable", "operator"]).exit_code == 0
    assert client.get("/api/probe/whoami", headers=bearer(token)).status_code == 200


def test_role_change_applies_to_token(
    api_panel: Flask, runner: FlaskCliRunner
) -> None:
    _, token = new_token(api_panel, "viewer")
    client = api_panel.test_client()
    assert client.post("/api/probe/act", headers=bearer(token)).status_code == 403
    result = runner.invoke(args=["users", "set-role", "viewer", "operator"])
    assert result.exit_code == 0, result.output
    assert "viewer now has the operator role" in result.output
    assert client.post("/api/probe/act", headers=bearer(token)).status_code == 200


def test_last_used_updates_once_a_minute(
    api_panel: Flask, database_url: str
) -> None:
    token_id, token = new_token(api_panel, "viewer")
    assert last_used(database_url, token_id) is None
    with api_panel.app_context():
        assert tokens.user_for_bearer(f"Bearer {token}") is not None
        first = last_used(database_url, token_id)
        assert first is not None
        assert tokens.user_for_bearer(f"Bearer {token}") is not None
        assert last_used(database_url, token_id) == first
        with psycopg.connect(database_url) as conn:
            conn.execute("UPDATE api_tokens SET last_used_at = now() - "
                         "interval '2 minutes' WHERE id = %s", (token_id,))
        older = last_used(database_url, token_id)
        assert tokens.user_for_bearer(f"Bearer {token}") is not None
        assert last_used(database_url, token_id) > older  # type: ignore[operator]


def test_user_for_bearer_returns_none_for_unknown(api_panel: Flask) -> None:
    with api_panel.app_context():
        assert tokens.user_for_bearer("Bearer pnl_unknown") is None
        assert tokens.user_for_bearer(None) is None
        assert tokens.user_for_bearer("") is None


def test_cli_token_create_prints_once(
    runner: FlaskCliRunner, database_url: str, api_panel: Flask
) -> None:
    result = runner.invoke(args=["users", "token", "create", "operator",
                                 "--name", "deploy-script"])
    assert result.exit_code == 0, result.output
    token = result.stdout.strip().splitlines()[-1]
    assert token.startswith("pnl_")
    assert "shown only now" in result.stderr
    rows = stored_tokens(database_url)
    assert [(row[1], row[2]) for row in rows] == [
        ("deploy-script", hashlib.sha256(token.encode()).hexdigest())]
    response = api_panel.test_client().get("/api/probe/whoami",
                                           headers=bearer(token))
    assert response.get_json()["username"] == "operator"
    listing = runner.invoke(args=["users", "token", "list", "operator"])
    assert listing.exit_code == 0
    assert f"{rows[0][0]}\tdeploy-script\t" in listing.output
    assert token not in listing.output


@pytest.mark.parametrize(("args", "message"), [
    (["users", "token", "create", "ghost", "--name", "x"], "no account named 'ghost'"),
    (["users", "token", "list", "ghost"], "no account named 'ghost'"),
    (["users", "token", "revoke", "999"], "no API token with id 999"),
    (["users", "token", "create", "viewer", "--name", "  "], "token name is empty"),
    (["users", "set-role", "ghost", "admin"], "no account named 'ghost'"),
    (["users", "set-role", "viewer", "root"], "'root' is not one of"),
    (["users", "disable", "ghost"], "no account named 'ghost'"),
    (["users", "set-password", "ghost"], "no account named 'ghost'"),
])
def test_cli_errors_name_value_and_fix(
    runner: FlaskCliRunner, args: list[str], message: str
) -> None:
    result = runner.invoke(args=args, input="a-long-enough-password\n")
    assert result.exit_code != 0
    assert message in result.output
    if "no account named" in message:
        assert "users list" in result.output


def test_cli_set_password_from_stdin(
    runner: FlaskCliRunner, api_panel: Flask
) -> None:
    client = api_panel.test_client()
    log_in(client, "operator")
    result = runner.invoke(args=["users", "set-password", "operator"],
                           input="brand-new-password-7\n")
    assert result.exit_code == 0, result.output
    assert "brand-new-password-7" not in result.output
    assert client.get("/account").status_code == 302  # old session ended
    with api_panel.app_context():
        assert auth.authenticate("operator", "brand-new-password-7") is not None
        assert auth.authenticate("operator", PASSWORDS["operator"]) is None


def test_cli_rejects_short_password(runner: FlaskCliRunner, api_panel: Flask) -> None:
    result = runner.invoke(args=["users", "set-password", "operator"],
                           input="short\n")
    assert result.exit_code != 0
    assert "5 characters long" in result.output
    assert "at least 12" in result.output
    with api_panel.app_context():
        assert auth.authenticate("operator", PASSWORDS["operator"]) is not None


def test_cli_disable_ends_session(runner: FlaskCliRunner, api_panel: Flask) -> None:
    client = api_panel.test_client()
    log_in(client, "viewer")
    result = runner.invoke(args=["users", "disable", "viewer"])
    assert result.exit_code == 0
    assert "users enable viewer" in result.output
    assert client.get("/account").status_code == 302


def test_account_page_creates_token_once(
    client_for: Callable[[str], FlaskClient], database_url: str
) -> None:
    client = client_for("operator")
    page = client.get("/account")
    assert page.status_code == 200
    response = client.post("/account/tokens", data={
        "name": "laptop", "csrf_token": csrf_token(page.get_data(as_text=True))})
    body = response.get_data(as_text=True)
    assert response.status_code == 200
    rows = stored_tokens(database_url)
    assert len(rows) == 1
    shown = [line.strip() for line in body.splitlines() if "pnl_" in line]
    assert len(shown) == 1
    token = shown[0].split(">")[1].split("<")[0]
    assert hashlib.sha256(token.encode()).hexdigest() == rows[0][2]
    assert response.headers["Cache-Control"] == "no-store"
    later = client.get("/account").get_data(as_text=True)
    assert token not in later
    assert "laptop" in later


def test_account_page_lists_own_tokens_only(
    client_for: Callable[[str], FlaskClient], panel: Flask
) -> None:
    new_token(panel, "admin", name="admin-secret-job")
    new_token(panel, "viewer", name="viewer-dashboard")
    body = client_for("viewer").get("/account").get_data(as_text=True)
    assert "viewer-dashboard" in body
    assert "admin-secret-job" not in body


def test_account_page_revokes_own_token_only(
    client_for: Callable[[str], FlaskClient], panel: Flask, database_url: str
) -> None:
    admin_token_id, _ = new_token(panel, "admin")
    own_id, _ = new_token(panel, "viewer")
    client = client_for("viewer")
    token = csrf_token(client.get("/account").get_data(as_text=True))
    other = client.post(f"/account/tokens/{admin_token_id}/revoke",
                        data={"csrf_token": token})
    assert other.status_code == 404
    own = client.post(f"/account/tokens/{own_id}/revoke", data={"csrf_token": token})
    assert own.status_code == 303
    assert [row[0] for row in stored_tokens(database_url)] == [admin_token_id]


def test_account_token_limit(
    client_for: Callable[[str], FlaskClient], panel: Flask, database_url: str
) -> None:
    for index in range(tokens.MAX_TOKENS_PER_USER):
        new_token(panel, "viewer", name=f"token-{index}")
    client = client_for("viewer")
    token = csrf_token(client.get("/account").get_data(as_text=True))
    response = client.post("/account/tokens",
                           data={"name": "one-too-many", "csrf_token": token})
    assert response.status_code == 400
    assert "revoke one" in response.get_data(as_text=True)
    assert len(stored_tokens(database_url)) == tokens.MAX_TOKENS_PER_USER


def test_account_page_needs_login(panel: Flask, database_url: str) -> None:
    client = panel.test_client()
    token = csrf_token(client.get("/login").get_data(as_text=True))
    response = client.post("/account/tokens",
                           data={"name": "anonymous", "csrf_token": token})
    assert response.status_code == 302
    assert stored_tokens(database_url) == []
