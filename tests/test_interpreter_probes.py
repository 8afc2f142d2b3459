"""One event, one firing, on an interpreter that declares probes of provider python itself.

A distribution's CPython (Debian's, built --with-dtrace) declares gc__start/done,
import__find__load__start/done and audit (3.13, 3.14), and from 3.15 function__entry/return
too (three arguments). The rule (src/interpreter.rs, docs/interpreter-probes.md): a probe both
declare is fired by the interpreter while a consumer enables the interpreter's copy, and by
pydtrace-rs otherwise (a consumer of ours alone, or a tool that asked for it through its lease,
attached by address: python/dtrace/tools/command/interpreter.py).

Run on every interpreter of the suite: the program binding is checked everywhere; the consumers
(raw bpftrace by path, both copies and each alone; the tools; perf) run where this interpreter
declares probes itself (scripts/dev test runs the suite on Debian's 3.13, 3.14 and 3.15 as well
as on pyenv's builds, which declare none).
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

import dtrace
from dtrace.tools import SCRIPT_TOOLS
from dtrace.tools.command import interpreter, programs
from dtrace.tools.proc import elf
from tracing import STEP_TIMEOUT, Bpftrace, Workload, handshake, require_tracer, run_tool, trace_with_tool

SCRIPTS = Path(dtrace.__file__).parent / "scripts"
LIBRARY = dtrace.library_path()
#: What a CPython 3.15 built --with-dtrace declares itself.
DECLARED_BY_315 = {"function__entry", "function__return", "gc__start", "gc__done",
                   "import__find__load__start", "import__find__load__done", "audit"}
#: Debian's python3.11, built --with-dtrace: a real object that declares CPython's probes.
STAND_IN = "/usr/bin/python3.11"
#: The probes this interpreter declares itself (empty on a build without --with-dtrace).
OWN = {name.replace("-", "__") for name in dtrace._native.interpreter_probes()}
#: Where this interpreter declares them.
OWN_OBJECT = dict(dtrace._native.interpreter_objects()[0])


def needs_own_probes(*names: str):
    """Tests of an interpreter that declares ``names`` itself; on one that does not, nothing to test."""
    missing = [name for name in names if name not in OWN]
    return pytest.mark.skipif(bool(missing), reason=f"{sys.executable} does not declare {', '.join(missing)} "
                                                    "itself (not built --with-dtrace, or older than 3.15)")


# --- binding a program (every interpreter) -----------------------------------------------------


@pytest.mark.parametrize("script", sorted(SCRIPTS.glob("*.bt")), ids=lambda p: p.name)
def test_probes_both_declare_are_bound_by_address_the_others_by_path(script):
    text = script.read_text()
    bound, by_address = interpreter.bind(text, LIBRARY, DECLARED_BY_315)
    sites = {p.location: p.name for p in elf.read(LIBRARY).probes if p.provider == "python"}
    used = set()
    for clause in programs.clauses(bound):
        for point in clause.attach_points:
            if point.kind == "uprobe" and point.text.startswith(f"uprobe:{LIBRARY}:"):
                name = sites[int(point.text.rsplit(":", 1)[1], 16)]  # a probe site of ours
                assert name in DECLARED_BY_315
                used.add(name)
            elif (probe := programs.usdt(point)) is not None:
                assert probe.path == LIBRARY and probe.name not in DECLARED_BY_315, point.text
    assert sorted(used) == by_address
    assert ("usdt::python:function__entry" in text) == ("function__entry" in by_address)
    # Apart from the attach points and the casts, the program is unchanged.
    def strip(program: str) -> str:
        program = re.sub(r"\(\(u?int(?:8|16|32|64)\)(arg\d)\)", r"\1", program)
        return re.sub(r"^(?:usdt|uprobe):.*$", "", program, flags=re.M)
    assert strip(bound) == strip(text)


def test_an_argument_narrower_than_64_bits_is_cast_back_to_its_type():
    program = "usdt::python:function__entry { @[str(arg3), arg2] = count(); }"
    bound, _ = interpreter.bind(program, LIBRARY, {"function__entry"})
    assert "@[str(((int64)arg3)), ((int32)arg2)] = count();" in bound
    assert interpreter.casts("8@%rdi 8@%rsi -4@%edx 8@%rcx") == {
        "arg0": "int64", "arg1": "int64", "arg2": "int32", "arg3": "int64"}
    assert interpreter.casts("-8@%rdi 2@%si -1@%dl") == {"arg0": "int64", "arg1": "uint16", "arg2": "int8"}
    # An argument the note leaves out (qualname, from 3.15 on) is cast as its 64-bit USDT self.
    assert interpreter.casts("8@%rdi 8@%rsi -4@%edx", ["char *filename", "char *funcname", "int lineno",
                                                        "char *qualname"])["arg3"] == "int64"


def test_a_clause_mixing_argument_layouts_is_refused():
    program = "usdt::python:gc__start, usdt::python:function__entry { @[arg2] = count(); }"
    with pytest.raises(interpreter.ToolError, match="different argument types in one clause"):
        interpreter.bind(program, LIBRARY, {"gc__start", "function__entry"})


def test_bound_scripts_pass_bpftrace_check():
    require_tracer()
    for script in sorted(SCRIPTS.glob("*.bt")):
        bound, _ = interpreter.bind(script.read_text(), LIBRARY, DECLARED_BY_315)
        strlen = next(tool.strlen for tool in SCRIPT_TOOLS.values() if script.stem in (tool.script, tool.aggregate_script))
        done = subprocess.run(["bpftrace", "-d", "-p", str(os.getpid()), "-e", bound, str(os.getpid())],
                              capture_output=True, text=True, env={**os.environ, "BPFTRACE_STRLEN": str(strlen)},
                              timeout=STEP_TIMEOUT)
        errors = [line for line in done.stderr.splitlines() if "ERROR" in line and "RLIMIT_MEMLOCK" not in line]
        assert done.returncode == 0 and not errors, (script.name, errors or done.stderr[-2000:])


def test_declared_reads_the_notes_of_a_with_dtrace_interpreter():
    if not os.path.exists(STAND_IN):
        pytest.skip(f"{STAND_IN} (Debian's python3.11, built --with-dtrace) is not installed here")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYDTRACE"))}
    process = subprocess.Popen([STAND_IN, "-c", "import sys; print('up', flush=True); sys.stdin.read()"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout.readline() == "up\n"
        found = interpreter.declared(process.pid, LIBRARY)
    finally:
        process.kill()
        process.wait()
    assert found["function__entry"] == found["gc__start"] == found["audit"] == STAND_IN


def test_the_module_and_the_tools_read_the_same_notes():
    # The native module reads its own interpreter's notes; the tools read them from outside.
    assert set(interpreter.declared(os.getpid(), LIBRARY)) == OWN
    names, unreadable = dtrace._native.interpreter_objects()
    assert unreadable is None
    assert {os.path.realpath(path) for _, path in names} <= {os.path.realpath(p) for p in
                                                              interpreter.declared(os.getpid(), LIBRARY).values()}


def test_a_note_without_qualname_is_bound_by_address_on_any_interpreter(monkeypatch):
    # From 3.15 on, function__entry/return's notes have CPython's three arguments: a tool binds
    # them by address even where the interpreter declares none (a build without --with-dtrace).
    from_315 = sys.version_info >= (3, 15)
    assert interpreter.short(LIBRARY) == ({"function__entry", "function__return"} if from_315 else set())
    monkeypatch.setattr(interpreter, "declared", lambda pid, library: {})
    program = "usdt::python:function__entry { @[str(arg3)] = count(); }"
    bound, _, asked = interpreter.adapt(program, [], os.getpid(), LIBRARY, "bt")
    assert asked == (["function-entry"] if from_315 else [])
    assert (f"uprobe:{LIBRARY}:0x" in bound and "str(((int64)arg3))" in bound) == from_315, bound


@pytest.mark.skipif(not OWN, reason=f"{sys.executable} declares no probe of provider python itself")
def test_probes_both_declare_have_as_many_arguments_in_both_notes():
    # bcc merges the sites of one name in all objects of a process and reads every site's arguments
    # by the list of the one it sorts first: a longer list of ours read past the end of the
    # interpreter's (ucalls died on an assertion, at random, on 3.15).
    ours = interpreter.sites(LIBRARY)
    for name in OWN:
        theirs = [p for p in elf.read(OWN_OBJECT[name.replace("__", "-")]).probes
                  if p.provider == "python" and p.name == name]
        counts = {len(site.arguments.split()) for site in theirs + ours[name]}
        assert len(counts) == 1, (name, [site.arguments for site in theirs + ours[name]])


def test_an_interpreter_without_probes_of_its_own_changes_nothing():
    program = (SCRIPTS / "calls.bt").read_text()
    if not OWN & {"function__entry", "function__return", "cfunction__entry"}:
        assert interpreter.adapt(program, ["function-entry"], os.getpid(), LIBRARY, "bt") == (
            program, ["function-entry"], [])
    assert interpreter.adapt(program, ["function-entry"], os.getpid(), LIBRARY, "d") == (
        program, ["function-entry"], [])


# --- real consumers, where this interpreter declares probes itself ---------------------------------

GC_BODY = """
    import gc

    def run(result):
        for _ in range(20):
            gc.collect()
        result["collections"] = 20
"""

CALLS_BODY = """
    def fib(n):
        return n if n < 2 else fib(n - 1) + fib(n - 2)

    def twice():
        yield 1
        yield 2

    def run(result):
        fib(15)
        for _ in range(100):
            list(twice())
"""


def system_wide(program: str):
    """A consumer attached by path, system-wide (no -p), its clauses filtered by ``pid`` ({pid})."""
    def consumer(workload: Workload) -> Bpftrace:
        text = program.replace("{own}", OWN_OBJECT.get("gc-start", "")).replace("{pid}", str(workload.pid))
        text = text.replace("{own_function}", OWN_OBJECT.get("function-entry", ""))
        return Bpftrace(text, workload.pid, workload.library, system_wide=True)
    return consumer


@needs_own_probes("gc__start")
def test_a_consumer_of_both_copies_sees_each_collection_once(workload_dir):
    require_tracer()
    consumer = handshake(Workload(GC_BODY, ["gc-start"], workload_dir), system_wide(
        "usdt:{lib}:python:gc__start, usdt:{own}:python:gc__start /pid == {pid}/ { @[probe] = count(); }"))
    # The interpreter's copy alone fired: its semaphore was up.
    assert consumer.maps["@"] == {f"usdt:{OWN_OBJECT['gc-start']}:python:gc__start": 20}


@needs_own_probes("gc__start")
@pytest.mark.parametrize("which", ["ours", "theirs"])
def test_a_consumer_of_one_copy_sees_each_collection_once(workload_dir, which):
    require_tracer()
    path = "{lib}" if which == "ours" else "{own}"
    consumer = handshake(Workload(GC_BODY, ["gc-start"], workload_dir), system_wide(
        f"usdt:{path}:python:gc__start /pid == {{pid}}/ {{ @collections = count(); }}"))
    assert consumer.maps["@collections"] == 20


@needs_own_probes("function__entry", "function__return")
def test_a_consumer_of_our_function_probes_gets_qualified_names_and_balance(workload_dir):
    # The interpreter's copies (3.15) have no arg3 and count a generator's resume as an entry
    # but not every suspension as a return; ours balance.
    require_tracer()
    # From 3.15 our notes of these two declare CPython's three arguments (bcc needs the two
    # objects' lists alike: build/codegen.rs); qualname is in arg3's register, which a hand-written
    # script reads as reg() (docs/interpreter-probes.md).
    assert {"function__entry", "function__return"} <= interpreter.short(LIBRARY)
    qualname = 'str(reg("cx"))' if platform.machine() == "x86_64" else 'str(reg("x3"))'
    consumer = handshake(Workload(CALLS_BODY, ["function-entry", "function-return"], workload_dir), system_wide(
        f"usdt:{{lib}}:python:function__entry /pid == {{pid}}/ {{ @entries[{qualname}] = count(); }}\n"
        f"usdt:{{lib}}:python:function__return /pid == {{pid}}/ {{ @returns[{qualname}] = count(); }}"))
    assert consumer.maps["@entries"]["fib"] == consumer.maps["@returns"]["fib"] == 1973
    assert consumer.maps["@entries"]["twice"] == consumer.maps["@returns"]["twice"] == 300


@needs_own_probes("function__entry")
def test_a_consumer_of_both_function_probes_counts_each_call_once(workload_dir):
    require_tracer()
    consumer = handshake(Workload(CALLS_BODY, ["function-entry"], workload_dir), system_wide(
        "usdt:{lib}:python:function__entry, usdt:{own_function}:python:function__entry /pid == {pid}/ "
        "{ @[probe, str(arg1)] = count(); }"))
    counted = {key: value for key, value in consumer.maps["@"].items() if key.endswith(",fib")}
    assert counted == {f"usdt:{OWN_OBJECT['function-entry']}:python:function__entry,fib": 1973}


@needs_own_probes("gc__start")
def test_the_gc_tool_counts_each_collection_once(workload_dir):
    workload, tool = trace_with_tool(GC_BODY, ["gc"], ["gc-start", "gc-done"], workload_dir)
    assert tool.code == 0, tool.stderr
    row = next(line.split() for line in tool.stdout.splitlines() if line.split()[:1] == ["2"])
    assert row[1] == "20", tool.stdout


@needs_own_probes("function__entry")
def test_the_calls_tool_counts_each_call_once_by_qualified_name(workload_dir):
    workload, tool = trace_with_tool(CALLS_BODY, ["calls", "--per-event"], ["function-entry"], workload_dir)
    assert tool.code == 0, tool.stderr
    counts = {parts[1]: int(parts[0]) for parts in (line.split() for line in tool.stdout.splitlines())
              if len(parts) >= 3 and parts[0].isdigit()}
    assert counts["fib"] == 1973 and counts["twice"] == 300, tool.stdout


@needs_own_probes("gc__start")
def test_run_attaches_a_raw_program_with_p(workload_dir):
    # `usdt::python:gc__start` under bpftrace 0.17's -p fails on such an interpreter; `run` binds it.
    workload = Workload(GC_BODY, ["gc-start"], workload_dir)
    tool = handshake(workload, lambda w: _RunTool(w.pid))
    assert tool.code == 0, tool.stderr
    assert re.search(r"^@collections: 20$", tool.stdout, re.M), tool.stdout


@needs_own_probes("gc__start")
def test_list_says_who_fires_each_probe(workload_dir):
    workload = Workload(GC_BODY, ["gc-start"], workload_dir)
    workload.start()
    try:
        done = run_tool("list", "-p", str(workload.pid))
    finally:
        workload.kill()
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith(("gc__", "line "))}
    assert rows["gc__start"].rstrip().endswith("nobody now"), done.stdout
    assert rows["line"].rstrip().endswith("pydtrace-rs"), done.stdout
    assert "INTERPRETER'S" in done.stdout and OWN_OBJECT["gc-start"] in done.stdout


class _RunTool:
    """``python -m dtrace run -e PROGRAM -p PID``, as tracing.ToolRun runs the other tools."""

    def __init__(self, pid: int) -> None:
        from tracing import ToolRun

        self.run = ToolRun(["run", "-e", "usdt::python:gc__start { @collections = count(); }"], pid)

    def start(self) -> None:
        from tracing import Lines

        run = self.run
        run.process = subprocess.Popen([sys.executable, "-m", "dtrace", *run.args, "-p", str(run.pid)],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        run.out, run.err = Lines(run.process.stdout, "run"), Lines(run.process.stderr, "run's stderr")
        while (line := run.err.next()) is not None and not line.startswith("Tracing"):
            pass
        assert line is not None, run.err.seen

    def stop(self) -> None:
        self.run.stop()
        self.code, self.stdout, self.stderr = self.run.code, self.run.stdout, self.run.stderr

    def kill(self) -> None:
        self.run.kill()
