"""Shared fixtures: see tracing.py for the traced-workload helpers."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def workload_dir():
    """A directory with a short path for a workload: bpftrace 0.17 takes string literals of at
    most 64 bytes, and tests compare the workload's filename with one."""
    path = Path(tempfile.mkdtemp(prefix="pdt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
