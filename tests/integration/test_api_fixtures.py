"""Helpers for the API tests: tokens, calls checked against the OpenAPI document.

``ApiCaller`` sends a request with a bearer token and checks the response against
the schema that /api/v1/openapi.json gives for its path, method and status, with a
small JSON Schema checker written here (no jsonschema package in the project).
The module also tests that checker, so a checker that accepts anything fails here.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.support.panel import build_panel
from webpanel import db
from webpanel.openapi import build_document

API = "/api/v1"
ANNOTATIONS = frozenset({"description", "default", "title", "examples",
                         "format", "readOnly", "writeOnly", "deprecated"})
KEYWORDS = frozenset({"$ref", "type", "enum", "const", "properties", "required",
                      "additionalProperties", "items", "minItems", "maxItems",
                      "minLength", "maxLength", "pattern", "minimum", "maximum",
                      "anyOf", "oneOf", "allOf"})


def create_token(app: Flask, role: str, name: str = "api-tests") -> str:
    """Create an API token for the account named after ``role`` with the CLI."""
    result = app.test_cli_runner().invoke(
        args=["users", "token", "create", role, "--name", name])
    assert result.exit_code == 0, result.output
    token = result.stdout.strip().splitlines()[-1]
    assert token.startswith("pnl_"), result.output
    return token


def bearer(token: str) -> dict[str, str]:
    """Return the Authorization header of ``token``."""
    return {"Authorization": f"Bearer {token}"}


def job_total(app: Flask) -> int:
    """Return how many rows procrastinate_jobs has."""
    url = app.config["FLEET_SETTINGS"].database_url
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM procrastinate_jobs").fetchone()
    assert row is not None
    return int(row[0])


def _type_ok(value: Any, kind: str) -> bool:
    if kind == "null":
        return value is None
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    if kind == "array":
        return isinstance(value, list)
    if kind == "object":
        return isinstance(value, dict)
    raise AssertionError(f"unknown JSON Schema type {kind!r}")


def _resolve(root: Mapping[str, Any], reference: str) -> Any:
    assert reference.startswith("#/"), f"only local references: {reference}"
    node: Any = root
    for part in reference[2:].split("/"):
        node = node[part]
    return node


def _is_time(value: str) -> bool:
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        return False
    return parsed.tzinfo is not None


def schema_errors(value: Any, schema: Mapping[str, Any], root: Mapping[str, Any],
                  where: str = "$") -> list[str]:
    """Return where ``value`` breaks ``schema`` (the JSON Schema subset used here).

    An unknown keyword fails the check, so the checker never skips a rule that
    the document relies on.
    """
    unknown = set(schema) - KEYWORDS - ANNOTATIONS
    unknown = {key for key in unknown if not key.startswith("x-")}
    assert not unknown, f"{where}: the checker does not know {sorted(unknown)}"
    errors: list[str] = []
    if "$ref" in schema:
        errors += schema_errors(value, _resolve(root, schema["$ref"]), root, where)
    kind = schema.get("type")
    if kind is not None:
        kinds = [kind] if isinstance(kind, str) else kind
        if not any(_type_ok(value, item) for item in kinds):
            return errors + [f"{where}: {value!r:.80} is not of type {kinds}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r:.80} is not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{where}: {value!r:.80} is not {schema['const']!r}")
    if schema.get("format") == "date-time" and isinstance(value, str) \
            and not _is_time(value):
        errors.append(f"{where}: {value!r:.80} is not a time with an offset")
    if isinstance(value, str):
        if len(value) > schema.get("maxLength", len(value)):
            errors.append(f"{where}: longer than {schema['maxLength']}")
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{where}: shorter than {schema['minLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r:.80} does not match "
                          f"{schema['pattern']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where}: {value} is below {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{where}: {value} is above {schema['maximum']}")
    if isinstance(value, list):
        errors += _array_errors(value, schema, root, where)
    if isinstance(value, dict):
        errors += _object_errors(value, schema, root, where)
    for item in schema.get("allOf", []):
        errors += schema_errors(value, item, root, where)
    if "anyOf" in schema and all(schema_errors(value, item, root, where)
                                 for item in schema["anyOf"]):
        errors.append(f"{where}: matches none of anyOf")
    if "oneOf" in schema:
        matches = sum(not schema_errors(value, item, root, where)
                      for item in schema["oneOf"])
        if matches != 1:
            errors.append(f"{where}: matches {matches} of oneOf, not exactly 1")
    return errors


def _array_errors(value: list[Any], schema: Mapping[str, Any],
                  root: Mapping[str, Any], where: str) -> list[str]:
    errors = []
    if len(value) < schema.get("minItems", 0):
        errors.append(f"{where}: fewer than {schema['minItems']} items")
    if len(value) > schema.get("maxItems", len(value)):
        errors.append(f"{where}: more than {schema['maxItems']} items")
    if "items" in schema:
        for index, item in enumerate(value):
            errors += schema_errors(item, schema["items"], root, f"{where}[{index}]")
    return errors


def _object_errors(value: dict[str, Any], schema: Mapping[str, Any],
                   root: Mapping[str, Any], where: str) -> list[str]:
    errors = []
    properties = schema.get("properties", {})
    for name in schema.get("required", []):
        if name not in value:
            errors.append(f"{where}: missing {name!r}")
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        if name in properties:
            errors += schema_errors(item, properties[name], root, f"{where}.{name}")
        elif extra is False:
            errors.append(f"{where}: unexpected property {name!r}")
        elif isinstance(extra, dict):
            errors += schema_errors(item, extra, root, f"{where}.{name}")
    return errors


def _operation_path(document: Mapping[str, Any], path: str) -> str | None:
    relative = path.split("?", 1)[0].removeprefix(API)
    paths = document["paths"]
    if relative in paths:
        return relative
    for template in paths:
        if "{" not in template:
            continue
        pattern = re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, relative):
            return template
    return None


def response_schema(document: Mapping[str, Any], method: str, path: str,
                    status: int) -> Mapping[str, Any]:
    """Return the schema the document gives a response; Error for other errors."""
    template = _operation_path(document, path)
    if template is not None:
        operation = document["paths"][template].get(method.lower())
        if operation is not None:
            response = operation["responses"].get(str(status))
            if response is not None:
                return response["content"]["application/json"]["schema"]
            assert status >= 400, (f"{method} {template} answered {status}, which "
                                   "the OpenAPI document does not describe")
    assert status >= 400, f"{method} {path} is not in the OpenAPI document"
    return {"$ref": "#/components/schemas/Error"}


class ApiCaller:
    """Sends API requests with a token and checks each response's JSON schema."""

    def __init__(self, app: Flask, token: str | None) -> None:
        self.app = app
        self.client: FlaskClient = app.test_client()
        self.token = token
        with app.app_context():
            self.document = build_document(app.config["FLEET_SETTINGS"])

    def __call__(self, method: str, path: str, body: Any = None, *,
                 raw: bytes | None = None, content_type: str = "application/json",
                 headers: Mapping[str, str] | None = None,
                 query_string: Any = None,
                 environ: Mapping[str, str] | None = None) -> Any:
        """Send one request and return the response, after the schema check."""
        sent = dict(headers or {})
        if self.token is not None:
            sent.update(bearer(self.token))
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            sent.setdefault("Content-Type", content_type)
        response = self.client.open(path, method=method, data=data, headers=sent,
                                    query_string=query_string,
                                    environ_overrides=dict(environ or {}))
        self.check(method, path, response)
        return response

    def check(self, method: str, path: str, response: Any) -> None:
        """Check a response: JSON, never a 5xx, matching its documented schema."""
        assert response.status_code < 500, (
            f"{method} {path} failed with {response.status_code}: "
            f"{response.get_data(as_text=True)[:500]}")
        assert response.mimetype == "application/json", (
            f"{method} {path} answered {response.mimetype}")
        body = response.get_json()
        schema = response_schema(self.document, method, path, response.status_code)
        problems = schema_errors(body, schema, self.document)
        assert not problems, (f"{method} {path} ({response.status_code}) breaks "
                              f"its schema: {problems[:5]}")


@pytest.fixture
def api_panel(database_url: str) -> Iterator[Flask]:
    """Yield the panel on a fresh database; closes the pool after."""
    app = build_panel(database_url)
    yield app
    db.close_process_pool()


@pytest.fixture
def api_as(api_panel: Flask) -> Callable[[str | None], ApiCaller]:
    """Return a function giving an ApiCaller with a new token of a role, or none."""
    def make(role: str | None) -> ApiCaller:
        token = create_token(api_panel, role) if role is not None else None
        return ApiCaller(api_panel, token)
    return make


@pytest.fixture(scope="module")
def shared_api_panel(module_database_url: str) -> Iterator[Flask]:
    """Yield one panel for a module's tests that change no job."""
    app = build_panel(module_database_url)
    yield app
    db.close_process_pool()


@pytest.fixture(scope="module")
def shared_tokens(shared_api_panel: Flask) -> dict[str, str]:
    """Return a cache of one token per role on the shared panel."""
    return {}


@pytest.fixture
def shared_api_as(shared_api_panel: Flask, shared_tokens: dict[str, str],
                  ) -> Iterator[Callable[[str | None], ApiCaller]]:
    """Yield ``api_as`` for the shared panel; closes the pool after each test.

    The pool belongs to the process, not to an app, so a test on another panel
    must not find it open on this panel's database.
    """
    def make(role: str | None) -> ApiCaller:
        if role is not None and role not in shared_tokens:
            shared_tokens[role] = create_token(shared_api_panel, role)
        token = shared_tokens[role] if role is not None else None
        return ApiCaller(shared_api_panel, token)
    yield make
    db.close_process_pool()


SCHEMA_ROOT: dict[str, Any] = {"components": {"schemas": {
    "Point": {"type": "object", "properties": {"x": {"type": "integer"}},
              "required": ["x"], "additionalProperties": False},
}}}


@pytest.mark.parametrize(("value", "schema"), [
    (True, {"type": "integer"}),
    (1.5, {"type": "integer"}),
    ("abc", {"type": "string", "maxLength": 2}),
    ("abc", {"type": "string", "pattern": "^(?:[0-9]+)$"}),
    (3, {"enum": [1, 2]}),
    ({"x": 1, "y": 2}, {"$ref": "#/components/schemas/Point"}),
    ({}, {"$ref": "#/components/schemas/Point"}),
    ([1, "a"], {"type": "array", "items": {"type": "integer"}}),
    ([], {"type": "array", "minItems": 1}),
    (None, {"anyOf": [{"type": "string"}, {"type": "integer"}]}),
    (5, {"oneOf": [{"type": "integer"}, {"type": "number"}]}),
    ("2024-01-01T00:00:00", {"type": "string", "format": "date-time"}),
    (7, {"type": "integer", "maximum": 6}),
    (False, {"const": True}),
])
def test_schema_errors_rejects_mismatch(value: Any, schema: dict[str, Any]) -> None:
    assert schema_errors(value, schema, SCHEMA_ROOT)


@pytest.mark.parametrize(("value", "schema"), [
    (1, {"type": ["integer", "null"]}),
    (None, {"type": ["integer", "null"]}),
    ({"x": 1}, {"$ref": "#/components/schemas/Point"}),
    ("2024-01-01T00:00:00+00:00", {"type": "string", "format": "date-time"}),
    ("42", {"type": "string", "pattern": "^(?:[0-9]+)$", "maxLength": 2}),
])
def test_schema_errors_accepts_match(value: Any, schema: dict[str, Any]) -> None:
    assert schema_errors(value, schema, SCHEMA_ROOT) == []


def test_schema_errors_fails_on_unknown_keyword() -> None:
    with pytest.raises(AssertionError, match="does not know"):
        schema_errors(1, {"multipleOf": 2}, SCHEMA_ROOT)
