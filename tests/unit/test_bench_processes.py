"""Tests of the benchmark's /proc readings and server library lookup."""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.database import available_libraries
from bench.processes import cpu_seconds, rss_kib


def test_cpu_seconds_grows_with_work() -> None:
    before = cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        sum(range(1000))
    assert cpu_seconds(os.getpid()) >= before + 0.1


def test_rss_of_this_process_is_plausible() -> None:
    kib = rss_kib(os.getpid())
    assert 1024 < kib < 4 * 1024 * 1024


def test_available_libraries_finds_installed_ones(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "auto_explain.so").write_bytes(b"")
    assert available_libraries(bindir) == ["auto_explain"]


def test_available_libraries_without_any(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    assert available_libraries(bindir) == []
