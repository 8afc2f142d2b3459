"""Attaching the way users attach: no help from the workload, and forks that say nothing.

The handshake tests (tests/tracing.py) hold the workload in ``dtrace.wait_for_consumer`` until
the probes are live. A user's process does no such thing: it is busy in Python, or blocked in C
while threads run, or in an event loop, when ``bpftrace -p PID`` attaches. Here the workload
only imports dtrace and runs; the consumer prints one line at its first event, and only then
does the test ask (SIGUSR1) for a marked phase whose events must be counted exactly. The bound
on that first event is generous (seconds): this is not a timing test, the latency benchmark
(benches/attach_latency.py) holds the target.

Then fork: CPython 3.12+ warns when a process with other OS threads forks, and 3.13.0 counts the
threads after the after-fork hooks have run. The watcher must be gone at that moment and still
come back in parent and child. The tests run with ``-W always::DeprecationWarning``: under
``-W error`` CPython drops the warning it cannot raise from inside ``os.fork()``, so an error
filter would hide it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tracing import STEP_TIMEOUT, BusyProcess, Lines, bound_for, parse_json_line, require_tracer, stop_with_sigint

#: How many calls of marked() the phase makes.
MARKED_CALLS = 1234

#: The shapes of a busy process (tests/workloads/busy.py) attached to here: the main thread busy
#: in Python, or writing a line every ~2 ms, or blocked in C while two threads run Python, or an
#: asyncio loop. Each runs spin() without end, and the marked phase once requested.
SHAPES = ["asyncio", "cpu-bound", "lock-wait", "writing"]

PROGRAM = '''
usdt:{lib}:python:function__entry /str(arg1) == "spin" && @first == 0/ {{ @first = 1; printf("FIRST\\n"); }}
usdt:{lib}:python:function__entry /str(arg1) == "marked"/ {{ @marked_entry = count(); }}
usdt:{lib}:python:function__return /str(arg1) == "marked"/ {{ @marked_return = count(); }}
'''


@pytest.fixture
def busy(cleanup):
    """A busy process that imports dtrace and runs; killed at the end of the test."""
    def start(shape: str, env: dict[str, str] | None = None) -> BusyProcess:
        return cleanup.ends(BusyProcess(shape, sys.executable, "--import-dtrace", "--calls", str(MARKED_CALLS),
                                        env=env))
    return start


def attach_and_count(workload: BusyProcess, cleanup) -> dict[str, int]:
    """bpftrace -p on the busy workload: wait for its first event, run the marked phase, detach,
    and return the counts; then check that the workload goes idle again."""
    # Where the interpreter declares the function probes itself (3.15 --with-dtrace), bpftrace
    # 0.17's -p cannot attach them by name: bound as the tools bind them there (tests/tracing.py).
    program, lease = bound_for(PROGRAM.format(lib=workload.library), workload.pid, workload.library)
    if lease is not None:
        cleanup.callback(lease.release)
    tracer = cleanup.popen(
        ["bpftrace", "-f", "json", "-p", str(workload.pid), "-e", program],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="backslashreplace",
    )
    out = Lines(tracer.stdout, "bpftrace")
    err = Lines(tracer.stderr, "bpftrace's stderr")
    while True:  # the first event: the probes went live without the workload's help
        line = out.next()
        assert line is not None, err.rest(5)
        event = parse_json_line(line)
        if event.get("type") == "printf" and event["data"] == "FIRST\n":
            break
    workload.phase()
    counts: dict[str, int] = {}
    for line in stop_with_sigint(tracer, out):
        if line.strip():
            event = parse_json_line(line)
            if event.get("type") == "map":
                counts.update(event["data"])
    tracer.wait(STEP_TIMEOUT)
    if lease is not None:
        lease.release()
    # After the consumer left: the probes go off again.
    assert workload.phase(traced=False)["idle"] == []
    return counts


@pytest.mark.parametrize("shape", SHAPES)
def test_bpftrace_p_on_a_busy_process_counts_a_marked_phase_exactly(shape, busy, cleanup):
    require_tracer()
    workload = busy(shape)
    for attach in ("first", "second"):  # a later attach goes through the same path
        counts = attach_and_count(workload, cleanup)
        assert counts == {"@first": 1, "@marked_entry": MARKED_CALLS, "@marked_return": MARKED_CALLS}, attach


def test_pydtrace_1_arms_a_busy_process_without_an_import(busy, cleanup):
    require_tracer()
    workload = busy("writing", env={"PYDTRACE": "1"})
    counts = attach_and_count(workload, cleanup)
    assert counts["@marked_entry"] == counts["@marked_return"] == MARKED_CALLS


FORKS = {
    "os.fork": '''
pid = os.fork()
if pid == 0:
    os._exit(0 if dtrace._native.is_armed() else 7)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, "the child's watcher did not run again"
''',
    "multiprocessing fork pool": '''
import multiprocessing
with multiprocessing.get_context("fork").Pool(2) as pool:
    assert pool.map(armed, range(4)) == [True] * 4
''',
    "ProcessPoolExecutor": '''
import concurrent.futures, multiprocessing
with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
    assert list(pool.map(armed, range(4))) == [True] * 4
''',
}


@pytest.mark.parametrize("arm", ["import dtrace", "PYDTRACE=1"])
@pytest.mark.parametrize("how", sorted(FORKS))
def test_fork_gives_no_multithreaded_fork_warning_and_the_watcher_runs_again(how, arm):
    code = (
        "import os, sys\n"
        "import dtrace  # armed already where PYDTRACE=1 made the .pth file import it at start-up\n"
        "def armed(_):\n"
        "    return dtrace._native.is_armed()\n"
        "if __name__ == '__main__':\n"
        "    assert dtrace._native.is_armed()\n"
        + textwrap.indent(textwrap.dedent(FORKS[how]), "    ")
        + "    print('parent armed', dtrace._native.is_armed())\n"
    )
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PYDTRACE")}
    if arm == "PYDTRACE=1":
        environment["PYDTRACE"] = "1"
    result = subprocess.run(
        [sys.executable, "-W", "always::DeprecationWarning", "-c", code],
        capture_output=True, text=True, env=environment, timeout=STEP_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "parent armed True"
    assert "multi-threaded" not in result.stderr and "DeprecationWarning" not in result.stderr, result.stderr


def test_watcher_stats_count_handoffs_to_the_main_thread():
    """A change of the enabled set applied by the busy main thread, not by the watcher taking the
    GIL: forced probes go through the same path as a consumer's."""
    code = textwrap.dedent('''
        import dtrace, json
        polls, taken, handed = dtrace._native._testing.watcher_stats()
        x = 0
        while not dtrace.enabled_probes():
            x += 1  # busy in Python: the pending call runs here
        print(json.dumps(dtrace._native._testing.watcher_stats()))
        ''')
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PYDTRACE")}
    environment["PYDTRACE_FORCE"] = "gc-start"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                            timeout=STEP_TIMEOUT)
    assert result.returncode == 0, result.stderr
    polls, taken, handed = json.loads(result.stdout)
    assert (taken, handed) == (0, 1)
