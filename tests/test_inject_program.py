"""The program --inject runs in the target (dtrace/tools/inject/program.py), tested as the module it
is: importing it runs nothing; its load() against this process and stand-ins for another; and the
source the tool fills in (payload.code) run as the target runs it, in a dictionary of its own, in a
fresh interpreter. No tracer, no gdb needed."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import types

import dtrace
from dtrace.tools.inject import payload, program


def test_importing_the_program_runs_nothing():
    assert program.ORIGIN is None and program.REPORT_PATH is None
    assert not hasattr(program, "__pydtrace_report__")
    assert payload.CODE == open(program.__file__).read()  # what the tool sends is this file


def test_load_reports_the_already_loaded_dtrace():
    report = program.load(sys, None)
    assert report["status"] == "loaded" and report["source"] == "already"
    assert report["library"] == dtrace.library_path() and report["version"] == dtrace.__version__


def test_load_refuses_another_module_named_dtrace_and_says_what_is_missing():
    other = types.SimpleNamespace(modules={"dtrace": types.ModuleType("dtrace")}, meta_path=[])
    report = program.load(other, None)
    assert report["status"] == "conflict" and "another module named dtrace is loaded" in report["error"]
    nothing = types.SimpleNamespace(modules={}, meta_path=[], executable="/usr/bin/python3")
    report = program.load(nothing, "/nowhere")
    assert report == dict(status="missing", found=None, offered="/nowhere", suffixes=report["suffixes"],
                          executable="/usr/bin/python3")
    assert report["suffixes"]  # the import system's extension suffixes, for the tool's message


def test_the_report_goes_only_into_the_file_the_tool_made(tmp_path, monkeypatch):
    report = tmp_path / "x.report"
    monkeypatch.setattr(program, "REPORT_PATH", str(report))
    program.write_report(os, b"{'status': 'loaded'}")
    assert not report.exists()  # the tool gave up and removed it: no new file
    report.write_text("")
    program.write_report(os, b"{'status': 'loaded'}")
    assert report.read_bytes() == b"{'status': 'loaded'}\n"


def test_the_filled_in_program_runs_as_in_the_target():
    """The exact source the tool sends, run in a fresh interpreter (that has not imported dtrace) in
    a dictionary of its own, as gdb's PyRun_String runs it: it imports the interpreter's own
    pydtrace-rs and leaves its report, the repr of a dict, in __pydtrace_report__."""
    source = payload.code("gdb", None)
    runner = ("import sys\nnamespace = {}\nexec(compile(sys.stdin.read(), '<injected>', 'exec'), namespace)\n"
              "print(namespace['__pydtrace_report__'].decode())\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYDTRACE")}
    done = subprocess.run([sys.executable, "-c", runner], input=source, capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    report = payload.parse_report(0, done.stdout.strip())
    assert report["status"] == "loaded" and report["source"] == "program" and report["origin"] == "gdb"
    assert report["library"] == dtrace.library_path()
    assert ast.literal_eval(repr(report)) == report
