"""--native: calls, flow and flame with the C functions Python code calls (cfunction probes),
under a real bpftrace, through -c and -p, with known answers."""

from __future__ import annotations

import re

import pytest

import dtrace

from test_tools import as_script, rows, traced_command
from tracing import run_tool, trace_with_tool


# The generated programs with --native pass bpftrace's check in test_tools.py (VARIANTS).


def test_without_native_no_cfunction_probe_is_used():
    for name in ("calls", "flow", "flame"):
        for extra in ([], ["-L"]) if name == "calls" else ([],):
            done = run_tool(name, *extra, "--script")
            assert done.returncode == 0 and ":python:cfunction" not in done.stdout, (name, extra)


NATIVE = """
    import math

    def norm(xs):
        return math.sqrt(sum(x * x for x in xs))  # norm-line

    def run(result):
        for i in range(40):
            norm([i, i + 1])
        result["sorted"] = sorted([3, 1, 2], key=lambda v: -v)  # sorted-line
"""


def line_in(body: str, marker: str) -> int:
    return next(n for n, text in enumerate(__import__("textwrap").dedent(body).splitlines(), 1) if marker in text)


def test_calls_native_through_p_counts_c_functions_by_calling_line(workload_dir):
    workload, tool = trace_with_tool(NATIVE, ["calls", "--native", "-n", "0"],
                                     ["function-entry", "cfunction-entry"], workload_dir)
    assert tool.code == 0, tool.stderr
    norm_line = f"{workload.path}:{workload.line_of('# norm-line')}"
    assert rows(tool.stdout, 1, "math.sqrt") == [["40", "math.sqrt", norm_line]], tool.stdout
    assert rows(tool.stdout, 1, "sum") == [["40", "sum", norm_line]], tool.stdout
    sorted_line = f"{workload.path}:{workload.line_of('# sorted-line')}"
    assert ["1", "sorted", sorted_line] in rows(tool.stdout, 1, "sorted"), tool.stdout
    # The Python functions' table is there as before, the C functions' table after it.
    assert rows(tool.stdout, 1, "norm")[0][0] == "40"
    headers = [line.split() for line in tool.stdout.splitlines() if line.startswith("CALLS")]
    assert headers == [["CALLS", "FUNCTION", "FILE"], ["CALLS", "C", "FUNCTION", "CALLED", "FROM"]]
    assert re.search(r"^\d+ calls of \d+ C functions from \d+ lines$", tool.stdout, re.M), tool.stdout


def test_calls_native_latency_through_c_times_c_functions(workload_dir):
    done = traced_command(workload_dir, "calls", "--native", "-L", "-n", "0", body=as_script(NATIVE))
    norm_line = f"workload.py:{line_in(as_script(NATIVE), '# norm-line')}"
    headers = [line.split() for line in done.stdout.splitlines() if line.startswith("CALLS")]
    assert headers[1] == ["CALLS", "TOTAL", "AVERAGE", "C", "FUNCTION", "CALLED", "FROM"], done.stdout
    row = re.search(rf"^\s*40\s+(\S+ \S+)\s+(\S+ \S+)\s+sum\s+{re.escape(norm_line)}$", done.stdout, re.M)
    assert row and not row.group(1).startswith("0 "), done.stdout
    # sum() runs the generator: its time includes the Python code it called back.
    sorted_row = re.search(r"^\s*1\s+(\S+ \S+)\s+(\S+ \S+)\s+sorted\s+workload.py:\d+$", done.stdout, re.M)
    assert sorted_row, done.stdout


FLOW_LINE = re.compile(r"^\s*\d+\.\d+  (\d+) +(->|<-) (\S+)( \[C\])? \((.*):(\d+)\)$")


def test_flow_native_through_p_indents_c_calls_below_their_caller(workload_dir):
    workload, tool = trace_with_tool(NATIVE, ["flow", "--native"],
                                     ["function-entry", "function-return", "cfunction-entry", "cfunction-return"],
                                     workload_dir)
    assert tool.code == 0, tool.stderr
    events = []
    for line in tool.stdout.splitlines():
        match = FLOW_LINE.match(line)
        if match and match.group(5) == str(workload.path):
            events.append((match.start(2), match.group(2), match.group(3), bool(match.group(4))))
    indent = {(name, native): i for i, arrow, name, native in events if arrow == "->"}
    assert indent[("norm", False)] < indent[("sum", True)] < indent[("norm.<locals>.<genexpr>", False)]
    assert indent[("norm", False)] < indent[("math.sqrt", True)] == indent[("sum", True)]
    assert indent[("run", False)] < indent[("sorted", True)] < indent[("run.<locals>.<lambda>", False)]
    for name in ("sum", "math.sqrt", "sorted"):
        entries = [e for e in events if e[2] == name and e[1] == "->"]
        assert len(entries) == len([e for e in events if e[2] == name and e[1] == "<-"]) == (1 if name == "sorted" else 40)
    assert re.search(r"^\d+ entries, \d+ returns \(\d+ of them calls of C functions\)$", tool.stdout, re.M)


@pytest.mark.xfail("function-entry" in dtrace._native.interpreter_probes(), strict=False,
                   reason="known defect, open: on an interpreter that declares the function probes itself "
                          "(3.15 --with-dtrace) the Python frames, bound by address and live from the lease, "
                          "and the C frames, live from their semaphores, at times nest wrongly in flame --native's tree")
def test_flame_native_through_p_adds_c_frames_as_leaves(workload_dir):
    workload, tool = trace_with_tool(NATIVE, ["flame", "--native", "--folded"],
                                     ["function-entry", "function-return", "cfunction-entry", "cfunction-return"],
                                     workload_dir)
    assert tool.code == 0, tool.stderr
    f = f"({workload.path})"
    stacks = dict(line.rsplit(" ", 1) for line in tool.stdout.splitlines())
    assert f"run {f};norm {f};math.sqrt [C]" in stacks, stacks
    assert f"run {f};norm {f};sum [C];norm.<locals>.<genexpr> {f}" in stacks, stacks
    assert f"run {f};sorted [C];run.<locals>.<lambda> {f}" in stacks, stacks
    assert all(int(ns) > 0 for ns in stacks.values())


def test_flame_native_through_c_draws_c_frames(workload_dir):
    done = traced_command(workload_dir, "flame", "--native", "-o", "out.svg", body=as_script(NATIVE))
    assert "wrote out.svg" in done.stdout
    svg = (workload_dir / "out.svg").read_text()
    assert re.search(r"<title>math\.sqrt \[C\]: [^<]*, 40 calls</title>", svg), svg[:2000]
