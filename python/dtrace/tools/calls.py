"""``calls``: calls per function (file, qualified name, count); with --latency, their time."""

from __future__ import annotations

from dtrace.tools.command.base import ScriptTool, cut_note
from dtrace.tools.render import report


class Calls(ScriptTool):
    name = "calls"
    script = "calls"
    aggregate_script = "calls_aggregate"
    summary = "calls per function, with --latency their total and average time"
    description = (
        "Count Python function calls per file and function (co_qualname), most called first. "
        "With --latency, also the total and average time from entry to return, callees included "
        "(a recursive function counts its nested calls again), sorted by total time. "
        "A generator or coroutine counts once per resume. With --native, also the calls of C "
        "functions (builtin functions, methods of builtin types, any callable that is not Python "
        "code) per caller, the file and line that called them, timed too with --latency. "
        "The process counts (and times) the calls itself and reports them to the tracer at each flush, "
        "with no event per call; --per-event (and --native) trace each call instead."
    )
    examples = """\
examples:
  python -m dtrace calls -p 4711                 count calls until Ctrl-C
  python -m dtrace calls -c "python3 app.py"     trace a command from its first line
  python -m dtrace calls -L -n 10 -d 5 -p 4711   top 10 by time, for 5 seconds
  python -m dtrace calls -i 1 -p 4711            a table per second
  python -m dtrace calls --native -L -p 4711     with the C functions and their callers, timed
  python -m dtrace calls --per-event -p 4711     a probe per call, counted by the tracer
  python -m dtrace calls --script                print the bpftrace program
"""
    maps = {"@calls": "ss", "@time_ns": "ss", "@ccalls": "ssd", "@ctime_ns": "ssd"}
    event_maps = ("@calls", "@ccalls")

    def add_arguments(self, parser):
        parser.add_argument("-L", "--latency", action="store_true",
                            help="also time the calls (total and average, callees included)")
        parser.add_argument("-n", "--top", type=int, default=20, metavar="N",
                            help="show the N most called (or, with --latency, slowest) functions; 0 for all "
                                 "(default: %(default)s)")
        parser.add_argument("--native", action="store_true",
                            help="also count (and with --latency time) the C functions Python code calls, "
                                 "per calling line (per event)")
        parser.add_argument("--per-event", action="store_true",
                            help="fire a probe per call and count in the tracer, as before aggregation in the "
                                 "process (slower: a trap per event)")

    def sections(self, args):
        keep = {"latency"} if args.latency else {"count"}
        if args.native:
            keep |= {"native", "native_latency"} if args.latency else {"native"}
        return keep

    def report(self, maps, args, out, label, session):
        if label:
            out.write(f"\n{label}\n")
        names = self.report_python(maps, args, out)
        if args.native:
            names += self.report_native(maps, args, out)
        note = cut_note(names, self.strlen)
        if note:
            out.write(note + "\n")

    def report_python(self, maps, args, out) -> list[str]:
        """The Python functions; returns the names shown, for the cut note."""
        calls = maps.get("@calls", {})
        if not calls:
            out.write("no Python function calls seen\n")
            return []
        hidden = self._table(out, args, calls, maps.get("@time_ns", {}), ["FUNCTION", "FILE"],
                             lambda k: report.path(report.name(k[0], self.strlen)))
        total = sum(calls.values())
        out.write(f"{total} calls of {len(calls)} functions")
        out.write(f"; {hidden} functions not shown (-n 0 shows all)\n" if hidden else "\n")
        if args.latency:
            out.write("TOTAL: from entry to return, callees included; a caller's time holds its callees' (and a "
                      "recursive call's, its own again): the column adds up to more than the time traced\n")
        return [part for k in calls for part in k]

    def report_native(self, maps, args, out) -> list[str]:
        """The C functions, per calling line; returns the names shown, for the cut note."""
        calls = maps.get("@ccalls", {})
        out.write("\n")
        if not calls:
            out.write("no C function calls seen\n")
            return []
        hidden = self._table(out, args, calls, maps.get("@ctime_ns", {}), ["C FUNCTION", "CALLED FROM"],
                             lambda k: f"{report.path(report.name(k[0], self.strlen))}:{k[2]}")
        functions = len({k[1] for k in calls})
        out.write(f"{sum(calls.values())} calls of {functions} C functions from {len(calls)} lines")
        out.write(f"; {hidden} not shown (-n 0 shows all)\n" if hidden else "\n")
        return [part for k in calls for part in k[:2]]

    def _table(self, out, args, calls, times, names, where) -> int:
        """The most called (with --latency: slowest) keys (file, function, ...), each with its
        calls (and total and average time), its function and ``where(key)``, under the headers
        ``names`` of those two columns; returns how many were not shown."""
        keys = sorted(calls, key=lambda k: (-times.get(k, 0), -calls[k], k) if args.latency else (-calls[k], k))
        shown, hidden = report.top(keys, args.top)
        headers = ["CALLS", "TOTAL", "AVERAGE", *names] if args.latency else ["CALLS", *names]
        rows = []
        for k in shown:
            total = times.get(k, 0)
            timing = [report.duration(total), report.duration(total / calls[k])] if args.latency else []
            rows.append([calls[k], *timing, report.name(k[1], self.strlen), where(k)])
        report.table(out, headers, rows, left=names)
        return hidden
