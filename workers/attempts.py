"""Notes on the running attempt, shared between a task and the middleware."""

from __future__ import annotations

import contextvars
import dataclasses


@dataclasses.dataclass
class AttemptNotes:
    """Facts a task records about its attempt, such as the upstream's response."""

    http_status: int | None = None
    retry_after: str | None = None


current_attempt: contextvars.ContextVar[AttemptNotes | None] = contextvars.ContextVar(
    "current_attempt", default=None
)


def note_http_answer(status: int, retry_after: str | None) -> None:
    """Record the upstream's status and Retry-After on the running attempt."""
    notes = current_attempt.get()
    if notes is not None:
        notes.http_status = status
        notes.retry_after = retry_after
