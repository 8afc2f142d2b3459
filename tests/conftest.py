"""Shared fixtures: see tracing.py for the traced-workload helpers.

Also the check that under PYDTRACE_REQUIRE_TRACER=1 (CI) no test skips for want of an
interpreter: scripts/dev sets up every interpreter the suite uses (pyenv's 3.12 and 3.13,
Debian's 3.13, 3.14 and 3.15, the older Pythons some tests start), so such a skip means a set-up
that tests less than it says.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from tracing import REQUIRE_TRACER

#: Skip reasons that say an interpreter the test needs is missing (tests/test_*.py word them so).
MISSING_INTERPRETER = re.compile(r"\bno (other )?C?Python\b|\bpython3\.\d+\b.* is not installed", re.I)

#: Debian sid's gdb 18, which scripts/dev unpacks (sid_setup): Debian 12's gdb 13.1 cannot write
#: the x86 extended register state back on CPUs with AMX, which --inject needs (docs/injection.md).
SID_GDB = Path(os.environ.get("PYDTRACE_SID_ROOT", "/opt/pydtrace-sid")) / "bin" / "gdb"


@pytest.fixture(autouse=True, scope="session")
def injection_gdb():
    """--inject's gdb for the whole run (the tools read PYDTRACE_GDB): as given, else the gdb that
    scripts/dev sets up where it is there, else gdb on PATH. tests/test_inject.py checks that it
    can write registers back."""
    if not os.environ.get("PYDTRACE_GDB") and os.access(SID_GDB, os.X_OK):
        os.environ["PYDTRACE_GDB"] = str(SID_GDB)
    yield os.environ.get("PYDTRACE_GDB") or shutil.which("gdb")


@pytest.fixture
def workload_dir():
    """A directory with a short path for a workload: bpftrace 0.17 takes string literals of at
    most 64 bytes, and tests compare the workload's filename with one."""
    path = Path(tempfile.mkdtemp(prefix="pdt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under PYDTRACE_REQUIRE_TRACER=1, a skip for a missing interpreter is a failure."""
    outcome = yield
    report = outcome.get_result()
    if not (REQUIRE_TRACER and report.skipped):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if MISSING_INTERPRETER.search(reason):
        report.outcome = "failed"
        report.longrepr = f"{reason}; PYDTRACE_REQUIRE_TRACER=1 makes a missing interpreter a failure, not a skip"
