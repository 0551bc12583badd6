"""A throw-away PostgreSQL server for a test session, and database helpers.

``PostgresServer`` runs initdb into a fresh folder under /tmp and starts the server
on a free loopback port with durability turned off (fsync, synchronous_commit and
full_page_writes off). Run as root, it runs as the account ``postgres``, else
``nobody``, through setpriv. ``stop()`` asks for a fast shutdown and deletes the
folder; ``halt()`` and ``resume()`` stop and restart it in place, for outage tests.
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg import sql

logger = logging.getLogger(__name__)

START_TIMEOUT = 60.0  # seconds for initdb plus the first accepted connection
# A fast shutdown waits for every child of the postmaster. A connection that
# arrives during the shutdown gets a child that only sends the shutdown error, and
# that child waits for the client's startup packet until authentication_timeout
# (60 s). The postmaster signals no such child, even on an immediate shutdown, and
# it accepts no connection meanwhile. A psycopg 3.3 connection attempt that timed
# out was seen to keep its socket open like this, so a worker reconnecting during
# the shutdown can hold it for a minute. After FAST_STOP_TIMEOUT seconds the whole
# process group is therefore killed, and the next start runs crash recovery if the
# shutdown checkpoint was not written yet.
FAST_STOP_TIMEOUT = 5.0
STOP_TIMEOUT = 30.0
PORT_ATTEMPTS = 3  # another process may take the chosen free port first
SUPERUSER = "postgres"
SERVER_OPTIONS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
}


def _has_server(directory: Path) -> bool:
    return (directory / "initdb").is_file() and (directory / "postgres").is_file()


def find_server_bindir() -> Path:
    """Return the folder of initdb and postgres: pg_config's, PATH's or the newest."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        )
        if result.returncode == 0:
            candidates.append(Path(result.stdout.strip()))
    initdb = shutil.which("initdb")
    if initdb is not None:
        candidates.append(Path(initdb).resolve().parent)
    debian = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda path: int(Path(path).parent.name)
        if Path(path).parent.name.isdigit()
        else 0,
    )
    candidates.extend(Path(path) for path in reversed(debian))
    for candidate in candidates:
        if _has_server(candidate):
            return candidate
    raise RuntimeError(
        "no PostgreSQL server binaries (initdb, postgres) found through pg_config, "
        "PATH or /usr/lib/postgresql/*/bin; install them (Debian: apt-get install "
        "postgresql) or set TEST_DATABASE_URL to a server the tests may use"
    )


def server_account() -> str | None:
    """Return the account the server runs as when the tests run as root, else None."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError("running as root, but neither 'postgres' nor 'nobody' exists")


def account_command(account: str | None) -> list[str]:
    """Return the setpriv prefix that runs a command as ``account``.

    The prefix also sets SIGINT as the parent-death signal, so the server shuts down
    when the test process dies without stopping it.
    """
    if account is None:
        return ["setpriv", "--pdeathsig", "INT", "--"]
    entry = pwd.getpwnam(account)
    return [
        "setpriv",
        f"--reuid={entry.pw_uid}",
        f"--regid={entry.pw_gid}",
        "--init-groups",
        "--pdeathsig",
        "INT",
        "--",
    ]


def free_port() -> int:
    """Return a loopback TCP port that was free when this function checked."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def database_url(server_url: str, name: str) -> str:
    """Return ``server_url`` with its database replaced by ``name``."""
    parts = urllib.parse.urlsplit(server_url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + name))


def database_name(url: str) -> str:
    """Return the database named in a PostgreSQL URL."""
    return urllib.parse.urlsplit(url).path.lstrip("/")


def create_database(admin_url: str, name: str, template: str | None = None) -> str:
    """Create database ``name`` (a copy of ``template`` when given); return its URL."""
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        statement = sql.SQL("{} TEMPLATE {}").format(
            statement, sql.Identifier(template)
        )
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(statement)
    return database_url(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    """Drop database ``name`` if it exists, ending any session still connected."""
    statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
        sql.Identifier(name)
    )
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(statement)


def unique_name(prefix: str) -> str:
    """Return a database name that no other test session picks."""
    return f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"


class PostgresServer:
    """A PostgreSQL server in a temporary folder, for one test session."""

    def __init__(self, bindir: Path | None = None) -> None:
        self.bindir = bindir or find_server_bindir()
        self.account = server_account()
        self.password = secrets.token_urlsafe(24)
        self.port = 0
        self.directory: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: Path | None = None

    @property
    def url(self) -> str:
        """Return the superuser's URL for the ``postgres`` database."""
        return (
            f"postgresql://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/postgres"
        )

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> str:
        """Initialize the cluster, start the server and return its URL."""
        self.directory = Path(tempfile.mkdtemp(prefix="pgtest-", dir="/tmp"))
        try:
            self._initdb()
            for attempt in range(1, PORT_ATTEMPTS + 1):
                self.port = free_port()
                if self._start_server(last_attempt=attempt == PORT_ATTEMPTS):
                    break
        except BaseException:
            self.stop()
            raise
        logger.info("test PostgreSQL server started on 127.0.0.1:%s", self.port)
        return self.url

    def _run_as_account(self, command: list[str]) -> list[str]:
        return account_command(self.account) + command

    def _initdb(self) -> None:
        assert self.directory is not None
        password_file = self.directory / "password"
        password_file.write_text(self.password + "\n")
        password_file.chmod(0o600)
        if self.account is not None:
            entry = pwd.getpwnam(self.account)
            for path in (self.directory, password_file):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        command = self._run_as_account(
            [
                str(self.bindir / "initdb"),
                f"--pgdata={self.directory / 'data'}",
                f"--username={SUPERUSER}",
                f"--pwfile={password_file}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            check=False,
        )
        password_file.unlink()
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb failed with exit status {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )

    def _start_server(self, last_attempt: bool) -> bool:
        assert self.directory is not None
        command = [
            str(self.bindir / "postgres"),
            "-D",
            str(self.directory / "data"),
            "-p",
            str(self.port),
            "-c",
            f"unix_socket_directories={self.directory}",
        ]
        for name, value in SERVER_OPTIONS.items():
            command += ["-c", f"{name}={value}"]
        self._log_file = self.directory / "server.log"
        with open(self._log_file, "ab") as log:
            self._process = subprocess.Popen(
                self._run_as_account(command),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                log_text = self._log_file.read_text(errors="replace")
                self._process = None
                if "could not bind" in log_text and not last_attempt:
                    logger.warning("port %s was taken; retrying", self.port)
                    return False
                raise RuntimeError(f"the test PostgreSQL server exited:\n{log_text}")
            try:
                with psycopg.connect(self.url, connect_timeout=2):
                    return True
            except psycopg.OperationalError:
                time.sleep(0.05)
        raise RuntimeError(
            f"the test PostgreSQL server did not accept connections within "
            f"{START_TIMEOUT:g} s; its log is {self._log_file}"
        )

    def halt(self) -> None:
        """Stop the server with a fast shutdown, keeping its data for ``resume``."""
        process, self._process = self._process, None
        if process is None:
            raise RuntimeError("the test PostgreSQL server is not running")
        self._shut_down(process)
        logger.info("test PostgreSQL server on port %s halted", self.port)

    def _shut_down(self, process: subprocess.Popen[bytes]) -> None:
        """Stop the postmaster with a fast shutdown, or kill its process group."""
        process.send_signal(signal.SIGINT)
        try:
            process.wait(FAST_STOP_TIMEOUT)
            return
        except subprocess.TimeoutExpired:
            logger.warning(
                "test PostgreSQL server %s still running %g s after a fast shutdown "
                "request; killing its process group",
                process.pid, FAST_STOP_TIMEOUT,
            )
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(STOP_TIMEOUT)

    def resume(self) -> None:
        """Start a halted server again on the same port and data folder."""
        if self._process is not None:
            raise RuntimeError("the test PostgreSQL server is already running")
        if self.directory is None:
            raise RuntimeError("the test PostgreSQL server was stopped for good")
        self._start_server(last_attempt=True)
        logger.info("test PostgreSQL server on port %s resumed", self.port)

    def stop(self) -> None:
        """Stop the server with a fast shutdown and delete its folder."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            self._shut_down(process)
        if process is not None:
            # Children left behind by a crashed postmaster share its process group.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
