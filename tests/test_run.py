"""python -m dtrace run: your own bpftrace program with the tools' start-up handshake, and plain
bpftrace by the probe object's path (system-wide), both traced from the first line with exact
counts; the program as the tool runs it; bad programs refused or left to bpftrace's word."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import dtrace
from dtrace.tools.command import programs
from dtrace.tools.run import Run
from tracing import STEP_TIMEOUT, Lines, require_tracer, run_tool, trace_with_tool

CALLS = 1000

# The first statement of the script runs the loop: nothing before it escapes the count.
FIRST_LINE = f"""\
def f():
    pass
for _ in range({CALLS}):
    f()
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def run_c(directory: Path, program: str, script_text: str = FIRST_LINE, *options: str,
          as_file: bool = False) -> subprocess.CompletedProcess:
    """``python -m dtrace run (PROGRAM_FILE | -e PROGRAM) -c "PYTHON script.py"``, to its end."""
    require_tracer()
    script = write(directory, "script.py", script_text)
    source = [str(write(directory, "program.bt", program))] if as_file else ["-e", program]
    return run_tool("run", *source, *options, "-c", f"{sys.executable} {script}", cwd=directory)


def stdout_lines(done: subprocess.CompletedProcess) -> list[str]:
    """bpftrace ends its output with blank lines before the maps: those are left out here."""
    return [line for line in done.stdout.splitlines() if line.strip()]


@pytest.mark.parametrize("target", ["*", "", "@TARGET@"], ids=["star", "empty", "TARGET"])
def test_c_traces_from_the_first_line_with_exact_counts(workload_dir, target):
    program = f"""
    usdt:{target}:python:function__entry /str(arg1) == "f"/ {{ @calls = count(); }}
    usdt:{target}:python:function__entry /str(arg1) == "<module>" && arg2 == 0 && str(arg0) == "{workload_dir}/script.py"/
    {{ @module = count(); }}
    """
    done = run_c(workload_dir, program, as_file=True)
    assert done.returncode == 0, done.stderr
    # Every call, and the script's <module> entry, its very first event: nothing was missed.
    assert stdout_lines(done) == ["@calls: 1000", "@module: 1"], (done.stdout, done.stderr)
    assert "Tracing with " in done.stderr and "program.bt" in done.stderr


def test_c_output_streams_untouched_with_the_users_begin(workload_dir):
    program = """
    BEGIN { printf("header\\n"); }
    usdt:*:python:function__entry /str(arg1) == "g"/ { printf("g %d\\n", arg2); @n = count(); }
    END { printf("footer\\n"); }
    """
    script = """\
    import sys
    sys.stdout.write("command says hi\\n")  # one write: whole beside the tracer's lines
    def g():
        pass
    g(); g()
    """
    done = run_c(workload_dir, program, script)
    assert done.returncode == 0, done.stderr
    # The user's BEGIN output comes first; the tool's own line and bpftrace's "Attaching"
    # line are not there; the command's own output is its own.
    assert stdout_lines(done) == ["header", "command says hi", "g 3", "g 3", "footer", "@n: 2"], done.stdout
    assert "pydtrace-run-" not in done.stdout + done.stderr


@pytest.mark.parametrize("begin", [
    'BEGIN { printf("one\\n"); printf("two\\n") }',  # no ';' after the last statement
    'BEGIN { @x = 1; if (@x) { printf("one\\n"); } printf("two\\n"); }',  # a block, then an expression
    'BEGIN { printf("one\\n"); if (1) { printf("two\\n"); } }',  # a block last
], ids=["no-semicolon", "block-inside", "block-last"])
def test_c_the_users_begin_prints_before_the_command_runs(workload_dir, begin):
    script = 'import sys\nsys.stdout.write("command\\n")\n'
    done = run_c(workload_dir, begin + "\nusdt:*:python:gc__start { @ = count(); }", script)
    assert done.returncode == 0, done.stderr
    assert stdout_lines(done)[:3] == ["one", "two", "command"], done.stdout


def test_c_a_program_that_exits_in_begin_ends_the_command(workload_dir):
    done, mark = run_marked(workload_dir, "-e", 'BEGIN { printf("bye\\n"); exit(); } usdt:*:python:line { @ = count(); }')
    assert done.returncode == 0, done.stderr
    assert stdout_lines(done) == ["bye", "@: 0"], done.stdout  # bpftrace prints its maps at exit
    assert "ended in its BEGIN, before the trace began; the command was ended" in done.stderr
    assert not mark.exists()


def test_p_traces_a_running_process(workload_dir):
    body = f"""
        def f():
            pass

        def run(result):
            for _ in range({CALLS}):
                f()
    """
    program = 'usdt:*:python:function__entry /str(arg1) == "f"/ { @calls = count(); }'
    workload, tool = trace_with_tool(body, ["run", "-e", program], ["function-entry"], workload_dir)
    assert tool.code == 0, tool.stderr
    assert [line for line in tool.stdout.splitlines() if line.strip()] == [f"@calls: {CALLS}"], tool.stdout


def test_duration_ends_the_trace_and_stops_the_command(workload_dir):
    require_tracer()
    # A command that would wait for ever: -d ends the trace, and the command with it, as the
    # other tools do.
    script = write(workload_dir, "script.py", "import time\ntime.sleep(60)\nprint('slept', flush=True)\n")
    tool = subprocess.Popen([sys.executable, "-m", "dtrace", "run", "-e", "usdt:*:python:gc__start { @ = count(); }",
                             "-d", "1", "-c", f"{sys.executable} {script}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = tool.communicate(timeout=STEP_TIMEOUT)
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()
    assert tool.returncode == 0, err
    assert "the trace has ended: stopping the command" in err, err
    assert "slept" not in out


def test_exit_in_the_program_ends_the_trace_and_the_command(workload_dir):
    # CPython's test_dtrace usability check, with the probe object for @TARGET@.
    program = 'usdt:@TARGET@:python:function__entry { printf("probe: success\\n"); exit(); }'
    done = run_c(workload_dir, program, "import time\ntime.sleep(60)\n")
    assert done.returncode == 0, done.stderr
    assert stdout_lines(done) == ["probe: success"], done.stdout


# --- bad programs -------------------------------------------------------------------------------

MARKER = """\
import os, pathlib
pathlib.Path(os.environ["MARK"]).write_text("ran")
"""


def run_marked(directory: Path, *source: str) -> tuple[subprocess.CompletedProcess, Path]:
    """``run SOURCE -c`` on a command that leaves a mark when it runs its first line."""
    require_tracer()
    script = write(directory, "marked.py", MARKER)
    mark = directory / "mark"
    done = run_tool("run", *source, "-c", f"{sys.executable} {script}", cwd=directory, env={"MARK": str(mark)})
    leftover = subprocess.run(["pgrep", "-f", str(script)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", "the command was left behind"
    return done, mark


@pytest.mark.parametrize("program, phrase", [
    ('usdt:*:python:function__entry { @calls = cnt(); }', "Unknown function: cnt"),
    ('usdt:*:python:function__entry { @calls = count() ', "syntax error"),
    ('usdt:*:python:function__entry /arg9 > 0/ { @ = count(); }', "arg9"),
], ids=["unknown-function", "open-brace", "no-such-argument"])
def test_a_program_bpftrace_rejects_gives_its_message_and_ends_the_command(workload_dir, program, phrase):
    done, mark = run_marked(workload_dir, "-e", program)
    assert done.returncode != 0
    assert phrase in done.stderr, done.stderr
    assert "bpftrace did not run the program" in done.stderr and "the command was ended" in done.stderr
    assert "Traceback" not in done.stderr
    assert not mark.exists(), "the command ran (untraced) although it was to be ended"


@pytest.mark.parametrize("program, phrase", [
    ('BEGIN { printf("hello\\n"); exit(); }', "names no probe at all"),
    ("", "names no probe at all"),
    ("kprobe:do_nanosleep { @ = count(); }", "names no probe of provider python"),
    ("usdt:*:ruby:method__entry { @ = count(); }", "names no probe of provider python"),
    ("usdt:*:python:function_entry { @ = count(); }", "provider python has no probe 'function_entry'"),
], ids=["only-begin", "empty", "kprobe", "other-provider", "misspelt"])
def test_a_program_without_python_probes_is_refused_with_exit_2(workload_dir, program, phrase):
    done, mark = run_marked(workload_dir, "-e", program)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert phrase in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not mark.exists(), "the command was started for a program that was refused"


def test_program_source_errors():
    assert run_tool("run", "-c", "true").returncode == 2
    missing = run_tool("run", "/nonexistent/prog.bt", "-c", "true")
    assert missing.returncode == 2 and "cannot read /nonexistent/prog.bt" in missing.stderr
    both = run_tool("run", "x.bt", "-e", "BEGIN {}", "-c", "true")
    assert both.returncode == 2 and "not both" in both.stderr


# --- the program as the tool runs it (no tracer needed) -----------------------------------------

def prepare(text: str, duration: int | None = None):
    return Run().prepare(text, "bt", "/lib/_native.so", "M", duration)


def test_script_shows_the_program_with_target_and_begin():
    done = run_tool("run", "-e", "usdt:@TARGET@:python:gc__start { @ = count(); }", "--script")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usdt:{dtrace.library_path()}:python:gc__start {{ @ = count(); }}\n"), done.stdout
    assert re.search(r'\nBEGIN\n{\n\tprintf\("pydtrace-run-[0-9a-f]{12}-begun\\n"\);\n}\n$', done.stdout), done.stdout


def test_the_markers_go_into_the_users_begin_keeping_its_lines():
    text = "// counts\nBEGIN\n{\n\tprintf(\"hi\\n\");\n}\nusdt:*:python:line { @[arg2] = count(); }\n"
    program, probes = prepare(text)
    assert program == text.replace("{\n\tprintf(\"hi\\n\");\n}", "{printf(\"M-attached\\n\"); \n\tprintf(\"hi\\n\");\n"
                                                                  " printf(\"M-begun\\n\"); }")
    assert program.count("\n") == text.count("\n")  # bpftrace's messages keep the user's line numbers
    assert probes == ["line"]


def test_probes_in_comments_and_strings_do_not_count():
    text = '// usdt:*:python:line\nBEGIN { printf("usdt:*:python:line {"); }\nusdt:*:python:gc__done { @ = sum(arg0); }\n'
    program, probes = prepare(text)
    assert probes == ["gc-done"]
    assert program.startswith('// usdt:*:python:line\nBEGIN {printf("M-attached\\n");  printf("usdt:*:python:line {");  '
                              'printf("M-begun\\n"); }')


def test_wildcards_and_lists_of_attach_points():
    _, probes = prepare("usdt:*:python:gc__*, usdt::python:function__return { @[probe] = count(); }")
    assert probes == ["function-return", "gc-done", "gc-start"]


def test_target_names_the_probe_object():
    program, probes = prepare("usdt:@TARGET@:python:function__* { @[str(arg1)] = count(); }", 5)
    assert program.startswith("usdt:/lib/_native.so:python:function__* {")
    assert program.endswith("\ninterval:s:5\n{\n\texit();\n}\n")
    # (Where the interpreter declares the probes itself, test_interpreter_probes.py: bound by address.)
    assert probes == ["function-entry", "function-return"]


def test_clauses_reader_on_every_bundled_script():
    scripts = sorted((Path(dtrace.__file__).parent / "scripts").glob("*.bt"))
    assert scripts
    for script in scripts:
        text = script.read_text()
        found = programs.clauses(text)
        assert found[0].attach_points[0].text == "BEGIN", script.name
        assert all(clause.closed(text) for clause in found), script.name
        # Every clause of the file, and nothing else: each header line that opens a clause.
        headers = [line for line in programs.mask(text).splitlines()
                   if line and not line[0].isspace() and line[0] not in "{}/#"]
        assert [c.attach_points[0].text for c in found] == [h.split()[0].rstrip(",") for h in headers], script.name


# --- plain bpftrace by the probe object's path, system-wide ----------------------------------


def test_plain_bpftrace_by_path_traces_from_the_first_line(workload_dir):
    """The README's way without the tools: bpftrace attached by the probe object's path (no -p,
    no -c: every process that maps the object, also one that loads it later), and the program
    started once bpftrace's BEGIN ran, with PYDTRACE=1. Importing dtrace in a process whose
    semaphores a consumer has already raised returns once those probes are live."""
    require_tracer()
    script = write(workload_dir, "script.py", FIRST_LINE)
    library = dtrace.library_path()
    program = ('BEGIN { printf("READY\\n"); } '
               f'usdt:{library}:python:function__entry /str(arg1) == "f"/ {{ @calls[pid] = count(); }}')
    tracer = subprocess.Popen(["bpftrace", "-e", program], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        out = Lines(tracer.stdout, "bpftrace")
        while (line := out.next()) != "READY":
            assert line is not None, tracer.stderr.read()
        commands = []
        for _ in range(3):
            command = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "PYDTRACE": "1"},
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            _, errors = command.communicate(timeout=STEP_TIMEOUT)
            assert command.returncode == 0, errors
            commands.append(command.pid)
        tracer.send_signal(signal.SIGINT)
        try:
            rest = out.rest(timeout=10)
        except TimeoutError:
            tracer.send_signal(signal.SIGINT)  # bpftrace 0.17 misses a SIGINT now and then
            rest = out.rest()
    finally:
        if tracer.poll() is None:
            tracer.kill()
        tracer.wait()
    counts = dict(line.split(": ") for line in rest if line.startswith("@calls["))
    # Each of the three processes: every call, from its first line.
    assert [counts.get(f"@calls[{pid}]") for pid in commands] == [str(CALLS)] * 3, rest


def test_d_scripts_for_the_dtrace_platforms():
    """The D path (macOS, illumos; DTrace cannot run here): the probes a script names, and the
    BEGIN clause the tool appends (D runs every BEGIN, the script's first)."""
    text = "python$target:::function-entry\n/copyinstr(arg1) == \"start\"/\n{\n\tself->trace = 1;\n}\n"
    program, probes = Run().prepare(text, "d", None, "M", 3)
    assert program == text + '\nBEGIN\n{\n\tprintf("M-begun\\n");\n}\n\ntick-3s\n{\n\texit(0);\n}\n'
    assert probes == ["function-entry"]
    _, probes = Run().prepare("python*:::gc-*,\npython$target:::line { }", "d", None, "M", None)
    assert probes == ["gc-done", "gc-start", "line"]
    with pytest.raises(Exception, match="names no probe of provider python"):
        Run().prepare("syscall::read:entry { }", "d", None, "M", None)
