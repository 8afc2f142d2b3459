"""``flow``: function entries and returns as they happen, indented by depth, per thread."""

from __future__ import annotations

import re

from dtrace.tools.command.base import ScriptTool
from dtrace.tools.render import report

#: A line of flow.bt/flow.d: TIME(us) TID DEPTH -> FUNCTION [C] (FILE:LINE); [C] marks a C function
#: (--native), whose FILE:LINE is the line that called it.
EVENT = re.compile(r"^\s*(\d+)\s+(\d+)\s+(-?\d+)\s+(->|<-) (\S+)( \[C\])? \((.*):(-?\d+)\)$")


class Flow(ScriptTool):
    name = "flow"
    script = "flow"
    strlen = 128
    streaming = True
    intervals = False
    summary = "entries and returns indented by depth, per thread, with timestamps"
    description = (
        "Print each Python function entry (->) and return (<-) as it happens, indented by the "
        "thread's call depth, with the time since tracing began and the thread id. A generator "
        "or coroutine enters at each resume and returns at each yield. With --native, calls of C "
        "functions show too, marked [C], with the line that called them, indented below their caller. "
        "Every event passes through the tracer's output buffer: a busy program outruns it, and lost "
        "events are reported."
    )
    examples = """\
examples:
  python -m dtrace flow -c "python3 app.py"      trace a command from its first line
  python -m dtrace flow -p 4711 -d 1             one second of a running process
  python -m dtrace flow -c "python3 app.py" > flow.txt
  python -m dtrace flow --native -p 4711 -d 1    with the C functions called, marked [C]
"""

    def add_arguments(self, parser):
        parser.add_argument("--native", action="store_true",
                            help="also show the calls of C functions (marked [C], with the calling line)")

    def sections(self, args):
        return {"native"} if args.native else set()

    def start(self, args, target, out):
        self.first = None
        self.entries = self.returns = self.native_entries = 0
        self.files: dict[str, int] = {}
        out.write(f"{'TIME(ms)':>10}  {'TID':<7}  FUNCTION\n")

    def on_printf(self, text, out):
        match = EVENT.match(text.rstrip("\n"))
        if match is None:
            return  # the program's column header
        us, tid, depth, arrow, function, native, file, line = match.groups()
        if self.first is None:
            self.first = int(us)
        self.files[file] = self.files.get(file, 0) + 1
        if arrow == "->":
            self.entries += 1
            self.native_entries += bool(native)
        else:
            self.returns += 1
        indent = "  " * max(int(depth) - 1, 0)
        ms = (int(us) - self.first) / 1000
        out.write(f"{ms:10.3f}  {tid:<7}  {indent}{arrow} {report.name(function, self.strlen)}{native or ''} "
                  f"({report.path(report.name(file, self.strlen))}:{line})\n")

    def events_by_file(self):
        return self.files

    def on_lost(self, count, out):
        out.write(f"{'':10}  {'':7}  [{count} events lost here]\n")

    def finish(self, args, out, session):
        native = f" ({self.native_entries} of them calls of C functions)" if args.native else ""
        cut = session.killed or len(session.signals) > 1
        if cut:
            # A second Ctrl-C (or a tracer that had to be killed) stops it at once: what was still
            # in its buffers, entries and returns alike, is not printed (and its lost-events
            # count may never come).
            out.write(f"{'':10}  {'':7}  [the trace was cut here: stopped at once by "
                      f"{'a kill' if session.killed else 'a second Ctrl-C'}; later events are missing]\n")
        out.write(f"{self.entries} entries, {self.returns} returns{native}\n")
        if self.returns > self.entries:
            out.write(f"{self.returns - self.entries} returns without their entry: frames entered before the trace could follow them "
                      f"(depth 0: before tracing began, or before its first return){', or events lost or cut' if cut or session.lost else ''}\n")
        elif self.entries > self.returns:
            out.write(f"{self.entries - self.returns} entries without their return: frames still running when "
                      f"the trace ended{', or events lost or cut' if cut or session.lost else ''}\n")
