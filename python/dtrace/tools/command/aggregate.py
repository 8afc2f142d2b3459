"""Aggregation in the process, the tools' side: asking for flushes, and ending a trace only after the last.

``calls``, ``lines`` and ``flame`` run, by default on Linux, programs on the aggregate probes
(``scripts/*_aggregate.bt``): while one of them is enabled, the process counts (and times, and
builds the call tree) inside itself, with no event per call or line, and reports what it gathered
through those probes at each flush (``src/aggregate.rs``, docs/probes.md). The process flushes every
second by itself and at exit; a tool asks for a flush by writing its PID into a free slot of the
exported array ``pydtrace_flush_requests`` through ``/proc/PID/mem`` (under the exclusive ``flock`` on
that file that the scope channel's tools hold too, ``proc/scope.py``). The watcher thread sees the request
within a poll (20 ms), has the flush run with the GIL, and ends it with ``aggregate__flush(PID, 0)``,
on which the tool's program prints ``pydtrace: flushed``. A request while nothing is gathered is
answered at once with an empty flush.

A tool asks:

- under ``-p``, once before it says "Tracing": its program ignores reports until the end of that
  flush, so that nothing gathered before it attached (for another tool) reaches it;
- with ``-i``, at each interval: its program prints and clears its maps at the end of that flush, so
  each interval holds exactly what was gathered between two of its flushes;
- at the end (``-d``, Ctrl-C, SIGTERM, SIGHUP): the tracer is stopped, and prints its maps, only
  once the last flush has ended (or after FLUSH_TIMEOUT, with a warning).

When the process exits, its exit flush reports the rest before the tracer sees it go.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time

from dtrace.tools.command import runner
from dtrace.tools.errors import ToolError, warn
from dtrace.tools.proc import elf, procfs

#: The exported array of flush requests in the probe object (src/aggregate.rs).
SYMBOL = "pydtrace_flush_requests"
#: Its slots: each holds 0 or the PID of a tool that asked.
SLOTS = 8
#: What the tools' programs print at the end of a flush the tool asked for.
FLUSHED = "pydtrace: flushed"
#: What they print at the end of the process's exit flush (``aggregate__flush(-1, ...)``).
EXIT_FLUSHED = "pydtrace: exit flush"
#: Seconds a flush may take: the watcher polls every 20 ms, then needs the GIL once (it takes it
#: itself when the main thread runs no Python).
FLUSH_TIMEOUT = 5.0
#: Seconds a tool waits for a free slot (eight tools asking at the same moment).
SLOT_TIMEOUT = 2.0


class Flusher:
    """Asks process ``pid`` for flushes through its ``pydtrace_flush_requests``."""

    def __init__(self, pid: int, library: str | None) -> None:
        self.pid = pid
        address = elf.symbol_address(pid, library, SYMBOL) if library else None
        if address is None:
            raise ToolError(f"the pydtrace-rs in process {pid} cannot be asked for a flush (its probe object "
                            f"has no {SYMBOL}: older than aggregation in the process); trace with --per-event")
        self.address = address
        try:
            self.fd = os.open(f"/proc/{pid}/mem", os.O_RDWR)
        except OSError as err:
            raise ToolError(f"cannot write to process {pid} to ask for a flush: {err.strerror}; "
                            "trace with --per-event") from None
        self.me = os.getpid()

    def request(self) -> bool:
        """Ask for a flush; False if the process has gone (its exit flush reported the rest)."""
        deadline = time.monotonic() + SLOT_TIMEOUT
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
                try:
                    words = struct.unpack(f"={SLOTS}I", os.pread(self.fd, 4 * SLOTS, self.address))
                    if self.me in words:
                        return True  # asked already, not yet taken: one flush answers both
                    if 0 in words:
                        os.pwrite(self.fd, struct.pack("=I", self.me), self.address + 4 * words.index(0))
                        return True
                finally:
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
            except OSError as err:
                if err.errno in (errno.ESRCH, errno.EIO, errno.ENOENT):
                    return False
                raise
            if time.monotonic() > deadline:
                raise ToolError(f"process {self.pid} has {SLOTS} flush requests waiting for more than "
                                f"{SLOT_TIMEOUT:g} s: is its watcher thread running?")
            time.sleep(0.005)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Aggregation:
    """One tool run's flushes: the first (under -p), one per interval, the last; and the stop after it."""

    def __init__(self, session: runner.Session, target: runner.Target, interval: int | None,
                 ticks: int, duration: int | None) -> None:
        self.session = session
        self.target = target
        self.interval = interval
        self.ticks = ticks
        self.duration = duration
        self.flusher: Flusher | None = None
        self.final_at: float | None = None
        self.stopping = False
        #: Whether the last flush (the tool's, or the process's at exit) has ended.
        self.complete = False
        self._done = threading.Event()
        self._lock = threading.Lock()

    def begin(self, early: list) -> None:
        """Once the tracer is attached: under -p, the first flush, waited for (the events read
        meanwhile go to ``early``); then the timer for the intervals and the duration."""
        self.flusher = Flusher(self.target.pid, self.target.library)
        if self.target.process is None:
            if not self.flusher.request():
                raise procfs.gone(self.target.pid)
            deadline = time.monotonic() + FLUSH_TIMEOUT
            try:
                for event in self.session.events(timeout=FLUSH_TIMEOUT):
                    if event.kind == "printf" and event.data.strip() == FLUSHED:
                        break
                    early.append(event)
                    if time.monotonic() > deadline:
                        raise TimeoutError
            except TimeoutError:
                raise ToolError(f"process {self.target.pid} did not flush within {FLUSH_TIMEOUT:g} s (is it "
                                "stopped?); trace with --per-event") from None
        threading.Thread(target=self._timer, daemon=True).start()

    def _timer(self) -> None:
        start = time.monotonic()
        asked = 0
        while not self._done.is_set():
            now = time.monotonic()
            if self.final_at is not None:
                if now - self.final_at > FLUSH_TIMEOUT:
                    warn(f"process {self.target.pid} did not flush within {FLUSH_TIMEOUT:g} s: what it "
                                "gathered since its last flush (at most a second) is missing")
                    self.complete = True  # said once, here
                    self._stop()
                    return
            elif self.interval:
                if now >= start + (asked + 1) * self.interval:
                    asked += 1
                    if self.ticks and asked >= self.ticks:
                        self.finish()
                    else:
                        self._request()
            elif self.duration and now >= start + self.duration:
                self.finish()
            self._done.wait(0.01)

    def _request(self) -> None:
        try:
            if not self.flusher.request():
                self._done.set()  # the process has gone: the tracer ends by itself
        except ToolError as err:
            warn(str(err))

    def finish(self) -> None:
        """Ask for the last flush; the tracer is stopped at its end."""
        with self._lock:
            if self.final_at is not None:
                return
            self.final_at = time.monotonic()
        self._request()

    def flushed(self) -> None:
        """The end of a flush this tool asked for (its program printed FLUSHED)."""
        if self.final_at is not None:
            self.complete = True
            self._stop()

    def exit_flushed(self) -> None:
        """The end of the process's exit flush (its program printed EXIT_FLUSHED)."""
        self.complete = True

    def warn_incomplete(self) -> None:
        """Say so when the trace ended without a last flush: the process died without its exit
        flush (a signal, ``os._exit``), or did not answer the tool's."""
        if not self.complete:
            warn(f"process {self.target.pid} ended without its last flush (killed by a signal, "
                        "os._exit?): what it counted since its previous flush (at most a second) is missing")

    def _stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            self._done.set()
            self.session.request_stop()

    def interrupt(self, signum: int) -> None:
        """Ctrl-C, SIGTERM or SIGHUP: the last flush first; a second signal stops at once."""
        if self.final_at is None and not self.stopping:
            self.session.engine.noted(signum)
            self.finish()
        else:
            self.session.interrupt(signum)

    def close(self) -> None:
        self._done.set()
        if self.flusher is not None:
            self.flusher.close()
