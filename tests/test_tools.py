"""python -m dtrace TOOL: every tool under a real bpftrace, through -c and -p, with known answers;
the bundled scripts under bpftrace's own check; the errors, with their messages and exit codes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

import dtrace
from dtrace.tools import SCRIPT_TOOLS, TOOLS
from dtrace.tools.command import interpreter
from dtrace.tools.flame import TIMES as FLAME_TIMES
from tracing import STEP_TIMEOUT, Bpftrace, ToolRun, Workload, require, require_tracer, run_tool, trace_with_tool
from tracing import workload_body

SCRIPTS = Path(dtrace.__file__).parent / "scripts"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ARMABLE = dtrace._native.ARMABLE_PROBES
INSTANCES_NEW = "instance-new-start" in ARMABLE
INSTANCES_DELETE = {"instance-delete-start", "instance-delete-done"} <= ARMABLE
NOT_ARMABLE = "the instance probes are not armed on this Python version (see README)"


def write(directory: Path, body: str, name: str = "workload.py") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(body))
    return path


def traced_command(directory: Path, *args: str, body: str) -> subprocess.CompletedProcess:
    """``python -m dtrace ARGS -c "PYTHON workload.py"``, run to its end in ``directory``."""
    require_tracer()
    script = write(directory, body)
    done = run_tool(*args, "-c", f"{sys.executable} {script}", cwd=directory)
    assert done.returncode == 0, done.stderr
    # Neither the tool nor the traced command failed (the tool reports the command's status).
    assert "Traceback" not in done.stderr, done.stderr
    assert "the command exited with status" not in done.stderr, done.stderr
    # Nor did the tracer complain (a helper error, a warning about the program).
    assert not re.search(r"helper errors|WARNING|ERROR", done.stderr), done.stderr
    return done


def as_script(body: str) -> str:
    """A workload body (``run(result)``) as a script that runs it."""
    return textwrap.dedent(body) + "\n\nrun({})\n"


def rows(text: str, column: int, value: str) -> list[list[str]]:
    """The table rows (split on runs of blanks) whose ``column`` is ``value``."""
    return [words for words in (line.split() for line in text.splitlines()) if len(words) > column
            and words[column] == value]


def line_of(path: Path, marker: str) -> int:
    lines = [n for n, text in enumerate(path.read_text().splitlines(), 1) if marker in text]
    assert len(lines) == 1, lines
    return lines[0]


# --- The bundled scripts pass bpftrace's own check (a dry run: -d) ------------------------------


def bpftrace_check(program: str, *arguments: str, strlen: int = 200) -> None:
    """``bpftrace -d``: parse, check and compile against the probes of this process (which has
    loaded dtrace), without attaching or running anything. Where this interpreter declares some
    of the program's probes itself, the program is checked as the tools run it there (those
    probes bound by address: dtrace/tools/command/interpreter.py)."""
    require_tracer()
    program, _, _ = interpreter.adapt(program, [], os.getpid(), dtrace.library_path(), "bt")
    done = subprocess.run(
        ["bpftrace", "-d", "-p", str(os.getpid()), "-e", program, *arguments],
        capture_output=True, text=True, env={**os.environ, "BPFTRACE_STRLEN": str(strlen)},
        timeout=STEP_TIMEOUT,
    )
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line and "RLIMIT_MEMLOCK" not in line]
    assert done.returncode == 0 and not errors, "\n".join(errors) or done.stderr[-2000:]


def tool_of(script: Path):
    return next(tool for tool in SCRIPT_TOOLS.values() if script.stem in (tool.script, tool.aggregate_script))


#: The probes a -p workload waits for: a tool's default (counted in the process) and --per-event.
AGGREGATE_CALLS = ["aggregate-calls", "aggregate-flush"]
MODES = {"aggregate": [], "per-event": ["--per-event"]}


@pytest.mark.parametrize("script", sorted(SCRIPTS.glob("*.bt")), ids=lambda p: p.name)
def test_bundled_script_passes_bpftrace_check(script):
    # where.bt takes the PID as $1; objdel.bt takes 1 for a command started by the tool; the
    # aggregating scripts take the tool's PID and 1.
    bpftrace_check(script.read_text(), str(os.getpid()), "1", strlen=tool_of(script).strlen)


def test_both_dialects_of_every_tool_are_bundled():
    tools = {tool.script for tool in SCRIPT_TOOLS.values() if tool.script}
    # The aggregating scripts are bpftrace's alone: the flush requests go through /proc/PID/mem.
    aggregating = {tool.aggregate_script for tool in SCRIPT_TOOLS.values() if tool.aggregate_script}
    assert {p.stem for p in SCRIPTS.glob("*.bt")} == tools | aggregating
    assert {p.stem for p in SCRIPTS.glob("*.d")} == tools
    for script in SCRIPTS.iterdir():
        text = script.read_text()
        assert text.startswith("#!/usr/"), script.name
        assert "USAGE:" in text and "Tracing " in text, script.name


VARIANTS = [
    ["calls"], ["calls", "--latency", "-i", "2", "-d", "5"], ["lines", "-i", "1"], ["gc", "-i", "1", "-d", "3"],
    ["objnew", "-i", "2"], ["objdel", "-d", "2"], ["flow", "-d", "1"], ["flame", "-d", "2"],
    ["where", "connect", "--trace-calls"], ["where", "--trace-calls", "--no-lines", "write", "-d", "4"],
    # --native (tests/test_tools_native.py traces with them)
    ["calls", "--native"], ["calls", "--native", "-L", "-i", "1", "-d", "3"], ["flow", "--native", "-d", "1"],
    ["flame", "--native"],
    # --per-event: the per-event scripts of the tools that count in the process by default
    ["calls", "--per-event"], ["calls", "--per-event", "-L", "-i", "2", "-d", "5"], ["lines", "--per-event", "-i", "1"],
    ["flame", "--per-event", "-d", "2"],
]
#: The lines the tool adds to an aggregating script with -i (at the end of its flushes).
INTERVAL_BODY = re.compile(r"\t(if \(@on\) \{|\t(print|clear)\(@\w+\);|\ttime\(.*\);|\})")


@pytest.mark.parametrize("args", VARIANTS, ids=" ".join)
def test_generated_variants_pass_bpftrace_check_and_keep_to_the_file(args):
    done = run_tool(*args, "--script")
    assert done.returncode == 0, done.stderr
    tool = TOOLS[args[0]]
    bpftrace_check(done.stdout, str(os.getpid()), strlen=tool.strlen)
    if "--native" in args:
        assert "cfunction__entry" in done.stdout and ("-L" not in args or "cfunction__return" in done.stdout)
    # Apart from the appended interval and duration clauses (and a probe named on the
    # command line), the program is the file's lines, in the file's order.
    aggregated = tool.aggregate_script and not {"--per-event", "--native"} & set(args)
    shipped = iter((SCRIPTS / f"{tool.aggregate_script if aggregated else tool.script}.bt").read_text().splitlines())
    program = done.stdout.split("\ninterval:")[0]
    if aggregated:
        assert "interval:" not in done.stdout  # the tool times -i and -d itself, by its flushes
        program = "\n".join(line for line in program.splitlines() if not INTERVAL_BODY.fullmatch(line))
    if args[0] == "where":
        function = next(a for a in args[1:] if not a.startswith("-") and not a.isdigit())
        program = program.replace(f"uprobe:libc:{function}", "uprobe:libc:connect")
        program = program.replace(f"that call {function}()", "that call connect()")
    for line in program.splitlines():
        assert any(line == candidate for candidate in shipped), line


def test_script_is_the_file_when_no_option_changes_it():
    # (calls, flame and flow have optional parts: --latency, --native.)
    for name in ("gc", "lines", "objnew"):
        done = run_tool(name, "--script")
        tool = TOOLS[name]
        assert done.stdout == (SCRIPTS / f"{tool.aggregate_script or tool.script}.bt").read_text(), name
    done = run_tool("lines", "--per-event", "--script")
    assert done.stdout == (SCRIPTS / "lines.bt").read_text()


# --- calls --------------------------------------------------------------------------------------


def test_calls_through_c_counts_a_recursive_function_exactly(workload_dir):
    # What `scripts/dev demo` runs: fib(20) makes 21891 calls.
    require_tracer()
    done = run_tool("calls", "-c", f"{sys.executable} {EXAMPLES / 'workload.py'}", cwd=EXAMPLES.parent)
    assert done.returncode == 0, done.stderr
    assert rows(done.stdout, 1, "fib")[0][0] == "21891"
    assert rows(done.stdout, 1, "Node.__init__")[0][0] == "364"  # build_tree(3, 5): 1 + 3 + ... + 3**5
    assert done.stdout.splitlines()[0].split() == ["CALLS", "FUNCTION", "FILE"]


#: 300 calls of countdown(), one of run() (tests/workloads/countdown.py).
COUNTDOWN = workload_body("countdown")


@pytest.mark.parametrize("mode", MODES)
def test_calls_through_p_counts_a_recursive_function_exactly(workload_dir, mode):
    probes = ["function-entry"] if MODES[mode] else AGGREGATE_CALLS
    workload, tool = trace_with_tool(COUNTDOWN, ["calls", *MODES[mode]], probes, workload_dir)
    assert tool.code == 0, tool.stderr
    assert rows(tool.stdout, 1, "countdown")[0][0] == "300"
    assert rows(tool.stdout, 1, "run")[0][0] == "1"


@pytest.mark.parametrize("mode", MODES)
def test_calls_latency_through_c_and_p(workload_dir, mode):
    body = as_script(COUNTDOWN)
    done = traced_command(workload_dir, "calls", "--latency", "-n", "0", *MODES[mode], body=body)
    assert done.stdout.splitlines()[0].split() == ["CALLS", "TOTAL", "AVERAGE", "FUNCTION", "FILE"]
    countdown = re.search(r"^\s*(\d+)\s+(\S+ \S+)\s+(\S+ \S+)\s+countdown\s", done.stdout, re.M)
    assert countdown and countdown.group(1) == "300", done.stdout
    # The report says what TOTAL means (countdown recurses: its total counts nested calls again).
    assert "TOTAL: from entry to return, callees included" in done.stdout, done.stdout
    probes = ["function-entry", "function-return"] if MODES[mode] else ["aggregate-time", "aggregate-flush"]
    workload, tool = trace_with_tool(COUNTDOWN, ["calls", "-L", *MODES[mode]], probes, workload_dir)
    countdown = re.search(r"^\s*(\d+)\s+(\S+ \S+)\s+(\S+ \S+)\s+countdown\s", tool.stdout, re.M)
    assert countdown and countdown.group(1) == "300", tool.stdout
    # Every call of countdown returned while traced: its time is there.
    assert not countdown.group(2).startswith("0 "), tool.stdout


@pytest.mark.parametrize("mode", MODES)
def test_calls_intervals_through_p_end_with_the_duration(workload_dir, mode):
    # The workload calls tick() until the tool has detached (its probes are off again).
    body = """
        import dtrace

        def tick():
            pass

        def run(result):
            while dtrace.enabled_probes():
                tick()
    """
    probes = ["function-entry"] if MODES[mode] else AGGREGATE_CALLS
    # Per event, the tool ends by itself (-d) and is not signalled: a Ctrl-C sent then could land
    # while it gives back what it asked the process for (its lease, on an interpreter with probes
    # of its own), which is a Ctrl-C's exit.
    workload, tool = trace_with_tool(body, ["calls", "-i", "1", "-d", "2", *MODES[mode]], probes, workload_dir,
                                     stop_signal=None if MODES[mode] else signal.SIGINT)
    assert tool.code == 0, tool.stderr
    blocks = re.split(r"^\d\d:\d\d:\d\d$", tool.stdout, flags=re.M)
    assert len(blocks) == 3 and not blocks[0].strip(), tool.stdout  # two intervals, nothing after
    assert "at exit" not in tool.stdout
    for block in blocks[1:]:
        assert int(rows(block, 1, "tick")[0][0]) > 0, block


# --- flow ---------------------------------------------------------------------------------------

NESTED = """
    def leaf(i):
        return i * 2

    def inner(i):
        return leaf(i) + 1

    def outer():
        return sum(inner(i) for i in range(3))

    def run(result):
        result["total"] = outer()
"""

FLOW_LINE = re.compile(r"^\s*\d+\.\d+  (\d+) +(->|<-) (\S+) \((.*):(\d+)\)$")


def flow_events(text: str, file: str) -> list[tuple[int, str, str]]:
    """(indent, arrow, function) of the flow lines of ``file``: TIME(ms)  TID (7 wide)  INDENT ARROW ..."""
    events = []
    for line in text.splitlines():
        match = FLOW_LINE.match(line)
        if match and match.group(4).endswith(file):
            indent = match.start(2) - (match.start(1) + max(len(match.group(1)), 7) + 2)
            events.append((indent, match.group(2), match.group(3)))
    return events


def check_flow(events):
    functions = {name for _, _, name in events}
    assert {"outer", "inner", "leaf", "outer.<locals>.<genexpr>"} <= functions, events
    for name in functions:  # balanced: an entry and a return per call, per resume and yield
        entries = sum(1 for _, arrow, n in events if n == name and arrow == "->")
        assert entries == sum(1 for _, arrow, n in events if n == name and arrow == "<-") > 0, name
    assert sum(1 for _, arrow, n in events if n == "leaf" and arrow == "->") == 3
    indent = {name: i for i, arrow, name in events if arrow == "->"}
    assert indent["outer"] < indent["outer.<locals>.<genexpr>"] < indent["inner"] < indent["leaf"]
    # A return is printed at its entry's indent.
    for name in ("outer", "inner", "leaf"):
        assert {i for i, _, n in events if n == name} == {indent[name]}, name


def test_flow_through_c_is_balanced_and_indented(workload_dir):
    done = traced_command(workload_dir, "flow", body=as_script(NESTED))
    assert done.stdout.splitlines()[0].split() == ["TIME(ms)", "TID", "FUNCTION"]
    check_flow(flow_events(done.stdout, "workload.py"))
    entries, returns = re.search(r"(\d+) entries, (\d+) returns", done.stdout).groups()
    assert int(entries) > 0


def test_flow_through_p_is_balanced_and_indented(workload_dir):
    workload, tool = trace_with_tool(NESTED, ["flow"], ["function-entry", "function-return"], workload_dir)
    assert tool.code == 0, tool.stderr
    events = flow_events(tool.stdout, "workload.py")
    check_flow(events)
    # run() was entered after the tool attached: the outermost line, at indent 0.
    assert events[0] == (0, "->", "run") and events[-1] == (0, "<-", "run")


# --- lines --------------------------------------------------------------------------------------

LOOP = """
    def loop(n):
        total = 0
        for i in range(n):
            total += i  # hot
        return total

    def run(result):
        result["total"] = loop(25)
"""


@pytest.mark.parametrize("mode", MODES)
def test_lines_through_c_and_p_count_a_loop_body_exactly(workload_dir, mode):
    done = traced_command(workload_dir, "lines", "-n", "0", *MODES[mode], body=as_script(LOOP))
    hot = f"workload.py:{line_of(workload_dir / 'workload.py', '# hot')}"
    assert rows(done.stdout, 1, hot)[0] == ["25", hot, "loop"]
    probes = ["line"] if MODES[mode] else ["aggregate-lines", "aggregate-flush"]
    workload, tool = trace_with_tool(LOOP, ["lines", "-n", "5", *MODES[mode]], probes, workload_dir)
    hot = f"{workload.path}:{workload.line_of('# hot')}"
    assert [r[0] for r in rows(tool.stdout, 1, hot)] == ["25"], tool.stdout


# --- gc -----------------------------------------------------------------------------------------

COLLECT = """
    import gc

    def run(result):
        for _ in range(5):
            gc.collect()
"""


def test_gc_through_c_and_p_sees_the_forced_collections(workload_dir):
    done = traced_command(workload_dir, "gc", body=as_script(COLLECT))
    assert int(rows(done.stdout, 0, "2")[0][1]) >= 5, done.stdout
    assert "pause (us), generation 2:" in done.stdout
    workload, tool = trace_with_tool(COLLECT, ["gc"], ["gc-start", "gc-done"], workload_dir)
    assert int(rows(tool.stdout, 0, "2")[0][1]) >= 5, tool.stdout
    histogram = tool.stdout.split("pause (us), generation 2:")[1]
    assert sum(int(m) for m in re.findall(r"^ +\[[^\n]*?[)\]] +(\d+) \|", histogram, re.M)) >= 5


# --- objnew and objdel --------------------------------------------------------------------------

WIDGETS = """
    class Widget:
        pass

    def run(result):
        keep = [Widget() for _ in range(123)]
        result["made"] = len(keep)
"""


@pytest.mark.skipif(not INSTANCES_NEW, reason=NOT_ARMABLE)
def test_objnew_through_c_and_p_counts_the_instances_of_a_class(workload_dir):
    done = traced_command(workload_dir, "objnew", "-n", "0", body=as_script(WIDGETS))
    assert rows(done.stdout, 1, "Widget")[0][0] == "123", done.stdout
    workload, tool = trace_with_tool(WIDGETS, ["objnew"], ["instance-new-start"], workload_dir)
    assert rows(tool.stdout, 1, "Widget")[0][:3] == ["123", "Widget", str(workload.path)], tool.stdout


ENUMS = """
    import copy
    import enum

    class Color(enum.Enum):
        RED = 1

    class Widget:
        pass

    class Single:
        _it = None

        def __new__(cls):
            if cls._it is None:
                cls._it = super().__new__(cls)
            return cls._it

    def run(result):
        for _ in range(5):
            Color(1)  # a lookup: no new instance
        widgets = [Widget() for _ in range(4)]
        copies = [copy.copy(widgets[0]) for _ in range(3)]  # made by C code: not seen
        for _ in range(6):
            Single()  # one instance, five times the same one
        result["distinct"] = len({id(Single()) for _ in range(2)})
"""


@pytest.mark.skipif(not INSTANCES_NEW, reason=NOT_ARMABLE)
def test_objnew_counts_calls_of_python_classes_from_python_code_not_new_instances(workload_dir):
    """What objnew counts, pinned: instance__new__start fires at each call of a Python class from
    Python code (CALL, before __new__), whatever __new__ or the metaclass returns. An Enum lookup
    or a cached instance counts each call; an instance made by C code (copy.copy) does not count."""
    workload, tool = trace_with_tool(ENUMS, ["objnew", "-n", "0"], ["instance-new-start"], workload_dir)
    assert tool.code == 0, tool.stderr
    counts = {row[1]: row[0] for row in (line.split() for line in tool.stdout.splitlines()[1:]) if len(row) == 3}
    assert counts["Color"] == "5" and counts["Widget"] == "4" and counts["Single"] == "8", tool.stdout
    assert workload.result["distinct"] == 1


TREES = """
    class Node:
        def __init__(self, children=()):
            self.children = list(children)

    def run(result):
        for _ in range(40):
            tree = Node([Node(), Node(), Node()])
            del tree  # one cascade: the root, then its three children
"""


def deletions(text: str) -> tuple[int, int]:
    match = re.search(r"(\d+) deletions, of (\d+) instances in all", text)
    assert match, text
    return int(match.group(1)), int(match.group(2))


@pytest.mark.skipif(not INSTANCES_DELETE, reason=NOT_ARMABLE)
def test_objdel_through_c_counts_a_cascade_as_one(workload_dir):
    done = traced_command(workload_dir, "objdel", body=as_script(TREES))
    cascades, instances = deletions(done.stdout)
    assert cascades >= 40 and instances >= 160  # the interpreter deletes more at exit


@pytest.mark.skipif(not INSTANCES_DELETE, reason=NOT_ARMABLE)
def test_objdel_through_p_counts_a_cascade_as_one(workload_dir):
    workload, tool = trace_with_tool(TREES, ["objdel"], ["instance-delete-start", "instance-delete-done"],
                                     workload_dir)
    assert deletions(tool.stdout) == (40, 160), tool.stdout
    assert "deletion time (ns), a cascade counting as one:" in tool.stdout


def test_objnew_and_objdel_report_formatting():
    """The report of each, from the maps bpftrace prints (JSON), without a tracer."""
    from dtrace.tools.command.tracers import Bpftrace

    def maps(tool, *lines):
        result = {}
        for line in lines:
            for event in Bpftrace().events(line, tool.key_arity(), tool.hists):
                result.setdefault(event.name, {}).update(event.data)
        return result

    import argparse
    import io

    objnew = TOOLS["objnew"]
    out = io.StringIO()
    objnew.report(maps(objnew, '{"type": "map", "data": {"@instances": {"/tmp/a,b.py,Widget": 123, '
                                '"<frozen x>,Thing": 7}}}'), argparse.Namespace(top=20), out, None, None)
    assert out.getvalue().splitlines() == [
        "INSTANCES  CLASS   FILE",
        "      123  Widget  /tmp/a,b.py",
        "        7  Thing   <frozen x>",
        "130 instances of 2 classes",
    ]
    objdel = TOOLS["objdel"]
    out = io.StringIO()
    objdel.report(maps(objdel, '{"type": "hist", "data": {"@deletion_ns": [{"min": 256, "max": 511, "count": 30},'
                               ' {"min": 512, "max": 1023, "count": 0}, {"min": 1024, "max": 2047, "count": 10}]}}',
                       '{"type": "map", "data": {"@instances": 160}}'), argparse.Namespace(), out, None, None)
    assert out.getvalue().splitlines() == [
        "deletion time (ns), a cascade counting as one:",
        "    [256, 512)  30 |@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@|",
        "    [512, 1K)    0 |                                        |",
        "    [1K, 2K)    10 |@@@@@@@@@@@@@                           |",
        "40 deletions, of 160 instances in all",
    ]


# --- where --------------------------------------------------------------------------------------

SOCKETS = """
    import socket

    def opener(port):
        with socket.socket() as s:
            s.connect_ex(("127.0.0.1", port))  # connect here

    def fetch_all():
        for _ in range(3):
            opener(9)  # from fetch_all

    def ping():
        opener(7)  # from ping

    def run(result):
        fetch_all()
        for _ in range(2):
            ping()
"""


def check_where(text: str, file: str, path: Path) -> None:
    connect, from_fetch, from_ping = (line_of(path, m) for m in ("# connect here", "# from fetch_all", "# from ping"))
    # by innermost Python function: opener, 5 times, at its connect_ex line
    assert rows(text, 1, "opener")[0] == ["5", "opener", f"{file}:{connect}"], text
    # the two stacks, innermost first, with their counts
    stacks = re.findall(r"^\s+(\d+)  (\S+)\s+opener\n\s+(\S+)\s+(\S+)\n", text, re.M)
    assert sorted(stacks) == [("2", f"{file}:{connect}", f"{file}:{from_ping}", "ping"),
                              ("3", f"{file}:{connect}", f"{file}:{from_fetch}", "fetch_all")], text


def test_where_connect_through_c_counts_the_stacks(workload_dir):
    # The program lives on a moment after its last connect: the tool names a code object from the
    # process once the tracer has reported it, and a program that has exited by then leaves the
    # line as "?" (docs/stacks.md).
    done = traced_command(workload_dir, "where", "connect", body=as_script(SOCKETS) + "__import__('time').sleep(1)\n")
    assert done.stdout.startswith("connect(): 5 calls from 2 Python stacks"), done.stdout
    check_where(done.stdout, "workload.py", workload_dir / "workload.py")


def test_where_connect_through_p_counts_the_stacks(workload_dir):
    workload, tool = trace_with_tool(SOCKETS, ["where", "connect", "--trace-calls"],
                                     ["function-entry", "function-return", "line"], workload_dir)
    assert tool.code == 0, tool.stderr
    check_where(tool.stdout, str(workload.path), workload.path)


MODULE_LEVEL = """\
import os, socket, sys
import dtrace
print(os.getpid(), flush=True)
sys.stdin.readline()  # the tool is attached
dtrace.wait_for_consumer("function-entry", "function-return", "line", timeout=60)
for port in (9, 7):
    s = socket.socket()
    s.connect_ex(("127.0.0.1", port))  # connect at module level
    s.close()
print("done", flush=True)
sys.stdin.readline()
"""


def test_where_through_p_shows_the_frame_that_was_running_when_tracing_began(workload_dir, cleanup):
    """Code at module level, attached with -p: its <module> frame was entered long before tracing
    began; the line probe's file and function (arg0, arg3) show it, marked as such."""
    require_tracer()
    script = write(workload_dir, MODULE_LEVEL, "module_level.py")
    process = cleanup.popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    pid = int(process.stdout.readline())
    tool = cleanup.ends(ToolRun(["where", "connect", "--trace-calls"], pid))
    tool.start()
    process.stdin.write("go\n")
    process.stdin.flush()
    assert process.stdout.readline() == "done\n"
    tool.stop()
    assert tool.code == 0, tool.stderr
    place = f"{script}:{line_of(script, '# connect at module level')}"
    assert tool.stdout.splitlines()[:3] == [
        "connect(): 2 calls from 1 Python stacks, innermost frame first",
        "",
        f"      2  {place}  <module>  (running since before tracing began; its callers are not known)",
    ], tool.stdout
    assert rows(tool.stdout, 1, "<module>")[-1] == ["2", "<module>", place], tool.stdout


# --- flame --------------------------------------------------------------------------------------


def test_flame_through_c_writes_an_svg_and_folded_stacks(workload_dir):
    body = as_script(NESTED)
    done = traced_command(workload_dir, "flame", "-o", "out.svg", body=body)
    assert "wrote out.svg" in done.stdout
    assert FLAME_TIMES in done.stdout  # wall time, callees included, and how it differs from sampling
    svg = ElementTree.parse(workload_dir / "out.svg").getroot()
    titles = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}title")]
    leaf = [t for t in titles if t.startswith("leaf (workload.py)")]
    assert len(leaf) == 1 and leaf[0].endswith(", 3 calls"), titles
    assert len(list(svg.iter("{http://www.w3.org/2000/svg}rect"))) == len(titles) + 1  # + the background

    done = traced_command(workload_dir, "flame", "--folded", body=body)
    stacks = dict(line.rsplit(" ", 1) for line in done.stdout.splitlines())
    f = "(workload.py)"
    path = f"<module> {f};run {f};outer {f};outer.<locals>.<genexpr> {f};inner {f};leaf {f}"
    assert int(stacks[path]) > 0, stacks


@pytest.mark.parametrize("mode", MODES)
def test_flame_through_p_folds_the_stacks_entered_after_attaching(workload_dir, mode):
    probes = ["function-entry", "function-return"] if MODES[mode] else ["aggregate-node", "aggregate-flush"]
    workload, tool = trace_with_tool(NESTED, ["flame", "--folded", *MODES[mode]], probes, workload_dir)
    assert tool.code == 0, tool.stderr
    f = f"({workload.path})"
    stacks = dict(line.rsplit(" ", 1) for line in tool.stdout.splitlines())
    assert f"run {f};outer {f};outer.<locals>.<genexpr> {f};inner {f};leaf {f}" in stacks, stacks
    # The driver's <module> frame was entered before the tool attached: no stack starts there.
    assert [key for key in stacks if "leaf" in key] == [f"run {f};outer {f};outer.<locals>.<genexpr> {f};inner {f};leaf {f}"]
    assert not [key for key in stacks if key.startswith("<module>")], stacks


def test_flame_through_c_writes_speedscope_and_folded_files_and_says_what_the_times_are(workload_dir):
    body = as_script(NESTED)
    done = traced_command(workload_dir, "flame", "-o", "app.speedscope.json", body=body)
    lines = done.stdout.splitlines()
    assert lines[0].startswith("wrote app.speedscope.json: ") and lines[0].endswith(
        "open it at https://www.speedscope.app"), done.stdout
    assert lines[1] == FLAME_TIMES, done.stdout
    profile = json.loads((workload_dir / "app.speedscope.json").read_text())
    names = [frame["name"] for frame in profile["shared"]["frames"]]
    (sampled,) = profile["profiles"]
    assert sampled["type"] == "sampled" and sampled["unit"] == "nanoseconds"
    stacks = {tuple(names[i] for i in sample): weight for sample, weight in zip(sampled["samples"], sampled["weights"])}
    assert stacks[("<module>", "run", "outer", "outer.<locals>.<genexpr>", "inner", "leaf")] > 0, stacks
    assert sampled["endValue"] == sum(sampled["weights"])

    done = traced_command(workload_dir, "flame", "--format", "folded", "-o", "app.folded", body=body)
    assert done.stdout.splitlines()[0].startswith("wrote app.folded: folded stacks, ")
    stacks = dict(line.rsplit(" ", 1) for line in (workload_dir / "app.folded").read_text().splitlines())
    f = "(workload.py)"
    assert int(stacks[f"<module> {f};run {f};outer {f};outer.<locals>.<genexpr> {f};inner {f};leaf {f}"]) > 0

    # Folded stacks on standard output: the note goes to stderr, the output stays pure.
    done = traced_command(workload_dir, "flame", "--folded", body=body)
    assert f"pydtrace: {FLAME_TIMES}" in done.stderr
    assert all(re.fullmatch(r".+ \d+", line) for line in done.stdout.splitlines()), done.stdout


# --- list ---------------------------------------------------------------------------------------


def test_list_without_a_target_prints_the_probe_object():
    done = run_tool("list")
    assert done.returncode == 0, done.stderr
    assert f"probe object: {dtrace.library_path()}" in done.stdout
    from dtrace.tools.listing import ARGUMENTS

    listed = [line.split()[0] for line in done.stdout.splitlines() if line.split()[:1] and line.split()[0] in ARGUMENTS]
    assert listed == list(ARGUMENTS)  # all nineteen, in the provider file's order


def test_list_through_p_shows_which_probes_are_enabled(workload_dir):
    require_tracer()
    workload = Workload("def run(result):\n    pass\n", ["gc-start"], workload_dir)
    workload.start()
    tracer = Bpftrace("usdt:{lib}:python:gc__start { @ = count(); }", workload.pid, workload.library)
    try:
        tracer.start()
        done = run_tool("list", "-p", str(workload.pid))
        tracer.stop()
    finally:
        tracer.kill()
        workload.kill()
    assert done.returncode == 0, done.stderr
    assert f"probe object: {workload.library}" in done.stdout
    assert "probes armed: yes" in done.stdout
    if "gc-start" in dtrace._native.interpreter_probes():
        # Bound by address there, asked for through the test's lease (tests/tracing.py): our
        # semaphore and the interpreter's stay down.
        assert rows(done.stdout, 0, "gc__start")[0][-7:] == [
            "no", "no", "pydtrace-rs", "(asked", "by", "tool", f"{os.getpid()})"], done.stdout
    else:
        assert rows(done.stdout, 0, "gc__start")[0][-3:] == ["yes", "(1)", "pydtrace-rs"], done.stdout
    if "function-entry" in dtrace._native.interpreter_probes():  # 3.15 built --with-dtrace: nobody enables either copy
        assert rows(done.stdout, 0, "function__entry")[0][-4:] == ["no", "no", "nobody", "now"], done.stdout
    else:
        assert rows(done.stdout, 0, "function__entry")[0][-2:] == ["no", "pydtrace-rs"], done.stdout


def test_list_through_c_lists_and_lets_the_command_run(workload_dir):
    script = write(workload_dir, "print('ran')\n")
    done = run_tool("list", "-c", f"{sys.executable} {script}")
    assert done.returncode == 0, done.stderr
    assert "probes armed: yes" in done.stdout and "function__entry" in done.stdout
    assert done.stdout.rstrip().endswith("ran")


# --- errors: a message and exit code 1 (2 for usage errors), never a traceback ------------------


def check_error(done: subprocess.CompletedProcess, *phrases: str, code: int = 1) -> None:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    for phrase in phrases:
        assert phrase in done.stderr, done.stderr


def test_error_no_tracer_installed():
    done = run_tool("calls", "-p", str(os.getpid()), env={"PATH": "/nonexistent"})
    check_error(done, "bpftrace is not installed", "apt-get install bpftrace")


def test_error_dtrace_on_linux():
    check_error(run_tool("gc", "-p", str(os.getpid()), "--tracer", "dtrace"), "DTrace is the tracer of macOS")


def test_error_not_enough_privileges():
    if os.geteuid() == 0:
        # As root, drop the effective user to nobody after start-up (the interpreter stays readable).
        code = ("import os, sys; from dtrace.tools.cli import main; os.seteuid(65534); "
                f"sys.argv = ['pydtrace', 'calls', '-p', '{os.getpid()}']; sys.exit(main())")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=STEP_TIMEOUT)
    else:
        done = run_tool("calls", "-p", str(os.getpid()))
    if "is not installed" in done.stderr:
        require("bpftrace is not installed")
    check_error(done, "Permission denied", "sudo ")


def test_error_pid_not_running():
    require_tracer()
    gone = subprocess.Popen(["true"])
    gone.wait()
    check_error(run_tool("calls", "-p", str(gone.pid)), f"no process with PID {gone.pid} is running")


def test_error_process_without_dtrace():
    require_tracer()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYDTRACE")}
    plain = subprocess.Popen([sys.executable, "-c", "import sys; print('up', flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert plain.stdout.readline() == "up\n"  # running the interpreter, not the forked tests
        done = run_tool("calls", "-p", str(plain.pid))
    finally:
        plain.kill()
        plain.wait()
    check_error(done, f"process {plain.pid} has not loaded the dtrace module", "import dtrace", "PYDTRACE=1")


def test_error_command_not_found():
    require_tracer()
    check_error(run_tool("calls", "-c", "/nonexistent/command --flag"), "command not found: /nonexistent/command")


def test_error_command_that_never_loads_dtrace():
    require_tracer()
    check_error(run_tool("calls", "-c", "true"), "the command exited (status 0) before loading dtrace",
                sys.executable)
    check_error(run_tool("calls", "-c", "sleep 30", "--startup-timeout", "1"),
                "the command did not load dtrace within 1 s")


def test_error_usage_without_a_target():
    check_error(run_tool("calls"), "give -p PID or -c COMMAND", code=2)


def test_ctrl_c_during_c_prints_what_was_gathered(workload_dir):
    """Ctrl-C (SIGINT to the tool's process group, as a terminal sends it) ends the command and
    the trace; the tool still prints its table."""
    require_tracer()
    script = write(workload_dir, """
        import sys, time
        def tick():
            pass
        for _ in range(7):
            tick()
        print("ticked", flush=True)
        time.sleep(60)
    """)
    tool = subprocess.Popen([sys.executable, "-m", "dtrace", "calls", "-n", "0", "-c", f"{sys.executable} {script}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert tool.stdout.readline() == "ticked\n"  # the command's own output comes first
        os.killpg(tool.pid, signal.SIGINT)
        out, err = tool.communicate(timeout=STEP_TIMEOUT)
    finally:
        if tool.poll() is None:
            tool.kill()
    assert tool.returncode == 0, err
    assert rows(out, 1, "tick")[0][0] == "7", (out, err)
