"""Fixtures for tests that run the panel in-process against the real database."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.support.panel import build_panel, logged_in_client
from webpanel import db


@pytest.fixture
def panel(database_url: str) -> Iterator[Flask]:
    """Yield the panel on a fresh database with admin, operator and viewer accounts."""
    app = build_panel(database_url)
    yield app
    db.close_process_pool()


@pytest.fixture
def client_for(panel: Flask) -> Callable[[str], FlaskClient]:
    """Return a function giving a test client logged in with a role."""
    return lambda role: logged_in_client(panel, role)
