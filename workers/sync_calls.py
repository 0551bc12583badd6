"""Find synchronous Procrastinate calls written inside ``async def`` functions.

Procrastinate's synchronous API (``defer()``, ``App.open()``, the job manager
methods without ``_async``) runs its own bridge to async code and must not run on a
thread whose event loop is already running: it raises, binds futures to the wrong
loop, or blocks the loop so that heartbeats stop. Worker and scheduler code runs on
a loop, so it must use ``defer_async``, ``open_async`` and the ``*_async`` methods.

``python -m workers.sync_calls PATH...`` prints each finding as ``FILE:LINE: ...``
and exits 1 when there is one. The check reads the source only: a synchronous call
hidden behind a plain function that async code calls is not found.
"""

from __future__ import annotations

import ast
import dataclasses
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

# Methods of tasks, job deferrers and blueprints that defer synchronously.
_DEFER_METHODS = frozenset({"defer", "batch_defer"})
# Synchronous methods of App, JobManager and the connectors.
_SYNC_METHODS = frozenset(
    {
        "open",
        "run_worker",
        "check_connection",
        "cancel_job_by_id",
        "retry_job_by_id",
        "get_job_status",
        "list_jobs",
        "list_queues",
        "list_tasks",
        "list_locks",
        "defer_job",
        "batch_defer_jobs",
        "execute_query",
        "execute_query_one",
        "execute_query_all",
    }
)
# Receivers whose ``open()`` is Procrastinate's: ``app.open()``,
# ``context.app.open()``, ``self.app.open()``.
_APP_NAMES = frozenset({"app", "procrastinate_app"})


@dataclasses.dataclass(frozen=True)
class SyncCall:
    """One synchronous Procrastinate call found inside an async function."""

    path: Path
    line: int
    call: str
    function: str

    def __str__(self) -> str:
        return (
            f"{self.path}:{self.line}: synchronous {self.call}() inside async "
            f"function {self.function}; use the *_async variant "
            "(defer_async, open_async, ...)"
        )


def _receiver_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _is_sync_call(call: ast.Call) -> str | None:
    func = call.func
    if not isinstance(func, ast.Attribute):
        return None
    name = func.attr
    receiver = _receiver_name(func.value)
    if name in _DEFER_METHODS:
        return f"{receiver}.{name}" if receiver else name
    if name == "open":
        return f"{receiver}.open" if receiver in _APP_NAMES else None
    if name in _SYNC_METHODS and receiver in {
        "job_manager", "connector", "app", "procrastinate_app"
    }:
        return f"{receiver}.{name}"
    return None


class _Finder(ast.NodeVisitor):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.async_stack: list[str | None] = []
        self.found: list[SyncCall] = []

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self.async_stack.append(node.name)
        self.generic_visit(node)
        self.async_stack.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        # A plain function nested in an async one may run in a thread.
        self.async_stack.append(None)
        self.generic_visit(node)
        self.async_stack.pop()

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self.async_stack.append(None)
        self.generic_visit(node)
        self.async_stack.pop()

    def visit_Call(self, node: ast.Call) -> None:
        function = self.async_stack[-1] if self.async_stack else None
        if function is not None:
            call = _is_sync_call(node)
            if call is not None:
                self.found.append(SyncCall(self.path, node.lineno, call, function))
        self.generic_visit(node)


def find_sync_calls(paths: Iterable[Path]) -> list[SyncCall]:
    """Return every synchronous Procrastinate call inside async functions."""
    found: list[SyncCall] = []
    for root in paths:
        files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
        for path in files:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            finder = _Finder(path)
            finder.visit(tree)
            found.extend(finder.found)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Print the findings for the given files or folders; return 1 if any."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    paths = [Path(argument) for argument in arguments] or [Path(__file__).parent]
    found = find_sync_calls(paths)
    for item in found:
        print(item)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
