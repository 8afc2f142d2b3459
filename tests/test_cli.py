"""The command line of the tools: Options.from_args (the one typed options object, made at parse
time), and every usage error with its exact message and exit status 2. No tracer needed, except
where a test says so."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys

import pytest

from dtrace.tools import TOOLS, cli
from dtrace.tools.command.options import Options, own_python, split_command
from dtrace.tools.errors import UsageError
from dtrace.tools.flame import flame_output
from tracing import require_tracer, run_tool

#: How the tools name this environment's Python in their examples and messages.
PY = own_python()

PROG = "python -m dtrace"


def options(*argv: str) -> Options:
    """The Options of ``python -m dtrace ARGV``, as main() makes them."""
    top, _ = cli.parser(PROG)
    return cli.options_of(top.parse_args(list(argv)))


def usage_error(*argv: str) -> str:
    with pytest.raises(UsageError) as error:
        options(*argv)
    return str(error.value)


# --- Options.from_args ---------------------------------------------------------------------------


def test_common_options_are_typed():
    got = options("calls", "-L", "-n", "5", "-d", "3", "-i", "1", "-p", "4711", "--max-keys", "100")
    assert got == Options(tool="calls", pid=4711, duration=3, interval=1, max_keys=100, top=5, latency=True)
    assert got.target_given and got.argv == () and got.command is None


def test_a_command_is_split_like_a_shell_would_split_it():
    got = options("gc", "-c", "python3 app.py --name 'two words' \"x y\"")
    assert got.argv == ("python3", "app.py", "--name", "two words", "x y")
    assert got.command == "python3 app.py --name 'two words' \"x y\""
    assert got.pid is None


def test_tools_without_an_option_get_its_default():
    got = options("gc", "-p", "1")
    assert got.interval is None and got.top == 20 and not got.latency and got.function is None


def test_the_options_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        options("gc", "-p", "1").pid = 2


def test_every_option_of_every_tool_is_a_field():
    """One typed object: a tool's parser that adds an option without a field is a bug, said at once."""
    for name in TOOLS:
        fields = {f.name for f in dataclasses.fields(Options)}
        top, _ = cli.parser(PROG)
        namespace = top.parse_args([name, "--script"] if name != "where" else [name, "f", "--script"])
        assert set(vars(namespace)) <= fields, name
    namespace = argparse.Namespace(tool="run", pid=1, command=None, script=False, tracer=None, max_keys=None,
                                   startup_timeout=30.0, duration=None, probes="gc-start")
    with pytest.raises(TypeError, match="Options has no field for probes: add one"):
        Options.from_args(namespace)


def test_where_takes_its_function_and_lines_option():
    got = options("where", "--no-lines", "-n", "0", "connect", "-p", "7")
    assert (got.function, got.no_lines, got.top) == ("connect", True, 0)


def test_list_needs_no_target_and_script_needs_none():
    assert options("list").target_given is False
    assert options("calls", "--script").script


@pytest.mark.parametrize("argv, message", [
    (["calls"], "give -p PID or -c COMMAND (or --script)"),
    (["calls", "-c", ""], f'-c needs a command, e.g. -c "{PY} app.py"'),
    (["calls", "-c", "   "], f'-c needs a command, e.g. -c "{PY} app.py"'),
    (["calls", "-c", "python3 'app.py"],
     "-c cannot split \"python3 'app.py\" like a shell: no closing quotation; quote it as a shell would, "
     f"e.g. -c \"{PY} app.py 'two words'\""),
    (["calls", "-p", "0"], "-p 0 is not a process ID: give the PID of a running process"),
    (["calls", "-p", "-5"], "-p -5 is not a process ID: give the PID of a running process"),
    (["calls", "-n", "-1", "-p", "1"], "-n must be 0 (show all) or more, not -1"),
    (["gc", "--startup-timeout", "0", "-c", "x"], "--startup-timeout must be more than 0 seconds, not 0"),
    (["flame", "--folded", "--format", "svg", "-p", "1"], "--folded and --format svg disagree: give one of them"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_usage_errors_say_what_to_do(argv, message):
    assert usage_error(*argv) == message


def test_split_command_directly():
    assert split_command("a 'b c'") == ("a", "b c")
    with pytest.raises(UsageError):
        split_command("")


# --- flame's output: its format and file, checked before tracing starts --------------------------


@pytest.mark.parametrize("output, chosen, folded, expected", [
    (None, None, False, ("svg", "flame.svg")),
    ("out.svg", None, False, ("svg", "out.svg")),
    ("app.speedscope.json", None, False, ("speedscope", "app.speedscope.json")),
    ("app.json", None, False, ("speedscope", "app.json")),
    ("app.folded", None, False, ("folded", "app.folded")),
    (None, "speedscope", False, ("speedscope", "flame.speedscope.json")),
    (None, None, True, ("folded", None)),
    (None, "folded", False, ("folded", None)),
    ("x.txt", "folded", True, ("folded", "x.txt")),
    ("x.json", "svg", False, ("svg", "x.json")),
])
def test_flame_format_and_file(output, chosen, folded, expected):
    assert flame_output(output, chosen, folded) == expected


def test_flame_output_paths_are_checked_at_parse_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert options("flame", "-o", "here.svg", "-p", "1").output == "here.svg"
    # A name whose suffix promises another format than the one written (issue 21: x.png got SVG).
    assert "flame writes SVG (.svg), speedscope JSON (.json) or folded stacks (.folded), not PNG" in \
        usage_error("flame", "-o", "x.png", "-p", "1")
    assert options("flame", "--format", "svg", "-o", "x.out", "-p", "1").format == "svg"
    assert usage_error("flame", "-o", "nodir/x.svg", "-p", "1") == \
        "-o nodir/x.svg: there is no directory nodir: create it, or write elsewhere"
    (tmp_path / "adir").mkdir()
    assert usage_error("flame", "-o", "adir", "-p", "1") == \
        "-o adir is a directory: give a file name, e.g. -o adir/flame.svg"
    # --script writes no file: nothing to check
    assert options("flame", "-o", "nodir/x.svg", "--script").output == "nodir/x.svg"
    # The check leaves nothing behind, and an existing file as it was.
    assert not (tmp_path / "here.svg").exists()
    (tmp_path / "kept.svg").write_text("old")
    options("flame", "-o", "kept.svg", "-p", "1")
    assert (tmp_path / "kept.svg").read_text() == "old"


def test_flame_output_not_writable(tmp_path):
    # Where no file can be made even by root: /proc.
    assert usage_error("flame", "-o", "/proc/self/x.svg", "-p", "1") == \
        "-o /proc/self/x.svg: cannot write it (No such file or directory): write elsewhere"
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert usage_error("flame", "-o", str(locked / "x.svg"), "-p", "1") == \
            f"-o {locked}/x.svg: cannot write it (Permission denied): write elsewhere"


# --- the command line's own behaviour: exit status 2 and the tool's usage ------------------------


def check_usage(done: subprocess.CompletedProcess, tool: str | None, message: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0].startswith(f"usage: {PROG} {tool} " if tool else f"usage: {PROG} "), done.stderr
    assert lines[-1] == f"{PROG}{' ' + tool if tool else ''}: error: {message}", done.stderr
    assert done.stdout == ""


def test_an_option_the_tool_does_not_take_prints_that_tools_usage():
    check_usage(run_tool("gc", "-n", "5"), "gc", f"gc does not take -n 5 ({PROG} gc --help lists its options)")
    check_usage(run_tool("flow", "-i", "1", "-p", "1"), "flow",
                f"flow does not take -i 1 ({PROG} flow --help lists its options)")


def test_children_with_a_stack_read_from_the_frames_is_a_usage_error():
    # A child's tracer runs the parent's program, and a frame walk is bound to one process's layout.
    check_usage(run_tool("where", "connect", "--children", "-c", "true"), "where",
                "--children reads no child's frames: give it with --trace-calls")
    check_usage(run_tool("flame", "--sample", "--children", "-c", "true"), "flame",
                "--children reads no child's frames: without --sample, flame traces the children")


def test_an_empty_or_unsplittable_command_is_a_usage_error():
    check_usage(run_tool("calls", "-c", ""), "calls", f'-c needs a command, e.g. -c "{PY} app.py"')
    check_usage(run_tool("calls", "-c", 'python3 "app.py'), "calls",
                "-c cannot split 'python3 \"app.py' like a shell: no closing quotation; quote it as a shell "
                f"would, e.g. -c \"{PY} app.py 'two words'\"")


def test_no_tool_is_a_usage_error():
    check_usage(run_tool(), None, f"give a tool, e.g. {PROG} calls -p PID ({PROG} --help lists them)")


def test_argparse_errors_exit_2_with_the_tools_usage():
    done = run_tool("calls", "-p", "abc")
    check_usage(done, "calls", "argument -p/--pid: invalid int value: 'abc'")
    done = run_tool("where")
    check_usage(done, "where", "the following arguments are required: FUNC")


def test_unwritable_output_is_refused_before_anything_starts(tmp_path):
    """flame -o nodir/x.svg: exit 2 before the command is started (it would leave a file)."""
    require_tracer()
    marker = tmp_path / "started"
    command = f"{sys.executable} -c \"open('{marker}', 'w')\""
    done = run_tool("flame", "-o", "nodir/x.svg", "-c", command, cwd=tmp_path)
    check_usage(done, "flame", "-o nodir/x.svg: there is no directory nodir: create it, or write elsewhere")
    assert not marker.exists()


def test_a_function_that_resolves_to_no_probe_is_an_error(tmp_path):
    """where nosuchfunc: bpftrace would attach nothing and report "not called"; the tool asks
    bpftrace first, and says so before the command is started."""
    require_tracer()
    done = run_tool("where", "nosuchfunc", "-p", str(os.getpid()))
    check_usage(done, "where",
                f"nosuchfunc resolves to no probe in process {os.getpid()} (uprobe:libc:nosuchfunc): give a "
                "function of libc (connect, write, ...), LIBRARY:FUNCTION, or a probe; "
                "`bpftrace -l 'uprobe:libc:*'` lists them")
    marker = tmp_path / "started"
    done = run_tool("where", "libc:nosuchfunc", "-c", f"{sys.executable} -c \"open('{marker}', 'w')\"")
    check_usage(done, "where",
                "libc:nosuchfunc resolves to no probe in this system (uprobe:libc:nosuchfunc): give a function "
                "of libc (connect, write, ...), LIBRARY:FUNCTION, or a probe; "
                "`bpftrace -l 'uprobe:libc:*'` lists them")
    assert not marker.exists()
    check_usage(run_tool("where", "no such", "-p", "1"), "where",
                "'no such' is not a function or probe: give a libc function (connect), LIBRARY:FUNCTION, or a "
                "tracer probe (uprobe:..., kprobe:...)")


def test_each_run_gets_a_fresh_tool_object(monkeypatch):
    """No per-run state on the module-level tools: main() runs a new object of the tool's class."""
    ran = []

    def fake_run(self, opts, out=sys.stdout):
        ran.append(self)
        return 0

    where = type(TOOLS["where"])
    monkeypatch.setattr(where, "run", fake_run)
    assert cli.main(["where", "connect", "-p", "1"]) == 0
    assert cli.main(["where", "connect", "-p", "1"]) == 0
    assert len(ran) == 2 and ran[0] is not ran[1]
    assert all(tool is not TOOLS["where"] and type(tool) is where for tool in ran)


def test_needs_target_is_an_attribute_of_the_tool():
    assert {name for name, tool in TOOLS.items() if not tool.needs_target} == {"list"}


def test_the_help_names_the_exit_status_and_the_command_ending_with_the_trace():
    done = run_tool("--help")
    assert "exit status: 0 once the trace ended" in done.stdout
    done = run_tool("calls", "--help")
    text = " ".join(done.stdout.split())
    assert "it ends with the trace (-d, Ctrl-C, SIGTERM, SIGHUP, the tool's end): SIGTERM, then SIGKILL after 5 s" \
        in text
    assert "a command started by -c is then stopped" in text
