"""The panel's SQL, kept as named and described blocks in ``.sql`` files.

A block starts with ``-- name: NAME`` followed by one or more ``--`` lines saying
what the query is for; the SQL runs until the next block.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

_BLOCK = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@functools.cache
def load(module: str) -> dict[str, str]:
    """Return the named queries of ``queries/<module>.sql``."""
    text = (Path(__file__).parent / f"{module}.sql").read_text(encoding="utf-8")
    parts = _BLOCK.split(text)
    queries = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        lines = [line for line in body.strip().splitlines()
                 if not line.lstrip().startswith("--")]
        queries[name] = "\n".join(lines).strip()
    return queries


def query(module: str, name: str) -> str:
    """Return one named query, raising KeyError naming the file when it is missing."""
    queries = load(module)
    if name not in queries:
        raise KeyError(f"no query named {name!r} in webpanel/queries/{module}.sql")
    return queries[name]
