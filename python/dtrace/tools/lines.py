"""``lines``: the hottest lines."""

from __future__ import annotations

from dtrace.tools.command.base import ScriptTool, cut_note
from dtrace.tools.render import report


class Lines(ScriptTool):
    name = "lines"
    script = "lines"
    aggregate_script = "lines_aggregate"
    summary = "the hottest lines"
    description = (
        "Count the Python lines executed, per file, line and function, hottest first. "
        "A loop's `for` line counts once per iteration and once more to end the loop. "
        "The process counts the lines itself and reports the counts to the tracer at each flush; "
        "with --per-event the line probe fires for every line, and the traced program runs several "
        "times slower."
    )
    examples = """\
examples:
  python -m dtrace lines -p 4711 -d 5            the hottest lines over 5 seconds
  python -m dtrace lines -c "python3 app.py"     trace a command from its first line
  python -m dtrace lines -n 50 -p 4711           the 50 hottest lines
"""
    maps = {"@lines": "ssd"}
    event_maps = ("@lines",)

    def add_arguments(self, parser):
        parser.add_argument("-n", "--top", type=int, default=20, metavar="N",
                            help="show the N hottest lines; 0 for all (default: %(default)s)")
        parser.add_argument("--per-event", action="store_true",
                            help="fire a probe per line and count in the tracer, as before aggregation in the "
                                 "process (slower: a trap per event)")

    def report(self, maps, args, out, label, session):
        lines = maps.get("@lines", {})
        if label:
            out.write(f"\n{label}\n")
        if not lines:
            out.write("no Python lines seen\n")
            return
        keys = sorted(lines, key=lambda k: (-lines[k], k[0], int(k[2])))
        shown, hidden = report.top(keys, args.top)
        rows = [[lines[k], f"{report.path(report.name(k[0], self.strlen))}:{k[2]}", report.name(k[1], self.strlen)]
                for k in shown]
        report.table(out, ["COUNT", "LINE", "FUNCTION"], rows, left=["LINE", "FUNCTION"])
        out.write(f"{sum(lines.values())} lines executed, {len(lines)} distinct")
        out.write(f"; {hidden} not shown (-n 0 shows all)\n" if hidden else "\n")
        note = cut_note([part for k in lines for part in k[:2]], self.strlen)
        if note:
            out.write(note + "\n")
