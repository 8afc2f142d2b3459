"""The errors the tools end with (what the command line prints for each, and its exit status), and
their warnings.

Every layer of ``dtrace.tools`` uses these; this module imports nothing of the package.
"""

from __future__ import annotations

import sys


class ToolError(Exception):
    """A problem the user can act on: printed as ``pydtrace: MESSAGE``, exit code 1."""


class UsageError(Exception):
    """A bad command line: printed after the tool's usage, exit status 2."""


def warn(message: str) -> None:
    """A warning on stderr, as every tool prints one: ``pydtrace: MESSAGE``."""
    print(f"pydtrace: {message}", file=sys.stderr, flush=True)
