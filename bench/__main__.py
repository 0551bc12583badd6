"""Run the benchmarks: python -m bench [--quick] [NAME ...].

NAME is any of drain, defer, latency, panel, recovery, memory (default: all, in
that order). ``--quick`` uses the small sizes meant for checking the benchmarks,
not for figures. BENCH_* variables set the sizes (see bench/config.py), and
BENCH_DATABASE_URL a server to use instead of a throw-away one.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from importlib.metadata import version

from bench.config import BenchConfig, load_config
from bench.database import BenchServer
from bench.report import Target, say, section, unmeasured

logger = logging.getLogger(__name__)

BENCHMARKS = ("drain", "defer", "latency", "panel", "recovery", "memory")


def describe_machine(server: BenchServer) -> None:
    """Print the machine, the versions and the sizes of this run."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as info:
        memory_kib = int(info.readline().split()[1])
    say(f"machine: {os.cpu_count()} CPUs ({cpu}), {memory_kib / 1048576:.1f} GiB "
        f"memory, {platform.system()} {platform.release()}")
    say(f"versions: Python {platform.python_version()}, PostgreSQL "
        f"{server.server_version()}, procrastinate {version('procrastinate')}, "
        f"psycopg {version('psycopg')}, Flask {version('flask')}, "
        f"gunicorn {version('gunicorn')}")


def _runner(name: str) -> Callable[[BenchConfig, BenchServer], list[Target]]:
    if name == "drain":
        from bench.drain import run_drain

        return run_drain
    if name == "defer":
        from bench.defer import run_defer

        return run_defer
    if name == "latency":
        from bench.latency import run_latency

        return run_latency
    if name == "panel":
        from bench.panel import run_panel

        return run_panel
    if name == "recovery":
        from bench.recovery import run_recovery

        return run_recovery
    from bench.memory import run_memory

    return run_memory


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks and print one line per target."""
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"any of {', '.join(BENCHMARKS)}; default all")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, to check the benchmarks themselves")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; expected any of "
                     f"{', '.join(BENCHMARKS)}")
    logging.basicConfig(level=logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(quick=args.quick)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = [name for name in BENCHMARKS if name in args.names] or list(BENCHMARKS)

    started = time.monotonic()
    targets: list[Target] = []
    with BenchServer(config.server_url) as server:
        describe_machine(server)
        say(f"sizes: {config}")
        for name in names:
            began = time.monotonic()
            try:
                targets.extend(_runner(name)(config, server))
            except Exception as exc:  # noqa: BLE001 - report and run the rest
                logger.exception("benchmark %s failed", name)
                targets.append(unmeasured(name, "the benchmark completes",
                                          f"{type(exc).__name__}: {exc}"))
            say(f"({name} took {time.monotonic() - began:.0f} s)")

    section(f"targets (run took {time.monotonic() - started:.0f} s)")
    for target in targets:
        say(target.line())
    return 0 if all(target.met for target in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
