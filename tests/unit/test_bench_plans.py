"""Tests of reading auto_explain plans from a PostgreSQL log."""

from __future__ import annotations

from bench.plans import CapturedPlan, parse_log, render, slow, unindexed

LOG = """\
2026-12-04 17:00:00.000 UTC [42] LOG:  duration: 0.050 ms  plan:
\t{
\t  "Query Text": "SELECT * FROM procrastinate_jobs WHERE args @> $1",
\t  "Plan": {
\t    "Node Type": "Limit",
\t    "Plan Rows": 50,
\t    "Total Cost": 10.5,
\t    "Plans": [
\t      {"Node Type": "Seq Scan", "Relation Name": "procrastinate_jobs",
\t       "Plan Rows": 50, "Total Cost": 9000.0, "Filter": "(args @> $1)"}
\t    ]
\t  }
\t}
2026-12-04 17:00:00.001 UTC [42] LOG:  duration: 0.010 ms  plan:
\t{"Query Text": "SELECT id FROM panel_users WHERE id = $1",
\t "Plan": {"Node Type": "Seq Scan", "Relation Name": "panel_users"}}
2026-12-04 17:00:00.002 UTC [42] LOG:  duration: 0.010 ms  plan:
\t{"Query Text": "EXPLAIN (FORMAT JSON) SELECT 1 FROM procrastinate_jobs",
\t "Plan": {"Node Type": "Seq Scan", "Relation Name": "procrastinate_jobs"}}
2026-12-04 17:00:00.003 UTC [42] LOG:  checkpoint starting: time
2026-12-04 17:00:00.004 UTC [42] LOG:  duration: 0.010 ms  plan:
\t{"Query Text": "SELECT 1 FROM procrastinate_jobs WHERE id = $1",
\t "Plan": {"Node Type": "Index Only Scan", "Relation Name": "procrastinate_jobs",
\t          "Index Name": "procrastinate_jobs_pkey"}}
"""


def test_parse_log_reads_every_plan() -> None:
    plans = parse_log(LOG)
    assert len(plans) == 4
    assert plans[0].query.startswith("SELECT * FROM procrastinate_jobs")


def test_sequential_scan_of_large_table_is_found() -> None:
    plan = parse_log(LOG)[0]
    assert plan.sequential_scans() == ["procrastinate_jobs"]


def test_sequential_scan_of_small_table_is_ignored() -> None:
    plan = parse_log(LOG)[1]
    assert plan.sequential_scans() == []


def test_index_scan_is_not_reported() -> None:
    plan = parse_log(LOG)[3]
    assert plan.sequential_scans() == []


def test_unindexed_skips_explain_statements() -> None:
    found = unindexed(parse_log(LOG))
    assert list(found) == ["SELECT * FROM procrastinate_jobs WHERE args @> $1"]


def test_entry_that_is_not_json_is_skipped() -> None:
    text = ("2026-12-04 17:00:00.000 UTC [42] LOG:  duration: 1.0 ms  plan:\n"
            "\tQuery Text: SELECT 1\n")
    assert parse_log(text) == []


def test_render_indents_children() -> None:
    plan = CapturedPlan("q", {"Node Type": "Limit", "Plans": [
        {"Node Type": "Index Scan", "Relation Name": "procrastinate_jobs",
         "Index Name": "panel_jobs_status_id_idx"}]})
    lines = render(plan.plan)
    assert lines[0].strip().startswith("Limit")
    assert lines[1].startswith("      Index Scan on procrastinate_jobs using "
                               "panel_jobs_status_id_idx")


def test_parse_log_reads_durations() -> None:
    durations = [plan.duration_ms for plan in parse_log(LOG)]
    assert durations == [0.05, 0.01, 0.01, 0.01]


def test_slow_keeps_statements_over_threshold() -> None:
    found = slow(parse_log(LOG), 0.05)
    assert list(found) == ["SELECT * FROM procrastinate_jobs WHERE args @> $1"]


def test_distinct_statement_keeps_slowest_capture() -> None:
    plan = {"Node Type": "Seq Scan", "Relation Name": "job_attempts"}
    plans = [CapturedPlan("SELECT 1", plan, 3.0), CapturedPlan("SELECT  1", plan, 9.0)]
    assert unindexed(plans)["SELECT 1"].duration_ms == 9.0
