"""Run a tool: find or start the target, start the tracer, handshake, collect the tracer's output.

The steps, for ``python -m dtrace TOOL``:

1. The tracer is chosen (bpftrace on Linux, dtrace on macOS and illumos) and
   checked: installed, and run with enough privileges.
2. The target: ``-p PID`` checks that the process runs and has loaded the
   probe object (``dtrace/_native*.so``), else offers to load it (``inject.py``);
   ``-c COMMAND`` starts the command with ``PYDTRACE=1`` and
   ``PYDTRACE_STARTUP=WFD,RFD`` (two pipes): its first
   interpreter reports ``PID LIBRARY`` and waits (see ``dtrace._wait_for_tool``).
3. The tracer attaches with ``-p PID`` and runs the program; its ``BEGIN``
   prints the "Tracing ..." line once every probe is attached.
4. For ``-c``, the command is then told ``go PROBES``: it waits until those
   probes are live in it and runs, traced from its first line.
5. The tracer's output is read until it exits: at Ctrl-C (forwarded to it as
   SIGINT), at the end of ``--duration``, or when the process exits.
"""

from __future__ import annotations

import os
import queue
import re
import select
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

from dtrace.tools.tracers import DTrace, Event, ToolError, Tracer

#: Seconds a started command may take to load dtrace and report, by default.
STARTUP_TIMEOUT = 30.0
#: Seconds the tracer may take to attach every probe (its BEGIN line).
ATTACH_TIMEOUT = 60.0
#: After Ctrl-C, the tracer is stopped once its output has been quiet this many seconds...
DRAIN_QUIET = 0.05
#: ... or this many seconds have passed.
DRAIN_LIMIT = 1.0


# --- the target ------------------------------------------------------------------------------

#: The probe object in /proc/PID/maps: dtrace/_native.cpython-312-x86_64-linux-gnu.so and the like.
_PROBE_OBJECT = re.compile(r"(?:^|/)dtrace/_native[^/]*\.(?:so|dylib|pyd)$")
_ARM_HINT = (
    "arm it with `import dtrace` in the program, or start it with PYDTRACE=1 in its environment "
    "(pydtrace-rs installed in its Python), or let the tool start it: -c \"COMMAND\""
)


@dataclass
class Target:
    """The traced process: attached by PID, or started by the tool (then ``process`` is set)."""

    pid: int
    library: str | None
    process: subprocess.Popen | None = None
    _to_child: int | None = None

    @property
    def held(self) -> bool:
        """Whether a started command still waits at start-up for the tool's word."""
        return self._to_child is not None

    def release(self, probes: list[str]) -> None:
        """Let a started command run, once the probes are live in it (no-op for ``-p``)."""
        if self._to_child is None:
            return
        if not probes:
            self._close()  # nothing to wait for: it runs at once
            return
        try:
            os.write(self._to_child, f"go {','.join(probes)}\n".encode())
        except OSError:
            pass  # the command has gone; the tracer will say so by exiting
        self._close()

    def abandon(self) -> None:
        """Give up on a started command: it runs on untraced, unless it is stopped too."""
        self._close()

    def stop(self) -> None:
        """Stop a started command (after a failed start of the tracer)."""
        self._close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _close(self) -> None:
        if self._to_child is not None:
            os.close(self._to_child)
            self._to_child = None

    def describe(self) -> str:
        """``PID 4711 (python app.py)``."""
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                words = [w.decode(errors="replace") for w in f.read().split(b"\0") if w]
        except OSError:
            words = []
        command = " ".join(words)
        if len(command) > 60:
            command = command[:57] + "..."
        return f"PID {self.pid} ({command})" if command else f"PID {self.pid}"


def check_running(pid: int) -> None:
    """Raise ToolError unless a process with this PID runs."""
    if pid <= 0:
        raise ToolError(f"{pid} is not a process ID")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise ToolError(f"no process with PID {pid} is running") from None
    except PermissionError:
        pass  # it runs; whether we may trace it is the tracer's question


def probe_object(pid: int) -> str | None:
    """The path of the probe object mapped into process ``pid`` (Linux), or None if it has none.

    Raises ToolError when the maps cannot be read, or when the object was
    replaced on disk after the process loaded it.
    """
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise ToolError(f"no process with PID {pid} is running") from None
    except PermissionError:
        hint = ("another user's process, or another container's?" if os.geteuid() == 0
                else "run as root (sudo) or as the process's owner")
        raise ToolError(f"Permission denied reading /proc/{pid}/maps: {hint}") from None
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 6:
            continue
        path = parts[5]
        deleted = path.endswith(" (deleted)")
        if deleted:
            path = path[: -len(" (deleted)")]
        if _PROBE_OBJECT.search(path):
            if deleted:
                raise ToolError(
                    f"process {pid} loaded {path}, which has since been deleted or replaced "
                    "(pydtrace-rs reinstalled?): the tracer cannot read its probes; restart the process"
                )
            return path
    return None


def watcher_running(pid: int) -> bool | None:
    """Whether the probes' watcher thread runs in ``pid`` (the probes are armed); None if unknown."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/comm") as f:
                if f.read().strip().startswith("pydtrace-watch"):
                    return True
        except OSError:
            continue
    return False


def attach(pid: int, inject: bool = False) -> Target:
    """The target of ``-p PID``: it must run and have loaded dtrace (checked on Linux). A Python
    process that has not is offered the probes (dtrace/tools/inject.py): on a terminal the user
    is asked; with ``inject`` they are loaded at once."""
    check_running(pid)
    if not sys.platform.startswith("linux"):
        return Target(pid, None)  # DTrace reports a process without the provider itself
    library = probe_object(pid)
    if library is None:
        from dtrace.tools import inject as injection

        not_loaded = (f"process {pid} has not loaded the dtrace module (pydtrace-rs): {_ARM_HINT}; "
                      "or pass --inject to load it into the running process now")
        injection.load_probes(pid, inject, Target(pid, None).describe(), not_loaded)
        library = probe_object(pid)
        if library is None:
            raise ToolError(f"the probes were loaded into process {pid}, but its maps show no probe object")
    if watcher_running(pid) is False:
        warn(
            f"process {pid} has loaded dtrace but its probes are not armed (PYDTRACE=0 in its "
            "environment?): they will not fire"
        )
    return Target(pid, library)


def start(command: str, timeout: float = STARTUP_TIMEOUT) -> Target:
    """Start ``command`` (split like a shell would, run without one) held at start-up, see the module doc."""
    argv = shlex.split(command)
    if not argv:
        raise ToolError("-c needs a command, e.g. -c \"python3 app.py\"")
    from_child, child_writes = os.pipe()
    child_reads, to_child = os.pipe()
    env = {**os.environ, "PYDTRACE": "1", "PYDTRACE_STARTUP": f"{child_writes},{child_reads}"}
    try:
        process = subprocess.Popen(argv, env=env, pass_fds=(child_writes, child_reads))
    except FileNotFoundError:
        _close_all(from_child, child_writes, child_reads, to_child)
        raise ToolError(f"command not found: {argv[0]}") from None
    except PermissionError:
        _close_all(from_child, child_writes, child_reads, to_child)
        raise ToolError(f"cannot run {argv[0]}: permission denied") from None
    _close_all(child_writes, child_reads)
    target = Target(0, None, process, to_child)
    try:
        report = _read_line(from_child, timeout, process)
    except BaseException:  # Ctrl-C while waiting: the command does not stay behind
        target.stop()
        raise
    finally:
        os.close(from_child)
    hint = (
        "is it a Python 3.12+ with pydtrace-rs installed (the environment's python, e.g. "
        f"{sys.executable})?"
    )
    if report is None:
        try:
            code = process.wait(timeout=1)  # it closed the pipe (exited), or the time is up
        except subprocess.TimeoutExpired:
            code = None
        target.stop()
        if code is None:
            raise ToolError(f"the command did not load dtrace within {timeout:g} s; {hint}")
        raise ToolError(f"the command exited (status {code}) before loading dtrace; {hint}")
    try:
        pid_text, library = report.split(" ", 1)
        target.pid = int(pid_text)
    except ValueError:
        target.stop()
        raise ToolError(f"unexpected start-up report from the command: {report!r}") from None
    target.library = library if library != "None" else None
    return target


def _read_line(fd: int, timeout: float, process: subprocess.Popen) -> str | None:
    """One line from ``fd`` within ``timeout`` s; None at end of file, timeout, or when ``process`` ended."""
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], min(remaining, 0.5))
        if not ready:
            if process.poll() is not None:
                return None
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        data += chunk
    return data.decode(errors="replace").strip()


def _close_all(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


# --- one run ---------------------------------------------------------------------------------


def warn(message: str) -> None:
    print(f"pydtrace: {message}", file=sys.stderr, flush=True)


#: Lines of bpftrace's stderr that say nothing to the user.
_NOISE = ("couldn't set RLIMIT_MEMLOCK", "available_filter_functions", "Attaching ")


@dataclass
class Session:
    """A running tracer: its output as events, read by a thread, and its exit."""

    tracer: Tracer
    program: str
    target: Target
    env: dict[str, str]
    keys: dict[str, int]
    hists: frozenset[str]
    arguments: list[str] = field(default_factory=list)
    lost: int = 0
    map_full: int = 0
    helper_errors: dict[str, int] = field(default_factory=dict)
    stderr_lines: list[str] = field(default_factory=list)
    interrupted: int = 0

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.tracer.argv(self.program, self.target.pid, self.arguments),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=self.env,
            start_new_session=True,  # Ctrl-C reaches it once, through interrupt()
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._last_line = time.monotonic()
        self._interrupt_at: float | None = None
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            self._last_line = time.monotonic()
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self.stderr_lines.append(line.rstrip("\n"))

    def interrupt(self) -> None:
        """Ctrl-C (from a signal handler). The tracer is sent SIGINT once its output has been
        quiet for a moment (see events()): bpftrace stops reading its buffers at SIGINT, so what
        the program printed just before would be lost. A second Ctrl-C sends SIGINT at once, a
        third kills the tracer."""
        self.interrupted += 1
        if self.interrupted == 1:
            self._interrupt_at = time.monotonic()
        else:
            self._signal(signal.SIGINT if self.interrupted == 2 else signal.SIGKILL)

    def _forward_interrupt(self) -> None:
        """SIGINT to the tracer after Ctrl-C, once its output is quiet or DRAIN_LIMIT has passed."""
        requested, now = self._interrupt_at, time.monotonic()
        if requested is not None and (now - self._last_line >= DRAIN_QUIET or now - requested >= DRAIN_LIMIT):
            self._signal(signal.SIGINT)

    def _signal(self, sig: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self._interrupt_at = None

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """The tracer's events up to its exit; TimeoutError if a line takes longer than ``timeout``."""
        waited = 0.0
        while True:
            self._forward_interrupt()
            try:
                line = self._lines.get(timeout=DRAIN_QUIET)
            except queue.Empty:
                waited += DRAIN_QUIET
                if timeout is not None and waited >= timeout:
                    raise TimeoutError from None
                continue
            waited = 0.0
            if line is None:
                if isinstance(self.tracer, DTrace):
                    yield from self.tracer.finish()
                return
            for event in self.tracer.events(line, self.keys, self.hists):
                if event.kind == "lost":
                    self.lost += event.data
                    yield event
                elif event.kind == "map_full":
                    self.map_full += 1
                elif event.kind == "helper_error":
                    self.helper_errors[event.data] = self.helper_errors.get(event.data, 0) + 1
                else:
                    yield event

    def wait(self) -> int:
        code = self.process.wait()
        for thread in self._threads:
            thread.join(5)
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.wait()

    def errors(self) -> str:
        """The tracer's stderr, without its harmless noise."""
        return "\n".join(line for line in self.stderr_lines if line.strip() and not any(n in line for n in _NOISE))

    def failure(self, what: str) -> ToolError:
        """A ToolError for a tracer that failed, with its own words and a hint where one fits."""
        errors = self.errors()
        hint = ""
        if re.search(r"permission|not permitted|EPERM", errors, re.I):
            hint = "\nPermission denied: run as root (sudo)."
        elif re.search(r"usdt|probe", errors, re.I) and self.target.library:
            hint = f"\n(probe object: {self.target.library})"
        return ToolError(f"{self.tracer.name} {what}:\n{errors or '(no message)'}{hint}")
