"""``calls``: calls per function (file, qualified name, count); with --latency, their time."""

from __future__ import annotations

from dtrace.tools import report
from dtrace.tools.base import Tool, cut_note


class Calls(Tool):
    name = "calls"
    script = "calls"
    summary = "calls per function, with --latency their total and average time"
    description = (
        "Count Python function calls per file and function (co_qualname), most called first. "
        "With --latency, also the total and average time from entry to return, callees included "
        "(a recursive function counts its nested calls again), sorted by total time. "
        "A generator or coroutine counts once per resume."
    )
    examples = """\
examples:
  python -m dtrace calls -p 4711                 count calls until Ctrl-C
  python -m dtrace calls -c "python3 app.py"     trace a command from its first line
  python -m dtrace calls -L -n 10 -d 5 -p 4711   top 10 by time, for 5 seconds
  python -m dtrace calls -i 1 -p 4711            a table per second
  python -m dtrace calls --script                print the bpftrace program
"""
    maps = {"@calls": "ss", "@time_ns": "ss"}

    def add_arguments(self, parser):
        parser.add_argument("-L", "--latency", action="store_true",
                            help="also time the calls (total and average, callees included)")
        parser.add_argument("-n", "--top", type=int, default=20, metavar="N",
                            help="show the N most called (or, with --latency, slowest) functions; 0 for all "
                                 "(default: %(default)s)")

    def sections(self, args):
        return {"latency"} if args.latency else set()

    def report(self, maps, args, out, label, session):
        calls = maps.get("@calls", {})
        times = maps.get("@time_ns", {})
        if label:
            out.write(f"\n{label}\n")
        if not calls:
            out.write("no Python function calls seen\n")
            return
        keys = sorted(calls, key=lambda k: (-times.get(k, 0), -calls[k], k) if args.latency else (-calls[k], k))
        shown, hidden = report.top(keys, args.top)
        if args.latency:
            headers = ["CALLS", "TOTAL", "AVERAGE", "FUNCTION", "FILE"]
            rows = [
                [calls[k], report.duration(times.get(k, 0)), report.duration(times.get(k, 0) / calls[k]),
                 report.name(k[1], self.strlen), report.path(report.name(k[0], self.strlen))]
                for k in shown
            ]
        else:
            headers = ["CALLS", "FUNCTION", "FILE"]
            rows = [[calls[k], report.name(k[1], self.strlen), report.path(report.name(k[0], self.strlen))]
                    for k in shown]
        report.table(out, headers, rows, left=["FUNCTION", "FILE"])
        total = sum(calls.values())
        out.write(f"{total} calls of {len(calls)} functions")
        out.write(f"; {hidden} functions not shown (-n 0 shows all)\n" if hidden else "\n")
        note = cut_note([part for k in calls for part in k], self.strlen)
        if note:
            out.write(note + "\n")
