"""How a tool ends, and what it leaves behind: nothing.

Whatever ends the tool (Ctrl-C, SIGTERM, SIGHUP, the terminal closing, SIGKILL), its bpftrace ends
too, no uprobe of the probe object is left in the kernel, and the traced process goes idle again.
A command started by -c ends with the trace (after -d too), and its own failure is the tool's exit
status. A tracer that misses a SIGINT gets another, and only then SIGKILL. A command that never
loads dtrace gets a hint that names the missing step (pydtrace-rs.pth after `maturin develop`).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import termios
import textwrap
from pathlib import Path

import pytest

from dtrace.tools.command import engine, runner
from tracing import (STEP_TIMEOUT, Lines, ToolRun, Workload, require_tracer, run_tool, tool_command, tracer_of,
                     uprobe_events_of, wait_gone)

TICKS = """
    def tick():
        pass

    def run(result):
        for _ in range(7):
            tick()
"""


def rows(text: str, column: int, value: str) -> list[list[str]]:
    return [words for words in (line.split() for line in text.splitlines()) if len(words) > column
            and words[column] == value]


def write(directory: Path, body: str, name: str = "command.py") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(body))
    return path


def check_nothing_left(workload: Workload, tracer: int) -> None:
    """bpftrace has exited, the kernel holds no uprobe of the probe object, the workload is idle."""
    assert wait_gone(tracer), f"bpftrace (PID {tracer}) outlived the tool"
    assert uprobe_events_of(workload.library) == []
    assert workload.finish() == 0, workload.stderr_text
    assert workload.idle["enabled"] == [], workload.idle
    assert workload.idle["events"] == [0] * 6, workload.idle


def traced_until(workload_dir: Path, tool: ToolRun) -> tuple[Workload, int]:
    """Start the TICKS workload, attach ``tool`` to it, let the workload run; returns the workload
    and the PID of the tool's bpftrace (the tool still runs)."""
    workload = Workload(TICKS, ["aggregate-calls", "aggregate-flush"], workload_dir)
    workload.start()
    tool.pid = workload.pid
    tool.start()
    tracer = tool.tracer_pid()
    workload.go()
    workload.wait_result()
    return workload, tracer


STOPS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL]


@pytest.mark.parametrize("sig", STOPS, ids=lambda s: signal.Signals(s).name)
def test_every_signal_that_ends_the_tool_ends_its_tracer(workload_dir, sig):
    require_tracer()
    tool = ToolRun(["calls", "-n", "0"], 0, stop_signal=sig)
    workload = None
    try:
        workload, tracer = traced_until(workload_dir, tool)
        tool.stop()
        if sig == signal.SIGKILL:
            assert tool.code == -signal.SIGKILL
        else:  # the trace was stopped: the report, and exit status 0
            assert tool.code == 0, tool.stderr
            assert rows(tool.stdout, 1, "tick")[0][0] == "7", tool.stdout
            assert "Traceback" not in tool.stderr, tool.stderr
        check_nothing_left(workload, tracer)
    finally:
        tool.kill()
        if workload is not None:
            workload.kill()


def test_closing_the_terminal_ends_the_trace_with_its_report(workload_dir):
    """The tool runs in a terminal of its own (a pty, its controlling terminal); closing the
    terminal hangs it up: the kernel sends the tool SIGHUP."""
    require_tracer()
    master, slave = os.openpty()

    def controlling_terminal():
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    tool = ToolRun(["calls", "-n", "0"], 0, stop_signal=None,
                   popen={"stdin": slave, "start_new_session": True, "preexec_fn": controlling_terminal})
    workload = None
    try:
        workload, tracer = traced_until(workload_dir, tool)
        os.close(slave)
        os.close(master)  # the terminal goes away
        tool.stop()
        assert tool.code == 0, tool.stderr
        assert rows(tool.stdout, 1, "tick")[0][0] == "7", tool.stdout
        check_nothing_left(workload, tracer)
    finally:
        tool.kill()
        if workload is not None:
            workload.kill()


# --- -c: the command ends with the trace; its failure is the tool's status ------------------------

SLEEPER = """
    import signal, sys, time
    if "--ignore-term" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    def tick():
        pass
    for _ in range(3):
        tick()
    print("ticked", flush=True)
    time.sleep(600)
"""


def command_pid(stderr: str) -> int:
    """The command's PID, from the tool's "Tracing ... [PID N (...)]" line."""
    match = re.search(r"^Tracing .*\[PID (\d+) ", stderr, re.M)
    assert match, stderr
    return int(match.group(1))


@pytest.mark.parametrize("extra", [[], ["--ignore-term"]], ids=["stops", "ignores-sigterm"])
def test_after_duration_the_command_is_stopped_and_the_tool_exits(workload_dir, extra):
    """-d 3 -c "a server": the tool does not wait for the command; it stops it (SIGTERM, then
    SIGKILL for one that ignores SIGTERM) and exits 0 after its report."""
    require_tracer()
    script = write(workload_dir, SLEEPER)
    done = run_tool("calls", "-n", "0", "-d", "3", "-c", " ".join([sys.executable, str(script), *extra]),
                    cwd=workload_dir)
    assert done.returncode == 0, done.stderr
    assert rows(done.stdout, 1, "tick")[0][0] == "3", done.stdout
    pid = command_pid(done.stderr)
    assert f"pydtrace: the trace has ended: stopping the command (PID {pid}) with SIGTERM" in done.stderr
    assert wait_gone(pid, timeout=1)


def test_a_tool_killed_with_sigkill_takes_its_tracer_and_command_along(workload_dir):
    require_tracer()
    script = write(workload_dir, SLEEPER)
    tool = subprocess.Popen(tool_command("calls", "-c", f"{sys.executable} {script}"), cwd=workload_dir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = Lines(tool.stdout, "the tool"), Lines(tool.stderr, "the tool's stderr")
        while not (line := err.next()).startswith("Tracing "):
            assert line is not None, err.seen
        pid = command_pid(line)
        assert out.next() == "ticked"  # the command's own output: it runs, traced
        tracer = tracer_of(tool.pid)
        library = Path(f"/proc/{pid}/maps").read_text()
        library = next(line.split()[-1] for line in library.splitlines() if "dtrace/_native" in line)
        tool.kill()
        assert tool.wait(STEP_TIMEOUT) == -signal.SIGKILL
        assert wait_gone(tracer), "bpftrace outlived the tool"
        assert wait_gone(pid), "the command outlived the tool"
        assert uprobe_events_of(library) == []
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()


@pytest.mark.parametrize("ending, status, message", [
    ("sys.exit(3)", 3, "pydtrace: the command exited with status 3"),
    ("os.kill(os.getpid(), signal.SIGSEGV)", 128 + signal.SIGSEGV, "pydtrace: the command was killed by SIGSEGV"),
], ids=["exit-3", "sigsegv"])
@pytest.mark.parametrize("mode", [[], ["--per-event"]], ids=["aggregate", "per-event"])
def test_a_failing_command_is_the_tools_exit_status_after_its_report(workload_dir, ending, status, message, mode):
    require_tracer()
    script = write(workload_dir, f"""
        import os, signal, sys
        def tick():
            pass
        for _ in range(4):
            tick()
        {ending}
    """)
    done = run_tool("calls", "-n", "0", *mode, "-c", f"{sys.executable} {script}", cwd=workload_dir)
    assert done.returncode == status, (done.returncode, done.stderr)
    assert done.stderr.splitlines()[-1] == message, done.stderr
    if not mode and "SIGSEGV" in ending:
        # Killed before its exit flush: what it counted is lost, and the tool says so.
        assert not rows(done.stdout, 1, "tick"), done.stdout
        assert "ended without its last flush" in done.stderr, done.stderr
        return
    assert rows(done.stdout, 1, "tick")[0][0] == "4", done.stdout  # the report came first
    assert "without its last flush" not in done.stderr, done.stderr


# --- a tracer that misses SIGINT -----------------------------------------------------------------

FAKE_TRACER = """
    import json, signal, sys, time
    log = open(sys.argv[1], "a", buffering=1)
    ignore = int(sys.argv[2])  # how many SIGINTs to miss (-1: all)
    blank_then_wait = sys.argv[3] == "slow-exit"
    seen = 0

    def on_int(signum, frame):
        global seen
        seen += 1
        log.write("SIGINT\\n")
        if ignore < 0 or seen <= ignore:
            return
        print(flush=True)
        print(flush=True)  # bpftrace's sign that it has left its event loop
        if blank_then_wait:
            signal.signal(signal.SIGINT, lambda *a: (log.write("SIGINT while leaving\\n"), sys.exit(9)))
            time.sleep(1.5)
        print(json.dumps({"type": "map", "data": {"@calls": {"/x.py,tick": 7}}}), flush=True)
        sys.exit(0)

    signal.signal(signal.SIGINT, on_int)
    print(json.dumps({"type": "printf", "data": "Tracing fake... Hit Ctrl-C to end.\\n"}), flush=True)
    while True:
        # Not signal.pause(): a SIGINT that lands after the interpreter's last check and before
        # the pause() call would wait for the next signal (a window that 3.14 widens enough for
        # the tests' 0.3 s). A short sleep runs the handler within 10 ms either way.
        time.sleep(0.01)
"""


def fake_tracer(directory: Path, ignore: int, mode: str = "quick-exit") -> tuple[list[str], Path]:
    script = write(directory, FAKE_TRACER, "fake_bpftrace.py")
    log = directory / "signals.log"
    return [sys.executable, str(script), str(log), str(ignore), mode], log


@pytest.fixture
def quick_stops(monkeypatch):
    """Shorter bounds than a real bpftrace gets, so the tests run quickly."""
    monkeypatch.setattr(engine, "RESEND_AFTER", 0.3)
    monkeypatch.setattr(engine, "KILL_AFTER", 0.5)


def start_fake(argv: list[str]) -> tuple[subprocess.Popen, Lines]:
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    lines = Lines(process.stdout, "the fake tracer")
    assert json.loads(lines.next())["type"] == "printf"  # its handler is installed
    return process, lines


@pytest.mark.parametrize("ignore, sent, code", [
    (0, [signal.SIGINT], 0),
    (1, [signal.SIGINT, signal.SIGINT], 0),
    (-1, [signal.SIGINT, signal.SIGINT, signal.SIGKILL], -signal.SIGKILL),
], ids=["stops-at-once", "misses-one", "misses-all"])
def test_the_stopper_resends_sigint_and_only_then_kills(tmp_path, quick_stops, ignore, sent, code):
    argv, log = fake_tracer(tmp_path, ignore)
    process, lines = start_fake(argv)
    stopper = engine.Stopper(process, lambda: any(not line.strip() for line in lines.available()))
    assert stopper.wait() == code
    assert stopper.sent == sent
    assert stopper.killed == (code == -signal.SIGKILL)


def test_the_stopper_sends_nothing_more_while_the_tracer_leaves(tmp_path, quick_stops):
    """Once bpftrace printed its blank lines a second SIGINT would kill it while it prints its
    maps: the stopper waits (EXIT_LIMIT), here longer than RESEND_AFTER and KILL_AFTER."""
    argv, log = fake_tracer(tmp_path, 0, "slow-exit")
    process, lines = start_fake(argv)
    stopper = engine.Stopper(process, lambda: any(not line.strip() for line in lines.available()))
    assert stopper.wait() == 0
    assert stopper.sent == [signal.SIGINT]
    assert log.read_text() == "SIGINT\n"
    assert lines.rest()[-1].startswith('{"type": "map"')


def test_the_tool_survives_a_tracer_that_misses_its_first_sigint(tmp_path):
    """The tool, through its Session and Stopper, with a stand-in for bpftrace on PATH that misses
    the first SIGINT: the tool sends another and prints the report."""
    require_tracer()  # the tool checks for root before it starts the tracer
    argv, log = fake_tracer(tmp_path, 1)
    fake = tmp_path / "bin" / "bpftrace"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\nexec {' '.join(argv)}\n")
    fake.chmod(0o755)
    tool = ToolRun(["calls", "-n", "0", "--per-event"], os.getpid(),  # this process has loaded dtrace
                   popen={"env": {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}})
    try:
        tool.start()
        tool.stop()
    finally:
        tool.kill()
    assert tool.code == 0, tool.stderr
    assert rows(tool.stdout, 1, "tick")[0][0] == "7", tool.stdout
    assert log.read_text() == "SIGINT\nSIGINT\n"
    assert "was killed" not in tool.stderr


# --- a command that never loads dtrace: the hint names the step --------------------------------


def make_venv(path: Path) -> Path:
    """A bare virtual environment of this Python's base interpreter: its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=STEP_TIMEOUT)
    return path / "bin" / "python"


def test_a_python_without_pydtrace_rs_or_without_its_pth_gets_the_step_that_is_missing(tmp_path):
    require_tracer()
    python = make_venv(tmp_path / "venv")
    script = write(tmp_path, "print('ran')\n")
    done = run_tool("calls", "-c", f"{python} {script}")
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"pydtrace: the command exited (status 0) before loading dtrace; pydtrace-rs is not installed in {python}: "
        f"install it there, or run the command with a Python that has it, e.g. {sys.executable}")

    # What `maturin develop` leaves: dtrace importable through its own pydtrace_rs.pth (a path line,
    # which adds the package without processing the .pth files beside it), but no pydtrace-rs.pth,
    # so PYDTRACE=1 does nothing.
    site = Path(subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    import dtrace

    (site / "pydtrace_rs.pth").write_text(str(Path(dtrace.__file__).parent.parent) + "\n")
    done = run_tool("calls", "-c", f"{python} {script}")
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"pydtrace: the command exited (status 0) before loading dtrace; PYDTRACE=1 does nothing in {python}: "
        f"pydtrace-rs.pth is missing from {site} (`maturin develop` leaves it out); add it: "
        f"cp pydtrace-rs.pth {site}/pydtrace_rs_arm.pth (or install with `pip install .`)")

    # The one step, as said: the file under a name that site loads after pydtrace_rs.pth (under
    # its own name it would load first, fail to import dtrace, and print an error at every start).
    (site / "pydtrace_rs_arm.pth").write_text(Path(dtrace.__file__).parent.parent.joinpath("pydtrace-rs.pth").read_text())
    done = run_tool("calls", "-c", f"{python} {script}")
    assert done.returncode == 0, done.stderr
    assert "ran" in done.stdout
    assert "Error processing line" not in done.stderr, done.stderr


def test_an_old_python_gets_the_version_it_needs(tmp_path):
    require_tracer()
    old = next((p for p in ("/usr/bin/python3.11", "/usr/bin/python3.10") if os.path.exists(p)), None)
    if old is None:
        pytest.skip("no Python older than 3.12 here")
    script = write(tmp_path, "print('ran')\n")
    done = run_tool("calls", "-c", f"{old} {script}")
    assert done.returncode == 1, done.stderr
    version = os.path.basename(old)[len("python"):]
    assert done.stderr.splitlines()[-1] == (
        f"pydtrace: the command exited (status 0) before loading dtrace; {old} is Python {version}: "
        f"pydtrace-rs needs CPython 3.12 or later; run the command with a Python that has pydtrace-rs, "
        f"e.g. {sys.executable}")


def test_the_python_of_a_command_is_found_by_name_or_by_its_script(tmp_path):
    assert runner.command_python([sys.executable, "x.py"]) == sys.executable
    script = write(tmp_path, f"#!/usr/bin/env -S {os.path.basename(sys.executable)} -u\nprint(1)\n", "tool")
    script.chmod(0o755)
    found = runner.command_python([str(script)])
    assert found is not None and os.path.basename(found) == os.path.basename(sys.executable)
    assert runner.command_python(["/bin/true"]) is None
    shell = write(tmp_path, "#!/bin/sh\necho\n", "sh-script")
    assert runner.command_python([str(shell)]) is None
