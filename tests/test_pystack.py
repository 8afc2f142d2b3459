"""The Python stack read from the interpreter's frames (dtrace/tools/proc/pystack.py): its layout read
and checked against live processes, its line tables against CPython's own answer, and the tools
that use it (where, flame --sample, run's @PYSTACK@) under a real bpftrace with exact stacks, on
processes that never imported dtrace."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dtrace.tools.errors import ToolError
from dtrace.tools.flame import SAMPLES
from dtrace.tools.proc import procfs, pyprocess, pystack
from tracing import STEP_TIMEOUT, Lines, ToolRun, require_tracer, run_tool

#: The environment of a process that must not load dtrace (no .pth arming, no tool handshake).
PLAIN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("PYDTRACE")}


def is_root() -> bool:
    return os.geteuid() == 0


needs_root = pytest.mark.skipif(not is_root(), reason="reading another process's memory needs root")


class Plain:
    """A Python process (this interpreter) that never imports dtrace: it prints its PID, waits for
    "go", runs ``BODY``'s ``run()``, prints "done", and waits for its stdin to close. With
    ``wait_for``, it imports dtrace and waits for those probes to be live before it runs."""

    DRIVER = textwrap.dedent("""\
        import os, sys
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import body
        WAIT_FOR = {wait_for!r}
        if WAIT_FOR:
            import dtrace
        print(os.getpid(), flush=True)
        if sys.stdin.readline().strip() == "go":
            if WAIT_FOR:
                assert dtrace.wait_for_consumer(*WAIT_FOR, timeout=60)
            body.run()
            print("done", "dtrace" in sys.modules, flush=True)
        sys.stdin.readline()
    """)

    def __init__(self, directory: Path, body: str, wait_for: tuple[str, ...] = ()) -> None:
        self.path = directory / "body.py"
        self.path.write_text(textwrap.dedent(body))
        (directory / "plain.py").write_text(self.DRIVER.replace("{wait_for!r}", repr(wait_for)))
        self.imports_dtrace = bool(wait_for)
        self.process = subprocess.Popen([sys.executable, str(directory / "plain.py")], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=PLAIN_ENV, cwd=directory)
        self.out = Lines(self.process.stdout, "the workload")
        self.pid = int(self.out.next())

    def line_of(self, marker: str) -> int:
        lines = [n for n, text in enumerate(self.path.read_text().splitlines(), 1) if marker in text]
        assert len(lines) == 1, lines
        return lines[0]

    def go(self) -> None:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        # it ran, and never imported dtrace (unless asked to, to compare with the probes' way)
        assert self.out.next() == f"done {self.imports_dtrace}"

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def traced_plain(directory: Path, body: str, *args: str) -> tuple[Plain, ToolRun]:
    """``python -m dtrace ARGS -p PID`` on a plain process running ``body``: the body runs once
    the tool printed its "Tracing ..." line (its program's BEGIN, after every probe attached)."""
    require_tracer()
    plain = Plain(directory, body)
    tool = ToolRun(list(args), plain.pid)
    try:
        tool.start()
        plain.go()
        tool.stop()
    finally:
        tool.kill()
        plain.close()
    assert tool.code == 0, tool.stderr
    assert "Traceback" not in tool.stderr and not re.search(r"helper errors|WARNING|ERROR", tool.stderr), tool.stderr
    return plain, tool


def stacks_of(text: str) -> dict[tuple[tuple[str, str], ...], int]:
    """where's stacks: {((place, function), ... innermost first): count}."""
    found = {}
    for block in re.findall(r"^ {0,6}\d+  .*?(?=\n\n|\nby innermost)", text, re.M | re.S):
        lines = block.splitlines()
        count, first = lines[0].split(None, 1)
        frames = [first] + [line.strip() for line in lines[1:]]
        found[tuple(tuple(frame.split(None, 1)) if not frame.startswith("(") else ("", frame)
                    for frame in frames)] = int(count)
    return found


# --- the line table, against CPython's own -----------------------------------------------------


def sample(n):
    total = 0
    for i in range(n):
        if i % 3:
            total += i
        else:
            total -= (
                i
                * 2
            )
    try:
        return total / n
    except ZeroDivisionError:
        return None


def test_line_at_reads_every_instruction_as_cpython_does():
    for code in (sample.__code__, test_line_at_reads_every_instruction_as_cpython_does.__code__,
                 pystack.line_at.__code__, pystack.Resolver.frame.__code__):
        checked = 0
        for start, end, line in code.co_lines():
            for offset in range(start, end, 2):
                assert pystack.line_at(code.co_linetable, code.co_firstlineno, offset) == line, (code, offset)
                checked += 1
        assert checked == len(code.co_code) // 2


# --- the layout, read from live processes --------------------------------------------------------

SLEEPER = """
import sys, time

def waiting():
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    time.sleep(60)  # waits here

waiting()
"""


@pytest.fixture
def sleeper(tmp_path):
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=PLAIN_ENV)
    assert process.stdout.readline() == "ready\n"
    # Asleep in time.sleep (its write may return before the call is made).
    deadline = time.monotonic() + STEP_TIMEOUT
    while not (procfs.status(process.pid) or {}).get("State", "").startswith("S") and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    yield process, script
    process.kill()
    process.wait()


@needs_root
def test_layout_reads_and_checks_the_stack_of_a_process_that_never_imported_dtrace(sleeper):
    process, script = sleeper
    layout = pystack.layout_of(process.pid)
    assert layout.source == ("the table for 3.12" if sys.version_info[:2] == (3, 12) else "_Py_DebugOffsets")
    with pystack.Memory(process.pid) as memory:
        (tid, state), = [t for t in pystack.threads(memory, layout) if t[0] == process.pid]
        frames = [(owner, code) for _, owner, code in pystack._frames(memory, layout, state)]
        resolver = pystack.Resolver(process.pid, layout)
        shown = []
        for frame, owner, code in pystack._frames(memory, layout, state):
            if owner >= pystack.SHIM_OWNER:
                continue
            index = (memory.u64(frame + layout.frame_instr) - code - layout.code_adaptive) >> 1
            shown.append(str(resolver.frame(code | index << 48)))
        resolver.close()
    assert frames
    line = SLEEPER.splitlines().index('    time.sleep(60)  # waits here') + 1
    assert shown == [f"{script}:{line} waiting", f"{script}:{line + 2} <module>"]


@needs_root
def test_a_layout_that_does_not_read_the_process_is_refused(sleeper):
    process, _ = sleeper
    python = pyprocess.identify(process.pid)
    with pystack.Memory(process.pid) as memory:
        layout = pystack.read_layout(python, memory)
        for wrong in ({"native_thread_id": layout.native_thread_id + 8}, {"frame_executable": 8},
                      {"code_qualname": layout.code_filename + 4}):
            bad = pystack.Layout(**{**vars(layout), "checked": [], **wrong})
            with pytest.raises(pystack.LayoutError, match="does not check out"):
                pystack.check_layout(python, memory, bad)


@needs_root
def test_an_interpreter_without_the_symbols_or_a_known_layout_is_refused(sleeper, monkeypatch):
    process, _ = sleeper
    python = pyprocess.identify(process.pid)
    with pystack.Memory(process.pid) as memory:
        stripped = pyprocess.PythonProcess(**{**vars(python), "elf": None})  # as if stripped of its symbols
        with pytest.raises(pystack.LayoutError, match="exports no symbol _PyRuntime"):
            pystack.read_layout(stripped, memory)
        if python.minor >= (3, 13):
            monkeypatch.delitem(pystack.DEBUG_OFFSETS, python.minor)
            with pytest.raises(pystack.LayoutError, match="does not know the order of _Py_DebugOffsets"):
                pystack.read_layout(python, memory)
        older = pyprocess.PythonProcess(**{**vars(python), "version": (3, 11, 9)})
        with pytest.raises(pystack.LayoutError, match="3.12 and later"):
            pystack.read_layout(older, memory)
        threaded = pyprocess.PythonProcess(**{**vars(python), "free_threaded": True})
        with pytest.raises(pystack.LayoutError, match="free-threaded"):
            pystack.read_layout(threaded, memory)


@needs_root
def test_a_process_that_exits_mid_walk_gives_a_clear_error_and_question_marks(sleeper):
    process, _ = sleeper
    layout = pystack.layout_of(process.pid)
    with pystack.Memory(process.pid) as memory:
        (_, state), = [t for t in pystack.threads(memory, layout) if t[0] == process.pid]
        walk = pystack._frames(memory, layout, state)
        frame, _, code = next(walk)
        process.kill()
        process.wait()
        with pytest.raises((pystack.LayoutError, StopIteration)):
            next(walk)  # the next frame cannot be read: an error that says so, or the end
    resolver = pystack.Resolver(process.pid, layout)  # the process is gone: nothing to read
    assert str(resolver.frame(code | 5 << 48)) == "?:? ? (a code object gone before it was read)"
    assert resolver.frame(pystack.CUT).qualname == pystack.MARKERS[pystack.CUT]
    with pytest.raises(ToolError, match="no process with PID"):
        pystack.layout_of(process.pid)


def test_not_a_python_process_is_refused():
    process = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(ToolError, match="is not a Python interpreter"):
            pystack.layout_of(process.pid)
    finally:
        process.kill()
        process.wait()


# --- where: the stacks that call a native function ----------------------------------------------

CHAIN = """
import socket

def dial(port):
    with socket.socket() as s:
        s.connect_ex(("127.0.0.1", port))  # connect here

def middle():
    dial(9)  # middle calls

def outer():
    for _ in range(3):
        middle()  # outer calls

def run():
    outer()  # run calls
    dial(7)  # run dials
"""


def test_where_reads_the_exact_stacks_from_the_frames_of_a_process_that_never_imported_dtrace(workload_dir):
    plain, tool = traced_plain(workload_dir, CHAIN, "where", "connect")
    file = plain.path
    at = {m: f"{file}:{plain.line_of(m)}" for m in ("# connect here", "# middle calls", "# outer calls",
                                                    "# run calls", "# run dials")}
    driver = workload_dir / "plain.py"
    go = f"{driver}:{[n for n, t in enumerate(driver.read_text().splitlines(), 1) if 'body.run()' in t][0]}"
    assert tool.stdout.startswith("connect(): 4 calls from 2 Python stacks"), tool.stdout
    assert stacks_of(tool.stdout) == {
        ((at["# connect here"], "dial"), (at["# middle calls"], "middle"), (at["# outer calls"], "outer"),
         (at["# run calls"], "run"), (go, "<module>")): 3,
        ((at["# connect here"], "dial"), (at["# run dials"], "run"), (go, "<module>")): 1,
    }, tool.stdout


def test_where_from_the_frames_agrees_with_the_entry_and_return_way_on_the_same_calls(workload_dir):
    """Both ways attached to one process at once, which then runs the chain: the same calls, the
    same frames (the entry/return way knows the frame that was running before it attached only
    from its line events, marked as such)."""
    require_tracer()
    plain = Plain(workload_dir, CHAIN, wait_for=("function-entry", "function-return", "line"))
    walked, rebuilt = ToolRun(["where", "connect"], plain.pid), ToolRun(["where", "connect", "--trace-calls"], plain.pid)
    try:
        walked.start()
        rebuilt.start()
        plain.go()
        walked.stop()
        rebuilt.stop()
    finally:
        walked.kill()
        rebuilt.kill()
        plain.close()
    assert walked.code == 0 and rebuilt.code == 0, (walked.stderr, rebuilt.stderr)
    from_frames, from_events = stacks_of(walked.stdout), stacks_of(rebuilt.stdout)
    assert sum(from_frames.values()) == 4 and len(from_frames) == 2, walked.stdout
    before = "<module>  (running since before tracing began; its callers are not known)"
    assert {stack[:-1]: count for stack, count in from_events.items()} == \
        {stack[:-1]: count for stack, count in from_frames.items()}, (walked.stdout, rebuilt.stdout)
    assert {stack[-1][1] for stack in from_events} == {before}, rebuilt.stdout
    assert {stack[-1][1] for stack in from_frames} == {"<module>"}, walked.stdout


RECURSION = """
import socket

def down(n):
    if n == 0:
        with socket.socket() as s:
            s.connect_ex(("127.0.0.1", 9))  # the bottom
        return
    down(n - 1)  # deeper

def run():
    down(30)
"""


def test_where_cuts_a_deep_stack_at_the_depth_limit_and_says_so(workload_dir):
    plain, tool = traced_plain(workload_dir, RECURSION, "where", "connect", "--depth", "10")
    (stack, count), = stacks_of(tool.stdout).items()
    bottom, deeper = (f"{plain.path}:{plain.line_of(m)}" for m in ("# the bottom", "# deeper"))
    assert count == 1
    assert stack == ((bottom, "down"),) + ((deeper, "down"),) * 9 + (("", pystack.MARKERS[pystack.CUT]),), stack


THREADS = """
import socket, threading

def connect(port):
    with socket.socket() as s:
        s.connect_ex(("127.0.0.1", port))  # connect here

def red():
    connect(9)  # red

def green():
    for _ in range(2):
        connect(9)  # green

def blue():
    for _ in range(3):
        connect(9)  # blue

def run():
    threads = [threading.Thread(target=f) for f in (red, green, blue)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
"""


def test_where_reads_each_threads_own_stack(workload_dir):
    plain, tool = traced_plain(workload_dir, THREADS, "where", "connect", "-n", "0")
    stacks = stacks_of(tool.stdout)
    here = f"{plain.path}:{plain.line_of('# connect here')}"
    by_caller = {}
    for stack, count in stacks.items():
        assert stack[0] == (here, "connect"), stack
        # then the thread's function, then threading's own frames (run, _bootstrap_inner, _bootstrap)
        assert [f for _, f in stack[2:]] == ["Thread.run", "Thread._bootstrap_inner", "Thread._bootstrap"], stack
        by_caller[stack[1]] = count
    assert by_caller == {(f"{plain.path}:{plain.line_of('# ' + name)}", name): n
                         for name, n in (("red", 1), ("green", 2), ("blue", 3))}, tool.stdout


GENERATORS = """
import asyncio, socket

def connect():
    with socket.socket() as s:
        s.connect_ex(("127.0.0.1", 9))  # connect here

def opening():
    for _ in range(2):
        connect()  # in the generator
        yield

async def fetch():
    await asyncio.sleep(0)
    connect()  # in the coroutine

async def main():
    await asyncio.gather(fetch(), fetch(), fetch())

def run():
    for _ in opening():  # drives the generator
        pass
    asyncio.run(main())
"""


def test_where_reads_generators_and_coroutines(workload_dir):
    plain, tool = traced_plain(workload_dir, GENERATORS, "where", "connect", "-n", "0")
    at = {m: f"{plain.path}:{plain.line_of(m)}" for m in ("# connect here", "# in the generator",
                                                         "# drives the generator", "# in the coroutine")}
    stacks = stacks_of(tool.stdout)
    generator = [s for s in stacks if s[1][1] == "opening"]
    coroutine = [s for s in stacks if s[1][1] == "fetch"]
    assert len(generator) == 1 and stacks[generator[0]] == 2, tool.stdout
    assert generator[0][:3] == ((at["# connect here"], "connect"), (at["# in the generator"], "opening"),
                                (at["# drives the generator"], "run")), tool.stdout
    # A task's coroutine runs from the event loop (asyncio's own frames below it), 3 times.
    assert len(coroutine) == 1 and stacks[coroutine[0]] == 3, tool.stdout
    stack = coroutine[0]
    assert stack[:2] == ((at["# connect here"], "connect"), (at["# in the coroutine"], "fetch")), tool.stdout
    names = [f for _, f in stack]
    assert "Handle._run" in names and names.index("Handle._run") < names.index("run"), names
    assert names[-1] == "<module>"


SUBINTERPRETER = """
try:
    import _interpreters as interpreters
except ImportError:  # 3.12
    import _xxsubinterpreters as interpreters

CODE = \'\'\'
import socket
def inner():
    with socket.socket() as s:
        s.connect_ex(("127.0.0.1", 9))
inner()
\'\'\'

def main_side():
    import socket
    with socket.socket() as s:
        s.connect_ex(("127.0.0.1", 9))  # main side

def run():
    interp = interpreters.create()
    interpreters.run_string(interp, CODE)
    main_side()  # after the sub-interpreter ran
    interpreters.destroy(interp)
"""


def test_where_reads_a_sub_interpreters_frames_and_marks_them(workload_dir):
    """The thread's state in the sub-interpreter is the one running: its frames are read, marked
    as a sub-interpreter's; back in the main interpreter (whose state for the thread is found
    though the sub-interpreter's, without frames, comes first), the main frames."""
    plain, tool = traced_plain(workload_dir, SUBINTERPRETER, "where", "connect")
    stacks = stacks_of(tool.stdout)
    main = ((f"{plain.path}:{plain.line_of('# main side')}", "main_side"),
            (f"{plain.path}:{plain.line_of('# after the sub-interpreter ran')}", "run"))
    sub = [stack for stack in stacks if stack[0][1] == "inner"]
    assert len(stacks) == 2 and len(sub) == 1, tool.stdout
    assert [(place.rpartition(":")[2], f) for place, f in sub[0]] == [
        ("5", "inner"), ("6", "<module>"), ("", pystack.MARKERS[pystack.SUBINTERPRETER])], tool.stdout
    assert sub[0][0][0].split(":")[0] in ("<string>", "<script>"), tool.stdout
    (other,) = set(stacks) - set(sub)
    assert other[:2] == main and other[-1][1] == "<module>", tool.stdout


# --- flame --sample ----------------------------------------------------------------------------

BUSY = """
import time

def spin(until):
    x = 0
    while time.monotonic() < until:  # spins here
        x += 1

def hot():
    spin(time.monotonic() + 1.0)  # hot spins

def run():
    cpu = time.thread_time()
    hot()  # run calls hot
    with open(__file__ + ".cpu", "w") as f:  # the CPU time the samples should add up to
        f.write(str(time.thread_time() - cpu))
"""


def test_flame_sample_counts_on_cpu_stacks_read_from_the_frames(workload_dir):
    plain, tool = traced_plain(workload_dir, BUSY, "flame", "--sample", "199", "--folded")
    f = f"({plain.path})"
    driver = f"({workload_dir / 'plain.py'})"
    stacks = dict(line.rsplit(" ", 1) for line in tool.stdout.splitlines() if line.strip())
    path = f"<module> {driver};run {f};hot {f};spin {f}"
    assert set(stacks) <= {path, f"<module> {driver};run {f};hot {f}", f"<module> {driver};run {f}"}, stacks
    # The thread's CPU time at 199 Hz (the timer is per CPU; the machine is shared: the thread
    # is not on a CPU all of its second).
    expected = float(Path(str(plain.path) + ".cpu").read_text()) * 199
    samples = sum(int(n) for n in stacks.values())
    assert abs(samples - expected) <= 0.2 * expected + 5, (samples, expected, stacks)
    assert int(stacks[path]) >= 0.9 * samples, stacks
    assert SAMPLES.split(":")[0] in tool.stderr


def test_flame_sample_writes_an_svg_of_samples(workload_dir):
    plain, tool = traced_plain(workload_dir, BUSY, "flame", "--sample", "-o", str(workload_dir / "s.svg"))
    assert "samples of Python stacks at 99 Hz" in tool.stdout and SAMPLES in tool.stdout, tool.stdout
    svg = (workload_dir / "s.svg").read_text()
    assert re.search(r"<title>spin \(.*body\.py\): \d+ samples \(\d", svg), svg[:2000]


# --- run: @PYSTACK@ in the user's program -------------------------------------------------------


def test_run_expands_pystack_and_prints_the_stacks(workload_dir):
    program = "uprobe:libc:connect { @[@PYSTACK@] = count(); }"
    plain, tool = traced_plain(workload_dir, CHAIN, "run", "-e", program)
    at = {m: f"{plain.path}:{plain.line_of(m)}" for m in ("# connect here", "# middle calls", "# run dials")}
    assert f"@[\n    {at['# connect here']} dial\n    {at['# middle calls']} middle\n" in tool.stdout, tool.stdout
    assert f"@[\n    {at['# connect here']} dial\n    {at['# run dials']} run\n" in tool.stdout, tool.stdout
    assert re.search(r"\n\]: 3\n", tool.stdout) and re.search(r"\n\]: 1\n", tool.stdout), tool.stdout
    assert "@__py" not in tool.stdout and "__pycode" not in tool.stdout


def test_run_script_shows_the_expanded_program():
    done = run_tool("run", "-e", "uprobe:libc:connect { @[@PYSTACK@] = count(); }", "--script")
    assert done.returncode == 0, done.stderr
    assert "@PYSTACK@" not in done.stdout and "@[$__pystack] = count();" in done.stdout
    assert "PY_RUNTIME" in done.stdout  # no process: its addresses are named, filled in with -p


def test_where_refuses_a_bad_depth():
    done = run_tool("where", "connect", "--depth", "0", "-p", str(os.getpid()), "--script")
    assert done.returncode != 0 and "--depth 0: give 1 to" in done.stderr, done.stderr


@pytest.mark.parametrize("args", [["where", "connect"], ["where", "kprobe:tcp_sendmsg", "--depth", "128", "-d", "3"],
                                  ["flame", "--sample", "-d", "2"], ["flame", "--sample", "997", "--depth", "8"],
                                  ["run", "-e", "profile:hz:99 { @[@PYSTACK@, tid] = count(); }"]],
                         ids=" ".join)
def test_walking_programs_pass_bpftrace_check_for_a_process(args):
    """--script -p PID: the program with that process's layout (here: this test's own process),
    accepted by bpftrace (parsed, checked, compiled; the verifier runs when it attaches: the
    traced tests above)."""
    require_tracer()
    done = run_tool(*args, "--script", "-p", str(os.getpid()))
    assert done.returncode == 0, done.stderr
    assert "PY_" not in done.stdout and "@PYSTACK@" not in done.stdout, done.stdout
    check = subprocess.run(["bpftrace", "-d", "-e", done.stdout, str(os.getpid())], capture_output=True, text=True,
                           timeout=STEP_TIMEOUT)
    assert check.returncode == 0, check.stderr[-3000:]


EXITING = """
import os, socket, sys

def dial():
    with socket.socket() as s:
        s.connect_ex(("127.0.0.1", 9))  # connect here

print(os.getpid(), flush=True)
sys.stdin.readline()
for _ in range(2):
    dial()
os._exit(0)  # at once, the tool still reading
"""


def test_where_on_a_process_that_exits_mid_trace_reports_and_ends(workload_dir, cleanup):
    """The process exits right after its calls: the tool ends by itself with what it read, every
    frame named (read at first sight) or marked, never a crash."""
    require_tracer()
    script = workload_dir / "exiting.py"
    script.write_text(textwrap.dedent(EXITING))
    process = cleanup.popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=PLAIN_ENV)
    pid = int(process.stdout.readline())
    tool = cleanup.ends(ToolRun(["where", "connect"], pid, stop_signal=None))
    tool.start()
    process.stdin.write("go\n")
    process.stdin.flush()
    assert process.wait(STEP_TIMEOUT) == 0
    tool.stop()  # it ends with the process
    assert tool.code == 0, tool.stderr
    assert tool.stdout.startswith("connect(): 2 calls from 1 Python stacks"), tool.stdout
    (stack, count), = stacks_of(tool.stdout).items()
    # A code object gone before the tool read it (the process exits at once) is named as the
    # tracer read it, with "?" for the line, which only the object could tell.
    assert stack[0] in ((f"{script}:6", "dial"), (f"{script}:?", "dial")), tool.stdout
    assert stack[1] in ((f"{script}:11", "<module>"), (f"{script}:?", "<module>")), tool.stdout
    assert "Traceback" not in tool.stderr
