"""Aggregation in the process (the aggregate probes, src/aggregate.rs): the tools' default gives the
numbers their per-event versions give, exactly; a consumer by hand gets them without asking; and the
bad inputs (a flush request while nothing aggregates, two tools at once, a consumer that never asks
for a flush or dies, a fork, the call tree's bound) do what docs/probes.md says."""

from __future__ import annotations

import collections
import os
import re
import signal
import sys
import textwrap

import pytest

import dtrace
from dtrace.tools.command import aggregate, interpreter
from dtrace.tools.proc import procfs
from tracing import STEP_TIMEOUT, Bpftrace, ToolRun, Workload, handshake, require_tracer, run_tool
from tracing import workload_body

#: Recursion, a generator, exceptions, methods, and four threads calling them at once.
BODY = """
    import threading

    def countdown(n):
        # The innermost call works a little: wide enough to be drawn in a flame graph (frames
        # narrower than a tenth of a pixel are left out, and counted in the process the times
        # are small).
        return sum(range(300)) if n == 0 else countdown(n - 1)

    def gen(n):
        for i in range(n):
            yield i

    def fails(i):
        raise ValueError(i)

    def catches(n):
        for i in range(n):
            try:
                fails(i)
            except ValueError:
                pass

    class Box:
        def __init__(self, v):
            self.v = v

        def get(self):
            return self.v

    def work(k):
        for _ in range(20):
            countdown(9)
        sum(gen(50))
        catches(25)
        return [Box(i).get() for i in range(40 + k)]

    def run(result):
        threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        work(10)
        for t in threads:
            t.join()
"""


def command(directory, *args: str) -> str:
    """``python -m dtrace ARGS -c "PYTHON workload.py"`` (BODY run once) to its end; its output."""
    require_tracer()
    (directory / "workload.py").write_text(textwrap.dedent(BODY) + "\n\nrun({})\n")
    done = run_tool(*args, "-c", f"{sys.executable} workload.py", cwd=directory)
    assert done.returncode == 0, done.stderr
    assert not re.search(r"Traceback|helper errors|WARNING|ERROR|not gathered", done.stderr), done.stderr
    return done.stdout


def require_per_event_tools() -> None:
    """Where the interpreter declares function__entry itself (3.15 --with-dtrace), bpftrace 0.17
    refuses the per-event tools' programs here ("couldn't get argument 0 for ...function__entry"):
    a known problem of the per-event tools on such interpreters, not of the aggregate probes."""
    if "function__entry" in interpreter.declared(os.getpid(), dtrace.library_path()):
        pytest.skip("the per-event tools on an interpreter that declares function__entry itself (bpftrace 0.17 "
                    "refuses their programs there)")


def workload_rows(text: str) -> collections.Counter:
    """The table rows about workload.py's code, as (count, function or line, file or function): the
    threading module's own calls depend on timing (an Event.wait that finds the flag set)."""
    return collections.Counter((words[0], words[-2], words[-1]) for words in map(str.split, text.splitlines())
                               if any("workload.py" in word for word in words[-2:]))


@pytest.mark.parametrize("args", [["calls"], ["calls", "-L"], ["lines"]], ids=" ".join)
def test_counted_in_the_process_equals_per_event(workload_dir, args):
    if args[0] == "calls":
        require_per_event_tools()
    counted = workload_rows(command(workload_dir, *args, "-n", "0"))
    per_event = workload_rows(command(workload_dir, *args, "-n", "0", "--per-event"))
    assert counted == per_event
    if args[0] == "calls":
        functions = {function: int(count) for count, function, _ in counted}
        # Four threads: 20 x 10 countdowns each, 51 resumes of gen, 25 raises.
        assert functions["countdown"] == 800 and functions["gen"] == 204 and functions["fails"] == 100
        assert functions["Box.get"] == 4 * 40 + 3 + 10


#: The functions work() calls, and work (the flame tests compare their frames: the module's first frames
#: are timing-dependent under flame.bt, which pushes a frame only once it has seen a return).
WORK = {"work", "countdown", "gen", "fails", "catches", "Box.__init__", "Box.get"}


def flame_frames(svg: str) -> collections.Counter:
    """The frames of WORK in a flame graph: (function, calls), one per stack node."""
    titles = re.findall(r"<title>(\S+) \(workload\.py\): [^<]*, (\d+) calls</title>", svg)
    return collections.Counter(title for title in titles if title[0] in WORK)


def test_flame_counted_in_the_process_equals_per_event(workload_dir):
    require_per_event_tools()
    frames, stacks = [], []
    for mode in ([], ["--per-event"]):
        command(workload_dir, "flame", "-o", "out.svg", *mode)
        frames.append(flame_frames((workload_dir / "out.svg").read_text()))
        folded = command(workload_dir, "flame", "--folded", *mode)
        stacks.append({line.rsplit(" ", 1)[0] for line in folded.splitlines() if "work (workload.py)" in line})
    assert frames[0] == frames[1] and stacks[0] == stacks[1]
    # Ten levels of countdown below the main thread's work() (20 calls each), and ten below the three
    # threads' (their stacks are one: 60).
    assert frames[0][("countdown", "20")] == 10 and frames[0][("countdown", "60")] == 10, frames[0]
    assert sum(int(calls) for (name, calls), n in frames[0].items() if name == "countdown" for _ in range(n)) == 800


#: 300 calls of countdown(), one of run() (tests/workloads/countdown.py).
COUNTDOWN = workload_body("countdown")


def countdowns(tool: ToolRun) -> int:
    assert tool.code == 0, tool.stderr
    (row,) = [words for words in map(str.split, tool.stdout.splitlines()) if "countdown" in words]
    return int(row[0])


def test_two_tools_at_once_each_count_exactly(workload_dir):
    # One counts, one times: the process gathers both, and each tool's first flush starts its count.
    require_tracer()
    workload = Workload(COUNTDOWN, ["aggregate-calls", "aggregate-time", "aggregate-flush"], workload_dir)
    workload.start()
    tools = [ToolRun(["calls"], workload.pid), ToolRun(["calls", "-L"], workload.pid)]
    try:
        for tool in tools:
            tool.start()
        workload.go()
        workload.wait_result()
        for tool in tools:
            tool.stop()
        assert workload.finish() == 0, workload.stderr_text
    finally:
        for tool in tools:
            tool.kill()
        workload.kill()
    assert [countdowns(tool) for tool in tools] == [300, 300]
    assert workload.idle["aggregate"] == [0, 0, 0], workload.idle


def test_a_tool_killed_with_sigkill_leaves_nothing_gathering(workload_dir):
    require_tracer()
    workload = Workload(COUNTDOWN, ["aggregate-node", "aggregate-flush"], workload_dir)
    handshake(workload, lambda w: ToolRun(["flame", "--folded"], w.pid, stop_signal=signal.SIGKILL))
    # Its bpftrace died with it: the probes went idle, the tree and the counts were dropped.
    assert workload.idle["aggregate"] == [0, 0, 0], workload.idle
    assert workload.idle["events"] == [0] * 6 and workload.idle["enabled"] == []


FORKS = """
    import os

    def countdown(n):
        return 0 if n == 0 else countdown(n - 1)

    def run(result):
        for _ in range(15):
            countdown(9)
        child = os.fork()
        if child == 0:
            for _ in range(100):
                countdown(9)
            os._exit(0)
        os.waitpid(child, 0)
        for _ in range(15):
            countdown(9)
"""


def test_a_fork_while_counting_leaves_the_parents_count_exact(workload_dir):
    require_tracer()
    workload = Workload(FORKS, ["aggregate-calls", "aggregate-flush"], workload_dir)
    tool = handshake(workload, lambda w: ToolRun(["calls"], w.pid))
    assert countdowns(tool) == 300  # the parent's: the child's (and what it inherited) are not


def test_a_consumer_by_hand_gets_the_counts_without_asking(workload_dir, cleanup):
    # The periodic flush (every second) reports what was gathered: the program ends by itself once
    # it has seen all 300 calls, without a flush request.
    require_tracer()
    program = """
        usdt:{lib}:python:aggregate__calls
        /str(arg1) == "countdown"/
        {
            @n = @n + arg4;
            if (@n >= 300) {
                exit();
            }
        }
        usdt:{lib}:python:aggregate__flush
        {
            @dropped = @dropped + arg1;
        }
    """
    workload = cleanup.ends(Workload(COUNTDOWN, ["aggregate-calls"], workload_dir))
    workload.start()
    tracer = cleanup.ends(Bpftrace(textwrap.dedent(program), workload.pid, workload.library))
    tracer.start()
    workload.go()
    workload.wait_result()
    tracer.process.wait(aggregate.FLUSH_TIMEOUT)  # exit() within a flush period or so
    maps = tracer.stop()
    assert workload.finish() == 0, workload.stderr_text
    assert maps["@n"] == 300 and maps.get("@dropped", 0) == 0, maps


def test_a_flush_request_while_nothing_aggregates_is_answered_empty(workload_dir, cleanup):
    require_tracer()
    program = """
        usdt:{lib}:python:aggregate__flush
        /arg0 == %d/
        {
            printf("flush %%d %%d\\n", arg0, arg1);
            exit();
        }
    """ % os.getpid()
    workload = cleanup.ends(Workload(COUNTDOWN, ["aggregate-flush"], workload_dir))
    workload.start()
    tracer = cleanup.ends(Bpftrace(textwrap.dedent(program), workload.pid, workload.library))
    tracer.start()
    workload.go()
    workload.wait_result()
    flusher = aggregate.Flusher(workload.pid, procfs.probe_object(workload.pid))
    cleanup.callback(flusher.close)
    assert flusher.request()
    tracer.process.wait(STEP_TIMEOUT)  # the answer came: the program exited
    # The watcher took the request: its slot is free again.
    assert os.pread(flusher.fd, 4 * aggregate.SLOTS, flusher.address) == bytes(4 * aggregate.SLOTS)
    flusher.close()
    tracer.stop()
    assert workload.finish() == 0, workload.stderr_text
    assert tracer.printed == [f"flush {os.getpid()} 0\n"]
    assert workload.idle["aggregate"] == [0, 0, 0], workload.idle


#: 260 functions, each calling each: 67,600 stacks below run(), more than the tree keeps.
WIDE = """
    def make(i):
        def f(j, leaf):
            if not leaf:
                table[j](0, True)
        f.__code__ = f.__code__.replace(co_name=f"f{i}", co_qualname=f"f{i}")
        return f

    table = [make(i) for i in range(260)]

    def run(result):
        for f in table:
            for j in range(260):
                f(j, False)
"""


def test_the_call_tree_is_bounded_and_says_what_it_dropped(workload_dir):
    require_tracer()
    (workload_dir / "workload.py").write_text(textwrap.dedent(WIDE) + "\n\nrun({})\n")
    done = run_tool("flame", "--folded", "-c", f"{sys.executable} workload.py", cwd=workload_dir)
    assert done.returncode == 0, done.stderr
    dropped = re.search(r"pydtrace: (\d+) calls or lines were not gathered", done.stderr)
    assert dropped and 0 < int(dropped.group(1)) < 67_600, done.stderr
    stacks = done.stdout.splitlines()
    assert len(stacks) <= 65_000, len(stacks)
