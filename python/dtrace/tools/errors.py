"""The errors the tools end with: what the command line prints for each, and its exit status.

Every layer of ``dtrace.tools`` raises these; this module imports nothing of the package.
"""

from __future__ import annotations


class ToolError(Exception):
    """A problem the user can act on: printed as ``pydtrace: MESSAGE``, exit code 1."""


class UsageError(Exception):
    """A bad command line: printed after the tool's usage, exit status 2."""
