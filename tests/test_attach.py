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
import signal
import subprocess
import sys
import textwrap

import pytest

from tracing import STEP_TIMEOUT, Lines, bound_for, parse_json_line, require_tracer, stop_with_sigint

#: How many calls of marked() the phase makes.
MARKED_CALLS = 1234

COMMON = '''
import os, signal, sys, threading, time
{arm}

go = threading.Event()
requested = threading.Event()


def spin(n):
    return n + 1


def marked(n):
    return n * 2


def phase():
    for i in range({calls}):
        marked(i)
    print("DONE", flush=True)


def on_usr1(signum, frame):
    requested.set()


def on_usr2(signum, frame):
    # After the consumer left: report once the probes are off again.
    deadline = time.monotonic() + 30
    while dtrace.enabled_probes() and time.monotonic() < deadline:
        time.sleep(0.001)
    print("IDLE", sorted(dtrace.enabled_probes()), flush=True)


signal.signal(signal.SIGUSR1, on_usr1)
signal.signal(signal.SIGUSR2, on_usr2)
import dtrace
print("READY", os.getpid(), dtrace.library_path(), flush=True)
'''

#: Shapes of a busy process. Each runs spin() without end, and phase() once requested.
SHAPES = {
    # The main thread runs Python and never releases the GIL by itself.
    "cpu-bound": '''
def main():
    while True:
        spin(1)
        if requested.is_set():
            requested.clear()
            phase()
main()
''',
    # The main thread writes a line every few milliseconds (releases the GIL for I/O).
    "writing": '''
def main():
    out = open(os.devnull, "w")
    i = 0
    while True:
        spin(i)
        i += 1
        if i % 2000 == 0:
            out.write("tick\\n"); out.flush()
        if requested.is_set():
            requested.clear()
            phase()
main()
''',
    # The main thread is blocked in C for good; two worker threads run Python.
    "main-blocked-in-c": '''
def worker(me):
    while True:
        spin(me)
        if me == 0 and requested.is_set():
            requested.clear()
            phase()
for me in range(2):
    threading.Thread(target=worker, args=(me,), daemon=True).start()
threading.Event().wait()
''',
    # An asyncio loop with tasks that await.
    "asyncio": '''
import asyncio

async def ticker():
    while True:
        for _ in range(200):
            spin(0)
        await asyncio.sleep(0)

async def phaser():
    while True:
        await asyncio.sleep(0.001)
        if requested.is_set():
            requested.clear()
            phase()

async def main():
    await asyncio.gather(ticker(), phaser())
asyncio.run(main())
''',
}

PROGRAM = '''
usdt:{lib}:python:function__entry /str(arg1) == "spin" && @first == 0/ {{ @first = 1; printf("FIRST\\n"); }}
usdt:{lib}:python:function__entry /str(arg1) == "marked"/ {{ @marked_entry = count(); }}
usdt:{lib}:python:function__return /str(arg1) == "marked"/ {{ @marked_return = count(); }}
'''


class BusyProcess:
    """A workload that runs without any handshake; lines on stdout say what it did."""

    def __init__(self, shape: str, arm: str, env: dict[str, str] | None = None) -> None:
        source = COMMON.format(arm=arm, calls=MARKED_CALLS) + SHAPES[shape]
        environment = {k: v for k, v in os.environ.items() if not k.startswith("PYDTRACE")}
        environment.update(env or {})
        self.process = subprocess.Popen(
            [sys.executable, "-c", source], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=environment,
        )
        self.stdout = Lines(self.process.stdout, "the busy workload")
        self.stderr = Lines(self.process.stderr, "the busy workload's stderr")
        ready = self.stdout.next()
        assert ready and ready.startswith("READY "), (ready, self.stderr.rest(5))
        _, pid, self.library = ready.split(" ", 2)
        self.pid = int(pid)

    def expect(self, word: str) -> str:
        line = self.stdout.next()
        assert line is not None and line.startswith(word), (line, self.stderr.available())
        return line

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def attach_and_count(workload: BusyProcess) -> dict[str, int]:
    """bpftrace -p on the busy workload: wait for its first event, run the marked phase, detach,
    and return the counts; then check that the workload goes idle again."""
    # Where the interpreter declares the function probes itself (3.15 --with-dtrace), bpftrace
    # 0.17's -p cannot attach them by name: bound as the tools bind them there (tests/tracing.py).
    program, lease = bound_for(PROGRAM.format(lib=workload.library), workload.pid, workload.library)
    tracer = subprocess.Popen(
        ["bpftrace", "-f", "json", "-p", str(workload.pid), "-e", program],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="backslashreplace",
    )
    out = Lines(tracer.stdout, "bpftrace")
    err = Lines(tracer.stderr, "bpftrace's stderr")
    try:
        while True:  # the first event: the probes went live without the workload's help
            line = out.next()
            assert line is not None, err.rest(5)
            event = parse_json_line(line)
            if event.get("type") == "printf" and event["data"] == "FIRST\n":
                break
        workload.process.send_signal(signal.SIGUSR1)
        workload.expect("DONE")
        counts: dict[str, int] = {}
        for line in stop_with_sigint(tracer, out):
            if line.strip():
                event = parse_json_line(line)
                if event.get("type") == "map":
                    counts.update(event["data"])
        tracer.wait(STEP_TIMEOUT)
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
        if lease is not None:
            lease.release()
    workload.process.send_signal(signal.SIGUSR2)
    assert workload.expect("IDLE") == "IDLE []"
    return counts


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_bpftrace_p_on_a_busy_process_counts_a_marked_phase_exactly(shape):
    require_tracer()
    workload = BusyProcess(shape, arm="")
    try:
        for attach in ("first", "second"):  # a later attach goes through the same path
            counts = attach_and_count(workload)
            assert counts == {"@first": 1, "@marked_entry": MARKED_CALLS, "@marked_return": MARKED_CALLS}, attach
    finally:
        workload.kill()


def test_pydtrace_1_arms_a_busy_process_without_an_import():
    require_tracer()
    workload = BusyProcess("writing", arm="", env={"PYDTRACE": "1"})
    try:
        counts = attach_and_count(workload)
        assert counts["@marked_entry"] == counts["@marked_return"] == MARKED_CALLS
    finally:
        workload.kill()


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
