"""perf (Debian's linux-perf) on the probes, as the README's recipe runs it: exact counts.

The recipe: ``perf buildid-cache --update LIB``, ``perf probe -x LIB -a
sdt_python:function__entry``, ``perf record -e sdt_python:function__entry -p
PID``, ``perf report`` / ``perf script``, and ``perf probe -d 'sdt_python:*'``,
since a perf probe event is defined system-wide (in tracefs) until removed.

The handshake is the one every traced test runs (tests/tracing.py): perf
record raises the probe's semaphore when it opens the event, so the workload
waits in ``dtrace.wait_for_consumer('function-entry')``. perf record opens its
events before it starts recording (it first reads the process's mappings), so
it is started with its events disabled (``-D -1``) and a control FIFO, and the
workload is let go only once perf has acknowledged ``enable``. perf is stopped
with SIGINT, as Ctrl-C would, and awaited.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import dtrace
from tracing import STEP_TIMEOUT, Workload, handshake, require

EVENT = "sdt_python:function__entry"
CALLS = 1234
#: The workload's target function is defined past every line of the code the driver runs
#: while traced (json, the driver itself), so the line (arg3 of perf's event, CPython's
#: arg2) tells its events apart from every other function's.
TARGET_LINE_AT_LEAST = 5000


def perf_missing_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "perf probes are a Linux tool"
    if shutil.which("perf") is None:
        return "perf is not installed (Debian: apt-get install linux-perf)"
    if os.geteuid() != 0:
        return "perf probe needs root: run the tests with sudo"
    if not Path("/sys/kernel/tracing/uprobe_events").exists():
        return "tracefs is not mounted: mount -t tracefs nodev /sys/kernel/tracing"
    return None


def require_perf() -> None:
    """Skip where perf cannot probe here; fail instead under PYDTRACE_REQUIRE_TRACER=1."""
    require(perf_missing_reason())


def perf(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["perf", *args], capture_output=True, text=True, timeout=STEP_TIMEOUT)
    if check:
        assert done.returncode == 0, f"perf {' '.join(args)} failed ({done.returncode}): {done.stderr}"
    return done


def perf_events_defined() -> list[str]:
    """The sdt_python events defined in tracefs now."""
    text = Path("/sys/kernel/tracing/uprobe_events").read_text()
    return [line for line in text.splitlines() if "sdt_python/" in line]


@dataclass
class PerfRecord:
    """``perf record -e EVENT -p PID``, started with its events disabled and enabled through
    its control FIFO: ``start`` returns once perf has acknowledged, i.e. it records."""

    pid: int
    directory: Path
    #: The events recorded (a glob, as perf record's -e takes it).
    event: str = EVENT

    @property
    def data(self) -> Path:
        return self.directory / "perf.data"

    def start(self) -> None:
        control, ack = self.directory / "perf.ctl", self.directory / "perf.ack"
        os.mkfifo(control)
        os.mkfifo(ack)
        self.process = subprocess.Popen(
            ["perf", "record", "-e", self.event, "-p", str(self.pid), "-o", str(self.data),
             "-D", "-1", f"--control=fifo:{control},{ack}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        # Opening a FIFO blocks until the other side opens it: perf opens both at start-up.
        with open(control, "w") as to_perf, open(ack) as from_perf:
            to_perf.write("enable\n")
            to_perf.flush()
            answer = from_perf.readline()
        assert answer.strip() == "ack", f"perf answered {answer!r} to enable"

    def stop(self) -> None:
        """Ctrl-C: perf writes what it recorded and exits."""
        self.process.send_signal(signal.SIGINT)
        try:
            _, self.stderr = self.process.communicate(timeout=STEP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGINT)  # a second Ctrl-C, should the first be missed
            _, self.stderr = self.process.communicate(timeout=STEP_TIMEOUT)
        # perf record ends its run on SIGINT and exits by it (130), or with 0.
        assert self.process.returncode in (0, 130, -signal.SIGINT), (self.process.returncode, self.stderr)

    def kill(self) -> None:
        if getattr(self, "process", None) is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def test_perf_probe_record_report_script_count_exactly(workload_dir):
    require_perf()
    padding = "\n" * TARGET_LINE_AT_LEAST
    body = f"""
        import sys
        {padding}
        def target():
            return 1

        def run(result):
            result["calls"] = sum(target() for _ in range({CALLS}))
    """
    workload = Workload(body, ["function-entry"], workload_dir)

    def recorder_for(workload: Workload) -> PerfRecord:
        # A leftover event of an earlier run that was killed would make `perf probe -a` fail.
        perf("probe", "-q", "-d", "sdt_python:*", check=False)
        # The README's recipe. `--update`, because `--add` keeps an older entry: the same build
        # under another path (another venv, another checkout) or an older build at this path,
        # and `perf probe -a` then fails. test_perf_recipe_survives_a_second_install checks that.
        perf("buildid-cache", "--update", workload.library)
        added = perf("probe", "-x", workload.library, "-a", EVENT)
        assert EVENT in added.stderr + added.stdout, added
        assert perf_events_defined(), "perf probe -a defined no event"
        return PerfRecord(workload.pid, workload_dir)

    try:
        # The workload goes once function-entry is live in it, and went idle again once perf stopped.
        recorder = handshake(workload, recorder_for)
    finally:
        perf("probe", "-q", "-d", "sdt_python:*", check=False)
    # The cleanup leaves no event behind: perf probe events are system-wide until removed.
    assert perf_events_defined() == []
    assert perf("probe", "-l").stdout.count("sdt_python") == 0

    assert workload.result == {"calls": CALLS}
    line = workload.line_of("def target():")
    assert line > TARGET_LINE_AT_LEAST

    # perf script: one line per event, with the probe's arguments as perf names them
    # (arg1 to arg4: CPython's filename, funcname, lineno, then co_qualname).
    script = perf("script", "-i", str(recorder.data)).stdout
    events = [row for row in script.splitlines() if f"{EVENT}:" in row]
    lines = [int(m.group(1)) for row in events if (m := re.search(r"\barg3=(-?\d+)", row))]
    assert len(lines) == len(events), script[:2000]
    assert lines.count(line) == CALLS, f"{lines.count(line)} events of target() at line {line}, not {CALLS}"
    assert all(f" {workload.pid} " in row for row in events), "events of another process"

    # perf report: the same number of events in all.
    report = perf("report", "-i", str(recorder.data), "--stdio").stdout
    count = re.search(r"^# Event count \(approx\.\): (\d+)$", report, re.M)
    assert count, report[:2000]
    assert int(count.group(1)) == len(events), report[:2000]
    assert f"of event '{EVENT}'" in report
    assert "Total Lost Samples: 0" in report


def test_perf_recipe_survives_a_second_install(tmp_path):
    """The same wheel in two environments: both copies carry one build ID, and perf's cache
    keeps one path per build ID. ``--add`` leaves the first path there and ``perf probe -a``
    on the second fails ("Failed to add events"); ``--update`` re-points it. This is what made
    the README's first recipe fail on a machine where the project was checked out twice."""
    require_perf()
    import dtrace

    library = dtrace.library_path()
    other = tmp_path / Path(library).name
    shutil.copy2(library, other)
    perf("probe", "-q", "-d", "sdt_python:*", check=False)
    try:
        perf("buildid-cache", "--update", str(other))  # the first install
        perf("buildid-cache", "--update", library)  # the README's recipe on the second
        added = perf("probe", "-x", library, "-a", EVENT)
        assert EVENT in added.stderr + added.stdout, added
        assert perf_events_defined(), "perf probe -a defined no event"
    finally:
        perf("probe", "-q", "-d", "sdt_python:*", check=False)
        perf("buildid-cache", "--remove", str(other), check=False)
        perf("buildid-cache", "--update", library, check=False)
    assert perf_events_defined() == []


# --- An interpreter that declares gc__start itself (Debian's builds --with-dtrace) ----------------

#: The object of this interpreter that declares gc__start itself, if one does.
OWN_GC_OBJECT = dict(dtrace._native.interpreter_objects()[0]).get("gc-start")
GC_EVENT = "sdt_python:gc__start"
COLLECTIONS = 20
GC_BODY = f"""
    import gc

    gc.disable()  # only the collections run() makes

    def run(result):
        for _ in range({COLLECTIONS}):
            gc.collect()
"""


@pytest.mark.skipif(OWN_GC_OBJECT is None, reason=f"{sys.executable} does not declare gc__start itself "
                                                  "(not built --with-dtrace): there is only one copy to probe")
@pytest.mark.parametrize("copies", ["both", "ours"])
def test_perf_records_each_collection_once_from_either_copy(workload_dir, copies):
    """perf probes both objects' gc__start (the second event named with a suffix: gc__start_1)
    (``-f``: perf refuses a second event of one name without it) and records them with one glob: perf raises both semaphores, the interpreter fires its copy
    and pydtrace-rs leaves its own silent (src/interpreter.rs), so each collection is recorded once.
    Ours alone: the interpreter's semaphore stays down, and pydtrace-rs fires each one."""
    require_perf()
    workload = Workload(GC_BODY, ["gc-start"], workload_dir)
    defined: list[str] = []

    def recorder_for(workload: Workload) -> PerfRecord:
        perf("probe", "-q", "-d", "sdt_python:*", check=False)
        objects = [workload.library] + ([OWN_GC_OBJECT] if copies == "both" else [])
        for path in objects:
            perf("buildid-cache", "--update", path)
            # -f: perf refuses a second event of one name unless forced, and then adds a suffix.
            added = perf("probe", "-x", path, *(["-f"] if defined else []), "-a", GC_EVENT)
            names = re.findall(r"(sdt_python:gc__start\w*)", added.stderr + added.stdout)
            assert names, added
            defined.append(names[0])
        assert len(set(defined)) == len(objects), defined  # the second is gc__start_1
        return PerfRecord(workload.pid, workload_dir, event=f"{GC_EVENT}*")

    try:
        recorder = handshake(workload, recorder_for)
    finally:
        perf("probe", "-q", "-d", "sdt_python:*", check=False)
    assert perf_events_defined() == []
    script = perf("script", "-i", str(recorder.data)).stdout
    recorded = {name: 0 for name in defined}
    for row in script.splitlines():
        match = re.search(r" (sdt_python:gc__start\w*):", row)
        if match:
            recorded[match.group(1)] += 1
    # Both: the interpreter's copy alone fired (its semaphore was up); ours alone: ours.
    fired = defined[1] if copies == "both" else defined[0]
    assert recorded == {name: COLLECTIONS if name == fired else 0 for name in defined}, script[:2000]
