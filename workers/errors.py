"""The project's exceptions.

FleetError
 ├── ConfigurationError      a setting is missing or invalid
 ├── SchemaMismatchError     the database schema does not match this release
 └── InvalidTaskArguments    a job's arguments were rejected before any I/O
"""

from __future__ import annotations


class FleetError(Exception):
    """Base class of every error raised by this project."""


class ConfigurationError(FleetError):
    """A setting is missing or invalid; the message names it and the fix."""


class SchemaMismatchError(FleetError):
    """The database schema does not match the installed release."""


class InvalidTaskArguments(FleetError, ValueError):
    """A job's arguments are invalid; retrying the job cannot help."""
