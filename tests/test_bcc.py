"""bcc's tools (Debian's bpfcc-tools: ucalls, uflow, ugc with ``-l python``) on the probes: exact counts.

bcc reads the SDT notes of every object the process maps, so the tools find provider ``python`` in
pydtrace-rs's probe object unchanged. On an interpreter that declares a probe too (Debian's builds
``--with-dtrace``: gc__start/done from 3.12 on, function__entry/return on 3.15), bcc (0.26) merges
both objects' notes of one name into one probe and raises the semaphore of the first object it
read: the interpreter's executable (mapped below the libraries), as the workload sees while the
tool is attached (its own semaphore stays down). The rule of
src/interpreter.rs then has the interpreter fire it, and pydtrace-rs leave its own copy silent, so
each event reaches the tool once; were ours raised instead, ours would fire and the interpreter's
stay silent. Each test asserts that exactly one of the two fires, whichever bcc picked.

Synchronisation. ucalls attaches, then prints its "Tracing ..." line, and counts in a map: that line
and ``dtrace.wait_for_consumer`` suffice. uflow and ugc print that line *before* they open their
perf buffer, and an event fired in between is lost; so the test waits, after the line, until the
tool's main thread is blocked in poll(2) on its buffers (``/proc/PID/syscall``), which it reaches
only once every CPU's buffer is open and in the map. At the end, every event fired is in the
buffers (the workload has reported its result); the tool wakes for each event, so once it has
printed the last line the test expects and is blocked in poll again it has printed them all,
and Ctrl-C stops it.

The tools need root, bcc (python3-bpfcc) and kernel headers (``/lib/modules/$(uname -r)/build``;
``scripts/dev setup`` installs bpfcc-tools and links Debian's 6.12 headers where the kernel ships
none): skipped without them, a failure under ``PYDTRACE_REQUIRE_TRACER=1``.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


import dtrace
from tracing import STEP_TIMEOUT, Lines, Workload, handshake, require

#: What this interpreter declares itself (empty on a build without --with-dtrace).
OWN = {name.replace("-", "__") for name in dtrace._native.interpreter_probes()}
#: The system calls a bcc tool's main thread waits in for its perf buffers, by machine.
POLL_SYSCALLS = {"x86_64": {7, 271, 232, 281, 441}, "aarch64": {73, 22, 441}}


def bcc_tool(name: str) -> str | None:
    """Debian's bpfcc-tools installs ucalls, uflow and ugc under /usr/sbin (not always on PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/share/bcc/tools")


def bcc_missing_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "bcc's tools run on Linux"
    if platform.machine() not in POLL_SYSCALLS:
        return f"no poll(2) system call numbers known for {platform.machine()}"
    if os.geteuid() != 0:
        return "bcc's tools need root: run the tests with sudo"
    missing = [name for name in ("ucalls", "uflow", "ugc") if bcc_tool(name) is None]
    if missing:
        return f"bcc's {', '.join(missing)} not installed (Debian: apt-get install bpfcc-tools; scripts/dev setup)"
    headers = Path(f"/lib/modules/{os.uname().release}/build")
    if not headers.exists():
        return (f"no kernel headers at {headers}: bcc compiles its programs against them "
                "(scripts/dev setup links Debian's where the kernel ships none)")
    return None


def require_bcc() -> None:
    """Skip where bcc's tools cannot run here; fail instead under PYDTRACE_REQUIRE_TRACER=1."""
    require(bcc_missing_reason())


def blocked_in_poll(pid: int) -> bool:
    """Whether process ``pid``'s main thread sleeps in poll(2) or epoll_wait(2)."""
    try:
        call = Path(f"/proc/{pid}/syscall").read_text().split()
    except OSError:
        return False
    return bool(call) and call[0].isdigit() and int(call[0]) in POLL_SYSCALLS[platform.machine()]


@dataclass
class BccTool:
    """``TOOL -l python [ARGS] PID``: attached once it printed "Tracing ..." (and, for a tool that
    reads a perf buffer, once it waits on that buffer); stopped with SIGINT, as Ctrl-C would."""

    name: str
    pid: int
    args: list[str] = field(default_factory=list)
    #: uflow and ugc print events from a perf buffer they open after their "Tracing" line.
    buffered: bool = False
    #: For a buffered tool: stop only once a line matching this has been printed.
    last_line: re.Pattern | None = None
    #: For a buffered tool: stop only once this many lines match ``counted``.
    counted: re.Pattern | None = None
    expected: int = 0
    lines: list[str] = field(default_factory=list)
    code: int | None = None

    def start(self) -> None:
        argv = [bcc_tool(self.name), "-l", "python", *self.args, str(self.pid)]
        # The tools are Python scripts: unbuffered, each event is on the pipe once printed.
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        errors="backslashreplace", env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.out = Lines(self.process.stdout, self.name)
        self.err = Lines(self.process.stderr, f"{self.name}'s stderr")
        while (line := self.out.next()) is not None and not line.startswith("Tracing "):
            pass
        if line is None:
            raise AssertionError(f"{self.name} ended before attaching: {self.err.rest(5)[-20:]}")
        if self.buffered:
            self._wait_polling()

    def _wait_polling(self) -> None:
        """Until the tool waits on its perf buffers (a state of the process, polled)."""
        deadline = time.monotonic() + STEP_TIMEOUT
        while not blocked_in_poll(self.process.pid):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.name} never waited on its perf buffer: {self.err.available()[-20:]}")
            time.sleep(0.005)

    def stop(self) -> None:
        if self.buffered:
            # Every event the workload fired is in the buffers: wait for the lines the test
            # expects, then until the tool sleeps on its buffers again, having printed the rest.
            deadline = time.monotonic() + STEP_TIMEOUT
            while not self._all_printed():
                if self.out.next(max(0.0, deadline - time.monotonic())) is None:
                    raise AssertionError(f"{self.name} ended early: {self.err.rest(5)[-20:]}")
            self._wait_polling()
        self.process.send_signal(signal.SIGINT)
        self.out.rest()
        self.err.rest()
        self.code = self.process.wait(STEP_TIMEOUT)
        self.lines = self.out.seen
        lost = [line for line in self.err.seen + self.lines if "lost" in line.lower()]
        assert not lost, f"{self.name} lost events (its perf buffer overflowed): {lost}"

    def _all_printed(self) -> bool:
        seen = self.out.available()
        if self.last_line is not None and not any(self.last_line.search(line) for line in seen):
            return False
        return self.counted is None or sum(bool(self.counted.search(line)) for line in seen) >= self.expected

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def who_fired(result: dict, probe: str) -> str:
    """Who fired ``probe`` while the tool was attached ("interpreter" or "pydtrace-rs"), as the
    workload saw it; asserts that exactly one did (only ours where the interpreter declares none)."""
    interpreter = probe in result["interpreter_firing"]
    ours = probe in result["ours_enabled"]
    if probe.replace("-", "__") in OWN:
        assert interpreter != ours, f"{probe}: the interpreter fires it: {interpreter}; pydtrace-rs: {ours}"
    else:
        assert ours and not interpreter, result
    return "interpreter" if interpreter else "pydtrace-rs"


#: Records which copies fire, as the workload sees them while traced.
WHO_FIRES = """
    import dtrace

    def who_fires(result):
        result["interpreter_firing"] = sorted(dtrace._native.interpreter_firing())
        result["ours_enabled"] = sorted(dtrace._native.consumer_probes())
"""

CALLS_BODY = WHO_FIRES + """
    def fib(n):
        return n if n < 2 else fib(n - 1) + fib(n - 2)

    def leaf():
        return 1

    def run(result):
        who_fires(result)
        fib(15)
        for _ in range(500):
            leaf()
"""


def test_ucalls_counts_each_call_once(workload_dir):
    require_bcc()
    workload = Workload(CALLS_BODY, ["function-entry"], workload_dir)
    tool = handshake(workload, lambda w: BccTool("ucalls", w.pid))
    assert tool.code == 0, tool.err.seen[-20:]
    # "FILENAME.FUNCTION   CALLS", the file name cut to bcc's 80 bytes.
    counts = {}
    for line in tool.lines:
        match = re.match(r"^(\S+)\.(\w+)\s+(\d+)$", line.strip())
        if match and str(workload.path).startswith(match.group(1)):
            counts[match.group(2)] = counts.get(match.group(2), 0) + int(match.group(3))
    assert counts.get("fib") == 1973 and counts.get("leaf") == 500, tool.lines
    who_fired(workload.result, "function-entry")


FLOW_BODY = WHO_FIRES + """
    def flow_fib(n):
        return n if n < 2 else flow_fib(n - 1) + flow_fib(n - 2)

    def flow_main():
        flow_fib(7)

    def run(result):
        who_fires(result)
        flow_main()
"""


def test_uflow_prints_each_entry_and_return_once(workload_dir):
    require_bcc()
    workload = Workload(FLOW_BODY, ["function-entry", "function-return"], workload_dir)
    # Only the workload's flow_* functions (-M: a prefix of the function's name; -C with the
    # file's name is a loop too long for the kernel's verifier), few enough to fit the perf
    # buffer however slowly uflow prints; the last event is flow_main() returning.
    tool = handshake(workload, lambda w: BccTool("uflow", w.pid, ["-M", "flow_"], buffered=True,
                                                 last_line=re.compile(r"<- \S+\.flow_main\s*$")))
    assert tool.code == 0, tool.err.seen[-20:]
    flow = []  # (direction, depth, function) of the workload file's functions
    for line in tool.lines:
        match = re.match(r"^\d+\s+\d+\s+\d+\s+[\d.]+\s+( *)(->|<-) (\S+)\.(\w+)\s*$", line)
        if match and str(workload.path).startswith(match.group(3)):
            flow.append((match.group(2), len(match.group(1)) // 2, match.group(4)))
    assert {name for _, _, name in flow} == {"flow_main", "flow_fib"}, flow
    fib = [step for step in flow if step[2] == "flow_fib"]
    assert sum(d == "->" for d, _, _ in fib) == 41 and sum(d == "<-" for d, _, _ in fib) == 41, flow
    # Balanced: each function returns at the depth it entered.
    stack = []
    for direction, depth, name in flow:
        if direction == "->":
            stack.append((depth, name))
        else:
            assert stack.pop() == (depth, name), flow
    who_fired(workload.result, "function-entry")
    who_fired(workload.result, "function-return")


GC_BODY = WHO_FIRES + """
    import gc

    gc.disable()  # only the collections run() makes

    def run(result):
        who_fires(result)
        for _ in range(20):
            gc.collect()
"""

#: One ugc line per collection: "START  TIME  DESCRIPTION".
GC_LINE = re.compile(r"^\d+\.\d+\s+\d+\.\d+\s")


def test_ugc_prints_each_collection_once(workload_dir):
    require_bcc()
    workload = Workload(GC_BODY, ["gc-start", "gc-done"], workload_dir)
    tool = handshake(workload, lambda w: BccTool("ugc", w.pid, buffered=True, counted=GC_LINE, expected=20))
    assert tool.code == 0, tool.err.seen[-20:]
    assert sum(bool(GC_LINE.search(line)) for line in tool.lines) == 20, tool.lines
    who_fired(workload.result, "gc-start")
    who_fired(workload.result, "gc-done")
