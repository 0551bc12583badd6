"""The test PostgreSQL server's halt, which the outage tests rely on.

Idle client sockets opened during a fast shutdown keep the postmaster waiting for
a minute. Halt must still end within seconds and leave a server that resumes.
"""

from __future__ import annotations

import socket
import threading
import time

import psycopg

from tests.support.postgres import FAST_STOP_TIMEOUT, PostgresServer


def test_halt_ends_despite_idle_clients() -> None:
    with PostgresServer() as server:
        sockets: list[socket.socket] = []
        halting = threading.Event()

        def open_idle_sockets() -> None:
            # Connect and send nothing, before and during the shutdown.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(sockets) < 200:
                try:
                    sockets.append(
                        socket.create_connection(("127.0.0.1", server.port), 0.5)
                    )
                except OSError:
                    if halting.is_set():
                        return
                time.sleep(0.01)

        opener = threading.Thread(target=open_idle_sockets, daemon=True)
        opener.start()
        while not sockets:
            time.sleep(0.01)
        halting.set()
        started = time.monotonic()
        try:
            server.halt()
            took = time.monotonic() - started
        finally:
            opener.join(timeout=35)
            for idle in sockets:
                idle.close()

        assert took < FAST_STOP_TIMEOUT + 10, took
        server.resume()
        with psycopg.connect(server.url, connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
