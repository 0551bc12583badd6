"""The ``users`` command: flask --app wsgi users create NAME --role viewer, and so on.

Passwords are read from the terminal (twice), or from the first line of standard
input with ``--password-stdin`` or when standard input is not a terminal, so
they never appear in the process list or the shell history.
"""

from __future__ import annotations

import getpass
import sys

import click
from flask import current_app
from flask.cli import AppGroup

from webpanel import auth, db, tokens
from webpanel.auth import ROLES, save_user
from webpanel.queries import query
from workers.settings import MIN_ADMIN_PASSWORD_LENGTH

users_cli = AppGroup("users", help="Manage the panel's accounts and API tokens.")
token_cli = AppGroup("token", help="Create, list and revoke API tokens.")
users_cli.add_command(token_cli)

_PASSWORD_STDIN_HELP = "Read the password from the first line of standard input."


def _read_password(from_stdin: bool) -> str:
    if from_stdin or not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    second = getpass.getpass("Password again: ")
    if first != second:
        raise click.UsageError("the two passwords differ; run the command again")
    return first


def _check_password(password: str) -> None:
    if len(password) < MIN_ADMIN_PASSWORD_LENGTH:
        raise click.UsageError(
            f"the password is {len(password)} characters long; choose one of at "
            f"least {MIN_ADMIN_PASSWORD_LENGTH} characters"
        )


def _unknown_user(username: str) -> click.ClickException:
    return click.ClickException(
        f"no account named {username!r}; list the accounts with "
        "`flask --app wsgi users list` or create it with `users create`"
    )


def _require_user_id(username: str) -> int:
    user_id = auth.user_id_by_name(username)
    if user_id is None:
        raise _unknown_user(username)
    return user_id


@users_cli.command("create")
@click.argument("username")
@click.option("--role", type=click.Choice(ROLES), default="viewer", show_default=True,
              help="What the account may do.")
@click.option("--password-stdin", is_flag=True, help=_PASSWORD_STDIN_HELP)
def create_user(username: str, role: str, password_stdin: bool) -> None:
    """Create an account, or reset the password and role of an existing one."""
    password = _read_password(password_stdin)
    _check_password(password)
    user_id = save_user(username, password, role)
    click.echo(f"saved user {username} (id {user_id}) with role {role}")


@users_cli.command("list")
def list_users() -> None:
    """List every account with its role."""
    for row in db.fetch_all(query("auth", "list_users")):
        state = "disabled" if row["disabled"] else "active"
        click.echo(f"{row['username']}\t{row['role']}\t{state}")


@users_cli.command("set-password")
@click.argument("username")
@click.option("--password-stdin", is_flag=True, help=_PASSWORD_STDIN_HELP)
def set_password(username: str, password_stdin: bool) -> None:
    """Give an account a new password; its open sessions end."""
    _require_user_id(username)
    password = _read_password(password_stdin)
    _check_password(password)
    if not auth.set_password(username, password):
        raise _unknown_user(username)
    click.echo(f"new password set for {username}; its open sessions have ended")


@users_cli.command("set-role")
@click.argument("username")
@click.argument("role", type=click.Choice(ROLES))
def set_role(username: str, role: str) -> None:
    """Change an account's role; it applies from the account's next request."""
    if not auth.set_role(username, role):
        raise _unknown_user(username)
    click.echo(f"{username} now has the {role} role")


@users_cli.command("disable")
@click.argument("username")
def disable_user(username: str) -> None:
    """Disable an account: its sessions and API tokens stop working at once."""
    if not auth.set_disabled(username, True):
        raise _unknown_user(username)
    click.echo(f"{username} is disabled; enable it again with `users enable "
               f"{username}`")


@users_cli.command("enable")
@click.argument("username")
def enable_user(username: str) -> None:
    """Enable a disabled account again."""
    if not auth.set_disabled(username, False):
        raise _unknown_user(username)
    click.echo(f"{username} is enabled")


@users_cli.command("sync-admin")
def sync_admin() -> None:
    """Create or update ADMIN_USERNAME with ADMIN_PASSWORD and the admin role."""
    settings = current_app.config["FLEET_SETTINGS"]
    if not settings.admin_password:
        raise click.UsageError("ADMIN_PASSWORD is not set; set it and run again")
    save_user(settings.admin_username, settings.admin_password, "admin")
    click.echo(f"admin account {settings.admin_username} is up to date")


@token_cli.command("create")
@click.argument("username")
@click.option("--name", required=True,
              help="What the token is for, such as 'deploy-script'.")
def create_token(username: str, name: str) -> None:
    """Create an API token for an account and print it once."""
    user_id = _require_user_id(username)
    try:
        info, token = tokens.create_token(user_id, name)
    except tokens.TokenError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"created token {info.id} ({info.name}) for {username}; it is shown "
               "only now:", err=True)
    click.echo(token)


@token_cli.command("list")
@click.argument("username")
def list_tokens(username: str) -> None:
    """List an account's API tokens: id, name, creation and last use."""
    user_id = _require_user_id(username)
    for info in tokens.list_tokens(user_id):
        last_used = info.last_used_at.isoformat(timespec="seconds") \
            if info.last_used_at else "never"
        click.echo(f"{info.id}\t{info.name}\t"
                   f"{info.created_at.isoformat(timespec='seconds')}\t{last_used}")


@token_cli.command("revoke")
@click.argument("token_id", type=click.IntRange(1, 2**63 - 1))
def revoke_token(token_id: int) -> None:
    """Revoke an API token by its id; requests that send it get 401."""
    if not tokens.revoke_token(token_id):
        raise click.ClickException(
            f"no API token with id {token_id}; list them with "
            "`flask --app wsgi users token list USERNAME`"
        )
    click.echo(f"revoked token {token_id}")
