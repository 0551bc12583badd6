"""The admin panel: ``create_app()`` builds the Flask application."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask

from workers.settings import Settings, check_web_secrets, load_settings

logger = logging.getLogger(__name__)

CSRF_TIME_LIMIT = 3600  # seconds an open form stays valid


def create_app(
    config: dict[str, Any] | None = None, settings: Settings | None = None
) -> Flask:
    """Build the panel; nothing connects to the database until the first request."""
    from webpanel import errors, security
    from webpanel.blueprints import register_blueprints
    from webpanel.cli import users_cli

    settings = settings or load_settings()
    check_web_secrets(settings)

    app = Flask(__name__)
    # A path with doubled slashes is not found, rather than redirected with a 308
    # that a client would follow by posting the form again to another address.
    app.url_map.merge_slashes = False
    app.config.update(
        FLEET_SETTINGS=settings,
        SECRET_KEY=settings.secret_key,
        SECRET_KEY_FALLBACKS=list(settings.secret_key_fallbacks),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_NAME="panel_session",
        PERMANENT_SESSION_LIFETIME=12 * 3600,
        WTF_CSRF_TIME_LIMIT=CSRF_TIME_LIMIT,
        MAX_CONTENT_LENGTH=settings.max_arguments_bytes * 4 + 65536,
        JSON_SORT_KEYS=False,
    )
    if config:
        app.config.update(config)

    security.init_app(app, settings)
    errors.init_app(app)
    register_blueprints(app)
    app.cli.add_command(users_cli)
    return app
