"""Shared fixtures: see tracing.py for the traced-workload helpers."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

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
