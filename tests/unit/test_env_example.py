"""Tests that .env.example documents every setting with its default and help text."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from workers.settings import PROJECT_DIR, SETTINGS, Setting

ENV_EXAMPLE = PROJECT_DIR / ".env.example"
SCRIPT_VARIABLES = {
    "LOCAL_DATABASE_PORT": "54320",
    "TEST_DATABASE_URL": "",
    "FULL": "0",
}
ASSIGNMENT = re.compile(r"^#?\s*(?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def _parse(path: Path) -> dict[str, tuple[str, str]]:
    """Map each assigned name to its value and the comment block right above it."""
    entries: dict[str, tuple[str, str]] = {}
    comment: list[str] = []
    for line in path.read_text().splitlines():
        match = ASSIGNMENT.match(line)
        if match is not None:
            entries[match["name"]] = (_unquote(match["value"]), " ".join(comment))
            comment = []
        elif line.startswith("#"):
            comment.append(line.lstrip("#").strip())
        else:
            comment = []
    return entries


@pytest.fixture(scope="module")
def entries() -> dict[str, tuple[str, str]]:
    return _parse(ENV_EXAMPLE)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda setting: setting.name)
def test_env_example_lists_setting_default(
    setting: Setting, entries: dict[str, tuple[str, str]]
) -> None:
    assert setting.name in entries, f"{setting.name} is missing from .env.example"
    value, _ = entries[setting.name]
    assert value == (setting.default or ""), (
        f"{setting.name} shows {value!r} in .env.example, but its default is "
        f"{setting.default!r}"
    )


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda setting: setting.name)
def test_env_example_describes_setting(
    setting: Setting, entries: dict[str, tuple[str, str]]
) -> None:
    assert setting.name in entries, f"{setting.name} is missing from .env.example"
    _, comment = entries[setting.name]
    assert comment == setting.help, (
        f"the comment above {setting.name} in .env.example differs from its help "
        "text in workers/settings.py"
    )


@pytest.mark.parametrize("name", sorted(SCRIPT_VARIABLES))
def test_env_example_lists_script_variable(
    name: str, entries: dict[str, tuple[str, str]]
) -> None:
    assert name in entries, f"{name} is missing from .env.example"
    value, comment = entries[name]
    assert value == SCRIPT_VARIABLES[name]
    assert comment, f"{name} has no description in .env.example"


def test_env_example_names_only_known_variables(
    entries: dict[str, tuple[str, str]],
) -> None:
    known = {setting.name for setting in SETTINGS} | set(SCRIPT_VARIABLES)
    unknown = sorted(set(entries) - known)
    assert unknown == [], f".env.example sets unknown names: {unknown}"


def test_env_example_parser_reads_assignment(tmp_path: Path) -> None:
    path = tmp_path / "env"
    path.write_text('# first line\n# second line\n# NAME="a b"\n\n# OTHER=1\n')
    assert _parse(path) == {
        "NAME": ("a b", "first line second line"),
        "OTHER": ("1", ""),
    }
