"""Start a workload, attach a real bpftrace to it, and handshake on both sides.

The one fixture module for tests that need a tracer. A test writes a
workload module (a ``run(result)`` function), and a bpftrace program; then:

1. :class:`Workload` starts the module under this interpreter. The driver
   imports ``dtrace`` (arming the probes) and the workload module, reports
   its PID and probe object, and waits.
2. :class:`Bpftrace` attaches with ``-p PID`` and waits for the program's
   ``BEGIN`` line, printed only once every probe of the program is attached.
   Where the interpreter declares some of the program's probes itself (a
   distribution's build ``--with-dtrace``), bpftrace 0.17's ``-p`` cannot
   attach those by name: the program is bound as the tools bind it there,
   those probes by address, asked for through a lease on the process's
   channel (dtrace/tools/command/interpreter.py); test_interpreter_probes.py tests
   the forms a user can write by hand.
3. The workload is told to go; it waits in ``dtrace.wait_for_consumer`` until
   the probes are live, runs ``run(result)`` and reports ``result``.
4. The tracer is stopped (SIGINT; bpftrace prints its maps), and the
   workload is told so; it waits until the probes are idle again and reports
   what is still hooked into the interpreter.

No step waits on a sleep: each waits for the other side's line, with a
timeout that only bounds a failure.

Also here: :class:`BusyProcess`, a process in one of ``workloads/busy.py``'s shapes that does
nothing to help a consumer (tests/test_attach.py, tests/test_inject.py); :class:`Speaker`, the
one reader of a child process's tagged lines; and :class:`Cleanup` (conftest's ``cleanup``
fixture), which ends what a test started, passed or failed.

Tests that need bpftrace and root skip where either is missing, and fail
instead under ``PYDTRACE_REQUIRE_TRACER=1`` (set in CI).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dtrace.tools.command import interpreter
from dtrace.tools.command.engine import Stopper
from dtrace.tools.command.tracers import decode_json_line
from dtrace.tools.proc import scope

#: Seconds any one handshake step may take before the test fails.
STEP_TIMEOUT = 60.0

#: From 3.15 on, CPython built --with-dtrace fires these itself with three arguments, and our
#: notes of them declare those three only (bcc reads all sites of a name by one argument list:
#: build/codegen.rs, FIRED_BY_CPYTHON); the firing function still passes qualname.
CPYTHONS_OWN_FROM_315 = {"function__entry": 3, "function__return": 3}


def noted_arguments(name: str, count: int, python: tuple[int, int]) -> int:
    """How many of probe ``name``'s ``count`` arguments its note declares in a build for
    CPython ``python``."""
    if python >= (3, 15) and name in CPYTHONS_OWN_FROM_315:
        return min(count, CPYTHONS_OWN_FROM_315[name])
    return count

REQUIRE_TRACER = os.environ.get("PYDTRACE_REQUIRE_TRACER") == "1"


def tracer_missing_reason() -> str | None:
    """Why bpftrace cannot attach here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "the bpftrace tests run on Linux"
    if shutil.which("bpftrace") is None:
        return "bpftrace is not installed (Debian: apt-get install bpftrace)"
    if os.geteuid() != 0:
        return "attaching bpftrace needs root: run the tests with sudo"
    return None


def require(reason: str | None) -> None:
    """Skip the calling test for ``reason`` (a consumer that cannot attach here), or fail under
    PYDTRACE_REQUIRE_TRACER=1; nothing when ``reason`` is None."""
    if reason is None:
        return
    if REQUIRE_TRACER:
        pytest.fail(f"{reason}; PYDTRACE_REQUIRE_TRACER=1 makes this a failure, not a skip")
    pytest.skip(reason)


def require_tracer() -> None:
    """Skip the calling test where bpftrace cannot attach; fail under PYDTRACE_REQUIRE_TRACER=1."""
    require(tracer_missing_reason())


class Lines:
    """The lines of a pipe, read by a thread, taken with a timeout."""

    def __init__(self, stream, name: str) -> None:
        self.name = name
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def next(self, timeout: float = STEP_TIMEOUT) -> str | None:
        """The next line; None at end of stream. Raises TimeoutError."""
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no line from {self.name} within {timeout} s; so far: {self.seen[-20:]}") from None
        if line is not None:
            self.seen.append(line)
        return line

    def available(self) -> list[str]:
        """The lines read so far, without waiting for more."""
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return self.seen
            if line is None:
                self._queue.put(None)
                return self.seen
            self.seen.append(line)

    def rest(self, timeout: float = STEP_TIMEOUT) -> list[str]:
        """Every remaining line, up to end of stream."""
        lines = []
        while (line := self.next(timeout)) is not None:
            lines.append(line)
        return lines


def clean_environment(**extra: str) -> dict[str, str]:
    """This environment without PYDTRACE* (nothing armed or forced by the test's own settings) and
    PYTHONPATH* (a process of another interpreter finds only its own modules), plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("PYDTRACE", "PYTHONPATH"))}, **extra}


def end(process: subprocess.Popen) -> None:
    """Kill ``process`` if it still runs, and reap it."""
    if process.poll() is None:
        process.kill()
    process.wait()


class Speaker:
    """A child process that says what it does in tagged lines on stdout (``TAG {json}``, or
    ``TAG words``), and is told words on stdin: the one reader of such lines for the tests'
    drivers (:class:`Workload`, :class:`BusyProcess`, test_idle.py's, test_scope.py's)."""

    #: What the process is called in a failure's message.
    name = "the workload"

    def spawn(self, argv: list[str], env: dict[str, str], stdin: bool = True) -> None:
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.stdout = Lines(self.process.stdout, self.name)
        self.stderr = Lines(self.process.stderr, f"{self.name}'s stderr")

    def line(self, tag: str, timeout: float = STEP_TIMEOUT) -> str:
        """The words after ``tag`` on the next line (not set aside), which must start with it; else,
        or when none comes within ``timeout``, the process is killed and the test fails."""
        deadline = time.monotonic() + timeout
        try:
            line = self.stdout.next(timeout)
            while line is not None and self.set_aside(line, tag):
                line = self.stdout.next(max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            self.kill()
            raise
        if line is None or not (line == tag or line.startswith(tag + " ")):
            self.kill()
            raise AssertionError(f"expected {tag} from {self.name}, got {line!r}; stderr: {self.stderr.rest(5)}")
        return line[len(tag) + 1 :]

    def set_aside(self, line: str, tag: str) -> bool:
        """Whether ``line`` is one to keep aside while waiting for ``tag`` (none here)."""
        return False

    def expect(self, tag: str) -> Any:
        """The JSON value after ``tag`` on the next line."""
        return json.loads(self.line(tag))

    def tell(self, word: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(word + "\n")
        self.process.stdin.flush()

    def kill(self) -> None:
        if hasattr(self, "process"):
            end(self.process)


DRIVER = '''\
import json, os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def send(tag, data):
    print(tag, json.dumps(data), flush=True)


def main():
    import dtrace
    # Imported before the tracer is told the PID: a consumer that attached while the module's
    # frame ran would see that frame return without having seen it enter.
    import workload
    if FORK_FIRST:  # the traced process is a forked child of the one started
        child = os.fork()
        if child:
            _, status = os.waitpid(child, 0)
            sys.exit(os.waitstatus_to_exitcode(status))
    send("LOADED", {"pid": os.getpid(), "library": dtrace.library_path(), "armed": dtrace._native.is_armed()})
    if sys.stdin.readline().strip() != "go":
        sys.exit(2)
    if not dtrace.wait_for_consumer(*PROBES, timeout=TIMEOUT):
        send("ERROR", {"live": sorted(dtrace.enabled_probes()), "consumer": sorted(dtrace._native.consumer_probes())})
        sys.exit(3)
    send("LIVE", sorted(dtrace.enabled_probes()))
    result = {}
    workload.run(result)
    send("RESULT", result)
    if sys.stdin.readline().strip() != "detached":
        sys.exit(2)
    deadline = time.monotonic() + TIMEOUT
    while dtrace.enabled_probes() and time.monotonic() < deadline:
        time.sleep(0.005)
    import gc
    tool = dtrace._native._testing.monitoring_tool_id()
    send("IDLE", {
        "enabled": sorted(dtrace.enabled_probes()),
        "events": [sys.monitoring.get_events(i) for i in range(6)],
        "tool": tool,
        "gc_callbacks": [getattr(c, "__name__", repr(c)) for c in gc.callbacks],
        "find_and_load": type(sys.modules["_frozen_importlib"]._find_and_load).__name__,
        "hooked_classes": dtrace._native._testing.hooked_classes(),
        "scope": dtrace._native.scope(),
        "cfunction_cache": dtrace._native._testing.cfunction_cache_stats()[0],
        # (what is gathered, code objects with unreported counts, call-tree nodes)
        "aggregate": list(dtrace._native._testing.aggregate_stats()),
        # What a tool's -p --children lease put into the environment and took back (os.environ, C).
        "follow_environment": {name: [os.environ.get(name), dtrace._native.getenv(name)]
                               for name in ("PYDTRACE", "PYDTRACE_FOLLOW")},
    })


if __name__ == "__main__":  # not when a multiprocessing child imports this file
    main()
'''


@dataclass
class Workload(Speaker):
    """A Python process running ``body`` (a module with ``run(result)``) once a consumer is live."""

    body: str
    probes: list[str]
    directory: Path
    env: dict[str, str] = field(default_factory=dict)
    python: str = sys.executable
    fork_first: bool = False
    pid: int = 0
    library: str = ""
    live: list[str] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    idle: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        """The workload module's file: its code objects' ``co_filename``."""
        return self.directory / "workload.py"

    def line_of(self, marker: str) -> int:
        """The line number of the (one) body line that contains ``marker``."""
        lines = [n for n, text in enumerate(self.path.read_text().splitlines(), 1) if marker in text]
        assert len(lines) == 1, f"{marker!r} is on lines {lines}"
        return lines[0]

    def start(self) -> None:
        self.path.write_text(textwrap.dedent(self.body))
        driver = self.directory / "driver.py"
        driver.write_text(
            f"PROBES = {self.probes!r}\nTIMEOUT = {STEP_TIMEOUT!r}\nFORK_FIRST = {self.fork_first!r}\n" + DRIVER
        )
        self.spawn([self.python, str(driver)], {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **self.env})
        loaded = self.expect("LOADED")
        self.pid, self.library = loaded["pid"], loaded["library"]
        assert loaded["armed"], "importing dtrace did not arm the probes"

    def go(self) -> None:
        """Let the workload run once its probes are live; returns when they are."""
        self.tell("go")
        self.live = self.expect("LIVE")

    def wait_result(self) -> dict[str, Any]:
        self.result = self.expect("RESULT")
        return self.result

    def finish(self) -> int:
        """After the tracer detached: the workload checks it is idle, and exits."""
        self.tell("detached")
        self.idle = self.expect("IDLE")
        self.process.stdin.close()
        code = self.process.wait(STEP_TIMEOUT)
        self.stderr_text = "\n".join(self.stderr.rest())
        return code


def parse_json_line(line: str) -> Any:
    """One line of ``bpftrace -f json`` output, decoded as the tools decode it (bpftrace 0.17's
    escaped bytes put back: see :func:`dtrace.tools.command.tracers.decode_json_line`)."""
    return decode_json_line(line)


def stop_with_sigint(process: subprocess.Popen, stdout: Lines, diagnosis=lambda: "") -> list[str]:
    """Stop a bpftrace as a user (and the tools) do: SIGINT, again if it missed the first, and
    only then SIGKILL (a failure here); returns the output it printed from now on."""
    mark = len(stdout.seen)
    # bpftrace prints blank lines once it has left its event loop: a second SIGINT after
    # that would kill it while it prints its maps.
    stopper = Stopper(process, lambda: any(not line.strip() for line in stdout.available()[mark:]))
    stopper.wait()
    if stopper.killed:
        raise AssertionError(f"bpftrace did not end after two SIGINTs and was killed; {diagnosis()}")
    try:
        stdout.rest()
    except TimeoutError as error:
        raise AssertionError(f"bpftrace's output did not end: {error}; {diagnosis()}") from None
    return stdout.seen[mark:]


@dataclass
class Bpftrace:
    """A ``bpftrace -p PID`` consumer running ``program``; ``{lib}`` in it names the probe object."""

    program: str
    pid: int
    library: str
    env: dict[str, str] = field(default_factory=dict)
    maps: dict[str, Any] = field(default_factory=dict)
    printed: list[str] = field(default_factory=list)
    #: Attach by path, to every process that maps the objects (no -p): the program filters by pid.
    system_wide: bool = False

    def start(self) -> None:
        """Attach; returns once the program's BEGIN ran, i.e. every probe is attached."""
        program = 'BEGIN { printf("READY\\n"); }\n' + self.program.replace("{lib}", self.library)
        self.lease = None
        if not self.system_wide:
            program, self.lease = bound_for(program, self.pid, self.library)
        target = [] if self.system_wide else ["-p", str(self.pid)]
        self.process = subprocess.Popen(
            ["bpftrace", "-f", "json", *target, "-e", program],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="backslashreplace",  # bpftrace prints the bytes it read, valid UTF-8 or not
            # Strings as long as bpftrace reads them (paths of test files exceed the default 64).
            env={**os.environ, "BPFTRACE_STRLEN": "200", **self.env},
        )
        self.stdout = Lines(self.process.stdout, "bpftrace")
        self.stderr = Lines(self.process.stderr, "bpftrace's stderr")
        while True:
            line = self.stdout.next()
            if line is None:
                raise AssertionError(f"bpftrace ended before BEGIN: {self.stderr.rest(5)}")
            event = parse_json_line(line)
            if event.get("type") == "printf" and event.get("data") == "READY\n":
                return

    def _diagnosis(self) -> str:
        """Where a bpftrace that does not answer is stuck, from /proc."""
        facts = []
        for name in ("wchan", "stat", "stack"):
            try:
                facts.append(f"{name}: {Path(f'/proc/{self.process.pid}/{name}').read_text().strip()}")
            except OSError as error:
                facts.append(f"{name}: {error}")
        return "; ".join(facts) + f"; stderr: {self.stderr.available()}"

    def stop(self) -> dict[str, Any]:
        """Detach (SIGINT, again if bpftrace misses it, as the tools stop it) and return the maps
        bpftrace printed, by name."""
        for line in stop_with_sigint(self.process, self.stdout, self._diagnosis):
            if not line.strip():
                continue
            event = parse_json_line(line)
            if event.get("type") in ("map", "hist", "stats"):
                self.maps.update(event["data"])
            elif event.get("type") == "printf":
                self.printed.append(event["data"])
        self.process.wait(STEP_TIMEOUT)
        self._release()
        return self.maps

    def kill(self) -> None:
        if hasattr(self, "process"):
            end(self.process)
        self._release()

    def _release(self) -> None:
        if getattr(self, "lease", None) is not None:
            self.lease.release()
            self.lease = None


def bound_for(program: str, pid: int, library: str) -> tuple[str, scope.Lease | None]:
    """``program`` as the tools run it on process ``pid``, and the lease that asks the process for
    the probes it attaches by address (None on an interpreter that declares none of them)."""
    program, _, asked = interpreter.adapt(program, [], pid, library, "bt")
    if not asked:
        return program, None
    return program, scope.Lease(scope.Channel(pid, library), "\n".join(f"probe:{name}" for name in asked))


@dataclass
class TraceRun:
    """What one traced run saw, from both sides."""

    workload: Workload
    tracer: Bpftrace

    @property
    def maps(self) -> dict[str, Any]:
        return self.tracer.maps

    @property
    def result(self) -> dict[str, Any]:
        return self.workload.result

    def count(self, name: str, key: str | None = None) -> int:
        """The value of map ``@name`` (or of its entry ``key``), 0 where absent."""
        value = self.maps.get("@" + name, 0 if key is None else {})
        return value if key is None else value.get(key, 0)


def handshake(workload: Workload, consumer_for) -> Any:
    """The two-sided handshake every traced test runs: start the workload, attach the consumer
    that ``consumer_for(workload)`` makes (it returns once its BEGIN ran), let the workload run
    once its probes are live, detach, and check that the workload went idle and exited cleanly."""
    workload.start()
    consumer = None
    try:
        consumer = consumer_for(workload)  # (its set-up may fail: the workload is ended all the same)
        consumer.start()
        workload.go()
        workload.wait_result()
        consumer.stop()
        code = workload.finish()
        assert code == 0, f"the workload exited with {code}: {workload.stderr_text}"
    finally:
        if consumer is not None:
            consumer.kill()
        workload.kill()
    return consumer


def trace(body: str, program: str, probes: list[str], directory: Path, env: dict[str, str] | None = None,
          tracer_env: dict[str, str] | None = None, fork_first: bool = False) -> TraceRun:
    """Run ``body`` under ``program``, with the full two-sided handshake, and detach."""
    require_tracer()
    workload = Workload(body, probes, directory, env=env or {}, fork_first=fork_first)
    tracer = handshake(workload, lambda w: Bpftrace(program, w.pid, w.library, env=tracer_env or {}))
    return TraceRun(workload, tracer)


# --- The tools (python -m dtrace TOOL), for tests/test_tools.py -------------------------------


def tool_command(*args: str) -> list[str]:
    """``python -m dtrace ARGS`` with this interpreter."""
    return [sys.executable, "-m", "dtrace", *args]


def run_tool(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
             timeout: float = STEP_TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``python -m dtrace ARGS`` to its end (a tool with ``-c``, ``--script``, an error)."""
    return subprocess.run(tool_command(*args), capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@dataclass
class ToolRun:
    """``python -m dtrace ARGS -p PID``: attached once it printed its "Tracing ..." line (the
    program's BEGIN, after every probe is attached); stopped with SIGINT, as Ctrl-C would."""

    args: list[str]
    pid: int
    stdout: str = ""
    stderr: str = ""
    code: int | None = None
    #: Signal sent by stop(): SIGINT as Ctrl-C, or SIGTERM, SIGHUP, SIGKILL; None when something
    #: else ends the tool (its terminal closing).
    stop_signal: int | None = signal.SIGINT
    #: Further keyword arguments for Popen (a terminal of its own, say).
    popen: dict[str, Any] = field(default_factory=dict)

    def start(self) -> None:
        self.process = subprocess.Popen(
            tool_command(*self.args, "-p", str(self.pid)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **self.popen,
        )
        self.out = Lines(self.process.stdout, "the tool")
        self.err = Lines(self.process.stderr, "the tool's stderr")
        while True:
            line = self.err.next()
            if line is None:
                raise AssertionError(f"the tool ended before attaching: {self.err.seen}; {self.out.rest(5)}")
            if line.startswith("Tracing "):
                return

    def tracer_pid(self) -> int:
        """The PID of the tool's bpftrace (its child), from /proc."""
        return tracer_of(self.process.pid)

    def stop(self) -> None:
        """Ctrl-C (or ``stop_signal``): the tool prints what it gathered and exits."""
        if self.stop_signal is not None and self.process.poll() is None:
            self.process.send_signal(self.stop_signal)
        self.stdout = "\n".join(self.out.rest()) + "\n"
        self.err.rest()  # every line ends up in self.err.seen
        self.stderr = "\n".join(self.err.seen)
        self.code = self.process.wait(STEP_TIMEOUT)

    def kill(self) -> None:
        if hasattr(self, "process"):
            end(self.process)


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux's /proc/PID/task/TID/children)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            found += [int(child) for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except OSError:
            continue
    return found


def tracer_of(pid: int) -> int:
    """The PID of the bpftrace that process ``pid`` (a tool) started."""
    for child in children(pid):
        try:
            if Path(f"/proc/{child}/comm").read_text().strip() == "bpftrace":
                return child
        except OSError:
            continue
    raise AssertionError(f"process {pid} has no bpftrace child: {children(pid)}")


def wait_gone(pid: int, timeout: float = STEP_TIMEOUT) -> bool:
    """Wait until process ``pid`` (not necessarily a child) has exited, through a pidfd that becomes
    readable when it does; True if it has, False if ``timeout`` passed first."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(fd)


def uprobe_events_of(library: str) -> list[str]:
    """The kernel's uprobe events (tracefs uprobe_events) that name ``library``."""
    for path in ("/sys/kernel/tracing/uprobe_events", "/sys/kernel/debug/tracing/uprobe_events"):
        if os.path.exists(path):
            return [line for line in Path(path).read_text().splitlines() if library in line]
    reason = "tracefs is not mounted: no uprobe_events to check (mount -t tracefs nodev /sys/kernel/tracing)"
    if REQUIRE_TRACER:
        pytest.fail(f"{reason}; PYDTRACE_REQUIRE_TRACER=1 makes this a failure, not a skip")
    pytest.skip(reason)


def trace_with_tool(body: str, args: list[str], probes: list[str], directory: Path,
                    env: dict[str, str] | None = None,
                    stop_signal: int | None = signal.SIGINT) -> tuple[Workload, ToolRun]:
    """Run ``body`` under ``python -m dtrace ARGS -p PID``, with the full two-sided handshake:
    the workload runs once the tool's program is attached and ``probes`` are live in it. The
    tool is stopped with ``stop_signal`` once the workload is done (None: it ends by itself)."""
    require_tracer()
    workload = Workload(body, probes, directory, env=env or {})
    tool = handshake(workload, lambda w: ToolRun(args, w.pid, stop_signal=stop_signal))
    return workload, tool


# --- Busy processes (workloads/busy.py), and what ends them -----------------------------------

#: The programs and workload modules that tests (and benches/attach_latency.py) share.
WORKLOADS = Path(__file__).resolve().parent / "workloads"
#: The busy-process program. Run by path, not imported: it runs under the interpreter under test,
#: which may have no pydtrace-rs and not this directory on its path (benches/attach_latency.py
#: runs it so too).
BUSY = WORKLOADS / "busy.py"


def workload_body(name: str) -> str:
    """The text of the workload module ``workloads/NAME.py``, as a :class:`Workload`'s body."""
    return (WORKLOADS / f"{name}.py").read_text()


class BusyProcess(Speaker):
    """A Python process in one of ``workloads/busy.py``'s shapes, with that program's ``options``:
    it runs without any handshake; its lines say what it did."""

    def __init__(self, shape: str, python: str = sys.executable, *options: str,
                 env: dict[str, str] | None = None) -> None:
        self.shape = shape
        self.name = f"the {shape} workload"
        self.slept: list[float] = []
        self.client = None
        self.spawn([python, str(BUSY), shape, *options], clean_environment(**(env or {})), stdin=False)
        self.ready = self.expect("READY")
        self.pid: int = self.ready["pid"]
        self.port: int | None = self.ready.get("port")
        self.library: str | None = self.ready.get("library")

    def set_aside(self, line: str, tag: str) -> bool:
        """The sleep shape's ``SLEPT`` lines go to :attr:`slept` (unless one is waited for)."""
        if line.startswith("SLEPT "):
            self.slept.append(float(line.split()[1]))
            return tag != "SLEPT"
        return False

    def request(self, text: str) -> str:
        """A line to the asyncio server, and its answer."""
        if self.client is None:
            import socket

            self.client = socket.create_connection(("127.0.0.1", self.port), timeout=STEP_TIMEOUT)
            self.reader = self.client.makefile("r")
        self.client.sendall(text.encode() + b"\n")
        return self.reader.readline().rstrip("\n")

    def phase(self, traced: bool = True) -> dict:
        """Run the marked phase (under a consumer, if ``traced``: it first waits for the probe its
        ``--wait-for`` names) and return what the process reported."""
        if self.shape == "asyncio-server":
            line = self.request("phase" if traced else "status")
            assert line.startswith("DONE "), line
            return json.loads(line.split(" ", 1)[1])
        self.process.send_signal(signal.SIGUSR1 if traced else signal.SIGUSR2)
        return self.expect("DONE")

    def kill(self) -> None:
        if self.client is not None:
            self.client.close()
        super().kill()


def remove(path: str | Path) -> None:
    """Remove a file if it is there."""
    Path(path).unlink(missing_ok=True)


class Cleanup(contextlib.ExitStack):
    """What a test started or made, ended and removed when the test ends, passed or failed, the
    last first: conftest.py's ``cleanup`` fixture."""

    def popen(self, argv: list[str], **options: Any) -> subprocess.Popen:
        """Start ``argv`` (with subprocess.Popen's ``options``): killed and reaped at the end."""
        return self.process(subprocess.Popen(argv, **options))

    def process(self, process: subprocess.Popen) -> subprocess.Popen:
        """``process`` killed and reaped at the end."""
        self.callback(end, process)
        return process

    def ends(self, thing: Any) -> Any:
        """``thing`` (a :class:`Speaker`, :class:`ToolRun`, :class:`Bpftrace`: anything with
        ``kill()``) killed at the end; register it before starting it."""
        self.callback(thing.kill)
        return thing

    def file(self, path: str | Path) -> None:
        """``path`` removed at the end, if it is there."""
        self.callback(remove, path)
