"""API tokens: random bearer tokens tied to one account, stored only as hashes.

A token is ``pnl_`` followed by 32 random bytes in URL-safe base64. The database
keeps its SHA-256 hash, so a copy of the table gives no usable token, and the
token itself is shown once, when it is created. A request with the token acts as
its account, with that account's role; disabling the account stops its tokens.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import secrets
from typing import Any

from werkzeug.datastructures import Authorization

from webpanel import db
from webpanel.auth import User
from webpanel.queries import query

logger = logging.getLogger(__name__)

TOKEN_PREFIX = "pnl_"
TOKEN_BYTES = 32
LAST_USED_RESOLUTION = 60  # seconds between two updates of last_used_at
MAX_TOKEN_NAME_LENGTH = 100  # characters
MAX_TOKENS_PER_USER = 20


class TokenError(ValueError):
    """A token request is invalid; the message names the value and the fix."""


@dataclasses.dataclass(frozen=True)
class TokenInfo:
    """A stored token, without its secret."""

    id: int
    user_id: int
    name: str
    created_at: datetime.datetime
    last_used_at: datetime.datetime | None


def hash_token(token: str) -> str:
    """Return the hex SHA-256 digest under which a token is stored."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def generate_token() -> str:
    """Return a new random token."""
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def check_token_name(name: str) -> str:
    """Return the stripped token name, raising TokenError when it is unusable."""
    name = name.strip()
    if not name:
        raise TokenError("the token name is empty; name it after what uses it, "
                         "such as 'deploy-script'")
    if len(name) > MAX_TOKEN_NAME_LENGTH:
        raise TokenError(f"the token name is {len(name)} characters long; use at "
                         f"most {MAX_TOKEN_NAME_LENGTH}")
    if not name.isprintable():
        raise TokenError("the token name contains control characters; use "
                         "printable characters only")
    return name


def create_token(user_id: int, name: str) -> tuple[TokenInfo, str]:
    """Store a new token for an account; return it with the token, shown once."""
    name = check_token_name(name)
    count = db.fetch_one(query("auth", "count_tokens"), {"user_id": user_id})
    if count is not None and count["count"] >= MAX_TOKENS_PER_USER:
        raise TokenError(f"this account already has {MAX_TOKENS_PER_USER} tokens; "
                         "revoke one it no longer needs first")
    token = generate_token()
    row = db.fetch_one(
        query("auth", "insert_token"),
        {"user_id": user_id, "name": name, "token_hash": hash_token(token)},
    )
    assert row is not None
    info = _info(row)
    logger.info("Created API token %s (%s) for user %s", info.id, name, user_id,
                extra={"action": "token_created", "token_id": info.id})
    return info, token


def list_tokens(user_id: int) -> list[TokenInfo]:
    """Return the tokens of one account, newest first."""
    rows = db.fetch_all(query("auth", "tokens_of_user"), {"user_id": user_id})
    return [_info(row) for row in rows]


def revoke_token(token_id: int, user_id: int | None = None) -> bool:
    """Delete a token; with ``user_id``, only one of that account's tokens."""
    count = db.execute(query("auth", "delete_token"),
                       {"id": token_id, "user_id": user_id})
    if count:
        logger.info("Revoked API token %s", token_id,
                    extra={"action": "token_revoked", "token_id": token_id})
    return count > 0


def parse_bearer(header_value: str | None) -> str | None:
    """Return the token of an ``Authorization: Bearer TOKEN`` value, else None."""
    if not header_value:
        return None
    authorization = Authorization.from_header(header_value)
    if authorization is None or authorization.type != "bearer":
        return None
    token = authorization.token
    if not token or len(token) > 200 or not token.isascii():
        return None
    return token


def user_for_bearer(header_value: str | None) -> User | None:
    """Return the active account of a bearer token, or None when it is unknown.

    Marks the token as used at most once every LAST_USED_RESOLUTION seconds, so
    that a busy client does not write a row on every request.
    """
    token = parse_bearer(header_value)
    if token is None:
        return None
    row = db.fetch_one(
        query("auth", "user_for_token"),
        {"token_hash": hash_token(token), "resolution": LAST_USED_RESOLUTION},
    )
    if row is None or row["disabled"]:
        return None
    return User(id=row["id"], username=row["username"], role=row["role"])


def _info(row: dict[str, Any]) -> TokenInfo:
    return TokenInfo(id=row["id"], user_id=row["user_id"], name=row["name"],
                     created_at=row["created_at"], last_used_at=row["last_used_at"])
