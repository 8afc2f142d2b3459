"""CPython's test_dtrace cases, as this project's tests, under bpftrace on every Python >= 3.12.

CPython's Lib/test/test_dtrace.py runs a tracer program on a small Python
program and compares what it prints with an expected output: the call stack
(function__entry and function__return with CPython's three arguments), the
garbage collections (gc__start and gc__done), a usability check, and, in its
older cases, the line probe. The programs, their bpftrace programs and the
expected outputs here (tests/cpython_dtrace/) are this project's own, written
from that published behaviour.

As in CPython's test, each line the tracer program prints starts with a
timestamp and a tab; the lines that do are kept, sorted by it (bpftrace's
per-CPU buffers need not print in order), and the timestamp taken off; paths
are cut to their basenames. Each case runs with ``-OO`` too, as CPython runs
it optimized.

CPython runs ``bpftrace -c "python case.py"``, which bpftrace 0.17 cannot do
for probes in a library the command has not loaded yet; ``python -m dtrace run
case.bt -c "python case.py"`` is the way here: the command is held at
start-up until the program's probes are attached and live, and ``@TARGET@``
(CPython's placeholder for the interpreter) names the probe object.
docs/cpython-parity.md lists where the expected outputs differ from CPython's.
"""

from __future__ import annotations

import dis
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from tracing import require_tracer, run_tool

CASES = Path(__file__).resolve().parent / "cpython_dtrace"
OPTIMIZE = ["", "-OO"]


def normalize(output: str, keep: str | None = None) -> str:
    """CPython's normalization: rows that start with a number, sorted by it, the number taken
    off, paths cut to their basenames; with ``keep``, only the rows that mention it."""
    rows = []
    for line in output.splitlines():
        match = re.match(r"^(\d+)\t(.*)$", line)
        if match:
            rows.append((int(match.group(1)), match.group(2)))
    rows.sort()
    text = [re.sub(r"/[^:\s]*/([^/:\s]+)(?=:)", r"\1", row) for _, row in rows]
    return "\n".join(row for row in text if keep is None or keep in row)


def trace_case(name: str, directory: Path, optimize: str) -> subprocess.CompletedProcess:
    """``python -m dtrace run NAME.bt -c "PYTHON [-OO] NAME.py"``, the case copied to a short
    path (bpftrace reads 64 bytes of a string by default)."""
    require_tracer()
    script = directory / f"{name}.py"
    shutil.copyfile(CASES / f"{name}.py", script)
    command = " ".join([sys.executable, *([optimize] if optimize else []), str(script)])
    done = run_tool("run", str(CASES / f"{name}.bt"), "-c", command, cwd=directory)
    assert done.returncode == 0, done.stderr
    assert "the command exited with status" not in done.stderr, done.stderr
    return done


def expected(name: str) -> str:
    return (CASES / f"{name}.bt.expected").read_text().rstrip()


@pytest.mark.parametrize("optimize", OPTIMIZE, ids=["O0", "OO"])
def test_function_entry_return(workload_dir, optimize):
    done = trace_case("call_stack", workload_dir, optimize)
    # As in CPython's bpftrace case, the program prints every frame, and the rows of the case's
    # file are compared.
    assert normalize(done.stdout, keep="call_stack.py") == expected("call_stack"), done.stdout


@pytest.mark.parametrize("optimize", OPTIMIZE, ids=["O0", "OO"])
def test_gc(workload_dir, optimize):
    done = trace_case("gc", workload_dir, optimize)
    assert normalize(done.stdout) == expected("gc"), done.stdout


@pytest.mark.parametrize("optimize", OPTIMIZE, ids=["O0", "OO"])
def test_line(workload_dir, optimize):
    done = trace_case("line", workload_dir, optimize)
    assert normalize(done.stdout) == expected("line"), done.stdout
    # The program's own output ("#" lines) went to the same stdout, untouched.
    assert "# end 1" in done.stdout.splitlines()


def test_usability(workload_dir):
    """CPython's check that the tracer can attach at all: a probe: success line from the first
    function entry of a command that does nothing."""
    require_tracer()
    program = 'usdt:@TARGET@:python:function__entry { printf("probe: success\\n"); exit(); }'
    done = run_tool("run", "-e", program, "-c", f"{sys.executable} -c pass", cwd=workload_dir)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "probe: success", done.stdout


@pytest.mark.parametrize("optimize", [0, 2], ids=["O0", "OO"])
def test_call_stack_case_calls_in_every_way(optimize):
    """CPython's test_verify_call_opcodes: start() makes each kind of call."""
    code = compile((CASES / "call_stack.py").read_text(), "<string>", "exec", optimize=optimize)
    start = next(c for c in code.co_consts if isinstance(c, types.CodeType) and c.co_name == "start")
    # 3.12 passes keyword names with KW_NAMES before CALL; 3.13 has CALL_KW.
    wanted = {"CALL", "CALL_FUNCTION_EX", "KW_NAMES" if sys.version_info < (3, 13) else "CALL_KW"}
    assert wanted <= {instruction.opname for instruction in dis.get_instructions(start)}


def test_normalize_sorts_keeps_numbered_rows_and_cuts_paths():
    output = ("2\t function-entry: /tmp/x/a.py:f:3\n# the program's own line\n\n"
              "1\tfunction-return:/a/b/c.py:<module>:9\n@depth: 0\n")
    assert normalize(output) == "function-return:c.py:<module>:9\n function-entry: a.py:f:3"
    assert normalize(output, keep="a.py") == " function-entry: a.py:f:3"
