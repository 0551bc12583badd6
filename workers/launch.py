"""Derive supervisord's environment from the settings and check conf/supervisord.conf.

``python -m workers.launch env`` prints ``export NAME=value`` lines for every variable
that conf/supervisord.conf expands with ``%(ENV_NAME)s``. ``python -m workers.launch
check`` parses that file with supervisor's own parser, as supervisord would, and
rejects unset variables and stop timeouts that would cut a graceful shutdown short.
``python -m workers.launch url`` prints the panel's address for WEB_BIND.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import socket
import sys
from collections.abc import Mapping, Sequence
from os import environ as os_environ
from pathlib import Path
from urllib.parse import urlsplit

from supervisor.options import ServerOptions

from workers.errors import ConfigurationError
from workers.settings import END_STATE_WINDOW, PROJECT_DIR, Settings, load_settings

SUPERVISOR_CONFIG = PROJECT_DIR / "conf" / "supervisord.conf"
LOCAL_DATABASE_CONFIG = PROJECT_DIR / "conf" / "postgres.conf"
DEMO_API_CONFIG = PROJECT_DIR / "conf" / "demo-api.conf"

# Seconds that supervisord waits beyond a program's own graceful timeout before it
# sends SIGKILL: time for the interpreter to exit and for pools to close.
PROCESS_STOP_MARGIN = 15
WEB_STOP_MARGIN = 10
# Seconds PostgreSQL's fast shutdown (SIGINT) is expected to need at most.
POSTGRES_FAST_SHUTDOWN = 10

# Programs that conf/supervisord.conf must define in every setup.
REQUIRED_PROGRAMS = ("setup", "web", "worker", "scheduler")

_MISSING_NAME = re.compile(r"contains names \('ENV_(?P<name>[^']+)'\)")
_FORMAT_TARGET = re.compile(r"Format string .* for '(?P<target>[^']+)'")
_SECTION = re.compile(r"in section '(?P<section>[^']+)'")


def supervisor_variables(settings: Settings) -> dict[str, str]:
    """Return every variable that conf/supervisord.conf expands, as strings."""
    # A worker stopped during a database outage keeps writing the end state of its
    # jobs for up to END_STATE_WINDOW seconds after its shutdown timeout.
    end_state = math.ceil(END_STATE_WINDOW)
    worker_stop = (
        math.ceil(settings.worker_shutdown_timeout) + end_state + PROCESS_STOP_MARGIN
    )
    scheduler_stop = (
        math.ceil(settings.scheduler_shutdown_timeout) + end_state
        + PROCESS_STOP_MARGIN
    )
    web_stop = settings.web_graceful_timeout + WEB_STOP_MARGIN
    included = []
    if settings.local_database:
        included.append(str(LOCAL_DATABASE_CONFIG))
    if settings.demo_api:
        included.append(str(DEMO_API_CONFIG))
    return {
        "PROJECT_DIR": str(PROJECT_DIR),
        "VAR_DIR": str(settings.var_dir),
        "SUPERVISOR_SOCKET": str(settings.supervisor_socket),
        "WORKER_PROCESSES": str(settings.worker_processes),
        "WORKER_STOPWAITSECS": str(worker_stop),
        "SCHEDULER_STOPWAITSECS": str(scheduler_stop),
        "WEB_STOPWAITSECS": str(web_stop),
        "EXTRA_PROGRAMS_CONF": " ".join(included),
        "API_BASE_URL": settings.api_base_url,
    }


def supervisor_environment(
    settings: Settings, base_env: Mapping[str, str]
) -> dict[str, str]:
    """Return a copy of ``base_env`` with the variables supervisord's config expands."""
    environment = dict(base_env)
    environment.update(supervisor_variables(settings))
    return environment


def graceful_timeouts(settings: Settings) -> dict[str, tuple[str, float]]:
    """Return, per program, the name and seconds of its graceful shutdown timeout."""
    return {
        "worker": ("WORKER_SHUTDOWN_TIMEOUT", settings.worker_shutdown_timeout),
        "scheduler": (
            "SCHEDULER_SHUTDOWN_TIMEOUT",
            settings.scheduler_shutdown_timeout,
        ),
        "web": ("WEB_GRACEFUL_TIMEOUT", float(settings.web_graceful_timeout)),
        "postgres": ("PostgreSQL's fast shutdown", float(POSTGRES_FAST_SHUTDOWN)),
    }


class _SupervisorConfigError(Exception):
    """Supervisor's parser rejected the configuration."""


class _ParsingOptions(ServerOptions):
    """Supervisor's server options that raise instead of printing usage and exiting."""

    def usage(self, msg: object) -> None:
        raise _SupervisorConfigError(str(msg))


def load_supervisor_config(
    environ: Mapping[str, str], config_path: Path = SUPERVISOR_CONFIG
) -> ServerOptions:
    """Parse a supervisord config as ``supervisord -c`` would under ``environ``.

    Raises ConfigurationError naming the variable and the section when a
    ``%(ENV_NAME)s`` reference cannot be expanded.
    """
    options = _ParsingOptions()
    # ServerOptions copies os.environ when it is created; parse against the given
    # environment instead.
    options.environ_expansions = {f"ENV_{k}": v for k, v in environ.items()}
    try:
        options.realize(args=["-c", str(config_path)], doc="", progname="supervisord")
    except _SupervisorConfigError as exc:
        raise ConfigurationError(_explain(str(exc), config_path)) from None
    finally:
        options.poller.close()
    return options


def _explain(message: str, config_path: Path) -> str:
    missing = _MISSING_NAME.search(message)
    if missing is None:
        return f"{config_path}: {message}"
    name = missing.group("name")
    section_match = _SECTION.search(message)
    target_match = _FORMAT_TARGET.search(message)
    target = target_match.group("target") if target_match else ""
    if section_match is not None:
        section = section_match.group("section")
        option = target
    elif "." in target:
        section, _, option = target.partition(".")
    else:
        section, option = "supervisord", target
    hint = ""
    if option == "environment":
        hint = " (an environment= line cannot refer to its own entries)"
    return (
        f"{config_path}: [{section}] {option} uses %(ENV_{name})s, but {name} is "
        f"not set in supervisord's environment{hint}; export {name} before "
        "starting supervisord or remove the reference"
    )


def check_supervisor_config(
    settings: Settings,
    environ: Mapping[str, str],
    config_path: Path = SUPERVISOR_CONFIG,
) -> list[str]:
    """Return the problems of a supervisord config; an empty list means it is usable."""
    try:
        options = load_supervisor_config(environ, config_path)
    except ConfigurationError as exc:
        return [str(exc)]

    problems = []
    groups = {group.name: group for group in options.process_group_configs}
    for name in REQUIRED_PROGRAMS:
        if name not in groups:
            problems.append(f"{config_path}: [program:{name}] is missing")
    if settings.local_database and "postgres" not in groups:
        problems.append(
            f"{config_path}: LOCAL_DATABASE is true but no [program:postgres] is "
            f"included; check the [include] files setting and {LOCAL_DATABASE_CONFIG}"
        )

    for name, (timeout_name, timeout) in graceful_timeouts(settings).items():
        group = groups.get(name)
        if group is None:
            continue
        for process in group.process_configs:
            if process.stopwaitsecs <= timeout:
                problems.append(
                    f"{config_path}: [program:{name}] stopwaitsecs="
                    f"{process.stopwaitsecs} is not larger than {timeout_name}="
                    f"{timeout:g} s, so supervisord would kill {process.name} "
                    "before it finishes shutting down; raise stopwaitsecs"
                )
    return problems


def _port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def _supervisord_answers(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def busy_addresses(settings: Settings, environ: Mapping[str, str]) -> list[str]:
    """Return a problem for each address the stack would listen on that is taken."""
    if _supervisord_answers(settings.supervisor_socket):
        return [
            f"supervisord already runs on {settings.supervisor_socket}: the stack "
            "is up. Use `.venv/bin/supervisorctl -c conf/supervisord.conf status`, "
            "or stop it with `... shutdown` before starting it again"
        ]
    addresses: list[tuple[str, str, int, str]] = []
    bind = settings.web_bind
    if not bind.startswith("unix:"):
        host, _, port = bind.rpartition(":")
        addresses.append(("WEB_BIND", host.strip("[]") or "0.0.0.0", int(port),
                       "set WEB_BIND to a free HOST:PORT"))
    if settings.local_database:
        port_text = environ.get("LOCAL_DATABASE_PORT", "")
        if port_text.isdigit():
            addresses.append(("LOCAL_DATABASE_PORT", "127.0.0.1", int(port_text),
                           "set LOCAL_DATABASE_PORT to a free port"))
    if settings.demo_api:
        address = urlsplit(settings.api_base_url)
        if address.hostname and address.port:
            addresses.append(("API_BASE_URL", address.hostname, address.port,
                           "set API_BASE_URL to your API, or stop what listens "
                           "there (the demo API would start on it)"))
    return [
        f"{name}: {host}:{port} is already in use by another program; {fix}"
        for name, host, port, fix in addresses
        if _port_in_use(host, port)
    ]


def panel_url(settings: Settings) -> str:
    """Return the address a browser opens for WEB_BIND."""
    bind = settings.web_bind
    if bind.startswith("unix:"):
        return f"unix socket {bind.removeprefix('unix:')} (put a proxy in front)"
    host, _, port = bind.rpartition(":")
    if host in {"0.0.0.0", "[::]", "::"}:
        return f"http://localhost:{port}/ (listening on every interface)"
    return f"http://{host}:{port}/"


def _command_env(settings: Settings) -> int:
    for name, value in supervisor_variables(settings).items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


def _command_check(settings: Settings) -> int:
    environment = supervisor_environment(settings, os_environ)
    problems = check_supervisor_config(settings, environment)
    problems += busy_addresses(settings, os_environ)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


def _command_url(settings: Settings) -> int:
    print(panel_url(settings))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one of the commands env, check or url; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m workers.launch")
    parser.add_argument(
        "command",
        choices=("env", "check", "url"),
        help="env: print export lines for supervisord; check: validate "
        "conf/supervisord.conf; url: print the panel's address",
    )
    arguments = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        print(exc, file=sys.stderr)
        return 2
    commands = {"env": _command_env, "check": _command_check, "url": _command_url}
    return commands[arguments.command](settings)


if __name__ == "__main__":
    sys.exit(main())
