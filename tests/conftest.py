"""Shared fixtures (``cleanup``, ``workload_dir``, ``injection_gdb``): see tracing.py for the
traced-workload helpers, and workloads/ for the programs the tests and the benchmarks run.

Also the check that under PYDTRACE_REQUIRE_TRACER=1 (CI) no test skips but for a reason on the
allow-list below (:data:`ALLOWED_SKIPS`): a missing tracer, gdb, readelf, interpreter or module
means a set-up that tests less than it says, and a skip for it is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from tracing import REQUIRE_TRACER, Cleanup

#: Debian sid's gdb 18, which scripts/dev unpacks (sid_setup): Debian 12's gdb 13.1 cannot write
#: the x86 extended register state back on CPUs with AMX, which --inject needs (docs/injection.md).
SID_GDB = Path(os.environ.get("PYDTRACE_SID_ROOT", "/opt/pydtrace-sid")) / "bin" / "gdb"

#: The skips a full run under PYDTRACE_REQUIRE_TRACER=1 may keep: each says that the test has
#: nothing to check on this interpreter, never that something it needs is missing. Any other skip
#: fails the run (pytest_runtest_makereport below). A pattern is searched for in the reason. The
#: list is what a full run on pyenv's 3.12 and Debian's 3.15 skips; a skip that no interpreter the
#: suite runs on takes (a probe the build does not arm: every one arms all of them) is left off, so
#: that it fails the day it happens.
ALLOWED_SKIPS: list[tuple[str, str]] = [
    # test_aggregate.py: bpftrace 0.17 refuses the per-event tools' programs on an interpreter
    # that declares function__entry itself (Debian's 3.15); the aggregate mode is tested there.
    (r"^the per-event tools on an interpreter that declares function__entry itself",
     "a known limit of the per-event tools on a 3.15 built --with-dtrace"),
    # test_perf.py, test_interpreter_probes.py: the interpreter's own probes, on an interpreter
    # built without --with-dtrace (pyenv's), or one that does not declare those probes.
    (r" does not declare .* itself \(not built --with-dtrace",
     "tests of the interpreter's own probes on an interpreter that declares none of them"),
    (r" declares no probe of provider python itself$",
     "a comparison of the interpreter's notes with ours, on an interpreter that has none"),
    # test_children.py: the other-user case runs the interpreter as user nobody, who cannot run
    # pyenv's (under /root, 0700); it runs on Debian's builds (under /opt).
    (r"^needs root, and an interpreter and dtrace that user nobody can run",
     "the other-user case on an interpreter that user nobody cannot run"),
    # test_inject.py: Debian's builds link libpython statically, so there is no library to
    # delete under the running process (pyenv's, linked shared, run the test).
    (r" is linked statically: no libpython to delete$",
     "an interpreter without libpython: the deleted-library case does not arise"),
    # test_inject.py: through gdb (3.12, 3.13) a blocked main thread runs the injected code at
    # once; the test is about sys.remote_exec (3.14 and later), which waits for it.
    (r"^gdb runs the code in a blocked main thread itself",
     "a case of sys.remote_exec, on an interpreter --inject reaches through gdb"),
]


def allowed_skip(reason: str, path: str) -> bool:
    """Whether a skip for ``reason`` of a test in file ``path`` may stand under
    PYDTRACE_REQUIRE_TRACER=1."""
    # The release artifacts' checks skip without built wheels unless PYDTRACE_REQUIRE_WHEELS=1
    # asks for them (then they fail by themselves): CI sets it, a run without wheels does not.
    if Path(path).name == "test_wheels.py" and os.environ.get("PYDTRACE_REQUIRE_WHEELS") != "1":
        return True
    return any(re.search(pattern, reason) for pattern, _ in ALLOWED_SKIPS)


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


@pytest.fixture
def cleanup():
    """What the test starts or makes (processes, tools, files), ended and removed when it ends,
    passed or failed: :class:`tracing.Cleanup`."""
    with Cleanup() as registry:
        yield registry


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under PYDTRACE_REQUIRE_TRACER=1, a skip whose reason is not on ALLOWED_SKIPS is a failure
    that names the test and the reason."""
    outcome = yield
    report = outcome.get_result()
    if not (REQUIRE_TRACER and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    if allowed_skip(reason, str(item.path)):
        return
    report.outcome = "failed"
    report.longrepr = (f"{item.nodeid} skipped: {reason}; PYDTRACE_REQUIRE_TRACER=1 makes a skip that is not on "
                       "ALLOWED_SKIPS (tests/conftest.py) a failure")
