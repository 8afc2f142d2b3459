"""The conftest check: under PYDTRACE_REQUIRE_TRACER=1 a skip whose reason is not on
``ALLOWED_SKIPS`` (tests/conftest.py) fails the run, naming the test and the reason.

Shown on a small test file run by pytest in a process of its own, with tests/conftest.py loaded as
a plugin: a skip for a missing readelf (``pytest.skip``), one for a missing gdb (a ``skipif``
marker), and one whose reason is on the allow-list.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tracing import STEP_TIMEOUT

HERE = Path(__file__).resolve().parent

SKIPS = '''
import pytest


def test_allowed():
    pytest.skip("the per-event tools on an interpreter that declares function__entry itself (bpftrace 0.17 "
                "refuses their programs there)")


def test_no_readelf():
    pytest.skip("readelf (binutils) is not installed")


@pytest.mark.skipif(True, reason="gdb is not installed")
def test_no_gdb():
    pass


def test_passes():
    pass
'''


def run_pytest(directory: Path, require: str | None) -> subprocess.CompletedProcess:
    """pytest on ``directory``/test_skips.py with this directory's conftest.py as a plugin, under
    PYDTRACE_REQUIRE_TRACER=``require`` (unset: None)."""
    (directory / "test_skips.py").write_text(SKIPS)
    env = {k: v for k, v in os.environ.items() if k != "PYDTRACE_REQUIRE_TRACER"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if require is not None:
        env["PYDTRACE_REQUIRE_TRACER"] = require
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-c",
                           os.devnull, "--rootdir", str(directory), "-rA", "-q", "test_skips.py"],
                          cwd=directory, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT)


def test_a_skip_off_the_allow_list_fails_under_require_tracer(tmp_path):
    done = run_pytest(tmp_path, "1")
    assert done.returncode == 1, done.stdout + done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith("1 failed, 1 passed, 1 skipped, 1 error"), done.stdout
    assert "SKIPPED [1] test_skips.py:6: the per-event tools on an interpreter that declares function__entry" \
        in done.stdout, done.stdout
    for test, reason in (("test_no_readelf", "readelf (binutils) is not installed"),
                         ("test_no_gdb", "gdb is not installed")):
        assert f"test_skips.py::{test} skipped: {reason}; PYDTRACE_REQUIRE_TRACER=1 makes a skip that is not on " \
            "ALLOWED_SKIPS (tests/conftest.py) a failure" in done.stdout, done.stdout


@pytest.mark.parametrize("require", [None, "0"])
def test_without_require_tracer_a_skip_is_a_skip(tmp_path, require):
    done = run_pytest(tmp_path, require)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("1 passed, 3 skipped"), done.stdout
