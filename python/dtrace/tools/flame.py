"""``flame``: an SVG flame graph of time by Python stack, from entry and return events."""

from __future__ import annotations

import os

from dtrace.tools import flamegraph, report, runner
from dtrace.tools.base import Tool, cut_note


class Flame(Tool):
    name = "flame"
    script = "flame"
    strlen = 200
    max_keys = 65536
    intervals = False
    summary = "an SVG flame graph of time by Python stack"
    description = (
        "Draw a flame graph of the time spent per Python stack, measured from function entries to "
        "returns (wall time, callees included: not a sample). The stacks are aggregated in the "
        "kernel, so no event is lost however busy the program. Write the SVG (open it in a browser; "
        "hover for times), or with --folded the stacks in the folded format of flamegraph.pl and "
        "speedscope. With --native, the C functions that Python code calls (builtin functions, "
        "methods of builtin types, any callable that is not Python code) are frames too, marked [C]: "
        "leaves, unless they call Python code back."
    )
    examples = """\
examples:
  python -m dtrace flame -c "python3 app.py"               writes flame.svg
  python -m dtrace flame -p 4711 -d 10 -o app.svg          10 seconds of a running process
  python -m dtrace flame -c "python3 app.py" --folded > app.folded
  python -m dtrace flame --native -c "python3 app.py"      with the C functions as leaves
"""
    # flame.bt keeps a node's parent and names in maps of their own; flame.d in one, @names.
    # @native marks the nodes of C functions (--native).
    maps = {"@parent": "d", "@file": "d", "@func": "d", "@time_ns": "d", "@calls": "d", "@names": "ddss",
            "@native": "d"}

    def add_arguments(self, parser):
        parser.add_argument("-o", "--output", default="flame.svg", metavar="FILE",
                            help="where to write the SVG (default: %(default)s)")
        parser.add_argument("--folded", action="store_true",
                            help="print folded stacks (\"a;b;c NANOSECONDS\") instead of an SVG")
        parser.add_argument("--native", action="store_true",
                            help="add the C functions that Python code calls as frames, marked [C]")

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
            frames[node] = flamegraph.Frame(
                label=f"{label} [C]" if (node,) in native else label,
                title=f"{label} [C]" if (node,) in native else
                f"{label} ({report.path(report.name(file, self.strlen))})",
                value=maps.get("@time_ns", {}).get((node,), 0),
                calls=maps.get("@calls", {}).get((node,), 0),
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

    def folded(self, root: flamegraph.Frame) -> list[str]:
        """Folded stacks: ``frame;frame;frame SELF_NANOSECONDS``, one line per stack with time of its own."""
        lines, todo = [], [(child, [child.title]) for child in root.children]
        while todo:
            frame, path = todo.pop()
            own = frame.value - sum(child.value for child in frame.children)
            if own > 0:
                lines.append(f"{';'.join(path)} {own:.0f}")
            todo.extend((child, path + [child.title]) for child in frame.children)
        return sorted(lines)

    def report(self, maps, args, out, label, session):
        root = self.tree(maps)
        if not root.children:
            out.write("no Python function returned while tracing\n")
            return
        if args.folded:
            out.write("\n".join(self.folded(root)) + "\n")
        else:
            title = f"Python time by stack ({report.duration(root.value)} in all)"
            with open(args.output, "w") as f:
                f.write(flamegraph.svg(root, title))
            out.write(f"wrote {args.output}: {len(self.names) // 2} stack nodes, {report.duration(root.value)} "
                      f"of Python time; open it in a browser\n")
            if os.geteuid() == 0 and os.environ.get("SUDO_UID"):
                try:
                    os.chown(args.output, int(os.environ["SUDO_UID"]), int(os.environ.get("SUDO_GID", "-1")))
                except OSError:
                    pass
        note = cut_note(self.names, self.strlen)
        if note:
            runner.warn(note)


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
