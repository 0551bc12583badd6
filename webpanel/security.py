"""Request hardening: CSRF, origin checks, security headers, proxies and cookies."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Request, abort, request
from flask.sessions import SecureCookieSessionInterface
from flask_wtf.csrf import CSRFProtect
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.wrappers import Response

from workers.settings import Settings

logger = logging.getLogger(__name__)

csrf = CSRFProtect()

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; "
    "base-uri 'none'; object-src 'none'"
)
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
ALLOWED_FETCH_SITES = frozenset({"same-origin", "none"})


class SecureWhenHttpsSessionInterface(SecureCookieSessionInterface):
    """Mark the session cookie Secure whenever the request came over HTTPS."""

    def get_cookie_secure(self, app: Flask) -> bool:
        """Return True for HTTPS requests, as seen through ProxyFix."""
        return bool(app.config.get("SESSION_COOKIE_SECURE")) or request.is_secure


def _same_origin(origin: str, req: Request) -> bool:
    parts = urlsplit(origin)
    return f"{parts.scheme}://{parts.netloc}" == f"{req.scheme}://{req.host}"


def check_origin() -> None:
    """Reject state changes sent from another site, on top of the CSRF token."""
    if request.method not in UNSAFE_METHODS:
        return
    if request.authorization and request.authorization.type == "bearer":
        return  # token requests carry no ambient credentials
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site not in ALLOWED_FETCH_SITES:
        logger.warning("Rejected a %s to %s from a %s page", request.method,
                       request.path, fetch_site, extra={"action": "origin_rejected"})
        abort(403, description="the request came from another site")
    origin = request.headers.get("Origin")
    if origin and origin != "null" and not _same_origin(origin, request):
        logger.warning("Rejected a %s to %s from origin %s", request.method,
                       request.path, origin[:200],
                       extra={"action": "origin_rejected"})
        abort(403, description="the request came from another origin")


def add_security_headers(response: Response) -> Response:
    """Add the CSP, framing, sniffing and referrer headers to every response."""
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    if request.path != "/static" and not request.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-store")
    return response


def init_app(app: Flask, settings: Settings) -> None:
    """Install CSRF protection, origin checks, headers and proxy handling."""
    csrf.init_app(app)
    app.session_interface = SecureWhenHttpsSessionInterface()
    app.before_request(check_origin)
    app.after_request(add_security_headers)
    proxies = settings.trusted_proxies
    if proxies:
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=proxies, x_proto=proxies, x_host=proxies,
            x_port=proxies, x_prefix=proxies,
        )


def exempt(view: Any) -> Any:
    """Exempt a token-authenticated API view from the session CSRF check."""
    return csrf.exempt(view)
