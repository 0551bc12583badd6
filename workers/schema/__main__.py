"""Apply or check the database schema: python -m workers.schema apply|check."""

from __future__ import annotations

import argparse
import sys

from workers.errors import FleetError
from workers.logs import configure_logging
from workers.schema import apply_schema, check_schema
from workers.settings import load_settings
from workers.startup import StopRequested, require_database_url, wait_for_database

EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h


def main(argv: list[str] | None = None) -> int:
    """Run the schema command named on the command line."""
    parser = argparse.ArgumentParser(prog="python -m workers.schema")
    parser.add_argument("command", choices=["apply", "check"])
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        configure_logging(settings, process_name="schema")
        url = require_database_url(settings)
        wait_for_database(url, settings, role="schema", check=False)
        if args.command == "apply":
            changed = apply_schema(url)
            print("schema applied" if changed else "schema already up to date")
        else:
            check_schema(url)
            print("schema matches this release")
    except FleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StopRequested:
        print("stopped before the schema was applied", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
