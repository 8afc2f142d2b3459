"""``objdel``: a histogram of deletion times, a cascade counting as one deletion."""

from __future__ import annotations

from dtrace.tools.command.base import ScriptTool
from dtrace.tools.render import report


class ObjDel(ScriptTool):
    name = "objdel"
    script = "objdel"
    strlen = 64  # the program reads no strings
    summary = "a histogram of deletion times, a cascade counting as one"
    description = (
        "Time the deletion of Python instances and print a power-of-two histogram in nanoseconds. "
        "An instance whose deletion deletes others (a cascade: a tree, a list of instances) counts as "
        "one deletion, timed from its start to its end."
    )
    examples = """\
examples:
  python -m dtrace objdel -p 4711                until Ctrl-C
  python -m dtrace objdel -c "python3 app.py"    trace a command from its first line
"""
    maps = {"@deletion_ns": "", "@instances": ""}
    hists = frozenset({"@deletion_ns"})

    def report(self, maps, args, out, label, session):
        buckets = maps.get("@deletion_ns", {}).get((), [])
        instances = maps.get("@instances", {}).get((), 0)
        if label:
            out.write(f"\n{label}\n")
        deletions = report.buckets_total(buckets)
        if not deletions:
            out.write("no instances deleted\n")
            return
        out.write("deletion time (ns), a cascade counting as one:\n")
        report.histogram(out, buckets)
        out.write(f"{deletions} deletions, of {instances} instances in all\n")
