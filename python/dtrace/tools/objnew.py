"""``objnew``: instances created per class and file."""

from __future__ import annotations

from dtrace.tools import report
from dtrace.tools.base import Tool, cut_note


class ObjNew(Tool):
    name = "objnew"
    script = "objnew"
    summary = "instances created per class and file"
    description = "Count the instances of Python classes created, per class and the file that defines it."
    examples = """\
examples:
  python -m dtrace objnew -p 4711                count instances until Ctrl-C
  python -m dtrace objnew -c "python3 app.py"    trace a command from its first line
  python -m dtrace objnew -i 5 -p 4711           a table every 5 seconds
"""
    maps = {"@instances": "ss"}

    def add_arguments(self, parser):
        parser.add_argument("-n", "--top", type=int, default=20, metavar="N",
                            help="show the N classes with the most instances; 0 for all (default: %(default)s)")

    def report(self, maps, args, out, label, session):
        instances = maps.get("@instances", {})
        if label:
            out.write(f"\n{label}\n")
        if not instances:
            out.write("no instances created\n")
            return
        keys = sorted(instances, key=lambda k: (-instances[k], k[1], k[0]))
        shown, hidden = report.top(keys, args.top)
        rows = [[instances[k], report.name(k[1], self.strlen), report.path(report.name(k[0], self.strlen))]
                for k in shown]
        report.table(out, ["INSTANCES", "CLASS", "FILE"], rows, left=["CLASS", "FILE"])
        out.write(f"{sum(instances.values())} instances of {len(instances)} classes")
        out.write(f"; {hidden} classes not shown (-n 0 shows all)\n" if hidden else "\n")
        note = cut_note([part for k in instances for part in k], self.strlen)
        if note:
            out.write(note + "\n")
