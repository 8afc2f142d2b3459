"""What runs in the target, for both ways in: the program (``program.py``, read as text) with the run's
values filled in, and the report it leaves, read back.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

from dtrace.tools.errors import ToolError
from dtrace.tools.proc import pyprocess

#: Seconds to wait for the main thread of the target to reach a point where it runs code.
SAFE_POINT_TIMEOUT = float(os.environ.get("PYDTRACE_INJECT_TIMEOUT", "10"))

#: The program run in the target: inject/program.py, as text (a module of its own, so that it is
#: linted and tested like the rest). ``ORIGIN``, ``OFFERED`` and ``REPORT_PATH`` (the lines that
#: set them to None) are filled in by :func:`code` with Python literals. It runs once, in a
#: namespace of its own (nothing is added to the program's), and leaves its report (bytes) in
#: ``__pydtrace_report__``.
PROGRAM = Path(__file__).resolve().parent / "program.py"
CODE = PROGRAM.read_text()


def code(origin: str, offered: str | None, report_path: str | None = None) -> str:
    """The exact source run in the target."""
    text = CODE
    for name, literal in (("ORIGIN", origin), ("OFFERED", offered), ("REPORT_PATH", report_path)):
        line = f"\n{name} = None\n"
        assert text.count(line) == 1
        text = text.replace(line, f"\n{name} = {literal!r}\n")
    return text


def parse_report(pid: int, text: str) -> dict:
    """The report the code left in process ``pid`` (the repr of a dict), or ToolError."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ToolError(f"unreadable report from process {pid}: {text!r}") from None


#: How the code gets in (:func:`method`), as the messages name it.
THROUGH = {"gdb": "gdb", "remote_exec": "sys.remote_exec"}


def outcome(process: pyprocess.PythonProcess, report: dict, offered: str | None, how: str) -> None:
    """Say what the code did in the target; ToolError unless the probes are there now."""
    pid = process.pid
    status = report.get("status")
    if status == "loaded":
        if not report.get("available"):
            raise ToolError(f"pydtrace-rs was loaded into process {pid} but cannot work there: {report.get('reason')}")
        where = {"program": "the program's own", "tool": "this tool's", "already": "the already loaded"}.get(
            report.get("source"), "")
        note = f" ({report['note']})" if report.get("note") else ""
        print(f"pydtrace: loaded {where} pydtrace-rs {report.get('version')} into process {pid} through "
              f"{THROUGH[how]}: {report.get('library')}{note}", file=sys.stderr, flush=True)
        return
    if status == "missing":
        ours = f"{sys.version_info[0]}.{sys.version_info[1]}"
        python = report.get("executable") or process.executable
        install = f"install pydtrace-rs where the process's Python finds it ({python} -m pip install pydtrace-rs)"
        if report.get("offered") is None and offered is None:
            raise ToolError(
                f"process {pid} runs {process.describe()}, which cannot import pydtrace-rs, and this tool's copy "
                f"is for Python {ours} ({sys.executable}): {install}, or run the tool with a Python "
                f"{pyprocess.version_text(process.minor)} that has it")
        raise ToolError(
            f"process {pid} runs {process.describe()}, which cannot import pydtrace-rs, and this tool's copy "
            f"({offered}) does not fit it (it loads extension modules ending in "
            f"{', '.join(report.get('suffixes') or [])}): {install}")
    if status == "conflict":
        raise ToolError(f"cannot load pydtrace-rs into process {pid}: {report.get('error')}")
    if status == "interrupted":
        raise ToolError(f"loading the probes into process {pid} was interrupted: a signal handler of the program "
                        f"raised {report.get('error')} meanwhile (passed on to the program); try again")
    raise ToolError(f"loading pydtrace-rs into process {pid} failed in the process: {report.get('error')}")
