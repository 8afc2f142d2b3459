"""``-p PID --inject``: loading the probes into a Python process that never imported dtrace.

Each workload here runs without pydtrace-rs loaded, in one of the shapes a user finds a process in
(tests/workloads/busy.py): busy in Python with threads, blocked in C (``time.sleep`` in the main
thread), the main thread waiting on a lock while threads run, an idle asyncio server. The test
runs the real tool, ``python -m dtrace calls -p PID --inject``, which injects ``import dtrace``
through gdb (3.12, 3.13) or ``sys.remote_exec`` (3.14 and later: :data:`VIA`, checked for in the
tool's messages) and traces; once its "Tracing ..." line is out, the workload is asked for a
marked phase, which first waits until the probes are live in it (``dtrace.wait_for_consumer``,
from the module the tool loaded) and then calls ``marked()`` a known number of times: the tool's
count must be exact. The workload also reports what the injection must not have changed (its
``__main__`` names, ``sys.path``, ``sys.last_exc``), and shows that it keeps running correctly
after: sleeps last as long as asked, threads keep computing right, the server keeps answering.

Then the failures: not Python, too old, free-threaded, ptrace refused, no terminal, a main thread
that never reaches a safe point, a process that exits during the injection, a signal handler
that raises while the code runs. Each gives a one-line reason and exit status 1, and leaves no
gdb and no stopped or traced process behind.

A gdb that cannot write the registers back (Debian 12's gdb 13.1 on CPUs with AMX) is refused
before anything changes in the process: a stand-in debugger (the working gdb, whose ptrace calls
that write the extended register state fail as 13.1's do there) shows it on any CPU, with the
process sleeping, blocked in accept and busy.

Tests that need root, bpftrace or a gdb that can write registers back skip where they are
missing, and fail under PYDTRACE_REQUIRE_TRACER=1 (tests/tracing.py). The gdb is PYDTRACE_GDB's,
which tests/conftest.py sets to the one scripts/dev sets up where it is there.
"""

from __future__ import annotations

import functools
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dtrace
from dtrace.tools.errors import ToolError
from dtrace.tools.inject import gdb as inject_gdb
from dtrace.tools.inject import loader as inject
from dtrace.tools.inject import payload, ptrace
from tracing import REQUIRE_TRACER, STEP_TIMEOUT, ToolRun, Lines, require, require_tracer, run_tool, tool_command
from tracing import BusyProcess, Cleanup, clean_environment

#: How many calls of marked() the phase makes.
MARKED_CALLS = 1500
ROOT = Path(__file__).resolve().parent.parent
#: The way in on this interpreter: sys.remote_exec (PEP 768) from 3.14, gdb before; and as the
#: tool's messages name it.
VIA = "remote_exec" if sys.version_info >= (3, 14) else "gdb"
THROUGH = {"gdb": "gdb", "remote_exec": "sys.remote_exec"}[VIA]


#: gdb commands that write another value into a general register and into one of the extended
#: state (SSE, part of the XSAVE area), then the old values back, each read back from the process.
REGISTER_ROUND_TRIP = [
    command
    for register in ("$r11", "$xmm0.v2_int64[0]")
    for command in (f"p/x {register}", f"set var {register} = ~{register}", "maintenance flush register-cache",
                    f"p/x {register}", f"set var {register} = ~{register}", "maintenance flush register-cache",
                    f"p/x {register}")
]


@functools.cache
def register_problem(gdb: str) -> str | None:
    """Why ``gdb`` cannot write registers of a process back on this machine (None: it can), seen
    on a process of its own (``sleep``)."""
    with Cleanup() as cleanup:
        sleeper = cleanup.popen(["sleep", "60"])
        argv = [gdb, "-batch", "-nx", "-p", str(sleeper.pid)]
        for command in REGISTER_ROUND_TRIP:
            argv += ["-ex", command]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=STEP_TIMEOUT)
    values = re.findall(r"^\$\d+ = (0x[0-9a-f]+)$", done.stdout, re.M)
    if len(values) == 6 and values[0] == values[2] != values[1] and values[3] == values[5] != values[4]:
        return None
    return next((line for line in done.stderr.splitlines() if "write" in line), done.stderr.strip()[-200:])


def require_gdb() -> str:
    """The gdb the tools run (PYDTRACE_GDB, else gdb on PATH), checked to write registers back here.
    Skip where injection cannot run (no root, bpftrace or such a gdb); fail under
    PYDTRACE_REQUIRE_TRACER=1."""
    require_tracer()
    try:
        gdb = inject_gdb.gdb_path()
        problem = register_problem(gdb)
        reason = (None if problem is None else
                  f"{gdb} cannot write registers back on this machine ({problem}): set PYDTRACE_GDB to a gdb "
                  "that can (scripts/dev sets up Debian sid's)")
    except ToolError as error:
        reason = str(error)
    if reason is not None:
        if REQUIRE_TRACER:
            pytest.fail(f"{reason}; PYDTRACE_REQUIRE_TRACER=1 makes this a failure, not a skip")
        pytest.skip(reason)
    return gdb


def base_interpreter() -> str:
    """The interpreter this virtual environment was made from: it has no pydtrace-rs of its own."""
    return getattr(sys, "_base_executable", sys.executable)


#: The shapes of tests/workloads/busy.py the tracing tests inject into: the main thread busy in
#: Python with two more threads; sleeping in C (time.sleep) while a thread waits; waiting on a lock
#: while two threads run Python; an idle asyncio server.
SHAPES = ["asyncio-server", "busy-threads", "lock-wait", "sleep"]


@pytest.fixture
def busy(cleanup):
    """Start a process in one of tests/workloads/busy.py's shapes, without pydtrace-rs loaded (its
    phase under a consumer waits for the calls tool's probe); killed at the end of the test."""
    def start(shape: str, python: str = sys.executable, *options: str,
              env: dict[str, str] | None = None) -> BusyProcess:
        return cleanup.ends(BusyProcess(shape, python, "--calls", str(MARKED_CALLS), "--wait-for", "aggregate-calls",
                                        *options, env=env))
    return start


@pytest.fixture
def tool(cleanup):
    """A ToolRun of ``python -m dtrace ARGS -p PID`` (not started), killed at the end of the test."""
    return lambda args, pid: cleanup.ends(ToolRun(args, pid))


def traced_phase(tool, workload: BusyProcess, inject: bool = True) -> tuple[ToolRun, dict]:
    """``calls -n 0 [--inject] -p PID`` on the workload, its marked phase under the tool, and the
    tool stopped: the tool's run, and what the workload reported."""
    run = tool(["calls", "-n", "0", *(["--inject"] if inject else [])], workload.pid)
    run.start()
    info = workload.phase()
    stop(run)
    return run, info


#: Shapes whose main thread runs no Python code until something outside wakes it: sys.remote_exec
#: runs its script only then (test_a_blocked_main_thread_runs_the_script_when_it_next_runs_python).
MAIN_THREAD_BLOCKED = {"lock-wait", "asyncio-server"}


def injection_files(pid: int) -> list[str]:
    """The names of the sys.remote_exec script and report files made for ``pid`` in its /tmp."""
    return sorted(name for name in os.listdir(f"/proc/{pid}/root/tmp") if name.startswith(f"pydtrace-inject-{pid}-"))


#: Seconds the tool gets to end after Ctrl-C before it gets a second one.
TOOL_SIGINT_GRACE = 15.0


def stop(tool: ToolRun) -> None:
    """ToolRun.stop, with a second Ctrl-C if the first did not end the trace: bpftrace 0.17 misses
    about one SIGINT in 26, and the tool passes its tracer one per Ctrl-C."""
    if tool.process.poll() is None:
        tool.process.send_signal(signal.SIGINT)
    try:
        while tool.out.next(TOOL_SIGINT_GRACE) is not None:
            pass
    except TimeoutError:
        if tool.process.poll() is None:
            tool.process.send_signal(signal.SIGINT)
        tool.out.rest()
    tool.stdout = "\n".join(tool.out.seen) + "\n"
    tool.err.rest()
    tool.stderr = "\n".join(tool.err.seen)
    tool.code = tool.process.wait(STEP_TIMEOUT)


def rows(text: str, column: int, value: str) -> list[list[str]]:
    return [words for words in (line.split() for line in text.splitlines()) if len(words) > column
            and words[column] == value]


def gdb_processes_for(pid: int) -> list[str]:
    """Command lines of gdb processes started for ``pid`` (the tool names /proc/PID/exe to them)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == b"gdb" and f"/proc/{pid}/exe".encode() in argv:
            found.append(" ".join(a.decode(errors="replace") for a in argv))
    return found


def assert_nothing_left(pid: int) -> None:
    """No gdb for ``pid``; if it still runs, it is neither stopped nor traced."""
    assert not gdb_processes_for(pid)
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return
    assert re.search(r"^State:\s+(\S)", status, re.M).group(1) not in ("T", "t"), status
    assert re.search(r"^TracerPid:\s+(\d+)", status, re.M).group(1) == "0", status


def probe_object_mapped(pid: int) -> bool:
    return "dtrace/_native" in Path(f"/proc/{pid}/maps").read_text()


def check_error(done: subprocess.CompletedProcess, *phrases: str) -> None:
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    for phrase in phrases:
        assert phrase in done.stderr, done.stderr


# --- Inject, then trace: exact counts, and the process keeps running correctly -------------------

SOURCES = {
    # The workload's interpreter has pydtrace-rs installed (this virtual environment).
    "own": lambda: sys.executable,
    # It has none: the tool offers its own copy (same version and ABI).
    "tool's copy": base_interpreter,
}


@pytest.mark.parametrize("source", sorted(SOURCES))
@pytest.mark.parametrize("shape", SHAPES if VIA == "gdb" else sorted(set(SHAPES) - MAIN_THREAD_BLOCKED))
def test_inject_then_trace_counts_a_marked_phase_exactly(shape, source, busy, tool):
    require_gdb()
    python = SOURCES[source]()
    if source == "tool's copy":
        probe = subprocess.run([python, "-c", "import dtrace"], capture_output=True, env=clean_environment())
        assert probe.returncode != 0, f"{python} has pydtrace-rs of its own: the tool's copy would not be used"
    workload = busy(shape, python)
    if shape == "asyncio-server":
        assert workload.request("before") == "echo before"
    assert not probe_object_mapped(workload.pid)
    run = tool(["calls", "-n", "0", "--inject"], workload.pid)
    run.start()
    loaded = [line for line in run.err.seen if line.startswith("pydtrace: loaded ")]
    where = "the program's own" if source == "own" else "this tool's"
    assert loaded and f"loaded {where} pydtrace-rs {dtrace.__version__} into process {workload.pid} " \
        f"through {THROUGH}: " in loaded[0], run.err.seen
    info = workload.phase()
    stop(run)
    assert run.code == 0, run.stderr
    assert rows(run.stdout, 1, "marked") and rows(run.stdout, 1, "marked")[0][0] == str(MARKED_CALLS), \
        run.stdout
    # What the injection must leave as it was.
    assert info["live"] is True
    assert info["main_added"] == [], info
    assert info["path_same"] is True, info
    assert info["last_exc"] == "None", info
    if source == "own":
        assert info["dtrace"] == dtrace.__file__
    else:
        assert info["dtrace"] == str(Path(dtrace.__file__).resolve())
    assert_nothing_left(workload.pid)
    # list -p says how the probes got there, and which pydtrace-rs.
    listing = run_tool("list", "-p", str(workload.pid))
    assert listing.returncode == 0, listing.stderr
    assert f"probes loaded: yes, injected by python -m dtrace --inject, through {THROUGH}\n" in listing.stdout, \
        listing.stdout
    assert f"pydtrace-rs: {dtrace.__version__} (" in listing.stdout, listing.stdout
    assert injection_files(workload.pid) == []  # sys.remote_exec's script and report are gone
    # The process runs on, correctly, after the tool left.
    again = workload.phase(traced=False)
    if shape != "sleep":  # there the SLEPT lines show it (below)
        assert all(after > before for after, before in zip(again["counts"], info["counts"]) if before), \
            (info, again)
    if shape == "asyncio-server":
        assert workload.request("after") == "echo after"
    if shape == "sleep":
        workload.line("SLEPT")  # one more sleep ends after the tool left
        assert workload.slept and all(s >= 0.7 for s in workload.slept), workload.slept
    assert workload.process.poll() is None, workload.stderr.available()
    assert not any(line.startswith("WRONG") for line in workload.stdout.seen)
    assert "Traceback" not in "\n".join(workload.stderr.available())


def test_an_interpreter_deleted_on_disk_since_the_process_started(workload_dir, busy, tool):
    """An upgrade replaced the interpreter's library under a running process: its symbols are
    read from the mapping itself (/proc/PID/map_files)."""
    require_gdb()
    python = base_interpreter()
    library = next((line.split()[2] for line in subprocess.run(["ldd", python], capture_output=True, text=True)
                    .stdout.splitlines() if "libpython" in line and "=>" in line), None)
    if library is None:
        pytest.skip(f"{python} is linked statically: no libpython to delete")
    shutil.copy(library, workload_dir)
    workload = busy("busy-threads", python, env={"LD_LIBRARY_PATH": str(workload_dir)})
    copy = workload_dir / Path(library).name
    assert str(copy) in Path(f"/proc/{workload.pid}/maps").read_text()
    copy.unlink()
    run, _ = traced_phase(tool, workload)
    assert run.code == 0, run.stderr
    assert rows(run.stdout, 1, "marked")[0][0] == str(MARKED_CALLS), run.stdout
    assert_nothing_left(workload.pid)


def test_a_second_tool_finds_the_probes_already_loaded(busy, tool):
    require_gdb()
    workload = busy("busy-threads")
    for attempt in range(2):
        run, _ = traced_phase(tool, workload)
        assert rows(run.stdout, 1, "marked")[0][0] == str(MARKED_CALLS)
        injected = any(line.startswith("pydtrace: loaded ") for line in run.err.seen)
        assert injected == (attempt == 0), run.err.seen  # the second run traces what is there
    assert [name for name in os.listdir(f"/proc/{workload.pid}/task")
            if Path(f"/proc/{workload.pid}/task/{name}/comm").read_text().startswith("pydtrace-watch")] != []


def check_blocked(done: subprocess.CompletedProcess, pid: int) -> None:
    """sys.remote_exec's script was not run within the tool's 2 s: the one-line reason, which says
    what happens to it and how to check; the script waits in the process's /tmp, the report is gone."""
    check_error(done, f"process {pid} has not run the script within 2 s",
                "runs it when the process's main thread next runs Python code",
                f"The script stays in its /tmp (/tmp/{injection_files(pid)[0]}) until then",
                "it removes itself and loads the probes", f"`python -m dtrace list -p {pid}` says whether")
    assert [name.rsplit(".", 1)[1] for name in injection_files(pid)] == ["py"]


def remove_left_scripts(cleanup, pid: int) -> None:
    """The sys.remote_exec script the process has not run yet: removed at the end of the test."""
    for name in injection_files(pid):
        cleanup.file(f"/tmp/{name}")


@pytest.mark.skipif(VIA != "remote_exec", reason="gdb runs the code in a blocked main thread itself "
                    "(test_inject_then_trace_counts_a_marked_phase_exactly)")
@pytest.mark.parametrize("shape", sorted(MAIN_THREAD_BLOCKED))
def test_a_blocked_main_thread_runs_the_script_when_it_next_runs_python(shape, busy, tool, cleanup):
    """sys.remote_exec: a main thread that waits in C (a lock, epoll) runs the script only when it
    runs Python again. The tool says so and leaves the script; the process runs it (and removes
    it) when woken, and a tool run then traces without injecting anything."""
    require_gdb()
    workload = busy(shape)
    done = run_tool("calls", "-p", str(workload.pid), "--inject", env={"PYDTRACE_INJECT_TIMEOUT": "2"})
    check_blocked(done, workload.pid)
    remove_left_scripts(cleanup, workload.pid)
    assert not probe_object_mapped(workload.pid)
    assert_nothing_left(workload.pid)
    # Woken: the lock's wait by a signal whose handler is Python code, the event loop by a
    # request. The main thread runs Python again, and the script with it.
    if shape == "lock-wait":
        workload.phase(traced=False)
    else:
        assert workload.request("wake") == "echo wake"
    deadline = time.monotonic() + STEP_TIMEOUT
    while not probe_object_mapped(workload.pid):
        assert time.monotonic() < deadline, workload.stderr.available()
        time.sleep(0.01)
    assert injection_files(workload.pid) == []
    listing = run_tool("list", "-p", str(workload.pid))
    assert "probes loaded: yes, injected by python -m dtrace --inject, through sys.remote_exec\n" \
        in listing.stdout, listing.stdout
    run, info = traced_phase(tool, workload, inject=False)  # loaded already
    assert rows(run.stdout, 1, "marked")[0][0] == str(MARKED_CALLS), run.stdout
    assert info["live"] is True and info["main_added"] == [] and info["path_same"] is True, info
    assert "Traceback" not in "\n".join(workload.stderr.available())


# --- A signal handler of the program that raises while the code runs: the program gets it -------

#: The shapes of tests/workloads/busy.py whose own handler of KeyboardInterrupt says GOT: the
#: main thread busy in Python, or sleeping. The program's audit hook raises SIGINT once, while
#: the injected code imports dtrace (busy.py --on-dtrace-import interrupt): the program's handler
#: runs inside the injected code.
INTERRUPTED_SHAPES = {"busy": "busy-catching-ctrl-c", "sleep": "sleep-catching-ctrl-c"}


# sys.remote_exec runs nothing in a main thread that sleeps for an hour (MAIN_THREAD_BLOCKED).
@pytest.mark.parametrize("shape", sorted(INTERRUPTED_SHAPES) if VIA == "gdb" else ["busy"])
def test_an_exception_from_a_signal_handler_during_the_injection_goes_to_the_program(shape, busy, tool):
    """Through gdb the code's exception is raised where the program was; sys.remote_exec would
    report it as unraisable, so the code raises it in the main thread once the script has ended."""
    require_gdb()
    workload = busy(INTERRUPTED_SHAPES[shape], sys.executable, "--on-dtrace-import", "interrupt")
    first = run_tool("calls", "-p", str(workload.pid), "--inject")
    check_error(first, f"loading the probes into process {workload.pid} was interrupted",
                "raised KeyboardInterrupt")
    workload.line("GOT KeyboardInterrupt")  # where the program was: its own handler's exception
    assert "Traceback" not in "\n".join(workload.stderr.available())  # not reported as unraisable
    assert_nothing_left(workload.pid)
    assert not probe_object_mapped(workload.pid)
    # The hook raised once: the next try loads the probes, and the program runs on.
    run, info = traced_phase(tool, workload)
    assert rows(run.stdout, 1, "marked")[0][0] == str(MARKED_CALLS), run.stdout
    assert info["live"] and info["main_added"] == [], info
    assert_nothing_left(workload.pid)


# --- Failures: a reason, exit status 1, and nothing left behind ---------------------------------


def test_refused_without_a_terminal_and_without_inject(busy):
    require_gdb()
    workload = busy("busy-threads")
    done = run_tool("calls", "-p", str(workload.pid))  # stdin is no terminal here
    check_error(done, f"process {workload.pid} has not loaded the dtrace module", "--inject", "import dtrace",
                "PYDTRACE=1")
    assert not probe_object_mapped(workload.pid)
    assert_nothing_left(workload.pid)


def test_a_process_that_is_not_python(cleanup):
    require_gdb()
    sleeper = cleanup.popen(["sleep", "100"])
    done = run_tool("calls", "-p", str(sleeper.pid), "--inject")
    check_error(done, f"process {sleeper.pid} (sleep, ", "is not a Python interpreter")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert_nothing_left(sleeper.pid)


def older_python(minor: str) -> str | None:
    """A CPython 3.``minor`` here: Debian's, or pyenv's."""
    candidates = [f"/usr/bin/python3.{minor}",
                  *sorted(Path(os.path.expanduser("~/.pyenv/versions")).glob(f"3.{minor}.*/bin/python3.{minor}"))]
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


@pytest.mark.parametrize("minor", ["11", "10"])
def test_a_python_older_than_3_12(minor, cleanup):
    """3.11 says its version in Py_Version; older ones only in their file names."""
    require_gdb()
    python = older_python(minor)
    if python is None:
        pytest.skip(f"no Python 3.{minor} here (/usr/bin/python3.{minor} or pyenv's 3.{minor}.*)")
    old = cleanup.popen([python, "-c", "import sys, time; print('up', flush=True); time.sleep(100)"],
                        stdout=subprocess.PIPE, text=True, env=clean_environment())
    assert old.stdout.readline() == "up\n"
    done = run_tool("calls", "-p", str(old.pid), "--inject")
    check_error(done, f"process {old.pid} runs Python 3.{minor}", "pydtrace-rs needs CPython 3.12 or later")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert_nothing_left(old.pid)
    listing = run_tool("list", "-p", str(old.pid))
    check_error(listing, "pydtrace-rs needs CPython 3.12 or later")


FAKE_LIBPYTHON = """
const unsigned long Py_Version = 0x030D00F0;  /* 3.13.0 final */
void Py_Initialize(void) {}
void _Py_DecRefShared(void *object) { (void)object; }  /* exported by free-threaded builds only */
"""
FAKE_MAIN = """
#include <unistd.h>
extern void Py_Initialize(void);
int main(void) { Py_Initialize(); write(1, "up\\n", 3); pause(); return 0; }
"""


def test_a_free_threaded_build(workload_dir, cleanup):
    """No free-threaded CPython here: a stand-in that looks like one from outside (libpython3.13t
    with the symbols such a build exports) shows the check, which runs before anything touches it."""
    require_gdb()
    compiler = shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler for the free-threaded stand-in")
    (workload_dir / "lib.c").write_text(FAKE_LIBPYTHON)
    (workload_dir / "main.c").write_text(FAKE_MAIN)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(workload_dir / "libpython3.13t.so"),
                    str(workload_dir / "lib.c")], check=True)
    subprocess.run([compiler, "-o", str(workload_dir / "python3.13t"), str(workload_dir / "main.c"),
                    f"-L{workload_dir}", "-lpython3.13t", f"-Wl,-rpath,{workload_dir}"], check=True)
    fake = cleanup.popen([str(workload_dir / "python3.13t")], stdout=subprocess.PIPE, text=True)
    assert fake.stdout.readline() == "up\n"
    done = run_tool("calls", "-p", str(fake.pid), "--inject")
    check_error(done, f"process {fake.pid} runs a free-threaded build, CPython 3.13.0 free-threaded",
                "pydtrace-rs needs a build with the GIL")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert_nothing_left(fake.pid)


def test_a_process_that_exits_during_the_injection(busy):
    """The program's audit hook ends it (os._exit(7)) as the injected code imports dtrace."""
    require_gdb()
    workload = busy("sleep", sys.executable, "--on-dtrace-import", "exit")
    done = run_tool("calls", "-p", str(workload.pid), "--inject")
    check_error(done, f"process {workload.pid} exited during the injection", "while the injected code ran")
    # Its exit status when gdb saw the exit before the process was gone.
    assert "(status" not in done.stderr or "(status 7)" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert workload.process.wait(STEP_TIMEOUT) == 7
    assert_nothing_left(workload.pid)


def release(workload: BusyProcess) -> dict:
    """Let a holds-the-gil workload go on (a byte through its pipe) and return its AFTER line:
    whether dtrace got loaded meanwhile."""
    with open(f"/proc/{workload.pid}/fd/{workload.ready['pipe']}", "w") as pipe:
        pipe.write("x")
    return workload.expect("AFTER")


def test_no_safe_point_in_time_leaves_the_process_untouched(busy):
    # The main thread blocks in C holding the GIL until the test writes a byte: no Python code
    # runs in the process meanwhile (tests/workloads/busy.py, holds-the-gil).
    require_gdb()
    workload = busy("holds-the-gil")
    pid = workload.pid
    done = run_tool("calls", "-p", str(pid), "--inject", env={"PYDTRACE_INJECT_TIMEOUT": "2"})
    if VIA == "gdb":
        check_error(done, f"process {pid}'s main thread did not reach a point where it can run Python code "
                          "within 2 s", "nothing was run in it")
    else:
        check_blocked(done, pid)
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert_nothing_left(pid)
    assert not probe_object_mapped(pid)
    # Released: through gdb it runs on as if nothing had happened (nothing of the tool's is
    # loaded); through sys.remote_exec it runs the script as it runs Python again, as said.
    loaded = VIA == "remote_exec"
    assert release(workload) == {"dtrace": loaded, "maps": loaded}
    assert injection_files(pid) == []
    assert workload.process.poll() is None


def test_a_process_stopped_by_someone_else_during_the_injection_stays_stopped(busy, cleanup):
    """A SIGSTOP from another process while gdb waits for the safe point: the process ends up
    stopped, as it would have without the tool, and the tool says so; continued, it runs on."""
    require_gdb()
    workload = busy("holds-the-gil", gdb_way_python())
    pid = workload.pid
    tool = cleanup.popen(tool_command("calls", "-p", str(pid), "--inject"), stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYDTRACE_INJECT_DEBUG": "1", "PYDTRACE_INJECT_TIMEOUT": "3"})
    said = Lines(tool.stderr, "the tool's stderr")
    while True:
        line = said.next()
        assert line is not None, said.seen
        if '"kind": "waiting"' in line:
            break
    os.kill(pid, signal.SIGSTOP)  # from this test's process
    assert tool.wait(STEP_TIMEOUT) == 1, said.seen
    said.rest()
    text = "\n".join(said.seen)
    assert f"process {pid} was stopped by process {os.getpid()}" in text, text
    assert "it is left stopped, as it would have been without the tool" in text, text
    assert "nothing was run in it" in text, text
    assert re.search(r"^State:\s+T", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert not gdb_processes_for(pid)
    assert re.search(r"^TracerPid:\s+0$", Path(f"/proc/{pid}/status").read_text(), re.M)
    os.kill(pid, signal.SIGCONT)
    assert release(workload) == {"dtrace": False, "maps": False}


def test_a_process_another_debugger_traces(busy, cleanup):
    """ptrace allows one tracer: with another debugger attached (the process runs on under it),
    the tool says so instead of trying."""
    require_gdb()
    workload = busy("busy-threads")
    holder = subprocess.Popen(["gdb", "-batch", "-nx", "-p", str(workload.pid), "-ex", "echo attached\\n",
                               "-ex", "continue"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    cleanup.callback(holder.wait)
    cleanup.callback(os.killpg, holder.pid, signal.SIGKILL)  # first: the debugger's whole session
    said = Lines(holder.stdout, "the other debugger")
    while True:
        line = said.next()
        assert line is not None, "the other debugger did not attach"
        if line == "attached":
            break
    done = run_tool("calls", "-p", str(workload.pid), "--inject")
    check_error(done, f"process {workload.pid} is already traced by process {holder.pid} (gdb)",
                "only one ptrace tracer")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not probe_object_mapped(workload.pid)
    assert not gdb_processes_for(workload.pid)


def test_without_ptrace_rights_the_message_explains_yama(busy):
    """Not root, not the owner: refused before gdb runs, with what ptrace needs and Yama's values."""
    require_gdb()
    workload = busy("busy-threads")
    code = ("import os, sys\n"
            "from dtrace.tools.inject import ptrace\nfrom dtrace.tools.proc import pyprocess\n"
            "from dtrace.tools.errors import ToolError\n"
            f"process = pyprocess.identify({workload.pid})\n"
            "os.seteuid(65534)\n"
            "try:\n"
            "    ptrace.check_privileges(process)\n"
            "except ToolError as error:\n"
            "    print(error)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=STEP_TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert f"cannot inject into process {workload.pid}: Permission denied" in done.stdout, done.stdout
    for phrase in ("CAP_SYS_PTRACE", "ptrace_scope", "0 (classic)", "1 (restricted)", "2 (admin-only)",
                   "3 (no attach)"):
        assert phrase in done.stdout or phrase in ptrace.ptrace_explanation(workload.pid), phrase
    assert "ptrace" in done.stdout


# --- list -p: loaded or not, how, and which version -----------------------------------------------


def test_list_says_the_probes_are_not_loaded(busy):
    require_gdb()
    workload = busy("sleep")
    done = run_tool("list", "-p", str(workload.pid))
    assert done.returncode == 0, done.stderr
    assert f"python: CPython {sys.version.split()[0]} (" in done.stdout, done.stdout
    assert "probes loaded: no, the program has not imported dtrace" in done.stdout, done.stdout
    assert not probe_object_mapped(workload.pid)


@pytest.mark.parametrize("how", ["import dtrace", "PYDTRACE=1"])
def test_list_says_how_the_probes_got_there(how, cleanup):
    require_tracer()
    code = "import dtrace, sys; print('up', flush=True); sys.stdin.read()"
    environment = clean_environment()
    if how == "PYDTRACE=1":
        environment["PYDTRACE"] = "1"
        code = "import sys; print('up', flush=True); sys.stdin.read()"
    process = cleanup.popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=environment)
    assert process.stdout.readline() == "up\n"
    done = run_tool("list", "-p", str(process.pid))
    assert done.returncode == 0, done.stderr
    expected = ("probes loaded: yes, imported by the program (import dtrace)" if how == "import dtrace" else
                "probes loaded: yes, PYDTRACE=1 in its environment: pydtrace-rs.pth imported dtrace at start-up")
    assert expected in done.stdout, done.stdout
    version = re.search(r"^pydtrace-rs: (\S+) \((.*)\)$", done.stdout, re.M)
    assert version and version.group(1) == dtrace.__version__, done.stdout
    assert Path(version.group(2)).name == f"pydtrace_rs-{dtrace.__version__}.dist-info"


# --- What runs in the target is what the documentation shows -------------------------------------


def test_the_documentation_shows_the_code_run_in_the_target():
    text = (ROOT / "docs" / "injection.md").read_text()
    assert payload.CODE in text
    compile(payload.code("gdb", "/somewhere/dtrace"), "<injected>", "exec")


def test_the_gdb_script_is_shipped_beside_the_tool():
    assert inject_gdb.GDB_SCRIPT.is_file()
    compile(inject_gdb.GDB_SCRIPT.read_text(), str(inject_gdb.GDB_SCRIPT), "exec")


# --- Asked on a terminal; Ctrl-C while waiting; a forked child says where its probes came from -----


class Terminal:
    """A pseudo-terminal as the tool's stdin and stderr, as when a user runs it."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        self.seen = ""

    def read_until(self, text: str) -> str:
        deadline = time.monotonic() + STEP_TIMEOUT
        while text not in self.seen:
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no {text!r} on the terminal; so far: {self.seen!r}"
            try:
                self.seen += os.read(self.master, 4096).decode(errors="replace")
            except OSError:  # the other end closed
                assert text in self.seen, f"no {text!r} on the terminal: {self.seen!r}"
        return self.seen

    def close(self) -> None:
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.mark.parametrize("answer", ["y", "n"])
def test_on_a_terminal_the_tool_asks_first(answer, busy, cleanup):
    require_gdb()
    workload = busy("busy-threads")
    terminal = Terminal()
    cleanup.callback(terminal.close)
    tool = cleanup.popen(tool_command("calls", "-n", "0", "-p", str(workload.pid)), stdin=terminal.slave,
                         stdout=subprocess.PIPE, stderr=terminal.slave, text=True)
    prompt = terminal.read_until("[y/N] ")
    assert f"PID {workload.pid} (" in prompt and "has not loaded the probes" in prompt, prompt
    assert f"runs `import dtrace` in it, through {THROUGH} " in prompt, prompt
    assert not probe_object_mapped(workload.pid)  # nothing before the answer
    os.write(terminal.master, f"{answer}\n".encode())
    if answer == "n":
        assert tool.wait(STEP_TIMEOUT) == 1
        assert f"not loading the probes into process {workload.pid}" in terminal.read_until("--inject")
        assert not probe_object_mapped(workload.pid)
    else:
        terminal.read_until("Tracing ")
        workload.phase()
        tool.send_signal(signal.SIGINT)
        out, _ = tool.communicate(timeout=STEP_TIMEOUT)
        assert tool.returncode == 0, terminal.seen
        assert rows(out, 1, "marked")[0][0] == str(MARKED_CALLS), out
    assert_nothing_left(workload.pid)


def test_ctrl_c_while_waiting_for_a_safe_point_gives_up_cleanly(busy, cleanup):
    """The tool says when gdb waits for the safe point (PYDTRACE_INJECT_DEBUG shows gdb's lines);
    Ctrl-C then makes gdb give up at once, long before its time is up. Through sys.remote_exec the
    script is in the process's /tmp once it is sent: Ctrl-C ends the wait, says that the process
    runs the script when it next runs Python, and leaves the script for it."""
    require_gdb()
    workload = busy("holds-the-gil")
    pid = workload.pid
    tool = cleanup.popen(tool_command("calls", "-p", str(pid), "--inject"), stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYDTRACE_INJECT_DEBUG": "1", "PYDTRACE_INJECT_TIMEOUT": "600"})
    said = Lines(tool.stderr, "the tool's stderr")
    if VIA == "gdb":
        while True:
            line = said.next()
            assert line is not None, said.seen
            if '"kind": "waiting"' in line:
                break
    else:
        deadline = time.monotonic() + STEP_TIMEOUT
        while not injection_files(pid):
            assert time.monotonic() < deadline and tool.poll() is None, said.rest()
            time.sleep(0.01)
        remove_left_scripts(cleanup, pid)
        time.sleep(0.2)  # past sys.remote_exec's return: the tool waits for the report
    assert not probe_object_mapped(pid)
    tool.send_signal(signal.SIGINT)
    assert tool.wait(STEP_TIMEOUT) == 130, said.seen
    said.rest()
    if VIA == "gdb":
        assert "pydtrace: nothing was run in process" in "\n".join(said.seen), said.seen
    else:
        assert f"pydtrace: process {pid} runs the script (/tmp/pydtrace-inject-" in "\n".join(said.seen), said.seen
        assert [name.rsplit(".", 1)[1] for name in injection_files(pid)] == ["py"]
    assert_nothing_left(pid)
    loaded = VIA == "remote_exec"
    assert release(workload) == {"dtrace": loaded, "maps": loaded}
    assert injection_files(pid) == []


def test_a_forked_child_of_an_injected_process_says_so(busy, cleanup):
    # SIGHUP makes the main thread fork a child that prints its PID and sleeps.
    require_gdb()
    workload = busy("sleep", sys.executable, "--fork-on-sighup")
    injected = run_tool("calls", "-p", str(workload.pid), "--inject", "-d", "1")
    assert injected.returncode == 0, injected.stderr
    workload.process.send_signal(signal.SIGHUP)
    child = int(workload.line("CHILD"))
    cleanup.callback(os.kill, child, signal.SIGKILL)
    listing = run_tool("list", "-p", str(child))
    assert listing.returncode == 0, listing.stderr
    assert f"probes loaded: yes, injected by python -m dtrace --inject, through {THROUGH}\n" in listing.stdout, \
        listing.stdout
    assert "probes armed: yes" in listing.stdout


def test_a_process_that_forks_during_the_injection(busy, tool):
    """Children forked while gdb is attached (and its breakpoint in the parent) end as they would
    have; the parent gets its probes and runs on. (A thread forks children until the probes are
    loaded, each of which runs Python code for a moment and exits 0: a child that inherited gdb's
    breakpoint would die of SIGTRAP.)"""
    require_gdb()
    workload = busy("busy-threads", sys.executable, "--fork-until-loaded")
    run, info = traced_phase(tool, workload)
    assert run.code == 0, run.stderr
    assert rows(run.stdout, 1, "marked")[0][0] == str(MARKED_CALLS), run.stdout
    assert info["live"] is True and info["counts"][1] > 0, info
    assert_nothing_left(workload.pid)
    assert not any(line.startswith(("CHILD-ENDED", "WRONG")) for line in workload.stdout.seen), \
        workload.stdout.seen
    assert workload.process.poll() is None


def other_version_python() -> str | None:
    """A CPython 3.12+ of another minor version than this one (pyenv's), without pydtrace-rs."""
    for candidate in sorted(Path(os.path.expanduser("~/.pyenv/versions")).glob("3.1[2-9].*/bin/python3.1[2-9]")):
        version = subprocess.run([str(candidate), "-c", "import sys; print(sys.version_info[1])"],
                                 capture_output=True, text=True)
        if version.returncode == 0 and int(version.stdout) != sys.version_info[1]:
            return str(candidate)
    return None


def test_neither_the_process_nor_the_tool_has_a_pydtrace_rs_for_it(busy):
    """Another Python version, without pydtrace-rs: the tool's copy cannot serve; the message says
    what to install where, and the process runs on without it."""
    require_gdb()
    python = other_version_python()
    if python is None:
        pytest.skip("no other CPython 3.12+ version here")
    workload = busy("sleep", python)
    done = run_tool("calls", "-p", str(workload.pid), "--inject")
    check_error(done, f"process {workload.pid} runs CPython 3.", "which cannot import pydtrace-rs",
                f"this tool's copy is for Python {sys.version_info[0]}.{sys.version_info[1]}",
                f"{python} -m pip install pydtrace-rs")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert_nothing_left(workload.pid)
    assert not probe_object_mapped(workload.pid)
    info = workload.phase(traced=False)
    assert info["dtrace"] is None and info["main_added"] == [] and info["path_same"], info


def test_a_main_thread_that_runs_a_subinterpreter(busy, cleanup):
    """pydtrace-rs cannot load into a sub-interpreter (PyO3 refuses them): its calls at the safe
    points are let pass, and the tool gives up when the main interpreter does not come back. The
    main thread sleeps in the sub-interpreter (tests/workloads/busy.py, subinterpreter)."""
    require_gdb()
    workload = busy("subinterpreter")
    done = run_tool("calls", "-p", str(workload.pid), "--inject", env={"PYDTRACE_INJECT_TIMEOUT": "2"})
    if VIA == "gdb":
        check_error(done, f"process {workload.pid}'s main thread runs a sub-interpreter's code",
                    "nothing was run in it")
    else:  # the main interpreter's code runs no more in the main thread: the script waits
        check_blocked(done, workload.pid)
        remove_left_scripts(cleanup, workload.pid)
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert_nothing_left(workload.pid)
    assert not probe_object_mapped(workload.pid)
    assert workload.process.poll() is None


# --- A gdb that cannot write the registers back: refused, the process untouched -----------------

#: Interposed on gdb's ptrace(): every write of the x86 extended register state (XSAVE area) or of
#: the floating-point registers fails with EFAULT ("Bad address"), as Debian 12's gdb 13.1's do on
#: CPUs with AMX; general registers are written as ever. An inferior call then writes the general
#: registers, fails on the extended state and leaves without restoring them, as 13.1 does there.
BROKEN_PTRACE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <stdarg.h>
#include <sys/ptrace.h>
#include <sys/types.h>

long ptrace(enum __ptrace_request request, ...) {
    static long (*real)(int, ...);
    va_list arguments;
    va_start(arguments, request);
    pid_t pid = va_arg(arguments, pid_t);
    void *address = va_arg(arguments, void *);
    void *data = va_arg(arguments, void *);
    va_end(arguments);
    if ((request == PTRACE_SETREGSET && ((long)address == NT_X86_XSTATE || (long)address == NT_PRFPREG))
        || request == PTRACE_SETFPREGS) {
        errno = EFAULT;
        return -1;
    }
    if (!real)
        real = (long (*)(int, ...))dlsym(RTLD_NEXT, "ptrace");
    return real(request, pid, address, data);
}
"""


@pytest.fixture(scope="module")
def stand_in_gdb(tmp_path_factory) -> str:
    """The working gdb with BROKEN_PTRACE: a gdb that fails as 13.1 does on CPUs with AMX."""
    gdb = require_gdb()
    compiler = shutil.which("cc")
    if compiler is None:
        if REQUIRE_TRACER:
            pytest.fail("no C compiler for the stand-in debugger; PYDTRACE_REQUIRE_TRACER=1 makes this a failure")
        pytest.skip("no C compiler for the stand-in debugger")
    directory = tmp_path_factory.mktemp("broken-gdb")
    (directory / "ptrace.c").write_text(BROKEN_PTRACE)
    library = directory / "broken-ptrace.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(directory / "ptrace.c"), "-ldl"], check=True)
    wrapper = directory / "gdb"
    wrapper.write_text(f'#!/bin/sh\n# {gdb}, whose writes of the extended register state fail (tests/test_inject.py)\n'
                       f'LD_PRELOAD={library}${{LD_PRELOAD:+:$LD_PRELOAD}} exec {gdb} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


#: Where the stand-in is pointed (shapes of tests/workloads/busy.py): the main thread sleeping
#: (time.sleep), blocked in accept, busy.
BROKEN_GDB_SHAPES = ["accept", "busy-threads", "sleep"]


def greeting(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=STEP_TIMEOUT) as connection:
        return connection.makefile("r").readline().strip()


def test_the_stand_in_breaks_a_sleeping_process_as_gdb_13_1_does(stand_in_gdb, busy):
    """What the refusal protects from: with the stand-in, calling a function in a process that
    sleeps in time.sleep (as --inject did) kills it with the kernel's restart code (Errno 514)."""
    workload = busy("sleep")
    done = subprocess.run([stand_in_gdb, "-batch", "-nx", "-p", str(workload.pid), "-ex",
                           "print ((int (*)(void))getpid)()"], capture_output=True, text=True,
                          timeout=STEP_TIMEOUT)
    assert "Couldn't write extended state status: Bad address" in done.stderr, done.stderr
    assert workload.process.wait(STEP_TIMEOUT) != 0
    assert "514" in "\n".join(workload.stderr.rest()), workload.stderr.seen


def gdb_way_python() -> str:
    """An interpreter --inject reaches through gdb: this one on 3.12 and 3.13, else a 3.13 or 3.12
    here (pyenv's or Debian's: scripts/dev sets them up)."""
    if VIA == "gdb":
        return sys.executable
    python = older_python("13") or older_python("12")
    if python is None:
        require(f"no CPython 3.12 or 3.13 here: on {sys.version.split()[0]} --inject goes through sys.remote_exec")
    return python


def broken_gdbs(stand_in: str) -> list[str]:
    """The stand-in, and this machine's own gdb where it is broken the same way (gdb 13.1 on a CPU
    with AMX)."""
    found = [stand_in]
    system = shutil.which("gdb")
    if system is not None and os.path.realpath(system) != os.path.realpath(inject_gdb.gdb_path()) \
            and register_problem(system) is not None:
        found.append(system)
    return found


@pytest.mark.parametrize("shape", BROKEN_GDB_SHAPES)
def test_a_gdb_that_cannot_write_registers_back_is_refused_and_the_process_lives_on(shape, stand_in_gdb, busy):
    for gdb in broken_gdbs(stand_in_gdb):
        workload = busy(shape, gdb_way_python())
        if shape == "accept":
            assert greeting(workload.port) == "hello 1"
        # Named with --gdb, or with PYDTRACE_GDB: the same refusal.
        how = ["--gdb", gdb] if gdb == stand_in_gdb else []
        done = run_tool("calls", "-p", str(workload.pid), "--inject", *how, env={"PYDTRACE_GDB": gdb})
        check_error(done, f"cannot inject into process {workload.pid}: {gdb} (GNU gdb",
                    "cannot write back the registers", "writing xmm0.v2_int64[0] failed",
                    "Couldn't write extended state status: Bad address", "nothing was changed in it",
                    "--gdb PATH or PYDTRACE_GDB=PATH", "sys.remote_exec")
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert_nothing_left(workload.pid)
        assert not probe_object_mapped(workload.pid)
        # It runs on as before: sleeps as long as asked, answers, computes right.
        if shape == "sleep":
            before = len(workload.slept)
            while len(workload.slept) < before + 2:
                workload.line("SLEPT")
            assert all(s >= 0.7 for s in workload.slept), workload.slept
        elif shape == "accept":
            assert greeting(workload.port) == "hello 2"
        else:
            first = workload.phase(traced=False)
            time.sleep(0.5)  # the threads get the GIL meanwhile
            again = workload.phase(traced=False)
            assert all(after > before for after, before in zip(again["counts"], first["counts"])), (first, again)
            assert not any(line.startswith("WRONG") for line in workload.stdout.seen)
        assert workload.process.poll() is None, workload.stderr.available()
        assert workload.stderr.available() == [], workload.stderr.available()
        workload.kill()


def test_a_gdb_that_is_not_there(busy):
    require_tracer()
    workload = busy("sleep", gdb_way_python())
    done = run_tool("calls", "-p", str(workload.pid), "--inject", "--gdb", "/nonexistent/gdb")
    check_error(done, "--gdb names /nonexistent/gdb, which is not an executable gdb")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert_nothing_left(workload.pid)
