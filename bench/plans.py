"""The plans of the panel's SQL, captured with auto_explain from the server log.

During a capture, ``auto_explain.log_min_duration`` is 0 server-wide, so every
statement's plan is written to the log as JSON. ``capture_plans`` returns the plans
read back from the log. ``unindexed`` picks those that read a large table with a
sequential scan, which the panel must not do at scale unless a Limit stops it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import psycopg

logger = logging.getLogger(__name__)

# Tables that grow with the number of jobs; a sequential scan of one is a defect.
LARGE_TABLES = frozenset({
    "procrastinate_jobs", "procrastinate_events", "job_attempts", "job_results",
    "audit_log", "health_checks",
})
_PLAN_START = re.compile(r"LOG:  duration: (?P<ms>[0-9.]+) ms  plan:\s*$")


@dataclasses.dataclass(frozen=True)
class CapturedPlan:
    """One statement's text and its plan, as auto_explain logged them."""

    query: str
    plan: dict[str, Any]
    duration_ms: float = 0.0

    def scans(self) -> Iterator[dict[str, Any]]:
        """Yield every node of the plan tree."""
        stack = [self.plan]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.get("Plans", []))

    def sequential_scans(self) -> list[str]:
        """Return the large tables this plan reads with a sequential scan."""
        return sorted({
            node.get("Relation Name", "")
            for node in self.scans()
            if node.get("Node Type") == "Seq Scan"
            and node.get("Relation Name") in LARGE_TABLES
        })


def render(node: dict[str, Any], depth: int = 0) -> list[str]:
    """Return a plan tree as indented EXPLAIN-like lines."""
    label = node.get("Node Type", "?")
    if "Relation Name" in node:
        label += f" on {node['Relation Name']}"
    if "Index Name" in node:
        label += f" using {node['Index Name']}"
    details = [f"rows={node.get('Plan Rows', '?')}",
               f"cost={node.get('Total Cost', '?')}"]
    for key in ("Filter", "Index Cond", "Hash Cond", "Sort Key"):
        if key in node:
            details.append(f"{key.lower()}: {node[key]}")
    lines = ["    " + "  " * depth + f"{label} ({', '.join(map(str, details))})"]
    for child in node.get("Plans", []):
        lines.extend(render(child, depth + 1))
    return lines


def parse_log(text: str) -> list[CapturedPlan]:
    """Return the plans auto_explain wrote in JSON format into ``text``."""
    plans = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        start = _PLAN_START.search(lines[index])
        index += 1
        if start is None:
            continue
        body = []
        while index < len(lines) and lines[index].startswith("\t"):
            body.append(lines[index][1:])
            index += 1
        try:
            document = json.loads("\n".join(body))
        except ValueError:
            logger.warning("skipped an auto_explain entry that is not JSON")
            continue
        plans.append(CapturedPlan(document.get("Query Text", "").strip(),
                                  document.get("Plan", {}), float(start["ms"])))
    return plans


@contextlib.contextmanager
def capture_plans(server_url: str, log_path: Path) -> Iterator[list[CapturedPlan]]:
    """Log every statement's plan while the block runs; fill the yielded list.

    Raises psycopg.Error when auto_explain cannot be configured on the server.
    """
    captured: list[CapturedPlan] = []
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET auto_explain.log_format = 'json'")
        conn.execute("ALTER SYSTEM SET auto_explain.log_min_duration = 0")
        conn.execute("SELECT pg_reload_conf()")
    offset = log_path.stat().st_size
    try:
        yield captured
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM RESET auto_explain.log_min_duration")
            conn.execute("ALTER SYSTEM RESET auto_explain.log_format")
            conn.execute("SELECT pg_reload_conf()")
        with open(log_path, errors="replace") as log:
            log.seek(offset)
            captured.extend(parse_log(log.read()))


def unindexed(plans: list[CapturedPlan]) -> dict[str, CapturedPlan]:
    """Return the distinct statements that scan a large table sequentially.

    Of a statement captured several times, the slowest capture is kept.
    """
    return _distinct(plan for plan in plans if plan.sequential_scans())


def slow(plans: list[CapturedPlan], threshold_ms: float) -> dict[str, CapturedPlan]:
    """Return the distinct statements that took ``threshold_ms`` or more once."""
    return _distinct(plan for plan in plans if plan.duration_ms >= threshold_ms)


def _distinct(plans: Iterable[CapturedPlan]) -> dict[str, CapturedPlan]:
    found: dict[str, CapturedPlan] = {}
    for plan in plans:
        # EXPLAIN without ANALYZE only plans (row estimates): it reads no rows.
        if plan.query.upper().startswith("EXPLAIN"):
            continue
        text = " ".join(plan.query.split())
        if text not in found or found[text].duration_ms < plan.duration_ms:
            found[text] = plan
    return found
