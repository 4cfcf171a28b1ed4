"""User-facing errors: each names the file, key or value at fault and what would be right.

The CLI prints them as one paragraph (no traceback) and exits with status 2.
"""

from __future__ import annotations


class CLTError(Exception):
    """A problem the user can fix: bad input, a missing artifact, a mismatch between stages."""

    exit_code = 2


class ConfigError(CLTError):
    """A wrong group option, unknown key, or badly typed value in the configuration."""
