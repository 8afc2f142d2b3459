"""The tracer engine: the one way a tool starts, reads, stops and reaps a tracer process.

Every tool's :class:`~dtrace.tools.command.runner.Session` (bpftrace's JSON read as events) and
``run``'s pass-through of the user's program (raw output, as it comes) run their tracer
through a :class:`TracerProcess`:

- **start**: its own session (a Ctrl-C at the terminal reaches it once, through the tool),
  stdin closed, and ``PR_SET_PDEATHSIG`` set to SIGKILL, so that even a tool killed with
  SIGKILL leaves no consumer attached (the kernel then detaches its uprobes and lowers the
  probes' semaphores as it closes the tracer's perf events; SIGINT would let bpftrace detach
  by itself, but bpftrace 0.17 misses a SIGINT now and then, and a dead tool cannot send a
  second);
- **read**: its stdout by a thread, as lines (text) or as chunks (bytes, passed on before a
  line is complete); its stderr by another, kept or handed on line by line;
- **stop**: a stop signal to the tool (Ctrl-C, SIGTERM, SIGHUP) or a request (``-d`` ended by
  the tool, the last flush of an aggregating tool) sends the tracer SIGINT once its output has
  been quiet for DRAIN_QUIET seconds (at most DRAIN_LIMIT after the request): bpftrace stops
  reading its buffers at SIGINT, so what the program printed just before would be lost. Then a
  :class:`Stopper` sees it through: SIGINT again if missed, SIGKILL at last. Each further stop
  signal hurries it: the next step at once;
- **reap**: its exit status, its reader threads joined, its pipes closed; on an error, killed
  and reaped (:meth:`TracerProcess.kill`).
"""

from __future__ import annotations

import io
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import IO, Callable, Iterator, Sequence

# The engine's constants: one set, for the tools and for run (run kept a copy that had drifted:
# RESEND_AFTER 3.0 and no kill timer).

#: Seconds the tracer may take to attach every probe (its BEGIN line).
ATTACH_TIMEOUT = 60.0
#: After a stop request, the tracer gets SIGINT once its output has been quiet this many
#: seconds (one poll of the reader's queue: long enough to see a burst still coming) ...
DRAIN_QUIET = 0.05
#: ... or this many seconds have passed (a program that prints without pause still stops).
DRAIN_LIMIT = 1.0
#: Seconds a tracer has, after SIGINT, to exit or to begin leaving before it is sent SIGINT again
#: (bpftrace 0.17 misses one now and then). One second, the value the tools have run with (and
#: tests/test_tool_lifecycle.py ends real bpftraces every way with): a bpftrace that got the
#: signal leaves its event loop at once and prints its blank lines (the sign
#: :meth:`Tracer.leaving` reads) well within it; run's 3 s only made a missed Ctrl-C wait longer.
#: One that has begun to leave is never sent another (that would cut its maps short), so the
#: short wait risks nothing.
RESEND_AFTER = 1.0
#: ... and, after the second SIGINT, seconds to do so before it is killed (run had no such
#: timer: a tracer that missed both SIGINTs kept the tool waiting until a third Ctrl-C).
KILL_AFTER = 5.0
#: Seconds a tracer that has begun leaving has to print its maps and exit before it is killed
#: (a map of many thousand keys takes seconds to print as JSON).
EXIT_LIMIT = 60.0

#: Lines of a tracer's stderr that say nothing to the user: bpftrace's notes on the memlock
#: limit and the kernel's function list, and its line when it attaches ("Attaching N probes..."
#: from 0.17, "Attached N probes" from 0.27: the tools say "Tracing ..." themselves).
NOISE = ("couldn't set RLIMIT_MEMLOCK", "available_filter_functions")
ATTACHING = re.compile(r"^Attach(?:ing \d+ probes?\.\.\.|ed \d+ probes?)$")


def is_noise(line: str) -> bool:
    """Whether a line of the tracer's stderr says nothing to the user (see NOISE)."""
    return not line.strip() or any(n in line for n in NOISE) or bool(ATTACHING.match(line.strip()))


def die_with_parent(sig: int) -> Callable[[], None]:
    """A ``preexec_fn`` that has the child sent ``sig`` when the tool dies, however it dies
    (Linux's PR_SET_PDEATHSIG; nothing elsewhere). Call it, and start the child, from the
    main thread: the signal follows the death of the thread that started the child."""
    if not sys.platform.startswith("linux"):
        return lambda: None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, sig, 0, 0, 0)
        if os.getppid() != parent:  # the tool died before the request took effect
            os.kill(os.getpid(), sig)

    return preexec


class Stopper:
    """Stops a tracer, surviving one that misses a SIGINT.

    SIGINT first: the tracer detaches, prints what it gathered and exits. If it
    has neither exited nor begun to leave (``leaving()``: for bpftrace, the blank
    lines it prints once it left its event loop) within RESEND_AFTER seconds,
    SIGINT again; if still not, SIGKILL after KILL_AFTER more. (A second SIGINT
    after bpftrace began to leave would kill it while it prints its maps: hence
    the wait for the sign.) One that has begun to leave gets EXIT_LIMIT seconds.

    :meth:`step` does what is due without blocking; :meth:`wait` steps until the
    tracer has exited.
    """

    def __init__(self, process: subprocess.Popen, leaving: Callable[[], bool] = lambda: False) -> None:
        self.process = process
        self.leaving = leaving
        self.sent: list[int] = []
        self._sent_at = 0.0
        self._leaving_since: float | None = None

    @property
    def killed(self) -> bool:
        return signal.SIGKILL in self.sent

    def step(self, hurry: bool = False) -> None:
        """Send what is due now; ``hurry``: the next signal at once (a user's repeated Ctrl-C)."""
        if self.process.poll() is not None:
            return
        now = time.monotonic()
        if self._leaving_since is None and self.sent and self.leaving():
            self._leaving_since = now
        if not self.sent:
            self._send(signal.SIGINT, now)
        elif self.killed:
            return
        elif self._leaving_since is not None:
            if now - self._leaving_since >= EXIT_LIMIT or hurry:
                self._send(signal.SIGKILL, now)
        elif len(self.sent) == 1 and (hurry or now - self._sent_at >= RESEND_AFTER):
            self._send(signal.SIGINT, now)
        elif len(self.sent) >= 2 and (hurry or now - self._sent_at >= KILL_AFTER):
            self._send(signal.SIGKILL, now)

    def _send(self, sig: int, now: float) -> None:
        try:
            self.process.send_signal(sig)
        except ProcessLookupError:
            pass
        self.sent.append(sig)
        self._sent_at = now

    def wait(self) -> int:
        """Stop the tracer; its exit status."""
        while True:
            self.step()
            try:
                return self.process.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                continue


class TracerProcess:
    """One tracer process, from its start to its reaping (see the module doc).

    ``leaving(line, signalled)``: the tracer's own sign that it has left its event loop
    (:meth:`dtrace.tools.command.tracers.Tracer.leaving`). ``raw``: the output as byte chunks as they
    come, rather than as lines. ``on_stderr``: called with each line of its stderr (from the
    reader's thread) instead of keeping them in ``stderr_lines``.
    """

    def __init__(self, argv: Sequence[str], env: dict[str, str], leaving: Callable[[str, bool], bool],
                 raw: bool = False, on_stderr: Callable[[str], None] | None = None) -> None:
        self.argv, self.env, self.raw = list(argv), env, raw
        self._leaving_line = leaving
        self.on_stderr = on_stderr
        self.process: subprocess.Popen | None = None
        self.stderr_lines: list[str] = []
        #: The stop signals the tool received while tracing, in order.
        self.signals: list[int] = []
        self.stopper: Stopper | None = None
        self.last_output = time.monotonic()
        self._output: queue.Queue[str | bytes | None] = queue.Queue()
        self._stop_requested_at: float | None = None
        self._leaving = False
        self._threads: list[threading.Thread] = []

    # --- start and read

    def start(self) -> None:
        """Start the tracer (from the main thread: see die_with_parent) and its readers."""
        self.process = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env,
            start_new_session=True,  # Ctrl-C reaches it once, through the tool
            preexec_fn=die_with_parent(signal.SIGKILL),  # see the module doc
        )
        self.last_output = time.monotonic()
        self._threads = [threading.Thread(target=self._read_chunks if self.raw else self._read_lines, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for thread in self._threads:
            thread.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read_lines(self) -> None:
        for line in _text(self.process.stdout):
            line = line.rstrip("\n")
            self.last_output = time.monotonic()
            self._saw(line)
            self._output.put(line)
        self._output.put(None)

    def _read_chunks(self) -> None:
        partial = b""
        while chunk := os.read(self.process.stdout.fileno(), 65536):
            self.last_output = time.monotonic()
            *lines, partial = (partial + chunk).split(b"\n")
            for line in lines:
                self._saw(line.decode(errors="replace"))
            self._output.put(chunk)
        self._output.put(None)

    def _saw(self, line: str) -> None:
        if self._leaving_line(line, self.stopper is not None):
            self._leaving = True

    def _read_stderr(self) -> None:
        for line in _text(self.process.stderr):
            if self.on_stderr is not None:
                self.on_stderr(line)
            else:
                self.stderr_lines.append(line.rstrip("\n"))

    def read(self, timeout: float = DRAIN_QUIET) -> str | bytes | None:
        """The next line (or chunk) of output, None once the tracer closed it; queue.Empty if
        none came within ``timeout``. Takes the stop's next step first, when one is due."""
        self.advance()
        return self._output.get(timeout=timeout)

    def lines(self, timeout: float | None = None,
              before: Callable[[], None] | None = None) -> Iterator[str | bytes]:
        """The output up to its end; TimeoutError if a line takes longer than ``timeout``.
        ``before``: called before each wait for a line (the tool's own housekeeping)."""
        waited = 0.0
        while True:
            if before is not None:
                before()
            try:
                line = self.read()
            except queue.Empty:
                waited += DRAIN_QUIET
                if timeout is not None and waited >= timeout:
                    raise TimeoutError from None
                continue
            waited = 0.0
            if line is None:
                return
            yield line

    def errors(self) -> str:
        """The tracer's stderr (as kept), without its harmless noise."""
        return "\n".join(line for line in self.stderr_lines if not is_noise(line))

    # --- stop

    def interrupt(self, signum: int = signal.SIGINT) -> None:
        """Ctrl-C, SIGTERM or SIGHUP to the tool (from a signal handler): the first asks for a
        stop once the output is quiet; each further one hurries it (SIGINT now, again, SIGKILL)."""
        self.signals.append(signum)
        if self._stop_requested_at is None:
            self._stop_requested_at = time.monotonic()
        elif self.stopper is None:
            self._begin_stop()
        else:
            self.stopper.step(hurry=True)

    def noted(self, signum: int) -> None:
        """A stop signal the tool answers itself first (an aggregating tool's last flush, then
        :meth:`request_stop`): kept, nothing sent."""
        self.signals.append(signum)

    def request_stop(self) -> None:
        """Stop the tracer once its output has been quiet for a moment, as after Ctrl-C, without a
        stop signal to the tool."""
        if self._stop_requested_at is None:
            self._stop_requested_at = time.monotonic()

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested_at is not None or bool(self.signals)

    def _begin_stop(self) -> None:
        if self.process is None:
            return  # not started yet: it is stopped once it is (see advance)
        if self.stopper is None:
            self.stopper = Stopper(self.process, lambda: self._leaving)
        self.stopper.step()

    def advance(self) -> None:
        """The stop's next step, when one is due: the first SIGINT once the output is quiet or
        DRAIN_LIMIT has passed, then the Stopper's."""
        if self.stopper is not None:
            self.stopper.step()
            return
        requested, now = self._stop_requested_at, time.monotonic()
        if requested is not None and (now - self.last_output >= DRAIN_QUIET or now - requested >= DRAIN_LIMIT):
            self._begin_stop()

    @property
    def killed(self) -> bool:
        """Whether the tracer had to be killed (its last output is lost)."""
        return self.stopper is not None and self.stopper.killed

    # --- reap

    def wait(self) -> int:
        """The tracer's exit status, once it exits (stopping it first if a stop was requested)."""
        if self.stop_requested:
            self._begin_stop()
            code = self.stopper.wait()
        else:
            code = self.process.wait()
        self._reap()
        return code

    def stop(self) -> int:
        """Stop the tracer now (SIGINT, again if missed, then SIGKILL) and wait for it."""
        self.request_stop()
        return self.wait()

    def kill(self) -> None:
        """On an error: kill the tracer at once (nothing more is read: the kernel detaches its
        probes) and reap it."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._reap()

    def _reap(self) -> None:
        for thread in self._threads:
            thread.join(5)
        if not any(thread.is_alive() for thread in self._threads):
            for stream in (self.process.stdout, self.process.stderr):
                stream.close()


def _text(stream: IO[bytes]) -> io.TextIOWrapper:
    """A pipe's lines as text: UTF-8, what does not decode replaced, newlines as Popen's text mode."""
    return io.TextIOWrapper(stream, encoding="utf-8", errors="replace")


@contextmanager
def stop_signals(handler: Callable[[int], None]) -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP go to ``handler(signum)`` while tracing, the tool's own handlers
    back after. Only the main thread can: elsewhere (a child's trace under --children) the
    command's handler reaches it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.getsignal(sig) for sig in stops}
    try:
        for sig in stops:
            signal.signal(sig, lambda signum, frame: handler(signum))
        yield
    finally:
        for sig, handler_before in previous.items():
            signal.signal(sig, handler_before)
