"""The tools under a current bpftrace give the reports they give under Debian 12's 0.17.

``scripts/dev setup`` unpacks Debian sid's bpftrace (0.27 when written) under
/opt/pydtrace-sid-bpftrace, run through its wrapper ``bin/bpftrace``; ``PYDTRACE_CURRENT_BPFTRACE``
names another. Each tool runs twice on the same workload, with ``-p`` and the usual two-sided
handshake (tests/tracing.py), once under each bpftrace (``--tracer-path``), and the parts of the
reports that do not measure time must be equal. What differs between the two releases, and what
the tools do about it (python/dtrace/tools/command/tracers.py): 0.27 erases spaces from map keys in its
JSON (``<frozen importlib._bootstrap>``), reads ``BPFTRACE_MAX_STRLEN`` and
``BPFTRACE_MAX_MAP_KEYS`` instead of 0.17's names, sends its output through one ring buffer for
all CPUs, reports reads of absent map keys as helper errors under ``-k``, and does not end when
its ``-p`` process is a zombie not yet reaped. The counting tools run per event here
(``--per-event``): their in-process aggregation is compared under 0.17 only (test_aggregate.py).

Where this interpreter declares probes itself (Debian's 3.15), the tools bind those by address
(docs/interpreter-probes.md): the same reports again, under either bpftrace.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tracing import STEP_TIMEOUT, require, trace_with_tool, tracer_missing_reason

CURRENT = os.environ.get("PYDTRACE_CURRENT_BPFTRACE", "/opt/pydtrace-sid-bpftrace/bin/bpftrace")

BODY = """
    import gc

    gc.disable()  # only the collections run() makes

    def fib(n):
        return n if n < 2 else fib(n - 1) + fib(n - 2)

    def squares(n):
        for i in range(n):
            yield i * i

    class Node:
        def __init__(self, parent=None):
            self.parent = parent

    def run(result):
        fib(12)
        sum(squares(50))
        for i in range(40):
            abs(-i)
        nodes = [Node() for _ in range(30)]
        for _ in range(3):
            gc.collect()
        result["nodes"] = len(nodes)
"""


def current_missing_reason() -> str | None:
    reason = tracer_missing_reason()
    if reason:
        return reason
    if not os.access(CURRENT, os.X_OK):
        return f"no current bpftrace at {CURRENT} (scripts/dev setup unpacks Debian sid's there)"
    return None


def version(path: str) -> str:
    done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=STEP_TIMEOUT)
    return done.stdout.strip()


def report(tool: list[str], probes: list[str], tracer: str, directory: Path) -> str:
    """The tool's report (its standard output) on one run of BODY under ``tracer``."""
    workload, run = trace_with_tool(BODY, [*tool, "--tracer-path", tracer], probes, directory)
    assert run.code == 0, run.stderr
    # No warning of the tracer's, no lost event, no failed map update, no helper error.
    # (and none of bpftrace's own lines passed on, such as 0.27's "Attached N probes").
    bad = re.compile(r"WARNING|ERROR|lost|full|helper error|^Attach|^stdin:")
    assert [line for line in run.stderr.splitlines() if bad.search(line)] == [], run.stderr
    return run.stdout


def workload_rows(text: str, directory: Path) -> list[str]:
    """The report's lines about the workload's own code (not the driver's, whose first events
    depend on when the probes come live), with the workload's path taken out."""
    path = str(directory / "workload.py")
    return [line.replace(str(directory) + "/", "") for line in text.splitlines() if path in line]


def calls_rows(text: str, directory: Path) -> list[str]:
    # Counts and names; the time columns measure.
    return sorted(" ".join(line.split()[:2] + line.split()[-1:]) for line in workload_rows(text, directory))


def flow_rows(text: str, directory: Path) -> list[str]:
    # Direction, depth, function and place; the time and thread columns measure or vary.
    return [re.sub(r"^\s*[\d.]+\s+\d+", "", line) for line in workload_rows(text, directory)]


def gc_rows(text: str, directory: Path) -> list[str]:
    # GENERATION, PAUSES and COLLECTED of each row of the table; the times measure.
    rows = [line.split() for line in text.splitlines() if re.match(r"^\s+\d+\s+\d+\s", line)]
    return [f"{row[0]} {row[1]} {row[-1]}" for row in rows]


def run_rows(text: str, directory: Path) -> list[str]:
    # The collections, and the calls of the workload's functions (the driver's vary).
    return [line for line in text.splitlines() if line.startswith("@collections") or re.search(r"\[(fib|squares)\]", line)]


CASES = {
    "calls": (["calls", "--per-event", "-n", "0"], ["function-entry"], calls_rows),
    # On an interpreter that declares function__entry, cfunction__entry is bound by path, not by
    # address: the form 0.27 attaches twice under -p (docs/interpreter-probes.md).
    "calls-native": (["calls", "--native", "-n", "0"], ["function-entry", "cfunction-entry"], calls_rows),
    "lines": (["lines", "--per-event", "-n", "0"], ["line"], lambda text, d: sorted(workload_rows(text, d))),
    "flow": (["flow"], ["function-entry", "function-return"], flow_rows),
    "gc": (["gc"], ["gc-start", "gc-done"], gc_rows),
    "objnew": (["objnew", "-n", "0"], ["instance-new-start"], lambda text, d: sorted(workload_rows(text, d))),
    "run": (["run", "-e", "usdt::python:gc__start { @collections = count(); } "
                          "usdt::python:function__entry { @calls[str(arg1)] = count(); }"],
            ["gc-start", "function-entry"], run_rows),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_tool_reports_the_same_under_a_current_bpftrace(tmp_path, name):
    require(current_missing_reason())
    tool, probes, rows = CASES[name]
    reports = {}
    for label, tracer in (("0.17", "bpftrace"), ("current", CURRENT)):
        directory = tmp_path / label.replace(".", "")
        directory.mkdir()
        text = report(tool, probes, tracer, directory)
        reports[label] = rows(text, directory)
    assert reports["0.17"], f"{name} reported nothing of the workload under 0.17"
    assert reports["current"] == reports["0.17"], f"under {version(CURRENT)}"


def test_calls_keeps_the_space_of_a_frozen_module_under_a_current_bpftrace(workload_dir):
    """0.27 erases spaces from its JSON's map keys; the tools put back the one CPython writes."""
    require(current_missing_reason())
    body = BODY.replace("fib(12)", "fib(12)\n        import importlib; importlib.invalidate_caches()")
    workload, run = trace_with_tool(body, ["calls", "--per-event", "-n", "0", "--tracer-path", CURRENT],
                                    ["function-entry"], workload_dir)
    assert run.code == 0, run.stderr
    assert "<frozen importlib._bootstrap" in run.stdout and "<frozenimportlib" not in run.stdout, run.stdout


def test_flame_folds_the_same_stacks_under_a_current_bpftrace(tmp_path):
    require(current_missing_reason())
    stacks = {}
    for label, tracer in (("017", "bpftrace"), ("current", CURRENT)):
        directory = tmp_path / label
        directory.mkdir()
        text = report(["flame", "--per-event", "--folded"], ["function-entry", "function-return"], tracer, directory)
        # "frame;frame;... TIME": the stacks through the workload's functions, without the times.
        stacks[label] = sorted(line.rsplit(" ", 1)[0] for line in workload_rows(text, directory))
    assert stacks["017"] and stacks["current"] == stacks["017"], stacks
