"""Who this process is: host, pid and supervisord process name."""

from __future__ import annotations

import os
import socket


def host_name() -> str:
    """Return this machine's host name."""
    return socket.gethostname()


def process_name(default_role: str) -> str:
    """Return supervisord's name for this process, such as 'worker:worker_00'."""
    name = os.environ.get("SUPERVISOR_PROCESS_NAME")
    group = os.environ.get("SUPERVISOR_GROUP_NAME")
    if name and group and group != name:
        return f"{group}:{name}"
    if name:
        return name
    return f"{default_role}-{os.getpid()}"


def application_name(role: str) -> str:
    """Return the PostgreSQL application_name for this process, with its pid."""
    return f"{role}:{os.getpid()}"[:63]
