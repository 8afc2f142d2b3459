"""Scoped tracing (docs/scope.md): PYDTRACE_SCOPE, the tools' --module and --file, the channel.

Without a tracer: the scope's grammar and rule, the channel's layout on both sides, leases set,
released, dropped when their holder dies, their union, malformed scopes (the traced program
keeps its last good scope and warns once), the tools' errors, and that out-of-scope code calls
back once per code location and then never again (sys.monitoring.DISABLE) until the scope
changes. The channel tests need ptrace access to a child process (the default for a parent).

Under a real bpftrace (skipped without one, failed under PYDTRACE_REQUIRE_TRACER=1): exact
counts for code in scope and no event from any other file, through PYDTRACE_SCOPE and through
the tools (-p and -c), and the scope going back when a tool exits, or is killed.

No step waits on a timer: the workload waits for the scope it is told to expect (bounded by a
timeout that only limits a failure), and the tools wait for the process's acknowledgement.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import dtrace
from dtrace.tools.command import runner
from dtrace.tools.errors import ToolError
from dtrace.tools.proc import scope as tool_scope
from dtrace.tools.proc.elf import ElfFile
from tracing import STEP_TIMEOUT, ToolRun, require_tracer, run_tool, trace, trace_with_tool
from tracing import Speaker, clean_environment

native = dtrace._native

# --- the grammar and the rule (no process) -------------------------------------------------------


@pytest.mark.parametrize("text,modules,files", [
    ("app", ["app"], []),
    (" app , pkg.sub ,", ["app", "pkg.sub"], []),
    ("*/jobs/*.py,worker.py", ["worker.py"], ["*/jobs/*.py"]),  # no glob character: a module name
    ("file:worker.py,module:a.b", ["a.b"], ["worker.py"]),
    ("<string>,/srv/**", [], ["<string>", "/srv/**"]),
    ("app\nfile:x[0-9].py", ["app"], ["x[0-9].py"]),
    ("", [], []),
    ("π.ünï", ["π.ünï"], []),
])
def test_scope_grammar(text, modules, files):
    assert native.parse_scope(text) == (modules, files)


@pytest.mark.parametrize("text,phrase", [
    ("my-app", "not a module name"),
    ("a..b", "empty part"),
    ("1st", "must start with a letter"),
    ("module:", "not a module name"),
    ("file:[abc", "no closing ']'"),
    ("file:[z-a].py", "reversed"),
    ("file:app/", "ends with '/'"),
    ("file:a**b", "whole path component"),
    ("file:x\\", "lone '\\'"),
])
def test_malformed_scopes_say_why(text, phrase):
    with pytest.raises(ValueError) as error:
        native.parse_scope(text)
    assert phrase in str(error.value)


@pytest.mark.parametrize("glob,path,covered", [
    ("/srv/app/*.py", "/srv/app/main.py", True),
    ("/srv/app/*.py", "/srv/app/sub/main.py", False),
    ("/srv/app/**/*.py", "/srv/app/main.py", True),
    ("/srv/app/**/*.py", "/srv/app/a/b/main.py", True),
    ("/srv/app/**", "/srv/application/x.py", False),
    ("app/*.py", "/srv/app/main.py", True),
    ("app/*.py", "/srv/myapp/main.py", False),
    ("worker.py", "/a/b/worker.py", True),
    ("worker.py", "/a/b/coworker.py", False),
    ("<frozen *>", "<frozen importlib._bootstrap>", True),
    ("w?rk[a-z]r.py", "/x/worker.py", True),
    ("w?rk[!a-z]r.py", "/x/worker.py", False),
    ("[]x].py", "/x/].py", True),
    ("a\\*.py", "/x/a*.py", True),
    ("a\\*.py", "/x/ab.py", False),
    ("/x/*", "x/y", False),
])
def test_file_globs(glob, path, covered):
    assert native._testing.scope_covers(f"file:{glob}", [], path) is covered


def test_a_module_name_covers_its_submodules_only():
    assert native._testing.scope_covers("app", ["app"], "/x.py")
    assert native._testing.scope_covers("app", ["app.sub.deep"], "/x.py")
    assert not native._testing.scope_covers("app", ["application"], "/x.py")
    assert not native._testing.scope_covers("app.sub", ["app"], "/x.py")
    # A script run as `python -m app.cli` is __main__ with __spec__.name "app.cli": both are asked.
    assert native._testing.scope_covers("app", ["app.cli", "__main__"], "/x.py")
    assert native._testing.scope_covers("__main__", ["__main__"], "/x.py")


def test_the_tools_read_the_channel_the_module_writes():
    layout = dict(native._testing.scope_channel_layout())
    assert layout.pop("size") == layout["slots"] + layout["slot_count"] * layout["slot_size"]
    assert layout == tool_scope.LAYOUT
    assert ElfFile(dtrace.library_path()).symbols.get(tool_scope.SYMBOL) is not None


# --- a scoped process, driven line by line ----------------------------------------------------

INSCOPE = '''\
def leaf(x):
    return x  # leaf-return


def gen(n):
    for i in range(n):
        yield i


def fails():
    raise ValueError("no")


def thrown():
    try:
        yield 1
    except KeyError:
        yield 2


class K:
    def method(self):
        return 1


def calls_back(f, n):
    for i in range(n):
        f(i)
'''

DRIVER = r'''
import json, os, sys, threading, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dtrace
native = dtrace._native
import inscope

TIMEOUT = float(os.environ["SCOPE_TIMEOUT"])


def outside(x):
    return x


def outside_fails():
    raise KeyError("no")


def outside_gen():
    try:
        yield 1
    except KeyError:
        yield 2


def send(tag, data):
    print(tag, json.dumps(data), flush=True)


def scope_now():
    s = dtrace.scope()
    return None if s is None else {"modules": list(s.modules), "files": list(s.files), "tools": list(s.tools)}


def work(n):
    for i in range(n):
        outside(i)
        inscope.leaf(i)
        try:
            outside_fails()  # PY_UNWIND out of scope: cannot be disabled
        except KeyError:
            pass
        g = outside_gen()
        next(g)
        g.throw(KeyError)  # PY_THROW out of scope: cannot be disabled
    inscope.calls_back(outside, 3)


if os.environ.get("PYDTRACE_FORCE"):  # the watcher arms forced probes at its first poll: wait for it
    dtrace.wait_for_consumer(*os.environ["PYDTRACE_FORCE"].split(","), timeout=TIMEOUT)
send("READY", {"pid": os.getpid(), "library": dtrace.library_path(), "scope": scope_now(),
               "armed": native.is_armed()})
tick = threading.Event()
for line in sys.stdin:
    command, _, argument = line.strip().partition(" ")
    if command == "scope":
        send("SCOPE", scope_now())
    elif command == "wait-scope":  # until the scope in force is the one given (bounded)
        wanted = json.loads(argument)
        deadline = time.monotonic() + TIMEOUT
        while scope_now() != wanted and time.monotonic() < deadline:
            tick.wait(0.002)
        send("SCOPE", scope_now())
    elif command == "wait-live":  # until a consumer's aggregate-calls probe is live (bounded)
        send("LIVE", dtrace.wait_for_consumer("aggregate-calls", timeout=TIMEOUT))
    elif command == "work":
        before = native._testing.scope_stats()
        work(int(argument))
        after = native._testing.scope_stats()
        send("WORKED", {"decisions": after[0] - before[0], "disables": after[1] - before[1]})
    else:
        send("ERROR", command)
'''


class Scoped(Speaker):
    """A process with dtrace armed that runs ``work(n)`` and reports its scope when asked."""

    name = "the scoped process"

    def __init__(self, directory: Path, env: dict[str, str] | None = None) -> None:
        (directory / "inscope.py").write_text(INSCOPE)
        script = directory / "scoped.py"
        script.write_text(DRIVER)
        self.spawn([sys.executable, str(script)], clean_environment(
            SCOPE_TIMEOUT=str(STEP_TIMEOUT), PYTHONDONTWRITEBYTECODE="1", **(env or {})))
        self.ready = self.expect("READY")
        self.pid = self.ready["pid"]
        self.library = self.ready["library"]

    def ask(self, command: str, tag: str) -> Any:
        self.tell(command)
        return self.expect(tag)

    def scope(self) -> Any:
        return self.ask("scope", "SCOPE")

    def wait_scope(self, wanted: Any) -> Any:
        return self.ask(f"wait-scope {json.dumps(wanted)}", "SCOPE")

    def work(self, n: int) -> dict[str, int]:
        return self.ask(f"work {n}", "WORKED")

    def close(self) -> str:
        """Ends the process; its stderr."""
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(STEP_TIMEOUT)
        return "\n".join(self.stderr.rest())


@pytest.fixture
def scoped(workload_dir, request):
    processes: list[Scoped] = []

    def start(**env: str) -> Scoped:
        process = Scoped(workload_dir, env)
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.kill()


def lease(pid: int, text: str) -> tool_scope.Lease:
    """This test process as a tool holding a lease on ``text``."""
    return tool_scope.Lease(tool_scope.Channel(pid), text)


HOLDER = r'''
import os, sys
from dtrace.tools.proc import scope
held = scope.Lease(scope.Channel(int(sys.argv[1])), sys.argv[2])
print("HELD", flush=True)
if sys.argv[3] == "exit":
    os._exit(0)  # leaves without releasing
sys.stdin.read()
'''


def holder(pid: int, text: str, then: str = "wait") -> subprocess.Popen:
    """Another process holding a lease on ``text`` once it printed HELD."""
    env = {**os.environ, "PYDTRACE": "0"}
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(pid), text, then], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = process.stdout.readline()
    assert line == "HELD\n", (line, process.stderr.read() if process.poll() is not None else "")
    return process


def as_scope(modules=(), files=(), tools=()) -> dict[str, list]:
    return {"modules": list(modules), "files": list(files), "tools": list(tools)}


def test_environment_scope_is_reported(scoped):
    process = scoped(PYDTRACE_SCOPE="inscope, */jobs/*.py")
    assert process.ready["scope"] == as_scope(["inscope"], ["*/jobs/*.py"])
    assert "Warning" not in process.close()


def test_a_malformed_environment_scope_warns_once_and_scopes_nothing(scoped):
    # -W error: the warning must not become an exception in the traced program.
    process = scoped(PYDTRACE_SCOPE="inscope,my-app", PYTHONWARNINGS="error")
    assert process.ready["armed"] and process.ready["scope"] is None
    stderr = process.close()
    assert stderr.count("scope ignored") == 1, stderr
    assert '"my-app" is not a module name' in stderr and "Traceback" not in stderr, stderr


def test_out_of_scope_code_calls_back_once_per_location_then_never(scoped):
    """With the code probes on (forced, no consumer needed) and a scope that leaves the driver
    out: after the first round, out-of-scope code never calls back again (DISABLE), exceptions
    and throws out of scope raise nothing into the program (PY_UNWIND and PY_THROW cannot be
    disabled), and a change of the scope brings the disabled locations back."""
    process = scoped(PYDTRACE_SCOPE="inscope", PYDTRACE_FORCE="function-entry,function-return,line")
    first = process.work(50)
    assert first["disables"] > 0, first
    again = process.work(50)
    assert again == {"decisions": 0, "disables": 0}, again
    # Put the driver (__main__) in scope through the channel: its code is decided again (the
    # disabled locations came back: sys.monitoring.restart_events()), and now fires.
    with_main = lease(process.pid, "module:__main__\nmodule:inscope")
    try:
        assert process.scope()["modules"] == ["__main__", "inscope"]
        changed = process.work(50)
        assert changed["decisions"] > 0 and changed["disables"] == 0, changed
    finally:
        with_main.release()
    assert process.scope() == as_scope(["inscope"])
    back = process.work(50)
    assert back["disables"] > 0, back  # out of scope again: disabled again, once per location
    assert process.work(50) == {"decisions": 0, "disables": 0}
    stderr = process.close()
    assert "Traceback" not in stderr and "ValueError" not in stderr, stderr


def test_a_lease_sets_the_scope_and_its_release_restores_it(scoped):
    process = scoped(PYDTRACE_SCOPE="inscope")
    held = lease(process.pid, "module:pkg.sub\nfile:*/jobs/*.py")
    try:
        # The lease returns only once the process acknowledged: the scope is in force already.
        assert process.scope() == as_scope(["pkg.sub"], ["*/jobs/*.py"], [os.getpid()])
        assert tool_scope.Channel(process.pid).published().tools == [os.getpid()]
    finally:
        held.release()
    assert process.scope() == as_scope(["inscope"])  # the base scope is back
    assert tool_scope.Channel(process.pid).published().entries == ["module:inscope"]


def test_two_leases_give_the_union_and_each_release_takes_its_part_back(scoped):
    process = scoped()
    first = holder(process.pid, "module:alpha")
    try:
        second = lease(process.pid, "module:beta\nmodule:alpha")
        try:
            assert process.scope() == as_scope(["alpha", "beta"], [], [first.pid, os.getpid()])
        finally:
            second.release()
        assert process.scope() == as_scope(["alpha"], [], [first.pid])
    finally:
        first.stdin.close()  # the holder ends without releasing: the process notices
        first.wait(STEP_TIMEOUT)
    assert process.wait_scope(None) is None


@pytest.mark.parametrize("how", ["SIGKILL", "exit"])
def test_a_lease_goes_when_its_holder_dies(scoped, how):
    process = scoped(PYDTRACE_SCOPE="inscope")
    held = holder(process.pid, "module:other", then="exit" if how == "exit" else "wait")
    if how == "SIGKILL":
        assert process.scope() == as_scope(["other"], [], [held.pid])
        held.send_signal(signal.SIGKILL)
    held.wait(STEP_TIMEOUT)
    assert process.wait_scope(as_scope(["inscope"])) == as_scope(["inscope"])
    # The slot was freed: every slot can be leased again.
    leases = [lease(process.pid, f"module:m{i}") for i in range(tool_scope.LAYOUT["slot_count"])]
    try:
        assert sorted(process.scope()["modules"]) == [f"m{i}" for i in range(len(leases))]
        with pytest.raises(ToolError, match="hold scopes in process .* already; at most 4 at once"):
            lease(process.pid, "module:one_too_many")
    finally:
        for held_lease in leases:
            held_lease.release()
    assert process.scope() == as_scope(["inscope"])


def test_a_malformed_lease_is_refused_and_the_last_good_scope_stays(scoped):
    process = scoped(PYDTRACE_SCOPE="inscope")
    # Written past the tool's own checks (as a tool of another version might): the process refuses.
    for _ in range(2):
        with pytest.raises(ToolError, match='refused: "bad-name" is not a module name'):
            lease(process.pid, "module:bad-name")
        with pytest.raises(ToolError, match="refused: the scope names no module and no file"):
            lease(process.pid, " , ")
    assert process.scope() == as_scope(["inscope"])
    good = lease(process.pid, "module:fine")
    good.release()
    assert process.scope() == as_scope(["inscope"])
    stderr = process.close()
    assert stderr.count("scope ignored") == 1, stderr  # warned once, never raised
    assert "Traceback" not in stderr, stderr


# --- the tools' errors --------------------------------------------------------------------------


def check_error(done: subprocess.CompletedProcess, *phrases: str) -> None:
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    for phrase in phrases:
        assert phrase in done.stderr, done.stderr


def check_usage_error(done: subprocess.CompletedProcess, *phrases: str) -> None:
    """A usage error: exit status 2 (docs/tools/README.md), the tool's usage, and the phrases."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "usage:" in done.stderr and "Traceback" not in done.stderr, done.stderr
    for phrase in phrases:
        assert phrase in done.stderr, done.stderr


def test_a_malformed_option_is_refused_before_anything_starts():
    # Checked before the tracer is looked for: these need neither root nor bpftrace.
    check_usage_error(run_tool("calls", "--file", "app/[x", "-p", str(os.getpid())),
                      "--file app/[x: malformed file glob", "no closing ']'")
    check_usage_error(run_tool("flow", "--module", "my-app", "-c", "true"),
                      "--module my-app:", "not a module name")
    check_usage_error(run_tool("calls", "--file", "a,b", "-p", str(os.getpid())), "cannot hold a comma")


def test_a_malformed_environment_scope_is_one_usage_error_for_a_command():
    # The command would inherit it, warn and run unscoped: refused before anything starts, and the
    # tool's own process (which has PYDTRACE=1 too) does not warn about it as well.
    done = run_tool("calls", "-c", "true", env={"PYDTRACE": "1", "PYDTRACE_SCOPE": "inscope,my-app"})
    check_usage_error(done, "PYDTRACE_SCOPE='inscope,my-app' in the environment", "not a module name")
    assert "RuntimeWarning" not in done.stderr, done.stderr


def test_an_unreadable_channel_is_a_clear_error(scoped, workload_dir):
    process = scoped()
    # An object without the channel: the process's pydtrace-rs is older than the tools. The C
    # library stands in (an extension module would not: Debian builds _json and others in).
    maps = Path(f"/proc/{process.pid}/maps").read_text().splitlines()
    libc = next(line.split()[-1] for line in maps if Path(line.split()[-1]).name.startswith("libc.so"))
    with pytest.raises(ToolError, match="has no scope channel .* older than --module/--file"):
        tool_scope.Channel(process.pid, libc)
    # A channel that does not hold what it should (the object replaced on disk, say).
    channel = tool_scope.Channel(process.pid)
    channel.write(0, b"X")
    channel.close()
    with pytest.raises(ToolError, match="scope channel of process .* is unreadable"):
        tool_scope.Channel(process.pid)
    if os.geteuid() == 0:
        # Without ptrace access (another user's process): the effective user dropped after start-up.
        code = ("import os, sys; from dtrace.tools.proc import scope; os.seteuid(65534)\n"
                "try:\n    scope.Channel(int(sys.argv[1]), sys.argv[2])\n"
                "except Exception as e:\n    print(e)")
        done = subprocess.run([sys.executable, "-c", code, str(process.pid), process.library],
                              capture_output=True, text=True, timeout=STEP_TIMEOUT,
                              env={**os.environ, "PYDTRACE": "0"})
        assert "permission denied. The scope channel needs the rights of the tracer itself" in done.stdout, done


def test_a_process_with_its_probes_disarmed_cannot_take_a_scope(scoped):
    process = scoped(PYDTRACE="0")
    assert not process.ready["armed"]
    target = runner.Target(process.pid, process.library)
    with pytest.raises(ToolError, match="not armed .* cannot take a scope"):
        tool_scope.open_session(None, target, "module:x")


# --- under bpftrace: exact counts, and nothing from elsewhere -----------------------------------

EVERYTHING = """
usdt:{lib}:python:function__entry { @entry[str(arg0), str(arg3)] = count(); }
usdt:{lib}:python:function__return { @ret[str(arg0), str(arg3)] = count(); }
usdt:{lib}:python:line { @line[str(arg0), str(arg3), arg2] = count(); }
"""

WORKLOAD = """
    import inscope

    def outside(x):
        return x

    def run(result):
        for i in range(N):
            inscope.leaf(i)
            outside(i)
        result["gen"] = sum(inscope.gen(10))
        for _ in range(3):
            try:
                inscope.fails()
            except ValueError:
                pass
        g = inscope.thrown()
        next(g)
        g.throw(KeyError)
        g.close()
        inscope.K().method()
        inscope.calls_back(outside, 5)
"""

N = 1000

#: Entries (and returns) of each in-scope function in one run of WORKLOAD: gen starts once and resumes
#: 10 times; thrown starts, is thrown into, and is closed (GeneratorExit thrown in, unwinding).
EXPECTED = {"leaf": N, "gen": 11, "fails": 3, "thrown": 3, "K.method": 1, "calls_back": 1}


def by_function(counts: dict[str, int]) -> dict[str, dict[str, int]]:
    """{file: {qualname: count}} from bpftrace's "file,qualname" keys."""
    out: dict[str, dict[str, int]] = {}
    for key, value in counts.items():
        path, _, name = key.rpartition(",")
        out.setdefault(path, {})[name] = out.get(path, {}).get(name, 0) + value
    return out


def check_exact(maps: dict[str, Any], inscope_path: Path) -> None:
    entries, returns = by_function(maps["@entry"]), by_function(maps["@ret"])
    assert set(entries) == set(returns) == {str(inscope_path)}, (entries, returns)
    assert entries[str(inscope_path)] == EXPECTED
    assert returns[str(inscope_path)] == EXPECTED
    files = {key.split(",")[0] for key in maps["@line"]}
    assert files == {str(inscope_path)}, files
    leaf_return = INSCOPE.splitlines().index("    return x  # leaf-return") + 1
    assert maps["@line"][f"{inscope_path},leaf,{leaf_return}"] == N


def traced(workload_dir: Path, env: dict[str, str]):
    (workload_dir / "inscope.py").write_text(INSCOPE)
    body = WORKLOAD.replace("range(N)", f"range({N})")
    # Two strings in a key: 100 bytes each keep bpftrace 0.17 within its 512-byte stack.
    return trace(body, EVERYTHING, ["function-entry", "function-return", "line"], workload_dir, env=env,
                 tracer_env={"BPFTRACE_STRLEN": "100"})


# The last: an unknown module is accepted (it may be imported later), and a bare file name is a glob.
@pytest.mark.parametrize("setting", ["inscope", "file:*/inscope.py", "nothing_here,file:inscope.py"])
def test_environment_scope_counts_exactly_and_nothing_else(workload_dir, setting):
    run = traced(workload_dir, {"PYDTRACE_SCOPE": setting})
    check_exact(run.maps, workload_dir / "inscope.py")
    assert run.result["gen"] == 45
    assert run.workload.idle["scope"] is not None  # the base scope stays in force


def test_tool_module_counts_exactly_and_the_scope_goes_back(workload_dir):
    (workload_dir / "inscope.py").write_text(INSCOPE)
    body = WORKLOAD.replace("range(N)", f"range({N})")
    workload, tool = trace_with_tool(body, ["calls", "--module", "inscope"], ["aggregate-calls", "aggregate-flush"],
                                     workload_dir)
    assert tool.code == 0, tool.stderr
    counts = {words[1]: int(words[0]) for words in (line.split() for line in tool.stdout.splitlines()[1:])
              if len(words) == 3 and words[0].isdigit()}
    assert counts == EXPECTED, tool.stdout
    assert all(line.split()[2].endswith("inscope.py") for line in tool.stdout.splitlines()[1:]
               if len(line.split()) == 3 and line.split()[0].isdigit())
    # The tool released its lease before it exited: the scope is back to none.
    assert workload.idle["scope"] is None, workload.idle


def test_tool_file_glob_through_c_counts_exactly(workload_dir):
    require_tracer()
    (workload_dir / "inscope.py").write_text(INSCOPE)
    script = workload_dir / "main.py"
    script.write_text(textwrap.dedent(WORKLOAD).replace("range(N)", f"range({N})") + "\nrun({})\n")
    done = run_tool("calls", "--file", "*/inscope.py", "-n", "0", "-c", f"{sys.executable} {script}",
                    cwd=workload_dir)
    assert done.returncode == 0, done.stderr
    counts = {words[1]: int(words[0]) for words in (line.split() for line in done.stdout.splitlines()[1:])
              if len(words) == 3 and words[0].isdigit()}
    # Traced from its first line: the import of inscope runs its module body and class body too.
    assert counts == {**EXPECTED, "<module>": 1, "K": 1}, done.stdout


def run_scoped_to_inscope(workload_dir: Path, program: str) -> tuple[dict[str, int], str]:
    """``run -e PROGRAM --module inscope -c`` on the workload, from its first line: the counts of
    the program's one map by key, and its output."""
    (workload_dir / "inscope.py").write_text(INSCOPE)
    script = workload_dir / "main.py"
    script.write_text(textwrap.dedent(WORKLOAD).replace("range(N)", f"range({N})") + "\nrun({})\n")
    done = run_tool("run", "-e", program, "--module", "inscope", "-c", f"{sys.executable} {script}",
                    cwd=workload_dir)
    assert done.returncode == 0, done.stderr
    counts = {line.split("[", 1)[1].split("]")[0]: int(line.rsplit(":", 1)[1])
              for line in done.stdout.splitlines() if line.startswith("@[")}
    return counts, done.stdout


def test_run_takes_the_scope_too(workload_dir):
    """``run --module``: the user's own program sees only the scope's events, as the tools do."""
    require_tracer()
    counts, stdout = run_scoped_to_inscope(workload_dir, 'usdt:*:python:function__entry { @[str(arg3)] = count(); }')
    # Traced from its first line: the import of inscope runs its module body and class body too.
    assert counts == {**EXPECTED, "<module>": 1, "K": 1}, stdout


def test_a_command_takes_the_scope_while_its_interpreter_starts(workload_dir):
    """``-c`` with a scope: the command waits for the tool inside its .pth, before its interpreter
    is initialised (3.15 reports Py_IsInitialized() 0 there), and its watcher takes the scope
    up all the same. The line probe, which no interpreter declares itself, counts exactly."""
    require_tracer()
    leaf_return = INSCOPE.splitlines().index("    return x  # leaf-return") + 1
    counts, stdout = run_scoped_to_inscope(workload_dir, 'usdt:*:python:line { @[str(arg1), arg2] = count(); }')
    assert counts[f"leaf, {leaf_return}"] == N, stdout
    assert not [key for key in counts if key.split(",")[0] in ("outside", "run")], stdout


def tool_children(pid: int) -> list[int]:
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(c) for c in f.read().split()]
    return children


def test_the_scope_goes_back_when_the_tool_is_killed(scoped):
    require_tracer()
    process = scoped(PYDTRACE_SCOPE="inscope")
    tool = ToolRun(["calls", "--module", "other", "--file", "*/jobs/*.py"], process.pid)
    tool.start()  # returns once the tracer is attached: the lease is held
    children = tool_children(tool.process.pid)
    try:
        assert process.scope() == as_scope(["other"], ["*/jobs/*.py"], [tool.process.pid])
        tool.process.send_signal(signal.SIGKILL)
        tool.process.wait(STEP_TIMEOUT)
        assert process.wait_scope(as_scope(["inscope"])) == as_scope(["inscope"])
    finally:
        tool.kill()
        for child in children:  # the tracer it started, orphaned
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_two_tools_at_once_trace_the_union(scoped):
    require_tracer()
    process = scoped()
    first = ToolRun(["calls", "--module", "inscope"], process.pid)
    second = ToolRun(["calls", "--module", "__main__"], process.pid)
    try:
        first.start()
        assert process.ask("wait-live", "LIVE") is True
        second.start()
        assert process.scope() == as_scope(["inscope", "__main__"], [], [first.process.pid, second.process.pid])
        process.work(10)
        second.stop()
        assert process.scope() == as_scope(["inscope"], [], [first.process.pid])
        process.work(10)
        first.stop()
    finally:
        first.kill()
        second.kill()
    assert process.scope() is None
    assert first.code == second.code == 0, (first.stderr, second.stderr)
    assert "also set scopes" in second.stderr and "the union of all" in second.stderr, second.stderr
    for tool in (first, second):
        assert all(line.split()[2].endswith(("inscope.py", "scoped.py")) for line in tool.stdout.splitlines()[1:]
                   if len(line.split()) == 3 and line.split()[0].isdigit()), tool.stdout
    # The first tool saw inscope.leaf in all 20 rounds; the second only while it ran (the union).
    first_counts = {w[1]: int(w[0]) for w in (line.split() for line in first.stdout.splitlines()) if len(w) == 3
                    and w[0].isdigit()}
    second_counts = {w[1]: int(w[0]) for w in (line.split() for line in second.stdout.splitlines()) if len(w) == 3
                     and w[0].isdigit()}
    assert first_counts["leaf"] == 20 and second_counts["leaf"] == 10, (first.stdout, second.stdout)
    assert second_counts["outside"] == 10 * 1 + 3 and "outside" in first_counts, second.stdout


def test_a_tool_without_a_scope_says_one_is_in_force(scoped):
    require_tracer()
    process = scoped(PYDTRACE_SCOPE="inscope")
    tool = ToolRun(["calls"], process.pid)
    try:
        tool.start()
        tool.stop()
    finally:
        tool.kill()
    assert "has a scope set by PYDTRACE_SCOPE" in tool.stderr and "module inscope" in tool.stderr, tool.stderr
    listed = run_tool("list", "-p", str(process.pid))
    assert "scope: module inscope (from PYDTRACE_SCOPE)" in listed.stdout, listed.stdout
