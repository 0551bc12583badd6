"""Sizes of the benchmark runs, read from BENCH_* environment variables."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping

logger = logging.getLogger(__name__)

# name: (default, quick default, meaning)
SIZES: dict[str, tuple[int, int, str]] = {
    "BENCH_JOBS": (1_000_000, 20_000, "jobs seeded for the panel at scale"),
    "BENCH_DRAIN_JOBS": (5_000, 1_000, "jobs drained per drain run"),
    "BENCH_RUNS": (3, 1, "runs per drain, defer and recovery figure; the median "
                         "is reported"),
    "BENCH_MEMORY_JOBS": (100_000, 5_000, "jobs drained while memory is sampled"),
    "BENCH_REQUESTS": (20, 5, "requests per page or listing at scale"),
    "BENCH_DEFERS": (500, 100, "defers per defer-throughput figure"),
    "BENCH_LATENCY_SAMPLES": (50, 10, "defers per defer-to-start figure"),
}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """How large each benchmark runs, and which database server it uses."""

    panel_jobs: int
    drain_jobs: int
    runs: int
    memory_jobs: int
    requests: int
    defers: int
    latency_samples: int
    server_url: str | None
    quick: bool

    @property
    def memory_first_sample(self) -> int:
        """Return the finished-job count of the first memory sample (10,000)."""
        return min(10_000, max(self.memory_jobs // 10, 1))


def load_config(
    environ: Mapping[str, str] | None = None, quick: bool = False
) -> BenchConfig:
    """Read the BENCH_* variables, raising ValueError naming any invalid one."""
    environ = os.environ if environ is None else environ
    values: dict[str, int] = {}
    for name, (default, quick_default, meaning) in SIZES.items():
        raw = environ.get(name, "").strip().replace("_", "")
        if not raw:
            values[name] = quick_default if quick else default
            continue
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(
                f"{name}={environ[name]!r} is invalid: expected a whole number of "
                f"at least 1 ({meaning})"
            )
        values[name] = int(raw)
    return BenchConfig(
        panel_jobs=values["BENCH_JOBS"],
        drain_jobs=values["BENCH_DRAIN_JOBS"],
        runs=values["BENCH_RUNS"],
        memory_jobs=values["BENCH_MEMORY_JOBS"],
        requests=values["BENCH_REQUESTS"],
        defers=values["BENCH_DEFERS"],
        latency_samples=values["BENCH_LATENCY_SAMPLES"],
        server_url=environ.get("BENCH_DATABASE_URL", "").strip() or None,
        quick=quick,
    )
