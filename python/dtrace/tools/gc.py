"""``gc``: garbage collections per generation, with a histogram of their pause times."""

from __future__ import annotations

from dtrace.tools.command.base import ScriptTool
from dtrace.tools.render import report


class GC(ScriptTool):
    name = "gc"
    script = "gc"
    strlen = 64  # the program reads no strings
    summary = "collections per generation and a histogram of their pauses"
    description = (
        "Count garbage collections per generation, with their total, average and longest pause, the "
        "objects they collected, and a histogram of pause times in microseconds per generation."
    )
    examples = """\
examples:
  python -m dtrace gc -p 4711                    until Ctrl-C
  python -m dtrace gc -c "python3 app.py"        trace a command from its first line
  python -m dtrace gc -i 10 -p 4711              a report every 10 seconds
"""
    maps = {"@pauses": "d", "@total_us": "d", "@longest_us": "d", "@collected": "d", "@pause_us": "d"}
    hists = frozenset({"@pause_us"})

    def report(self, maps, args, out, label, session):
        pauses = maps.get("@pauses", {})
        if label:
            out.write(f"\n{label}\n")
        if not pauses:
            out.write("no garbage collections seen\n")
            return
        generations = sorted(pauses, key=lambda k: int(k[0]))
        rows = []
        for g in generations:
            count, total = pauses[g], maps.get("@total_us", {}).get(g, 0)
            rows.append([g[0], count, report.duration(total * 1000), report.duration(total * 1000 / count),
                         report.duration(maps.get("@longest_us", {}).get(g, 0) * 1000),
                         maps.get("@collected", {}).get(g, 0)])
        report.table(out, ["GENERATION", "COLLECTIONS", "TOTAL", "AVERAGE", "LONGEST", "COLLECTED"], rows)
        for g in generations:
            out.write(f"\npause (us), generation {g[0]}:\n")
            report.histogram(out, maps.get("@pause_us", {}).get(g, []))
