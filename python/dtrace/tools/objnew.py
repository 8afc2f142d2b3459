"""``objnew``: instances created per class and file."""

from __future__ import annotations

from dtrace.tools.command.base import ScriptTool, cut_note
from dtrace.tools.render import report


class ObjNew(ScriptTool):
    name = "objnew"
    script = "objnew"
    summary = "instances created per class and file (calls of Python classes from Python code)"
    description = (
        "Count the instances of Python classes created, per class and the file that defines it. "
        "Precisely, it counts instance__new__start: each call of a Python class (one made by a "
        "class statement or type()) from Python code, Cls(...), before __new__ runs. For an ordinary "
        "class that is one new instance per call. A call that returns an existing object counts too, "
        "although no instance is made: an Enum lookup such as Color(1), a class whose __new__ or "
        "metaclass __call__ returns a cached instance. Instances made by C code (copy.copy, pickle, "
        "map(Cls, items), functools.partial(Cls)()) are not counted, nor are instances of builtin and "
        "extension types."
    )
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
