"""The ``users`` command: flask --app wsgi users create NAME --role viewer, and so on."""

from __future__ import annotations

import getpass
import sys

import click
from flask.cli import AppGroup
from flask import current_app

from webpanel import db
from webpanel.auth import ROLES, save_user
from webpanel.queries import query
from workers.settings import MIN_ADMIN_PASSWORD_LENGTH

users_cli = AppGroup("users", help="Manage the panel's accounts.")


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("Password: ")
    second = getpass.getpass("Password again: ")
    if first != second:
        raise click.UsageError("the two passwords differ; run the command again")
    return first


def _check_password(password: str) -> None:
    if len(password) < MIN_ADMIN_PASSWORD_LENGTH:
        raise click.UsageError(
            f"the password is shorter than {MIN_ADMIN_PASSWORD_LENGTH} characters; "
            "choose a longer one"
        )


@users_cli.command("create")
@click.argument("username")
@click.option("--role", type=click.Choice(ROLES), default="viewer", show_default=True,
              help="What the account may do.")
@click.option("--password-stdin", is_flag=True,
              help="Read the password from the first line of standard input.")
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


@users_cli.command("sync-admin")
def sync_admin() -> None:
    """Create or update ADMIN_USERNAME with ADMIN_PASSWORD and the admin role."""
    settings = current_app.config["FLEET_SETTINGS"]
    if not settings.admin_password:
        raise click.UsageError("ADMIN_PASSWORD is not set; set it and run again")
    save_user(settings.admin_username, settings.admin_password, "admin")
    click.echo(f"admin account {settings.admin_username} is up to date")
