"""The sections of BENCHMARKS.md that one script each writes, found by their markers.

benches/report.py rewrites the page from its own results; the sections measured apart
(interpreters built --with-dtrace, scoped tracing, C function probes, the counting tools, attach
latency, Python stacks) sit between markers, and each script replaces only its own. This module is the one
place that finds, keeps and replaces them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"

#: Markers of each owned section, by the script (or hand) that writes it.
WITH_DTRACE = ("<!-- with-dtrace:begin -->", "<!-- with-dtrace:end -->")  # benches/report.py --section
SCOPE = ("<!-- scope:begin -->", "<!-- scope:end -->")  # benches/scope.py
CFUNCTION = ("<!-- cfunction:begin -->", "<!-- cfunction:end -->")  # measured apart, written by hand
ATTACH_LATENCY = ("<!-- attach-latency: written by benches/attach_latency.py -->", "<!-- /attach-latency -->")
PYSTACK = ("<!-- pystack:begin -->", "<!-- pystack:end -->")  # benches/pystack_cost.py's output, written by hand
#: benches/tool_overhead.py --markdown's table, with its reading written by hand.
COUNTING_TOOLS = ("<!-- counting-tools:begin -->", "<!-- counting-tools:end -->")

#: Every owned section, in the order report.py keeps them.
OWNED = (WITH_DTRACE, SCOPE, CFUNCTION, COUNTING_TOOLS, ATTACH_LATENCY, PYSTACK)


def kept(output: Path, markers: tuple[str, str]) -> list[str]:
    """The section between ``markers`` as ``output`` has it now (with a blank line after it),
    or nothing when it has none."""
    begin, end = markers
    text = output.read_text() if output.exists() else ""
    start = text.find(begin)
    stop = text.find(end, start) if start >= 0 else -1
    return text[start:stop + len(end)].splitlines() + [""] if stop >= 0 else []


def splice(output: Path, markers: tuple[str, str], lines: list[str], before: str | None = None) -> None:
    """Replace the section between ``markers`` with ``lines`` (which carry the markers); when
    ``output`` has none yet, put it before the line ``before`` where given and present, else at
    the end."""
    begin, end = markers
    text = output.read_text() if output.exists() else ""
    block = "\n".join(lines)
    start = text.find(begin)
    stop = text.find(end, start) if start >= 0 else -1
    at = text.find(before) if before else -1
    if stop >= 0:
        text = text[:start] + block + text[stop + len(end):]
    elif at >= 0:
        text = text[:at] + block + "\n\n" + text[at:]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    output.write_text(text)


def run_arguments(doc: str, written: str) -> argparse.ArgumentParser:
    """The options of a script that measures into a results directory and writes ``written``
    of BENCHMARKS.md from it (report.py: the report; scope.py: its section)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--python", action="append", help="an interpreter with pydtrace-rs installed (repeatable)")
    parser.add_argument("--quick", action="store_true", help="fewer and shorter rounds")
    parser.add_argument("--no-callgrind", action="store_true", help="skip the instruction counts")
    parser.add_argument("--output", default=str(BENCHMARKS))
    parser.add_argument("--results", help="keep the raw results in this directory")
    parser.add_argument("--from", dest="from_dir", help=f"write {written} from results kept earlier")
    return parser
