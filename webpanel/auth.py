"""Login, logout, accounts and roles; every view needs a login unless marked public.

Roles, from least to most: viewer (read only), operator (job actions), admin
(everything, process control and accounts included). A view that changes state
declares its role with ``requires``; one that declares none is open to admins
only, so a forgotten decorator fails closed.

Failed logins are counted per account and per client address in PostgreSQL, so
every gunicorn worker sees the same count; a key that reaches its limit within
the window is locked for a while.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import ipaddress
import logging
import secrets
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
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import Unauthorized
from werkzeug.security import check_password_hash, generate_password_hash
from wtforms import PasswordField, StringField
from wtforms.validators import DataRequired, Length

from webpanel import db
from webpanel.errors import EXPIRED_FORM_MESSAGE, keeps_input_when_expired
from webpanel.queries import query

logger = logging.getLogger(__name__)

bp = Blueprint("auth", __name__)

ROLES = ("viewer", "operator", "admin")
ROLE_DESCRIPTIONS = {
    "viewer": "reads every page and the API; changes nothing but its own tokens",
    "operator": "also defers, retries, cancels and deletes jobs",
    "admin": "also controls processes; the only role for undeclared actions",
}
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
PASSWORD_METHOD = "scrypt"  # werkzeug's default cost: n=2**15, r=8, p=1
USER_FAILURE_LIMIT = 5  # failures per account within the window before a lock
ADDRESS_FAILURE_LIMIT = 20  # failures per address; several people may share one
LOGIN_FAILURE_WINDOW = 900  # seconds
LOGIN_LOCK_SECONDS = 300  # seconds a key stays locked after reaching its limit
MAX_USERNAME_LENGTH = 150
INVALID_LOGIN_MESSAGE = "Invalid user name or password."

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


def opens_with_metrics_token(view: F) -> F:
    """Let a view respond without a login when the request sends METRICS_TOKEN."""
    view.opens_with_metrics_token = True  # type: ignore[attr-defined]
    return view


def requires(role: str) -> Callable[[F], F]:
    """Let only accounts with ``role`` or a stronger one run the view."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")

    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            user = current_user()
            if user is None:
                return _to_login()
            if not user.may(role):
                _forbid(user, role)
            return view(*args, **kwargs)

        wrapped.required_role = role  # type: ignore[attr-defined]
        return wrapped  # type: ignore[return-value]

    return decorator


def _forbid(user: User, role: str) -> None:
    logger.warning("User %s (%s) was denied %s %s, which needs the %s role",
                   user.username, user.role, request.method, request.path, role,
                   extra={"action": "access_denied", "username": user.username})
    abort(403, description=f"this needs the {role} role; your account "
                           f"{user.username} has the {user.role} role")


def session_tag(password_hash: str) -> str:
    """Return the value that ties a session to the password it was opened with."""
    return hashlib.sha256(password_hash.encode()).hexdigest()[:32]


def _session_id(key: str) -> str:
    # Only the hash is stored, so the table's rows cannot be replayed as cookies.
    return hashlib.sha256(key.encode()).hexdigest()


def _session_lifetime() -> float:
    return current_app.permanent_session_lifetime.total_seconds()


def _session_user() -> User | None:
    user_id = session.get("user_id")
    key = session.get("session_key")
    if not isinstance(user_id, int) or not isinstance(key, str):
        return None
    row = db.fetch_one(query("auth", "user_by_session"),
                       {"session_id": _session_id(key),
                        "lifetime": _session_lifetime()})
    if row is None or row["id"] != user_id or row["disabled"]:
        return None
    tag = session.get("auth_tag")
    if not isinstance(tag, str) or not hmac.compare_digest(
            tag, session_tag(row["password_hash"])):
        return None  # the password changed since this session logged in
    return User(id=row["id"], username=row["username"], role=row["role"])


def current_user() -> User | None:
    """Return the account of this request, loading it once per request.

    A request authenticated with an API token (``g.api_user``) acts as the
    token's account, whatever session cookie it also carries.
    """
    if "user" in g:
        return g.user
    user = g.get("api_user") or _session_user()
    g.user = user
    return user


def _to_login() -> Any:
    if request.path.startswith("/api/"):
        raise Unauthorized(
            description="log in or send 'Authorization: Bearer TOKEN'",
            www_authenticate=WWWAuthenticate("bearer"),
        )
    if request.method in {"GET", "HEAD"}:
        return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
    return redirect(url_for("auth.login"))


def _metrics_token_sent() -> bool:
    expected = current_app.config["FLEET_SETTINGS"].metrics_token
    authorization = request.authorization
    if not expected or authorization is None or authorization.type != "bearer":
        return False
    sent = authorization.token or ""
    return hmac.compare_digest(sent.encode(), str(expected).encode())


def enforce_login() -> Any:
    """Send anonymous requests for non-public views to the login page.

    A state change on a view that declares no role with ``requires`` is allowed
    to admins only.
    """
    if request.endpoint is None or request.endpoint == "static":
        return None
    view = current_app.view_functions.get(request.endpoint)
    if view is None or getattr(view, "is_public", False):
        return None
    if getattr(view, "opens_with_metrics_token", False) and _metrics_token_sent():
        return None
    user = current_user()
    if user is None:
        return _to_login()
    if request.method in UNSAFE_METHODS and not hasattr(view, "required_role") \
            and not user.may("admin"):
        _forbid(user, "admin")
    return None


def safe_next(target: str | None) -> str:
    """Return ``target`` when it is a path on this site, else the dashboard."""
    fallback = url_for("dashboard.index")
    if not target or not target.startswith("/") or target.startswith("//"):
        return fallback
    # Browsers drop tabs and newlines and read a backslash as a slash, which
    # would turn "/\t/host" or "/\\host" into a link to another site.
    if any(ch == "\\" or ord(ch) < 0x21 or ord(ch) == 0x7F for ch in target):
        return fallback
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return fallback
    return target


def client_address() -> str:
    """Return the client's address as ProxyFix resolved it."""
    return request.remote_addr or "unknown"


def address_key(address: str) -> str:
    """Return the throttle key of an address; IPv6 counts per /64 network."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"addr:{address[:100]}"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"addr:{ip.ipv4_mapped}"
        return f"addr:{ipaddress.ip_network(f'{ip}/64', strict=False)}"
    return f"addr:{ip}"


def _user_key(username: str) -> str:
    return f"user:{username.lower()[:MAX_USERNAME_LENGTH]}"


class LoginForm(FlaskForm):
    """The login form."""

    username = StringField("User name", validators=[
        DataRequired(), Length(max=MAX_USERNAME_LENGTH)])
    password = PasswordField("Password", validators=[DataRequired(),
                                                     Length(max=1024)])


def _lock_seconds_left(keys: list[str]) -> int:
    rows = db.fetch_all(query("auth", "login_lock"), {"keys": keys})
    return max((int(row["seconds_left"]) for row in rows), default=0)


def _record_failure(username: str) -> None:
    limits = ((_user_key(username), USER_FAILURE_LIMIT),
              (address_key(client_address()), ADDRESS_FAILURE_LIMIT))
    counts = []
    for key, limit in limits:
        row = db.fetch_one(query("auth", "record_login_failure"), {
            "key": key, "window": LOGIN_FAILURE_WINDOW, "limit": limit,
            "lock": LOGIN_LOCK_SECONDS})
        assert row is not None
        counts.append(row["failures"])
        if row["locked"]:
            logger.warning("Login throttle key %s is locked for %d s after %d "
                           "failures", key, LOGIN_LOCK_SECONDS, row["failures"],
                           extra={"action": "login_lock", "key": key})
    db.execute(query("auth", "purge_login_failures"),
               {"window": LOGIN_FAILURE_WINDOW})
    logger.warning(
        "Failed login for user %r from %s (%d failures for the account, %d for "
        "the address)", username[:MAX_USERNAME_LENGTH], client_address(), *counts,
        extra={"action": "login_failed", "username": username[:MAX_USERNAME_LENGTH],
               "address": client_address()},
    )


def _dummy_hash() -> str:
    # Checked when the account does not exist, so that both paths cost one hash
    # of the same kind and cost.
    cached = current_app.extensions.get("panel_dummy_hash")
    if cached is None:
        cached = hash_password("no account has this password")
        current_app.extensions["panel_dummy_hash"] = cached
    return str(cached)


def authenticate(username: str, password: str) -> User | None:
    """Return the account when the password matches, else None."""
    row = db.fetch_one(query("auth", "user_by_name"), {"username": username})
    if row is None or row["disabled"]:
        check_password_hash(_dummy_hash(), password)
        return None
    if not check_password_hash(row["password_hash"], password):
        return None
    if not row["password_hash"].startswith(PASSWORD_METHOD + ":32768:8:1$"):
        # An older or cheaper hash: store a current one now that we know the
        # password. The session tag then follows the new hash.
        db.execute(query("auth", "set_password_hash"),
                   {"username": username, "password_hash": hash_password(password)})
    return User(id=row["id"], username=row["username"], role=row["role"])


def _log_in(user: User) -> Any:
    db.execute(query("auth", "clear_login_failures"),
               {"keys": [_user_key(user.username)]})
    row = db.fetch_one(query("auth", "user_by_id"), {"id": user.id})
    assert row is not None
    key = secrets.token_urlsafe(32)
    db.execute(query("auth", "open_session"),
               {"session_id": _session_id(key), "user_id": user.id,
                "lifetime": _session_lifetime()})
    session.clear()
    session["user_id"] = user.id
    session["session_key"] = key
    session["auth_tag"] = session_tag(row["password_hash"])
    session.permanent = True
    logger.info("User %s logged in from %s", user.username, client_address(),
                extra={"action": "login", "username": user.username})
    return redirect(safe_next(request.args.get("next")))


def _attempt_login(username: str, password: str) -> tuple[User | None, str]:
    keys = [_user_key(username), address_key(client_address())]
    seconds_left = _lock_seconds_left(keys)
    if seconds_left > 0:
        logger.warning("Login refused for user %r from %s: locked for %d s",
                       username[:MAX_USERNAME_LENGTH], client_address(),
                       seconds_left, extra={"action": "login_locked"})
        minutes = max(1, -(-seconds_left // 60))
        return None, ("Too many failed logins for this account or from this "
                      f"address. Try again in {minutes} minute"
                      f"{'s' if minutes > 1 else ''}.")
    user = authenticate(username, password)
    if user is None:
        _record_failure(username)
        return None, INVALID_LOGIN_MESSAGE
    return user, ""


@bp.route("/login", methods=["GET", "POST"])
@public
@keeps_input_when_expired
def login() -> Any:
    """Log in a user with a user name and a password."""
    form = LoginForm()
    error = ""
    if request.method == "POST":
        if g.get("csrf_expired"):
            error = EXPIRED_FORM_MESSAGE
        elif not form.validate():
            error = "Enter a user name and a password."
        else:
            user, error = _attempt_login(form.username.data or "",
                                         form.password.data or "")
            if user is not None:
                return _log_in(user)
    status = 400 if error else 200
    return render_template("login.html", form=form, error=error), status


@bp.route("/logout", methods=["POST"])
@requires("viewer")
def logout() -> Any:
    """Log out the current user."""
    user = current_user()
    key = session.get("session_key")
    if isinstance(key, str):
        db.execute(query("auth", "close_session"), {"session_id": _session_id(key)})
    session.clear()
    if user:
        logger.info("User %s logged out", user.username,
                    extra={"action": "logout", "username": user.username})
    flash("You are logged out.", "info")
    return redirect(url_for("auth.login"))


def hash_password(password: str) -> str:
    """Return a salted scrypt hash of ``password``."""
    return generate_password_hash(password, method=PASSWORD_METHOD)


def save_user(username: str, password: str, role: str) -> int:
    """Create or update an account and return its id.

    An account whose password already matches keeps its hash, so running this
    again with the same password (as setup does) does not end its sessions.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    existing = db.fetch_one(query("auth", "user_by_name"), {"username": username})
    if existing is not None and check_password_hash(existing["password_hash"],
                                                    password):
        password_hash = existing["password_hash"]
    else:
        password_hash = hash_password(password)
    row = db.fetch_one(
        query("auth", "upsert_user"),
        {"username": username, "password_hash": password_hash, "role": role},
    )
    assert row is not None
    return int(row["id"])


def set_password(username: str, password: str) -> bool:
    """Give an account a new password, ending its sessions; False when unknown."""
    row = db.fetch_one(query("auth", "set_password_hash"),
                       {"username": username, "password_hash": hash_password(password)})
    return row is not None


def set_role(username: str, role: str) -> bool:
    """Change an account's role; False when there is no such account."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    return db.fetch_one(query("auth", "set_role"),
                        {"username": username, "role": role}) is not None


def set_disabled(username: str, disabled: bool) -> bool:
    """Disable or enable an account; False when there is no such account."""
    return db.fetch_one(query("auth", "set_disabled"),
                        {"username": username, "disabled": disabled}) is not None


def user_id_by_name(username: str) -> int | None:
    """Return the id of the account named ``username``, or None."""
    row = db.fetch_one(query("auth", "user_by_name"), {"username": username})
    return None if row is None else int(row["id"])


class TokenForm(FlaskForm):
    """The form that creates an API token on the account page."""

    name = StringField("Token name", validators=[DataRequired(), Length(max=100)])


@bp.route("/account", methods=["GET"])
@requires("viewer")
def account() -> Any:
    """Show the account's role and its API tokens."""
    return _account_page(TokenForm())


def _account_page(form: TokenForm, new_token: str = "", error: str = "",
                  status: int = 200) -> Any:
    from webpanel import tokens

    user = current_user()
    assert user is not None
    return render_template(
        "account.html", user=user, form=form, tokens=tokens.list_tokens(user.id),
        new_token=new_token, error=error, role_descriptions=ROLE_DESCRIPTIONS,
        max_tokens=tokens.MAX_TOKENS_PER_USER,
    ), status


@bp.route("/account/tokens", methods=["POST"])
@requires("viewer")
@keeps_input_when_expired
def create_token() -> Any:
    """Create an API token for the logged-in account and show it once."""
    from webpanel import tokens

    user = current_user()
    assert user is not None
    form = TokenForm()
    if g.get("csrf_expired"):
        return _account_page(form, error=EXPIRED_FORM_MESSAGE, status=400)
    if not form.validate():
        return _account_page(form, error="Enter a token name of at most 100 "
                                         "characters.", status=400)
    try:
        info, token = tokens.create_token(user.id, form.name.data or "")
    except tokens.TokenError as exc:
        return _account_page(form, error=f"The token was not created: {exc}.",
                             status=400)
    # The page that shows the token is the POST's own response, never a redirect:
    # the token must not travel through the session cookie or the history.
    flash(f"Token {info.id} ({info.name}) is created.", "info")
    return _account_page(TokenForm(formdata=None), new_token=token)


@bp.route("/account/tokens/<int:token_id>/revoke", methods=["POST"])
@requires("viewer")
def revoke_token(token_id: int) -> Any:
    """Revoke one of the logged-in account's API tokens."""
    from webpanel import tokens

    user = current_user()
    assert user is not None
    if not tokens.revoke_token(token_id, user_id=user.id):
        abort(404, description=f"your account has no token with id {token_id}")
    flash(f"Token {token_id} is revoked; requests that send it now get 401.", "info")
    return redirect(url_for("auth.account"), code=303)
