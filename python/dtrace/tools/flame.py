"""``flame``: a flame graph of time by Python stack, from entry and return events: an interactive
SVG, a speedscope profile, or folded stacks."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from dtrace.tools.command.base import ScriptTool, cut_note
from dtrace.tools.errors import UsageError, warn
from dtrace.tools.proc import pystack
from dtrace.tools.render import flamegraph, report

#: flame's output formats, and the file each writes when -o is not given (None: standard output).
FLAME_FORMATS = {"svg": "flame.svg", "speedscope": "flame.speedscope.json", "folded": None}

#: What the times are, said with every report.
TIMES = (
    "The times are wall time from each call's entry to its return, callees included: time the code "
    "waited (I/O, locks, sleep) counts, and so does the probes' own cost per call, so frames that make "
    "many small calls weigh more here than in a sampling profiler's share of CPU samples (py-spy, perf)."
)
#: What the values are with --sample.
SAMPLES = (
    "These are samples: each counts a thread found running on a CPU, at the rate asked for, with the Python "
    "stack read from its frames (code waiting for I/O, locks or sleep is not on a CPU and is not sampled). "
    "A frame's share is its share of the samples, an estimate that is better the more samples there are."
)


class Flame(ScriptTool):
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
  python -m dtrace flame --sample -p 4711 -d 10              samples at 99 Hz, any Python 3.12+ process
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
        parser.add_argument("--sample", nargs="?", type=int, const=99, metavar="HZ",
                            help="sample the on-CPU Python stacks HZ times a second per CPU (default 99), read "
                                 "from the frames: no Python probe is enabled, and -p works on any Python 3.12+ "
                                 "process (bpftrace)")
        parser.add_argument("--depth", type=int, default=pystack.DEFAULT_DEPTH, metavar="N",
                            help="with --sample: frames read per stack (default: %(default)s)")

    def check_options(self, options):
        """The format and the file to write, settled; the file checked before tracing starts."""
        fmt, output = flame_output(options.output, options.format, options.folded)
        if output is not None and not options.script:
            check_writable(output)
        return replace(options, output=output, format=fmt)

    def aggregated(self, args, dialect):
        # Samples are read from the frames: nothing to count in the process.
        return getattr(args, "sample", None) is None and super().aggregated(args, dialect)

    def program(self, args, dialect):
        self.sampling = getattr(args, "sample", None) is not None
        if not self.sampling:
            return super().program(args, dialect)
        if dialect != "bt":
            raise UsageError("--sample reads the frames with bpftrace (Linux)")
        if args.native:
            raise UsageError("--sample and --native cannot be combined: the samples hold Python frames only")
        if not 1 <= args.sample <= 10000:
            raise UsageError(f"--sample {args.sample}: give a rate of 1 to 10000 Hz")
        if not 1 <= args.depth <= pystack.MAX_DEPTH:
            raise UsageError(f"--depth {args.depth}: give 1 to {pystack.MAX_DEPTH}")
        if getattr(args, "scope_modules", None) or getattr(args, "scope_files", None):
            raise UsageError("--module and --file scope the entry/return events, not --sample's frames")
        if getattr(args, "children", False):
            # Each child would need the walk bound to its own frame layout (command/base.py, _trace_child).
            raise UsageError("--children reads no child's frames: without --sample, flame traces the children")
        text = pystack.stack_program(f"profile:hz:{args.sample}",
                                     f"samples of the Python stacks at {args.sample} Hz", args.depth)
        return text + (self._duration_clause(args.duration, dialect) if args.duration else "")

    def arguments(self, target):
        return [str(target.pid)] if self.sampling else []  # the walk's predicate: pid == $1

    def start(self, args, target, out):
        self.resolver = pystack.Resolver(target.pid, self.layout) if self.sampling else None

    def on_printf(self, text, out):
        if self.sampling:
            pystack.on_printf(text, self.resolver)

    def sampled_tree(self, maps) -> tuple[flamegraph.Frame, int]:
        """The tree of the sampled stacks (values: samples), and the samples outside Python code."""
        counted, broken = pystack.count_stacks(maps, self.resolver)
        self.resolver.close()
        root, outside = flamegraph.Frame("all", "all"), broken
        self.names = []
        for frames, count in counted.items():
            if frames[0].qualname in (pystack.MARKERS[pystack.NO_THREAD], pystack.MARKERS[pystack.NO_FRAME]):
                outside += count
                continue
            node = root
            root.value += count
            for frame in reversed(frames):  # outermost first
                title = f"{frame.qualname} ({report.path(frame.file)})" if frame.file else frame.qualname
                child = next((c for c in node.children if c.title == title), None)
                if child is None:
                    child = flamegraph.Frame(label=frame.qualname, title=title, name=frame.qualname,
                                             file=frame.file)
                    node.children.append(child)
                    self.names += [frame.qualname, frame.file]
                child.value += count
                node = child
        return root, outside

    def report_samples(self, maps, args, out) -> None:
        root, outside = self.sampled_tree(maps)
        samples = int(root.value)
        said = f"{samples} samples of Python stacks at {args.sample} Hz" + (
            f" ({outside} more found the thread outside Python code)" if outside else "")
        if not samples:
            out.write(f"no sample found Python code running ({outside} outside it)\n")
            return
        self.emit(root, args, out, said, said,
                  lambda: flamegraph.speedscope_json(root, f"Python stacks, {said}", unit="none"),
                  lambda: flamegraph.svg(root, f"Python stacks on CPU: {samples} samples at {args.sample} Hz",
                                         "samples of the threads running on a CPU, stacks read from the "
                                         "frames; click to zoom", unit="samples"),
                  SAMPLES)

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
        if self.sampling:
            self.report_samples(maps, args, out)
            return
        root = self.tree(maps)
        if not root.children:
            out.write("no Python function returned while tracing\n")
            return
        total = report.duration(root.value)
        title = f"Python time by stack ({total} in all)"
        self.emit(root, args, out, f"{total} of Python time",
                  f"{len(self.names) // 2} stack nodes, {total} of Python time",
                  lambda: flamegraph.speedscope_json(root, title),
                  lambda: flamegraph.svg(root, title, "wall time from entry to return, callees included "
                                                      "(not CPU samples); click to zoom"),
                  TIMES)
        note = cut_note(self.names, self.strlen)
        if note:
            warn(note)

    def emit(self, root: flamegraph.Frame, args, out, folded_said: str, said: str,
             speedscope: Callable[[], str], svg: Callable[[], str], note: str) -> None:
        """The tree in the format asked for: folded stacks (on standard output, or the file ``-o``
        names), a speedscope profile or an SVG; then ``note``, which says what the values are (on
        stderr when standard output holds the stacks alone). ``folded_said`` and ``said`` sum up what
        was written, for folded stacks and for the other formats."""
        if args.format == "folded":
            text = "\n".join(flamegraph.folded(root)) + "\n"
            if args.output is None:
                out.write(text)
            else:
                self.write(args.output, text)
                out.write(f"wrote {args.output}: folded stacks, {folded_said}\n")
        elif args.format == "speedscope":
            self.write(args.output, speedscope())
            out.write(f"wrote {args.output}: {said}; open it at https://www.speedscope.app\n")
        else:
            self.write(args.output, svg())
            out.write(f"wrote {args.output}: {said}; open it in a browser\n")
        if args.output is None:
            warn(note)
        else:
            out.write(note + "\n")

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


def flame_output(output: str | None, chosen: str | None, folded: bool) -> tuple[str, str | None]:
    """flame's format and output file: --format, --folded, or the suffix of -o (.json: speedscope,
    .folded: folded stacks, anything else: SVG); without -o, the format's default file."""
    if folded and chosen not in (None, "folded"):
        raise UsageError(f"--folded and --format {chosen} disagree: give one of them")
    fmt = "folded" if folded else chosen
    suffix = Path(output).suffix.lower() if output else ""
    by_suffix = {".svg": "svg", ".json": "speedscope", ".folded": "folded"}
    if suffix and suffix not in by_suffix and fmt is None:
        raise UsageError(f"-o {output}: flame writes SVG (.svg), speedscope JSON (.json) or folded stacks "
                         f"(.folded), not {suffix[1:].upper()}; name the file for one of them, or give --format "
                         "(a browser can save the SVG as an image)")
    if fmt is None:
        name = (output or "").lower()
        fmt = "speedscope" if name.endswith(".json") else "folded" if name.endswith(".folded") else "svg"
    return fmt, output if output is not None else FLAME_FORMATS[fmt]


def check_writable(path: str) -> None:
    """UsageError unless a file can be written at ``path`` (checked before tracing starts, so
    that no trace is lost to a typo)."""
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"-o {path} is a directory: give a file name, e.g. -o {target / 'flame.svg'}")
    directory = target.parent
    if not directory.is_dir():
        raise UsageError(f"-o {path}: there is no directory {directory}: create it, or write elsewhere")
    existed = target.exists()
    try:
        with open(target, "a"):
            pass
    except OSError as error:
        raise UsageError(f"-o {path}: cannot write it ({error.strerror}): write elsewhere") from None
    if not existed:
        target.unlink()
