"""--children: the Python processes a traced command starts, traced from their first line, with
exact counts per process; and what the tool says without it."""

from __future__ import annotations

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


def test_children_with_p_is_a_usage_error():
    done = run_tool("calls", "--children", "-p", "1")
    assert done.returncode == 2, done.stderr
    assert "--children follows the processes of a command" in done.stderr


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
