"""Tests of conf/supervisord.conf, read by supervisor's own parser, and workers.launch.

The config is loaded under a minimal environment (PATH and HOME) plus what
``python -m workers.launch env`` exports, as scripts/run.sh starts supervisord.
"""

from __future__ import annotations

import configparser
import math
import os
import re
import runpy
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from supervisor.datatypes import RestartUnconditionally
from supervisor.options import ClientOptions, ProcessConfig, ServerOptions

from workers.errors import ConfigurationError
from workers.launch import (
    LOCAL_DATABASE_CONFIG,
    SUPERVISOR_CONFIG,
    check_supervisor_config,
    load_supervisor_config,
    supervisor_environment,
    supervisor_variables,
)
from workers.settings import PROJECT_DIR, Settings, load_settings

ENV_REFERENCE = re.compile(r"%\(ENV_(?P<name>[A-Za-z0-9_]+)\)s")


def minimal_environment(var_dir: Path, **overrides: str) -> dict[str, str]:
    """Return PATH and HOME, VAR_DIR and ``overrides``: all that supervisord gets."""
    environment = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "VAR_DIR": str(var_dir),
    }
    environment.update(overrides)
    return environment


def load(var_dir: Path, **overrides: str) -> tuple[Settings, ServerOptions]:
    """Parse conf/supervisord.conf as scripts/run.sh would start it."""
    (var_dir / "log").mkdir(parents=True, exist_ok=True)
    base = minimal_environment(var_dir, **overrides)
    settings = load_settings(base)
    options = load_supervisor_config(supervisor_environment(settings, base))
    return settings, options


def processes(options: ServerOptions) -> dict[str, list[ProcessConfig]]:
    """Map each program (group) name to its process configs."""
    return {
        group.name: list(group.process_configs)
        for group in options.process_group_configs
    }


def all_processes(options: ServerOptions) -> list[tuple[str, ProcessConfig]]:
    return [
        (group, process)
        for group, configs in processes(options).items()
        for process in configs
    ]


@pytest.fixture
def var_dir(tmp_path: Path) -> Path:
    return tmp_path / "var"


@pytest.fixture(params=[False, True], ids=["external-db", "local-db"])
def loaded(request: pytest.FixtureRequest, var_dir: Path) -> ServerOptions:
    local = "true" if request.param else "false"
    _, options = load(var_dir, LOCAL_DATABASE=local)
    return options


def test_config_parses_minimal_environment(var_dir: Path) -> None:
    settings, options = load(var_dir)
    groups = processes(options)
    assert sorted(groups) == ["scheduler", "setup", "web", "worker"]
    assert check_supervisor_config(
        settings, supervisor_environment(settings, minimal_environment(var_dir))
    ) == []


def test_config_includes_postgres_when_local(var_dir: Path) -> None:
    settings, options = load(var_dir, LOCAL_DATABASE="true")
    groups = processes(options)
    assert "postgres" in groups
    environment = supervisor_environment(
        settings, minimal_environment(var_dir, LOCAL_DATABASE="true")
    )
    assert check_supervisor_config(settings, environment) == []


def test_config_references_only_exported_names(var_dir: Path) -> None:
    exported = set(supervisor_variables(load(var_dir)[0]))
    for path in (SUPERVISOR_CONFIG, LOCAL_DATABASE_CONFIG):
        lines = path.read_text().splitlines()
        text = "\n".join(line for line in lines if not line.startswith((";", "#")))
        referenced = {match["name"] for match in ENV_REFERENCE.finditer(text)}
        unexported = sorted(referenced - exported)
        assert unexported == [], f"{path.name} expands names nobody exports"


def test_config_missing_variable_names_section(tmp_path: Path, var_dir: Path) -> None:
    text = SUPERVISOR_CONFIG.read_text()
    header = "[program:worker]\n"
    assert header in text
    broken = text.replace(
        header,
        header + 'environment=PGHOST="127.0.0.1",PGHOSTADDR="%(ENV_PGHOST)s"\n',
    )
    broken_path = tmp_path / "supervisord.conf"
    broken_path.write_text(broken)
    (var_dir / "log").mkdir(parents=True)
    base = minimal_environment(var_dir)
    settings = load_settings(base)
    environment = supervisor_environment(settings, base)

    with pytest.raises(ConfigurationError) as raised:
        load_supervisor_config(environment, broken_path)
    assert "ENV_PGHOST" in str(raised.value)
    assert "program:worker" in str(raised.value)

    problems = check_supervisor_config(settings, environment, broken_path)
    assert len(problems) == 1
    assert "ENV_PGHOST" in problems[0]
    assert "program:worker" in problems[0]


def test_config_unset_exported_name_fails(var_dir: Path) -> None:
    (var_dir / "log").mkdir(parents=True)
    base = minimal_environment(var_dir)
    environment = supervisor_environment(load_settings(base), base)
    del environment["WORKER_STOPWAITSECS"]
    with pytest.raises(ConfigurationError) as raised:
        load_supervisor_config(environment)
    assert "ENV_WORKER_STOPWAITSECS" in str(raised.value)
    assert "program:worker" in str(raised.value)


def test_socket_is_private_unix_socket(var_dir: Path) -> None:
    settings, options = load(var_dir)
    unix = [c for c in options.server_configs if c["family"] == socket.AF_UNIX]
    inet = [c for c in options.server_configs if c["family"] == socket.AF_INET]
    assert len(unix) == 1
    assert unix[0]["file"] == str(settings.supervisor_socket)
    assert unix[0]["chmod"] == 0o700
    assert inet == []


def test_config_text_declares_socket_mode() -> None:
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";", "#"))
    parser.read(SUPERVISOR_CONFIG)
    assert parser.get("unix_http_server", "chmod") == "0700"
    assert not parser.has_section("inet_http_server")


def test_supervisorctl_finds_default_socket() -> None:
    client = ClientOptions()
    client.environ_expansions = {}
    client.realize(args=["-c", str(SUPERVISOR_CONFIG), "status"], doc="")
    default_socket = load_settings({}).supervisor_socket
    assert client.serverurl == f"unix://{default_socket}"


def test_programs_rotate_logs(loaded: ServerOptions, var_dir: Path) -> None:
    for group, process in all_processes(loaded):
        assert process.stdout_logfile == str(var_dir / "log" / f"{process.name}.log")
        assert process.stdout_logfile_maxbytes == 10 * 1024 * 1024, group
        assert process.stdout_logfile_backups == 5, group
        assert process.redirect_stderr is True, group


def test_programs_stop_as_group(loaded: ServerOptions) -> None:
    for group, process in all_processes(loaded):
        assert process.killasgroup is True, group
        if group == "postgres":
            # The postmaster stops its own children, and some of them treat SIGINT
            # as a different request.
            assert process.stopasgroup is False
        else:
            assert process.stopasgroup is True, group


def test_programs_stop_signals(loaded: ServerOptions) -> None:
    for group, process in all_processes(loaded):
        expected = signal.SIGINT if group == "postgres" else signal.SIGTERM
        assert process.stopsignal == expected, group


def test_programs_run_from_project(loaded: ServerOptions) -> None:
    for group, process in all_processes(loaded):
        assert process.directory == str(PROJECT_DIR), group
        words = shlex.split(process.command)
        if group in ("web", "worker", "scheduler"):
            assert words[:4] == ["setpriv", "--pdeathsig", "TERM", "--"], group
            words = words[4:]
        assert words[0].startswith(str(PROJECT_DIR)), group


def test_python_programs_use_venv(loaded: ServerOptions) -> None:
    groups = processes(loaded)
    venv_bin = f"{PROJECT_DIR}/.venv/bin/"
    assert shlex.split(groups["web"][0].command)[4:] == [
        venv_bin + "gunicorn",
        "-c",
        f"{PROJECT_DIR}/conf/gunicorn.conf.py",
        "wsgi:app",
    ]
    for name in ("worker", "scheduler"):
        words = shlex.split(groups[name][0].command)[4:]
        assert words == [venv_bin + "python", "-m", f"workers.{name}"]


def test_long_running_programs_autorestart(loaded: ServerOptions) -> None:
    groups = processes(loaded)
    for name in ("web", "worker", "scheduler"):
        for process in groups[name]:
            assert process.autorestart is RestartUnconditionally, name
            assert process.startsecs >= 1, name


def test_setup_runs_once(loaded: ServerOptions) -> None:
    (setup,) = processes(loaded)["setup"]
    assert setup.autorestart is False
    assert setup.startsecs == 0
    assert setup.exitcodes == [0]
    assert setup.command == f"{PROJECT_DIR}/scripts/setup.sh"


def test_postgres_starts_first(var_dir: Path) -> None:
    _, options = load(var_dir, LOCAL_DATABASE="true")
    priorities = {
        group.name: group.priority for group in options.process_group_configs
    }
    others = [value for name, value in priorities.items() if name != "postgres"]
    assert priorities["postgres"] < min(others)
    assert priorities["setup"] < priorities["web"]
    assert priorities["setup"] < priorities["worker"]
    assert priorities["setup"] < priorities["scheduler"]


def test_worker_process_names(var_dir: Path) -> None:
    _, options = load(var_dir, WORKER_PROCESSES="3")
    names = [process.name for process in processes(options)["worker"]]
    assert names == ["worker_00", "worker_01", "worker_02"]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"WORKER_SHUTDOWN_TIMEOUT": "90.5", "SCHEDULER_SHUTDOWN_TIMEOUT": "0",
         "STALLED_JOB_THRESHOLD": "120"},
        {"WEB_GRACEFUL_TIMEOUT": "600", "WORKER_SHUTDOWN_TIMEOUT": "3600",
         "STALLED_JOB_THRESHOLD": "3700"},
    ],
    ids=["defaults", "fractional", "largest"],
)
def test_stopwaitsecs_exceed_graceful_timeouts(
    var_dir: Path, overrides: dict[str, str]
) -> None:
    settings, options = load(var_dir, LOCAL_DATABASE="true", **overrides)
    groups = processes(options)
    timeouts = {
        "worker": settings.worker_shutdown_timeout,
        "scheduler": settings.scheduler_shutdown_timeout,
        "web": settings.web_graceful_timeout,
        "postgres": 10,
    }
    for name, timeout in timeouts.items():
        for process in groups[name]:
            assert process.stopwaitsecs > timeout, name
    # The worker may write end states for END_STATE_WINDOW after its timeout.
    assert groups["worker"][0].stopwaitsecs == (
        math.ceil(settings.worker_shutdown_timeout) + 30 + 15
    )


def test_check_rejects_short_stopwaitsecs(tmp_path: Path, var_dir: Path) -> None:
    text = SUPERVISOR_CONFIG.read_text()
    short = text.replace(
        "stopwaitsecs=%(ENV_WORKER_STOPWAITSECS)s", "stopwaitsecs=30"
    )
    assert short != text
    path = tmp_path / "supervisord.conf"
    path.write_text(short)
    (var_dir / "log").mkdir(parents=True)
    base = minimal_environment(var_dir)
    settings = load_settings(base)
    problems = check_supervisor_config(
        settings, supervisor_environment(settings, base), path
    )
    assert len(problems) == 2  # one per worker process
    assert "[program:worker]" in problems[0]
    assert "WORKER_SHUTDOWN_TIMEOUT=30" in problems[0]


def run_launch(
    command: str, environment: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m workers.launch COMMAND`` from the project folder."""
    return subprocess.run(
        [sys.executable, "-m", "workers.launch", command],
        cwd=PROJECT_DIR,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_launch_env_prints_exports(var_dir: Path) -> None:
    environment = minimal_environment(var_dir, SCHEDULER_SHUTDOWN_TIMEOUT="12.5")
    result = run_launch("env", environment)
    assert result.returncode == 0, result.stderr
    exported: dict[str, str] = {}
    for line in result.stdout.splitlines():
        words = shlex.split(line)
        assert words[0] == "export"
        name, _, value = words[1].partition("=")
        exported[name] = value
    assert exported == supervisor_variables(load_settings(environment))
    # ceil(12.5) + 30 s of end-state writes + 15 s of margin
    assert exported["SCHEDULER_STOPWAITSECS"] == "58"
    assert exported["VAR_DIR"] == str(var_dir)
    assert exported["EXTRA_PROGRAMS_CONF"] == ""


def test_launch_env_rejects_invalid_setting(var_dir: Path) -> None:
    result = run_launch("env", minimal_environment(var_dir, WORKER_PROCESSES="many"))
    assert result.returncode == 2
    assert "WORKER_PROCESSES" in result.stderr
    assert result.stdout == ""


def test_launch_check_accepts_project_config(var_dir: Path) -> None:
    (var_dir / "log").mkdir(parents=True)
    result = run_launch("check", minimal_environment(var_dir, LOCAL_DATABASE="true"))
    assert result.returncode == 0, result.stderr


def test_launch_check_reports_missing_log_dir(var_dir: Path) -> None:
    result = run_launch("check", minimal_environment(var_dir))
    assert result.returncode == 1
    assert "does not exist" in result.stderr


def gunicorn_config(
    monkeypatch: pytest.MonkeyPatch, **overrides: str
) -> dict[str, Any]:
    """Execute conf/gunicorn.conf.py as gunicorn does and return its names."""
    monkeypatch.setenv("SECRET_KEY", "unit-test-secret-key-" + "k" * 32)
    for name, value in overrides.items():
        monkeypatch.setenv(name, value)
    return runpy.run_path(str(PROJECT_DIR / "conf" / "gunicorn.conf.py"))


def test_gunicorn_config_rejects_missing_secret_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SECRET_KEY", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(PROJECT_DIR / "conf" / "gunicorn.conf.py"))
    assert exit_info.value.code == 78
    assert "SECRET_KEY is not set" in capsys.readouterr().err


def test_gunicorn_config_follows_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    config = gunicorn_config(
        monkeypatch,
        WEB_BIND="127.0.0.1:8123",
        WEB_WORKERS="3",
        WEB_TIMEOUT="45",
        WEB_GRACEFUL_TIMEOUT="25",
    )
    assert config["bind"] == ["127.0.0.1:8123"]
    assert config["workers"] == 3
    assert config["timeout"] == 45
    assert config["graceful_timeout"] == 25
    assert config["preload_app"] is False
    assert callable(config["worker_exit"])


def test_gunicorn_control_socket_in_var_dir(
    monkeypatch: pytest.MonkeyPatch, var_dir: Path
) -> None:
    config = gunicorn_config(monkeypatch, VAR_DIR=str(var_dir))
    assert config["control_socket"] == str(var_dir / "gunicorn.ctl")


class _RecordingLog:
    def __init__(self) -> None:
        self.records: list[str] = []

    def warning(self, message: str, *args: object) -> None:
        self.records.append(message % args)

    def exception(self, message: str, *args: object) -> None:
        self.records.append(message % args)


class _FakeServer:
    def __init__(self) -> None:
        self.log = _RecordingLog()


class _FakeWorker:
    pid = 4242


def test_gunicorn_worker_exit_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    config = gunicorn_config(monkeypatch)
    server = _FakeServer()
    config["worker_exit"](server, _FakeWorker())
    for record in server.log.records:
        assert "close_process_pool" in record or "4242" in record
