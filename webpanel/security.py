"""Request hardening: token auth, origin and CSRF checks, headers, proxies, cookies.

One ``before_request`` guard runs the checks in a fixed order, before any view
(after turning HEAD into GET and rejecting a query string that is not UTF-8):

1. API token: under /api/ an ``Authorization: Bearer`` header authenticates the
   request as the token's account, or the request gets a 401.
2. Origin: a state change whose ``Sec-Fetch-Site`` or ``Origin`` header names
   another site gets a 403.
3. Login: every view except those marked public needs an account.
4. CSRF: a state change made with the session cookie needs a valid token, signed
   with SECRET_KEY or one of SECRET_KEY_FALLBACKS.

Token-authenticated requests skip steps 2 and 4 because a browser never adds an
``Authorization`` header on its own, so such a request carries no ambient
credentials that another site could borrow.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Flask, Request, current_app, g, request
from flask.json.provider import DefaultJSONProvider
from flask.sessions import SecureCookieSessionInterface
from flask_wtf.csrf import CSRFError, CSRFProtect, validate_csrf
from itsdangerous import BadData, SignatureExpired
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import BadRequest, Forbidden, Unauthorized
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import IntegerConverter, Map
from werkzeug.wrappers import Response
from wtforms import ValidationError

from webpanel import auth, tokens
from workers.settings import Settings

logger = logging.getLogger(__name__)

csrf = CSRFProtect()

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; "
    "base-uri 'none'; object-src 'none'"
)
HSTS_MAX_AGE = 365 * 24 * 3600  # seconds, sent on HTTPS responses only
UNSAFE_METHODS = auth.UNSAFE_METHODS
ALLOWED_FETCH_SITES = frozenset({"same-origin", "none"})
API_PREFIX = "/api/"
BIGINT_MAX = 2**63 - 1  # PostgreSQL's bigint, the type of every id


class SecureWhenHttpsSessionInterface(SecureCookieSessionInterface):
    """Mark the session cookie Secure whenever the request came over HTTPS."""

    def get_cookie_secure(self, app: Flask) -> bool:
        """Return True for HTTPS requests, as seen through ProxyFix."""
        return bool(app.config.get("SESSION_COOKIE_SECURE")) or request.is_secure


class BoundedJSONProvider(DefaultJSONProvider):
    """Flask's JSON provider, reading too deeply nested input as invalid JSON.

    Python's parser raises RecursionError on input such as 5000 ``[``; as a
    ValueError it becomes the 400 that any other invalid JSON body gets.
    """

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        """Parse JSON, raising ValueError for invalid or too deeply nested input."""
        try:
            return super().loads(s, **kwargs)
        except RecursionError:
            raise ValueError("the JSON body is nested too deeply") from None


class BigintConverter(IntegerConverter):
    """The ``int`` URL converter, limited to PostgreSQL's bigint range.

    An id beyond the range then matches no route (404) instead of reaching a
    query that PostgreSQL rejects.
    """

    def __init__(
        self,
        map: Map,  # noqa: A002 - the name werkzeug passes it under
        fixed_digits: int = 0,
        min: int | None = None,  # noqa: A002
        max: int | None = BIGINT_MAX,  # noqa: A002
        signed: bool = False,
    ) -> None:
        super().__init__(map, fixed_digits=fixed_digits, min=min, max=max,
                         signed=signed)


def _token_blueprints() -> set[str]:
    return current_app.extensions.setdefault("panel_token_blueprints", set())


def exempt_api(bp: Blueprint) -> Blueprint:
    """Let API tokens authenticate the requests of ``bp``, with no session CSRF.

    Call it on the API blueprint before the app registers it. Requests that use
    the session cookie instead of a token still need a CSRF token (the
    ``X-CSRFToken`` header) for every state change.
    """
    csrf.exempt(bp)
    bp.record_once(
        lambda state: state.app.extensions.setdefault(
            "panel_token_blueprints", set()).add(bp.name)
    )
    return bp


def exempt(view: Any) -> Any:
    """Exempt one token-authenticated API view from flask-wtf's form CSRF check."""
    return csrf.exempt(view)


def _token_auth_applies() -> bool:
    if request.path.startswith(API_PREFIX):
        return True
    return request.blueprint is not None and request.blueprint in _token_blueprints()


def authenticate_bearer() -> None:
    """Authenticate an API request that carries ``Authorization: Bearer TOKEN``."""
    if not _token_auth_applies():
        return
    header = request.headers.get("Authorization")
    if header is None:
        return
    user = tokens.user_for_bearer(header)
    if user is None:
        logger.warning(
            "Rejected an API request to %s from %s: invalid or revoked token",
            request.path, auth.client_address(),
            extra={"action": "token_rejected", "address": auth.client_address()},
        )
        raise Unauthorized(
            description=(
                "the API token is missing, invalid or revoked; send "
                "'Authorization: Bearer TOKEN' with a token from the account page "
                "or from `flask --app wsgi users token create USERNAME --name NAME`"
            ),
            www_authenticate=WWWAuthenticate("bearer", {"error": "invalid_token"}),
        )
    g.api_user = user
    g.user = user
    g.token_authenticated = True


def _same_origin(origin: str, req: Request) -> bool:
    parts = urlsplit(origin)
    return f"{parts.scheme}://{parts.netloc}".lower() == \
        f"{req.scheme}://{req.host}".lower()


def check_origin() -> None:
    """Reject state changes sent from another site, on top of the CSRF token."""
    if request.method not in UNSAFE_METHODS or g.get("token_authenticated"):
        return
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site not in ALLOWED_FETCH_SITES:
        logger.warning("Rejected a %s to %s from a %s page", request.method,
                       request.path, fetch_site[:40],
                       extra={"action": "origin_rejected"})
        raise Forbidden(description="the request came from another site; "
                                    "submit the form from the panel's own page")
    origin = request.headers.get("Origin")
    if origin is not None and not _same_origin(origin, request):
        logger.warning("Rejected a %s to %s from origin %r", request.method,
                       request.path, origin[:200],
                       extra={"action": "origin_rejected"})
        raise Forbidden(description="the request came from another origin; "
                                    "submit the form from the panel's own page")


def csrf_keys(app: Flask) -> list[str]:
    """Return the keys that may have signed a CSRF token, the current one first."""
    current = app.config.get("WTF_CSRF_SECRET_KEY") or app.secret_key
    fallbacks = app.config.get("SECRET_KEY_FALLBACKS") or []
    return [str(current), *(str(key) for key in fallbacks)]


def validate_csrf_token(token: str | None) -> None:
    """Check a CSRF token against every key, raising ValidationError when invalid.

    A token signed with a key in SECRET_KEY_FALLBACKS stays valid, so forms that
    were open while the key rotated can still be submitted.
    """
    rejection: ValidationError | None = None
    for key in csrf_keys(current_app):
        try:
            validate_csrf(token, secret_key=key)
            return
        except ValidationError as exc:
            cause = exc.__cause__
            # Only a bad signature means that another key may have signed it;
            # a missing, expired or mismatched token is final.
            if not isinstance(cause, BadData) or isinstance(cause, SignatureExpired):
                raise
            rejection = exc
    assert rejection is not None
    raise rejection


def _submitted_csrf_token() -> str | None:
    field = current_app.config["WTF_CSRF_FIELD_NAME"]
    token = request.form.get(field)
    if token:
        return token
    for header in current_app.config["WTF_CSRF_HEADERS"]:
        token = request.headers.get(header)
        if token:
            return token
    return None


def _check_https_referrer() -> None:
    # Over HTTPS a same-origin Origin header was already checked; without one,
    # the Referer must name this origin, as flask-wtf's strict mode requires.
    if request.headers.get("Origin"):
        return
    referrer = request.referrer
    if not referrer:
        raise CSRFError("The referrer header is missing.")
    if not _same_origin(referrer, request):
        raise CSRFError("The referrer does not match the host.")


def check_csrf() -> None:
    """Require a valid CSRF token on every state change made with the session."""
    app = current_app
    if not app.config.get("WTF_CSRF_ENABLED", True):
        return
    if request.method not in UNSAFE_METHODS or request.endpoint is None:
        return
    if g.get("token_authenticated"):
        g.csrf_valid = True  # no ambient credentials, so no CSRF to check
        return
    try:
        validate_csrf_token(_submitted_csrf_token())
    except ValidationError as exc:
        raise CSRFError(exc.args[0]) from exc
    if request.is_secure and app.config.get("WTF_CSRF_SSL_STRICT", True):
        _check_https_referrer()
    g.csrf_valid = True


def check_query_string() -> None:
    """Reject a query string with raw bytes that are not UTF-8.

    werkzeug decodes the query string strictly, so without this check every view
    that reads ``request.args`` would fail with a 500 on such a request.
    """
    try:
        request.query_string.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(description="the query string is not valid UTF-8; "
                                     "percent-encode it") from None


def read_head_as_get() -> None:
    """Let a view see a HEAD request as the GET it stands for.

    A view that branches on ``request.method == "GET"`` would otherwise take its
    POST branch for HEAD, without the CSRF check that only state changes get.
    werkzeug still drops the body, because the WSGI environ keeps saying HEAD.
    """
    if request.method == "HEAD":
        request.method = "GET"


def guard_request() -> Any:
    """Run token auth, the origin check, the login check and the CSRF check."""
    read_head_as_get()
    check_query_string()
    authenticate_bearer()
    check_origin()
    response = auth.enforce_login()
    if response is not None:
        return response
    check_csrf()
    return None


def add_security_headers(response: Response) -> Response:
    """Add the CSP, framing, sniffing and referrer headers to every response."""
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "same-origin")
    headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
    headers.setdefault("Cross-Origin-Resource-Policy", "same-origin")
    if request.is_secure:
        headers.setdefault("Strict-Transport-Security", f"max-age={HSTS_MAX_AGE}")
    if request.path != "/static" and not request.path.startswith("/static/"):
        headers.setdefault("Cache-Control", "no-store")
    return response


def init_app(app: Flask, settings: Settings) -> None:
    """Install the request guard, headers, proxy handling and the id converter."""
    csrf.init_app(app)
    # guard_request runs flask-wtf's check itself, after the login check and with
    # the fallback keys, so the extension's own hook stays off.
    app.config["WTF_CSRF_CHECK_DEFAULT"] = False
    app.url_map.converters["int"] = BigintConverter
    app.json = BoundedJSONProvider(app)
    app.session_interface = SecureWhenHttpsSessionInterface()
    app.before_request(guard_request)
    app.after_request(add_security_headers)
    proxies = settings.trusted_proxies
    if proxies:
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=proxies, x_proto=proxies, x_host=proxies,
            x_port=proxies, x_prefix=proxies,
        )
