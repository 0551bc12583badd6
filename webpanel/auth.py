"""Login, logout, accounts and roles; every view needs a login unless marked public.

Roles, from least to most: viewer (read only), operator (job actions), admin
(everything, process control and accounts included). Failed logins are counted per
account and per address in PostgreSQL, so every gunicorn worker sees the same count.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    abort,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_wtf import FlaskForm
from werkzeug.security import check_password_hash, generate_password_hash
from wtforms import PasswordField, StringField
from wtforms.validators import DataRequired, Length

from webpanel import db
from webpanel.errors import keeps_input_when_expired
from webpanel.queries import query

logger = logging.getLogger(__name__)

bp = Blueprint("auth", __name__)

ROLES = ("viewer", "operator", "admin")
LOGIN_FAILURE_LIMIT = 5  # failures per key within the window before a lock
LOGIN_FAILURE_WINDOW = 900  # seconds
LOGIN_LOCK_SECONDS = 300  # seconds a key stays locked after reaching the limit
# Checked against when the account does not exist, so that both paths cost the same.
_DUMMY_HASH = generate_password_hash("not a real password")

F = TypeVar("F", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True)
class User:
    """A logged-in account."""

    id: int
    username: str
    role: str

    def may(self, role: str) -> bool:
        """Tell whether this account has ``role`` or a stronger one."""
        return ROLES.index(self.role) >= ROLES.index(role)


def public(view: F) -> F:
    """Mark a view as reachable without a login."""
    view.is_public = True  # type: ignore[attr-defined]
    return view


def requires(role: str) -> Callable[[F], F]:
    """Let only accounts with ``role`` or a stronger one run the view."""

    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            user = current_user()
            if user is None:
                return _to_login()
            if not user.may(role):
                abort(403, description=f"this needs the {role} role; you are "
                                       f"{user.role}")
            return view(*args, **kwargs)

        return wrapped  # type: ignore[return-value]

    return decorator


def current_user() -> User | None:
    """Return the account of this request, loading it once per request."""
    if "user" in g:
        return g.user
    user = None
    user_id = session.get("user_id")
    if isinstance(user_id, int):
        row = db.fetch_one(query("auth", "user_by_id"), {"id": user_id})
        if row and not row["disabled"]:
            user = User(id=row["id"], username=row["username"], role=row["role"])
    api_user = getattr(g, "api_user", None)
    g.user = user or api_user
    return g.user


def _to_login() -> Any:
    if request.path.startswith("/api/"):
        abort(401)
    return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))


def enforce_login() -> Any:
    """Send anonymous requests for non-public views to the login page."""
    if request.endpoint is None or request.endpoint == "static":
        return None
    view = current_app.view_functions.get(request.endpoint)
    if view is not None and getattr(view, "is_public", False):
        return None
    if current_user() is None:
        return _to_login()
    return None


def _safe_next(target: str | None) -> str:
    if not target:
        return url_for("dashboard.index")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") \
            or target.startswith("//") or "\\" in target:
        return url_for("dashboard.index")
    return target


def client_address() -> str:
    """Return the client's address as ProxyFix resolved it."""
    return request.remote_addr or "unknown"


class LoginForm(FlaskForm):
    """The login form."""

    username = StringField("User name", validators=[DataRequired(), Length(max=150)])
    password = PasswordField("Password", validators=[DataRequired(),
                                                     Length(max=1024)])


def _throttle_keys(username: str) -> list[str]:
    return [f"user:{username.lower()[:150]}", f"addr:{client_address()}"]


def _locked(keys: list[str]) -> bool:
    rows = db.fetch_all(query("auth", "login_lock"), {"keys": keys})
    return any(row["locked"] for row in rows)


def _record_failure(keys: list[str], username: str) -> None:
    for key in keys:
        row = db.fetch_one(
            query("auth", "record_login_failure"),
            {"key": key, "window": LOGIN_FAILURE_WINDOW},
        )
        if row and row["failures"] >= LOGIN_FAILURE_LIMIT:
            db.execute(query("auth", "lock_login_key"),
                       {"key": key, "seconds": LOGIN_LOCK_SECONDS})
    logger.warning(
        "Failed login for user %r from %s", username[:150], client_address(),
        extra={"action": "login_failed", "username": username[:150],
               "address": client_address()},
    )


def authenticate(username: str, password: str) -> User | None:
    """Return the account when the password matches, else None."""
    row = db.fetch_one(query("auth", "user_by_name"), {"username": username})
    if row is None or row["disabled"]:
        check_password_hash(_DUMMY_HASH, password)
        return None
    if not check_password_hash(row["password_hash"], password):
        return None
    return User(id=row["id"], username=row["username"], role=row["role"])


@bp.route("/login", methods=["GET", "POST"])
@public
@keeps_input_when_expired
def login() -> Any:
    """Log in a user with a user name and a password."""
    form = LoginForm()
    error = None
    if request.method == "POST" and g.get("csrf_expired"):
        error = "This form expired. Log in again."
    elif form.validate_on_submit():
        username = form.username.data or ""
        keys = _throttle_keys(username)
        if _locked(keys):
            error = (
                "Too many failed logins for this account or address. "
                f"Wait {LOGIN_LOCK_SECONDS // 60} minutes and try again."
            )
            logger.warning(
                "Login refused for user %r from %s: locked", username[:150],
                client_address(), extra={"action": "login_locked"},
            )
        else:
            user = authenticate(username, form.password.data or "")
            if user is None:
                _record_failure(keys, username)
                error = "Invalid user name or password."
            else:
                db.execute(query("auth", "clear_login_failures"),
                           {"keys": [keys[0]]})
                session.clear()
                session["user_id"] = user.id
                session.permanent = True
                logger.info("User %s logged in from %s", user.username,
                            client_address(), extra={"action": "login"})
                return redirect(_safe_next(request.args.get("next")))
    status = 200 if error is None or request.method == "GET" else 400
    return render_template("login.html", form=form, error=error), status


class LogoutForm(FlaskForm):
    """The logout button."""


@bp.route("/logout", methods=["POST"])
def logout() -> Any:
    """Log out the current user."""
    user = current_user()
    session.clear()
    if user:
        logger.info("User %s logged out", user.username, extra={"action": "logout"})
    flash("You are logged out.", "info")
    return redirect(url_for("auth.login"))


def hash_password(password: str) -> str:
    """Return a salted scrypt hash of ``password``."""
    return generate_password_hash(password, method="scrypt")


def save_user(username: str, password: str, role: str) -> int:
    """Create or update an account and return its id."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    row = db.fetch_one(
        query("auth", "upsert_user"),
        {"username": username, "password_hash": hash_password(password),
         "role": role},
    )
    assert row is not None
    return int(row["id"])
