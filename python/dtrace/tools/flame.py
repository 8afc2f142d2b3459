"""``flame``: a flame graph of time by Python stack, from entry and return events: an interactive
SVG, a speedscope profile, or folded stacks."""

from __future__ import annotations

import os

from dtrace.tools import flamegraph, report, runner
from dtrace.tools.base import Tool, cut_note
from dtrace.tools.options import FLAME_FORMATS

#: What the times are, said with every report.
TIMES = (
    "The times are wall time from each call's entry to its return, callees included: time the code "
    "waited (I/O, locks, sleep) counts, and so does the probes' own cost per call, so frames that make "
    "many small calls weigh more here than in a sampling profiler's share of CPU samples (py-spy, perf)."
)


class Flame(Tool):
    name = "flame"
    script = "flame"
    aggregate_script = "flame_aggregate"
    strlen = 200
    max_keys = 65536
    intervals = False
    summary = "a flame graph of time by Python stack (SVG, speedscope or folded stacks)"
    description = (
        "Draw a flame graph of the time spent per Python stack, measured from function entries to "
        "returns. The process keeps the call tree itself and reports it to the tracer at each flush, "
        "with no event per call (--per-event: the stacks are aggregated in the kernel from an event per "
        "call and return); no event is lost however busy the program. Write an interactive SVG (open it in a browser: hover for times, click to zoom, "
        "Search to highlight), a speedscope profile (--format speedscope, or -o NAME.json; open it at "
        "https://www.speedscope.app), or folded stacks for flamegraph.pl (--format folded). "
        "The times are wall time from entry to return, callees included: not samples. A frame that "
        "waits (I/O, locks, sleep) counts its waiting, and every traced call adds the probes' own "
        "cost (about a microsecond), so frames that make many small calls weigh more than in a "
        "sampling profiler such as py-spy or perf, whose share is of CPU samples. With --native, the "
        "C functions that Python code calls (builtin functions, methods of builtin types, any callable "
        "that is not Python code) are frames too, marked [C]: leaves, unless they call Python code back."
    )
    examples = """\
examples:
  python -m dtrace flame -c "python3 app.py"                 writes flame.svg
  python -m dtrace flame -p 4711 -d 10 -o app.svg            10 seconds of a running process
  python -m dtrace flame -c "python3 app.py" -o app.speedscope.json   for https://www.speedscope.app
  python -m dtrace flame -c "python3 app.py" --folded > app.folded    for flamegraph.pl
  python -m dtrace flame --native -c "python3 app.py"        with the C functions as leaves
"""
    # flame.bt keeps a node's parent and names in maps of their own; flame.d in one, @names.
    # @native marks the nodes of C functions (--native).
    maps = {"@parent": "d", "@file": "d", "@func": "d", "@time_ns": "d", "@calls": "d", "@names": "ddss",
            "@native": "d"}

    def add_arguments(self, parser):
        parser.add_argument("-o", "--output", metavar="FILE",
                            help="the file to write (default: flame.svg, flame.speedscope.json for speedscope, "
                                 "standard output for folded stacks); checked before tracing starts")
        parser.add_argument("--format", choices=sorted(FLAME_FORMATS),
                            help="svg (interactive), speedscope (JSON), or folded stacks (default: from the "
                                 "suffix of -o: .json is speedscope, .folded is folded; else svg)")
        parser.add_argument("--folded", action="store_true", help="the same as --format folded")
        parser.add_argument("--native", action="store_true",
                            help="add the C functions that Python code calls as frames, marked [C] (per event)")
        parser.add_argument("--per-event", action="store_true",
                            help="fire a probe per call and return and count in the tracer, as before aggregation in the "
                                 "process (slower: a trap per event)")

    def sections(self, args):
        return {"native"} if args.native else set()

    def tree(self, maps) -> flamegraph.Frame:
        """The stack tree, under a root for the whole trace."""
        names = maps.get("@func", {})
        if "@names" in maps:  # the D script: @names[node, parent, file, function]
            for (node, parent, file, func) in maps["@names"]:
                maps.setdefault("@parent", {})[(node,)] = int(parent)
                maps.setdefault("@file", {})[(node,)] = file
                names[(node,)] = func
        native = maps.get("@native", {})
        frames = {}
        for (node,), func in names.items():
            file = maps.get("@file", {}).get((node,), "?")
            label = report.name(func, self.strlen)
            value = maps.get("@time_ns", {}).get((node,), 0)
            calls = maps.get("@calls", {}).get((node,), 0)
            if (node,) in native:  # a C function: no file of its own
                frames[node] = flamegraph.Frame(
                    label=f"{label} [C]", title=f"{label} [C]", name=f"{label} [C]", value=value, calls=calls,
                )
                continue
            frames[node] = flamegraph.Frame(
                label=label,
                title=f"{label} ({report.path(report.name(file, self.strlen))})",
                value=value,
                calls=calls,
                name=label,
                file=report.name(file, self.strlen),
            )
        root = flamegraph.Frame("all", "all")
        for node, frame in frames.items():
            parent = str(maps.get("@parent", {}).get((node,), 0))
            frames.get(parent, root).children.append(frame)
        merge_alike(root)

        # A frame that did not return while tracing has no time of its own: its callees'.
        # (Deep stacks are common: no recursion here.)
        order, todo = [], [root]
        while todo:
            frame = todo.pop()
            order.append(frame)
            todo.extend(frame.children)
        for frame in reversed(order):
            frame.children = [child for child in frame.children if child.value > 0]
            frame.value = max(frame.value, sum(child.value for child in frame.children))

        self.names = [part for (node,), func in names.items() for part in (func, maps.get("@file", {}).get((node,), ""))]
        return root

    def report(self, maps, args, out, label, session):
        root = self.tree(maps)
        if not root.children:
            out.write("no Python function returned while tracing\n")
            return
        total = report.duration(root.value)
        if args.format == "folded":
            text = "\n".join(flamegraph.folded(root)) + "\n"
            if args.output is None:
                out.write(text)
            else:
                self.write(args.output, text)
                out.write(f"wrote {args.output}: folded stacks, {total} of Python time\n")
        elif args.format == "speedscope":
            self.write(args.output, flamegraph.speedscope_json(root, f"Python time by stack ({total} in all)"))
            out.write(f"wrote {args.output}: {len(self.names) // 2} stack nodes, {total} of Python time; "
                      "open it at https://www.speedscope.app\n")
        else:
            title = f"Python time by stack ({total} in all)"
            subtitle = "wall time from entry to return, callees included (not CPU samples); click to zoom"
            self.write(args.output, flamegraph.svg(root, title, subtitle))
            out.write(f"wrote {args.output}: {len(self.names) // 2} stack nodes, {total} "
                      f"of Python time; open it in a browser\n")
        if args.output is None:
            runner.warn(TIMES)  # standard output holds the stacks alone
        else:
            out.write(TIMES + "\n")
        note = cut_note(self.names, self.strlen)
        if note:
            runner.warn(note)

    @staticmethod
    def write(path: str, text: str) -> None:
        with open(path, "w") as f:
            f.write(text)
        if os.geteuid() == 0 and os.environ.get("SUDO_UID"):
            try:
                os.chown(path, int(os.environ["SUDO_UID"]), int(os.environ.get("SUDO_GID", "-1")))
            except OSError:
                pass


def merge_alike(root: flamegraph.Frame) -> None:
    """Siblings with the same title become one frame, as flamegraph.pl merges equal stacks: two
    nodes can name the same function (a C function whose names pydtrace-rs worked out again after
    its cache slot was taken has a new name pointer, so a new node)."""
    todo = [root]
    while todo:
        frame = todo.pop()
        merged: dict[str, flamegraph.Frame] = {}
        for child in frame.children:
            same = merged.get(child.title)
            if same is None:
                merged[child.title] = child
            else:
                same.value += child.value
                same.calls += child.calls
                same.children.extend(child.children)
        frame.children = list(merged.values())
        todo.extend(frame.children)
