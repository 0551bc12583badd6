"""Result rows keyed by job id: the primary key stores at most one result per job."""

from __future__ import annotations

from typing import Any

from procrastinate import JobContext

from workers.end_state import write_through_outage

STORE_RESULT = """
INSERT INTO job_results (job_id, task_name, result)
VALUES (%(job_id)s, %(task_name)s, %(result)s)
ON CONFLICT (job_id) DO NOTHING
"""

READ_RESULT = "SELECT result FROM job_results WHERE job_id = %(job_id)s"


def storable(value: Any) -> Any:
    """Return ``value`` with NUL characters replaced, since jsonb cannot hold them.

    Without this, an upstream response containing U+0000 would fail to store after
    the upstream applied the request, and the job would send it again.
    """
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {storable(key): storable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [storable(item) for item in value]
    return value


async def store_result(context: JobContext, result: dict[str, Any]) -> None:
    """Store a job's result unless an earlier run of the same job stored one.

    The upstream has already applied the request, so the write is tried again
    through a short database outage instead of failing the attempt.
    """
    connector = context.app.connector
    await write_through_outage(
        lambda: connector.execute_query_async(
            STORE_RESULT,
            job_id=context.job.id,
            task_name=context.job.task_name,
            result=storable(result),
        ),
        description=f"the result of job {context.job.id}",
        extra={"job_id": context.job.id, "task": context.job.task_name},
    )


async def stored_result(context: JobContext) -> dict[str, Any] | None:
    """Return the result an earlier run of this job stored, if any."""
    row = await context.app.connector.execute_query_one_async(
        "SELECT (" + READ_RESULT + ") AS result", job_id=context.job.id
    )
    return row["result"]
