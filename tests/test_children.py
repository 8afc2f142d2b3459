"""--children: the Python processes a traced command starts, traced from their first line, with
exact counts per process; and what the tool says without it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tracing import require_tracer, run_tool

POOL = """\
import multiprocessing as mp, sys

def work(n):
    return n * 2

if __name__ == "__main__":
    with mp.get_context(sys.argv[1]).Pool(2) as pool:
        print(sum(pool.map(work, range(10), chunksize=1)))
"""

EXECUTOR = """\
import concurrent.futures as cf, multiprocessing as mp, sys

def work(n):
    return n * 2

if __name__ == "__main__":
    with cf.ProcessPoolExecutor(2, mp_context=mp.get_context(sys.argv[1])) as executor:
        print(sum(executor.map(work, range(7))))
"""

#: A test module for ``python -m test --testdir DIR -j2``: its test methods call leaf() 5 and 3 times.
REGRTEST = """\
import unittest

def leaf():
    return 1

class A(unittest.TestCase):
    def test_a(self):
        for _ in range(5):
            leaf()

class B(unittest.TestCase):
    def test_b(self):
        for _ in range(3):
            leaf()
"""


def sections(stdout: str) -> dict[str, str]:
    """The report's sections by title (``PID N (...), a child process (ended)``)."""
    parts = re.split(r"^=== (.*)$", stdout, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def calls_of(text: str, function: str, file: str) -> int:
    """The CALLS of ``function`` in ``file`` in one section of calls' table (0 when absent)."""
    found = [int(words[0]) for words in (line.split() for line in text.splitlines())
             if len(words) >= 3 and words[1] == function and words[2].endswith(file)]
    assert len(found) <= 1, found
    return sum(found)


def trace_children(tmp_path: Path, body: str, *argv: str, name: str = "app.py") -> tuple[dict, str]:
    require_tracer()
    script = tmp_path / name
    script.write_text(body)
    done = run_tool("calls", "-n", "0", "--children", "-c", " ".join([sys.executable, str(script), *argv]),
                    cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "is not traced" not in done.stderr, done.stderr
    return sections(done.stdout), done.stderr


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_multiprocessing_pool_workers_are_traced_with_exact_counts(tmp_path, method):
    found, _ = trace_children(tmp_path, POOL, method)
    command = [title for title in found if title.endswith("the command")]
    children = [title for title in found if "a child process" in title]
    assert len(command) == 1, found.keys()
    assert calls_of(found[command[0]], "work", "app.py") == 0
    # The pool's two workers (and, with forkserver, its server) did all the work between them.
    assert len(children) >= 2, found.keys()
    assert sum(calls_of(found[title], "work", "app.py") for title in children) == 10, found


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_process_pool_executor_workers_are_traced_with_exact_counts(tmp_path, method):
    found, _ = trace_children(tmp_path, EXECUTOR, method)
    children = [title for title in found if "a child process" in title]
    assert sum(calls_of(found[title], "work", "app.py") for title in children) == 7, found


def test_regrtest_workers_are_traced_with_exact_counts(tmp_path):
    require_tracer()
    probe = subprocess.run([sys.executable, "-c", "import test.libregrtest"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("this Python has no test package (python -m test)")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_small.py").write_text(REGRTEST)
    (tmp_path / "tests" / "test_other.py").write_text(REGRTEST.replace("range(5)", "range(4)"))
    done = run_tool("calls", "-n", "0", "--children", "-c",
                    f"{sys.executable} -m test --testdir {tmp_path / 'tests'} -j2 test_small test_other",
                    cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stderr + done.stdout
    found = sections(done.stdout)
    total = sum(calls_of(text, "leaf", "test_small.py") for text in found.values())
    other = sum(calls_of(text, "leaf", "test_other.py") for text in found.values())
    assert (total, other) == (8, 7), done.stdout


def test_without_children_the_tool_says_how_many_ran_untraced(tmp_path):
    require_tracer()
    script = tmp_path / "app.py"
    script.write_text(POOL)
    done = run_tool("calls", "-n", "0", "-c", f"{sys.executable} {script} spawn", cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "===" not in done.stdout
    assert re.search(r"pydtrace: [2-9] Python child processes of the command ran untraced .*--children",
                     done.stderr), done.stderr


#: A running process (traced with -p --children) that starts, once the tool's probes are live, a
#: multiprocessing pool by fork and one by spawn (10 calls of work() each) and a `python -c` (3 calls).
RUNNING = """\
import multiprocessing as mp, os, subprocess, sys

def work(n):
    return n * 2

def run(result):
    result["follow"] = [os.environ.get("PYDTRACE_FOLLOW"), os.environ.get("PYDTRACE")]
    for method in ("fork", "spawn"):
        with mp.get_context(method).Pool(2) as pool:
            result[method] = sum(pool.map(work, range(10), chunksize=1))
    subprocess.run([sys.executable, "-c", "import workload; [workload.work(i) for i in range(3)]"],
                   cwd=os.path.dirname(os.path.abspath(__file__)), check=True)
"""

#: A process outside the traced tree that maps the same probe object and knows the tool's socket.
OUTSIDER = """\
import os, dtrace, workload
for i in range(5):
    workload.work(i)
print(os.getpid(), sorted(dtrace.enabled_probes()))
"""


def trace_running(tmp_path: Path, args: list[str], env: dict[str, str] | None = None):
    """``python -m dtrace ARGS --children -p PID`` on a process that runs RUNNING once the tool's probes
    are live in it (the two-sided handshake), and, meanwhile, a process outside its tree that reports to the
    same socket (OUTSIDER), and a second tool that asks to follow the same process's children. Returns the
    workload (exited), the tool (stopped with SIGINT) and the outsider's PID."""
    from tracing import ToolRun, Workload

    require_tracer()
    workload = Workload(RUNNING, ["function-entry"], tmp_path, env=env or {})
    workload.start()
    tool = ToolRun([*args, "--children"], workload.pid)
    try:
        tool.start()
        workload.go()
        result = workload.wait_result()
        assert (result["fork"], result["spawn"]) == (90, 90)
        socket_path, flag = result["follow"]
        assert flag == "1" and socket_path and socket_path.endswith("/socket"), result
        outsider = subprocess.run([sys.executable, "-c", OUTSIDER], cwd=tmp_path, capture_output=True, text=True,
                                  env={**os.environ, "PYDTRACE": "1", "PYDTRACE_FOLLOW": socket_path}, timeout=60)
        assert outsider.returncode == 0, outsider.stderr
        outsider_pid, enabled = outsider.stdout.split(" ", 1)
        assert enabled.strip() == "[]", outsider.stdout  # no tracer attached to it
        # One tool at a time follows a process's children: the environment names one socket.
        second = run_tool("calls", "--children", "-p", str(workload.pid))
        assert second.returncode == 1, second.stderr
        assert "follows the children of this process already" in second.stderr, second.stderr
        tool.stop()
        assert tool.code == 0, tool.stderr
        assert workload.finish() == 0, workload.stderr_text
        assert "Warning" not in workload.stderr_text, workload.stderr_text  # the refusal was the tool's only
    finally:
        tool.kill()
        workload.kill()
    return workload, tool, int(outsider_pid)


def test_p_children_traces_what_a_running_process_starts_from_then_on(tmp_path):
    """-p PID --children: the pools' workers (fork and spawn) and a subprocess, each traced from its first
    line with exact counts; a process outside the tree that reports to the same socket is neither traced
    nor given probes; a second tool cannot follow the same process's children; and the process's
    environment is as it was once the tool has ended."""
    workload, tool, outsider = trace_running(tmp_path, ["calls", "-n", "0"])
    found = sections(tool.stdout)
    process = [title for title in found if title.endswith(", the process")]
    assert len(process) == 1 and process[0].startswith(f"PID {workload.pid} "), found.keys()
    assert calls_of(found[process[0]], "work", "workload.py") == 0
    pids = {int(title.split()[1]) for title in found if "a child process" in title}
    assert outsider not in pids, found.keys()
    assert len(pids) >= 5, found.keys()  # two workers per pool and the subprocess (and spawn's helpers)
    assert sum(calls_of(found[title], "work", "workload.py") for title in found) == 23, tool.stdout
    # Taken back: as the process had them before the tool came, in os.environ and in the C environment.
    before = os.environ.get("PYDTRACE")
    assert workload.idle["follow_environment"] == {"PYDTRACE": [before, before],
                                                   "PYDTRACE_FOLLOW": [None, None]}, workload.idle


def test_run_p_children_gives_each_new_process_a_tracer(tmp_path):
    """run -p PID --children, on a process that had PYDTRACE_FOLLOW already (a -c command's child, say):
    exact counts per process, and that value back once the tool has ended."""
    earlier = str(tmp_path / "an-earlier-tool" / "socket")
    program = 'usdt::python:function__entry /str(arg3) == "work"/ { @work[pid] = count(); }'
    workload, tool, outsider = trace_running(tmp_path, ["run", "-e", program], env={"PYDTRACE_FOLLOW": earlier})
    counts = {int(pid): int(n) for pid, n in re.findall(r"^@work\[(\d+)\]: (\d+)$", tool.stdout, re.M)}
    assert sum(counts.values()) == 23 and workload.pid not in counts and outsider not in counts, tool.stdout
    assert len(counts) >= 3, tool.stdout  # a worker of each pool at least, and the subprocess
    before = os.environ.get("PYDTRACE")
    assert workload.idle["follow_environment"] == {"PYDTRACE": [before, before],
                                                   "PYDTRACE_FOLLOW": [earlier, earlier]}, workload.idle


#: A process that says, once its environment names a tool's socket or no longer does (as asked on its
#: stdin: "set" or "unset"), what its environment holds.
WATCHED = """\
import json, os, sys, time
import dtrace

print(os.getpid(), flush=True)
for line in sys.stdin:
    deadline = time.monotonic() + 60
    while (os.environ.get("PYDTRACE_FOLLOW") is None) == (line.strip() == "set") and time.monotonic() < deadline:
        time.sleep(0.005)
    print(json.dumps({name: [os.environ.get(name), dtrace._native.getenv(name)]
                      for name in ("PYDTRACE", "PYDTRACE_FOLLOW")}), flush=True)
"""


def test_p_children_environment_comes_back_when_the_tool_is_killed(tmp_path):
    """A tool killed with SIGKILL cannot give its lease back: the process notices that its holder has gone
    and takes the variables back all the same, exactly as they were."""
    import json
    import signal

    from tracing import Lines, ToolRun

    require_tracer()
    script = tmp_path / "watched.py"
    script.write_text(WATCHED)
    process = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, env={**os.environ, "PYDTRACE": "yes"})
    lines = Lines(process.stdout, "the process")
    tool = ToolRun(["calls", "--children"], int(lines.next()), stop_signal=signal.SIGKILL)
    try:
        tool.start()
        process.stdin.write("set\n")
        process.stdin.flush()
        during = json.loads(lines.next())
        assert during["PYDTRACE"] == ["1", "1"], during
        assert during["PYDTRACE_FOLLOW"][0] == during["PYDTRACE_FOLLOW"][1] is not None, during
        tool.stop()
        assert tool.code == -signal.SIGKILL
        process.stdin.write("unset\n")
        process.stdin.flush()
        after = json.loads(lines.next())
        assert after == {"PYDTRACE": ["yes", "yes"], "PYDTRACE_FOLLOW": [None, None]}, after
    finally:
        tool.kill()
        process.kill()
        process.wait()


#: A process of another user whose child, started once the tool follows, calls work() 4 times.
OTHER_USER = """\
import json, os, subprocess, sys
import dtrace

print(os.getpid(), flush=True)
sys.stdin.readline()
path = os.environ["PYDTRACE_FOLLOW"]
info = os.stat(path)
subprocess.run([sys.executable, "-c", "work = lambda: None; [work() for _ in range(4)]"], check=True)
print(json.dumps([info.st_uid, info.st_mode & 0o777, os.stat(os.path.dirname(path)).st_mode & 0o777]), flush=True)
sys.stdin.readline()
"""


def test_p_children_of_another_users_process():
    """A tool run as root on another user's process: that user's children can report (the socket is
    theirs, mode 0600, in the tool's directory, mode 0711), and are traced with exact counts."""
    import json

    from tracing import Lines, ToolRun

    require_tracer()
    nobody = 65534

    def as_nobody() -> None:
        os.setgid(nobody)
        os.setuid(nobody)

    try:
        runnable = os.geteuid() == 0 and subprocess.run([sys.executable, "-c", "import dtrace"], cwd="/",
                                                        preexec_fn=as_nobody, capture_output=True).returncode == 0
    except PermissionError:
        runnable = False
    if not runnable:
        pytest.skip("needs root, and an interpreter and dtrace that user nobody can run (a pyenv one under /root "
                    "is not)")
    # In one line (its command line heads its section), from no file (user nobody cannot read tmp_path).
    process = subprocess.Popen([sys.executable, "-c", f"exec({OTHER_USER!r})"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, preexec_fn=as_nobody, cwd="/")
    lines = Lines(process.stdout, "the process")
    tool = ToolRun(["calls", "-n", "0", "--children"], int(lines.next()))
    try:
        tool.start()
        process.stdin.write("go\n")
        process.stdin.flush()
        assert json.loads(lines.next()) == [nobody, 0o600, 0o711]
        tool.stop()
        assert tool.code == 0, tool.stderr
        process.stdin.write("done\n")
        process.stdin.flush()
        assert process.wait(60) == 0
    finally:
        tool.kill()
        process.kill()
        process.wait()
    found = sections(tool.stdout)
    child = [text for title, text in found.items() if "a child process" in title]
    assert len(child) == 1 and calls_of(child[0], "<lambda>", "<string>") == 4, tool.stdout


def test_a_variable_in_c_gets_a_hint_about_env():
    require_tracer()
    done = run_tool("calls", "-c", "FOO=1 python3 app.py")
    assert done.returncode == 1
    assert 'use env: -c "env FOO=1 python3 app.py"' in done.stderr, done.stderr


def test_flow_with_children_puts_the_pid_first(tmp_path):
    found_pids = set()
    require_tracer()
    script = tmp_path / "app.py"
    script.write_text(POOL)
    done = run_tool("flow", "--children", "-c", f"{sys.executable} {script} fork", cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    entries = [line for line in done.stdout.splitlines() if "-> work (" in line]
    assert len(entries) == 10, done.stdout[-3000:]
    for line in entries:
        found_pids.add(int(line.split()[0]))
    assert len(found_pids) >= 1


def test_run_with_children_gives_each_process_a_tracer(tmp_path):
    require_tracer()
    script = tmp_path / "app.py"
    script.write_text(POOL)
    program = 'usdt::python:function__entry /str(arg3) == "work"/ { @work[pid] = count(); }'
    done = run_tool("run", "--children", "-e", program, "-c", f"{sys.executable} {script} spawn",
                    cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    counts = {int(pid): int(n) for pid, n in re.findall(r"^@work\[(\d+)\]: (\d+)$", done.stdout, re.M)}
    assert sum(counts.values()) == 10, done.stdout
    assert len(re.findall(r"^Tracing with the program", done.stderr, re.M)) >= 3, done.stderr


# --- The cost of a trace, said with numbers ------------------------------------------------------

BUSY = """\
def leaf(i):
    return i

for i in range(200000):
    leaf(i)
"""


def test_a_busy_trace_says_its_events_per_second_and_the_scope_to_use(tmp_path):
    require_tracer()
    script = tmp_path / "app.py"
    script.write_text(BUSY)
    # Per event: each call traps (counted in the process, calls costs no trap per call: no note).
    done = run_tool("calls", "--per-event", "-c", f"{sys.executable} {script}", cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    total = int(re.search(r"^(\d+) calls of \d+ functions", done.stdout, re.M).group(1))
    assert calls_of(done.stdout, "leaf", "app.py") == 200000
    note = re.search(r"the trace saw ([\d,]+) events in ([\d.]+) s \(([\d,]+) a second\)", done.stderr)
    assert note, done.stderr
    assert int(note.group(1).replace(",", "")) == total
    assert re.search(r"Most events came from: --file app\.py \((\d+)%\)", done.stderr), done.stderr
    assert "flame --sample" in done.stderr


def test_a_quiet_trace_says_nothing_about_its_cost(tmp_path):
    require_tracer()
    script = tmp_path / "app.py"
    script.write_text(BUSY.replace("200000", "10"))
    done = run_tool("calls", "-c", f"{sys.executable} {script}", cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert calls_of(done.stdout, "leaf", "app.py") == 10
    assert "the trace saw" not in done.stderr, done.stderr


def test_help_examples_name_this_environments_python(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    done = run_tool("calls", "--help", cwd=tmp_path)
    assert done.returncode == 0
    from dtrace.tools.command.options import own_python

    python = own_python()
    assert f'-c "{python} app.py"' in done.stdout, done.stdout
    assert python == "python3" or '"python3 ' not in done.stdout


def test_flow_after_a_double_ctrl_c_is_balanced_or_marks_the_cut(tmp_path):
    """Two SIGINTs 0.1 s apart, as an impatient user sends them: every return the report shows
    without its entry is explained, and a trace stopped at once says where it was cut."""
    import signal
    import time

    from tracing import STEP_TIMEOUT, tool_command

    require_tracer()
    script = tmp_path / "app.py"
    script.write_text("def leaf(i):\n    return i\n\nwhile True:\n    for i in range(1000):\n        leaf(i)\n")
    process = subprocess.Popen(tool_command("flow", "-c", f"{sys.executable} {script}"), cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        assert line.startswith("Tracing "), line
        time.sleep(0.5)  # let events flow: the cut must fall in the middle of them
        process.send_signal(signal.SIGINT)
        time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=STEP_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    entries, returns = map(int, re.search(r"^(\d+) entries, (\d+) returns", stdout, re.M).groups())
    assert entries > 0
    cut = "[the trace was cut here" in stdout
    if entries != returns:
        assert re.search(r"(returns without their entry|entries without their return)", stdout), stdout[-2000:]
    if returns > entries + 1:  # more than the frame running when tracing began (depth 0)
        assert cut or "events were lost" in stderr, (stdout[-2000:], stderr)


#: A pytest module for pytest-xdist's two workers: its tests call leaf() 5 and 3 times.
XDIST = """\
def leaf():
    return 1


def test_a():
    for _ in range(5):
        leaf()


def test_b():
    for _ in range(3):
        leaf()
"""


def test_pytest_xdist_workers_are_traced_with_exact_counts(tmp_path):
    require_tracer()
    probe = subprocess.run([sys.executable, "-c", "import xdist"], capture_output=True)
    if probe.returncode != 0:  # scripts/dev setup installs it
        pytest.skip("pytest-xdist is not installed in this environment (pip install pytest-xdist)")
    (tmp_path / "test_leaves.py").write_text(XDIST)
    done = run_tool("calls", "-n", "0", "--children", "-c",
                    f"{sys.executable} -m pytest -q -p no:cacheprovider -n 2 test_leaves.py",
                    cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stderr + done.stdout
    found = sections(done.stdout)
    assert sum(calls_of(text, "leaf", "test_leaves.py") for text in found.values()) == 8, done.stdout
    # The tests ran in the workers, not in the command.
    command = [text for title, text in found.items() if title.endswith("the command")]
    assert calls_of(command[0], "leaf", "test_leaves.py") == 0
