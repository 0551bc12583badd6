"""Tests of the benchmark's result lines, statistics and size settings."""

from __future__ import annotations

import re

import pytest

from bench.config import load_config
from bench.report import (
    Target,
    format_ratio,
    format_target,
    median,
    percentile,
    unmeasured,
)

TARGET_LINE = re.compile(r"^target \S+: .+ \(goal .+\) (met|missed)$")


def test_target_line_met() -> None:
    line = Target("drain_1x10", "95% of bare", ">= 90% of bare", True).line()
    assert line == "target drain_1x10: 95% of bare (goal >= 90% of bare) met"


def test_target_line_missed() -> None:
    line = format_target("dashboard_p95", "180.0 ms", "p95 < 150 ms", False)
    assert line == "target dashboard_p95: 180.0 ms (goal p95 < 150 ms) missed"


def test_target_line_matches_documented_format() -> None:
    line = format_target("memory_flat", "+0.1 MiB", "within 3 MiB", True)
    assert TARGET_LINE.match(line)


def test_target_name_with_space_is_rejected() -> None:
    with pytest.raises(ValueError, match="one word"):
        format_target("drain 1x10", "1", "2", True)


def test_unmeasured_target_is_missed_with_reason() -> None:
    target = unmeasured("api_batch_defer", ">= 80%", "/api/v1/jobs returned 404")
    assert not target.met
    assert target.line() == ("target api_batch_defer: not measured: /api/v1/jobs "
                             "returned 404 (goal >= 80%) missed")


def test_ratio_line_shows_both_figures() -> None:
    line = format_ratio("drain_2x10", 675.0, 750.0)
    assert line == "ratio drain_2x10 product/bare: 0.90 (675.0 / 750.0)"


def test_ratio_line_with_zero_anchor() -> None:
    assert format_ratio("drain_1x10", 10.0, 0.0).startswith(
        "ratio drain_1x10 product/bare: 0.00")


@pytest.mark.parametrize(("fraction", "expected"), [
    (0.0, 1.0), (0.5, 50.5), (0.95, 95.05), (1.0, 100.0),
])
def test_percentile_interpolates_between_ranks(fraction: float,
                                               expected: float) -> None:
    values = [float(value) for value in range(100, 0, -1)]
    assert percentile(values, fraction) == pytest.approx(expected)


def test_percentile_of_one_value() -> None:
    assert percentile([7.0], 0.95) == 7.0


def test_percentile_of_nothing_is_rejected() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 0.5)


def test_percentile_fraction_out_of_range_is_rejected() -> None:
    with pytest.raises(ValueError, match="outside 0-1"):
        percentile([1.0], 95)


def test_median_of_three_runs() -> None:
    assert median([450.0, 10.0, 470.0]) == 450.0


def test_config_defaults() -> None:
    config = load_config({})
    assert config.panel_jobs == 1_000_000
    assert config.runs == 3
    assert config.memory_jobs == 100_000
    assert config.memory_first_sample == 10_000
    assert config.server_url is None


def test_config_reads_bench_jobs_with_underscores() -> None:
    assert load_config({"BENCH_JOBS": "1_000"}).panel_jobs == 1000


def test_config_quick_sizes_are_smaller() -> None:
    quick = load_config({}, quick=True)
    assert quick.panel_jobs < 1_000_000
    assert quick.memory_first_sample == quick.memory_jobs // 10


def test_config_rejects_invalid_size() -> None:
    with pytest.raises(ValueError, match="BENCH_RUNS='zero' is invalid"):
        load_config({"BENCH_RUNS": "zero"})


def test_config_rejects_zero() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        load_config({"BENCH_DRAIN_JOBS": "0"})


def test_config_reads_database_url() -> None:
    config = load_config({"BENCH_DATABASE_URL": "postgresql://u@127.0.0.1/db"})
    assert config.server_url == "postgresql://u@127.0.0.1/db"
