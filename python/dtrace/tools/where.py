"""``where FUNC``: the Python stacks that lead to a native function, counted."""

from __future__ import annotations

import re
from collections import Counter

from dtrace.tools.command.base import ScriptTool, cut_note
from dtrace.tools.errors import UsageError
from dtrace.tools.proc import procfs, pystack
from dtrace.tools.render import report

#: The bundled scripts' native probe and how they name it.
SCRIPT_PROBE = {"bt": "uprobe:libc:connect", "d": "pid$target::connect:entry"}
PROBE_TYPES = ("uprobe:", "uretprobe:", "usdt:", "kprobe:", "kretprobe:", "kfunc:", "kretfunc:", "tracepoint:",
               "rawtracepoint:", "pid", "syscall:", "fbt:")
#: The most frames the scripts print per stack.
MAX_FRAMES = 100
#: How a frame that was already running when tracing began is marked.
RUNNING_BEFORE = "(running since before tracing began; its callers are not known)"
#: Probe types that attach to nothing, silently, when the function does not exist (bpftrace 0.17).
SILENT_TYPES = ("uprobe:", "uretprobe:")


def native_probe(function: str, dialect: str) -> str:
    """FUNC as the dialect's probe: ``connect`` (in libc), ``LIBRARY:FUNCTION``, or a probe as is."""
    if not re.fullmatch(r"[\w$.:/+@*-]+", function):
        raise UsageError(f"{function!r} is not a function or probe: give a libc function (connect), "
                         "LIBRARY:FUNCTION, or a tracer probe (uprobe:..., kprobe:...)")
    if function.startswith(PROBE_TYPES):
        return function
    if ":" in function:
        library, name = function.rsplit(":", 1)
        return f"uprobe:{library}:{name}" if dialect == "bt" else f"pid$target:{library}:{name}:entry"
    return f"uprobe:libc:{function}" if dialect == "bt" else f"pid$target::{function}:entry"


class Where(ScriptTool):
    name = "where"
    script = "where"
    strlen = 200
    intervals = False
    summary = "Python stacks that lead to a native function (e.g. connect), counted"
    description = (
        "Count the Python stacks (file:line function, innermost first) from which a native "
        "function is called: FUNC in libc (connect, open, write, ...), LIBRARY:FUNCTION for another "
        "library, or a whole tracer probe (uprobe:..., kprobe:..., tracepoint:...). The stack is read "
        "from the interpreter's own frames when FUNC is called (bpftrace, CPython 3.12+): no Python probe "
        "is enabled, so the program pays nothing per Python call, and -p works on any Python process, "
        "whether or not it imported dtrace. --trace-calls keeps each thread's stack from the entry, "
        "return and line probes instead (the way of DTrace platforms); of the frames entered before "
        "tracing began (-p), the one running below the others is then shown, marked, from its line "
        "events (not with --no-lines); its callers are not known."
    )
    examples = """\
examples:
  python -m dtrace where connect -c "python3 app.py"   who opens the connections
  python -m dtrace where connect -p 4711
  python -m dtrace where write -p 4711 -d 10           who writes, for 10 seconds
  python -m dtrace where /usr/lib/x86_64-linux-gnu/libssl.so.3:SSL_write -p 4711
  python -m dtrace where kprobe:tcp_sendmsg -p 4711    a kernel function, from the process's threads
  python -m dtrace where connect -p 4711 --trace-calls   from entry/return events (needs dtrace loaded)
"""

    def add_arguments(self, parser):
        parser.add_argument("function", metavar="FUNC",
                            help="a libc function (connect), LIBRARY:FUNCTION, or a tracer probe")
        parser.add_argument("--trace-calls", action="store_true",
                            help="rebuild the stacks from function entry/return (and line) events instead of "
                                 "reading the frames: every Python call then costs a probe")
        parser.add_argument("--no-lines", action="store_true",
                            help="with --trace-calls: do not follow lines (cheaper): frames show the line they "
                                 "were entered at")
        parser.add_argument("--depth", type=int, default=pystack.DEFAULT_DEPTH, metavar="N",
                            help="frames read per stack, innermost first (default: %(default)s); deeper "
                                 "stacks end in a marker")
        parser.add_argument("-n", "--top", type=int, default=10, metavar="N",
                            help="show the N most frequent stacks; 0 for all (default: %(default)s)")

    def sections(self, args):
        return set() if args.no_lines else {"lines"}

    def walking(self, args, dialect) -> bool:
        """Whether the stacks are read from the frames (else rebuilt from entry/return events)."""
        return dialect == "bt" and not args.trace_calls

    def program(self, args, dialect):
        self.walk = self.walking(args, dialect)
        if not self.walk:
            return super().program(args, dialect)
        if not 1 <= args.depth <= pystack.MAX_DEPTH:
            raise UsageError(f"--depth {args.depth}: give 1 to {pystack.MAX_DEPTH}")
        if getattr(args, "scope_modules", None) or getattr(args, "scope_files", None):
            raise UsageError("--module and --file scope the entry/return events: give them with --trace-calls "
                             "(the frames are read whole)")
        if getattr(args, "children", False):
            # Each child would need the walk bound to its own frame layout; a child's tracer
            # runs the parent's program (command/base.py, _trace_child).
            raise UsageError("--children reads no child's frames: give it with --trace-calls")
        self.what = args.function if ":" in args.function else f"{args.function}()"
        text = pystack.stack_program(native_probe(args.function, dialect), f"the Python stacks that call {self.what}",
                                     args.depth)
        return text + (self._duration_clause(args.duration, dialect) if args.duration else "")

    def customize(self, program, args, dialect):
        probe = native_probe(args.function, dialect)
        self.what = args.function if ":" in args.function else f"{args.function}()"
        program = program.replace(SCRIPT_PROBE[dialect], probe)
        return program.replace("that call connect()", f"that call {self.what}")

    def check(self, options, tracer):
        # bpftrace 0.17 attaches a uprobe to a function that does not exist to nothing, and
        # runs: the trace would say "not called". Ask it first (in the process's libraries
        # with -p; in this system's with -c).
        probe = native_probe(options.function, tracer.dialect)
        if not probe.startswith(SILENT_TYPES):
            return
        if options.pid is not None:
            procfs.check_running(options.pid)  # before asking about its libraries
        listed = tracer.list_probes(probe, options.pid)
        if listed is not None and not listed:
            where = f"process {options.pid}" if options.pid is not None else "this system"
            raise UsageError(
                f"{options.function} resolves to no probe in {where} ({probe}): give a function of libc "
                f"(connect, write, ...), LIBRARY:FUNCTION, or a probe; `bpftrace -l '{probe.rsplit(':', 1)[0]}:*'` "
                "lists them"
            )

    def arguments(self, target):
        return [str(target.pid)]

    def start(self, args, target, out):
        self.stacks: dict[tuple[str, str], dict] = {}
        self.order: list[tuple[str, str]] = []
        self.resolver = pystack.Resolver(target.pid, self.layout) if self.walk else None

    def on_printf(self, text, out):
        if self.walk:
            pystack.on_printf(text, self.resolver)
            return
        words = text.rstrip("\n").split(" ", 5)
        if len(words) < 4:
            return
        kind, tid, call = words[0], words[1], words[2]
        key = (tid, call)
        if kind == "stack":
            self.stacks[key] = {"depth": int(words[3]), "frames": {}, "funcs": {}}
            self.order.append(key)
        elif kind == "frame" and key in self.stacks and len(words) == 6:
            self.stacks[key]["frames"][int(words[3])] = (words[5], words[4])
        elif kind == "func" and key in self.stacks:
            self.stacks[key]["funcs"][int(words[3])] = text.rstrip("\n").split(" ", 4)[4]
        elif kind == "base" and key in self.stacks:
            # base TID CALL LINE FILE: the frame below, running since before tracing began
            self.stacks[key]["base"] = text.rstrip("\n").split(" ", 4)[4], words[3]
        elif kind == "basefunc" and key in self.stacks:
            self.stacks[key]["basefunc"] = text.rstrip("\n").split(" ", 3)[3]

    def report(self, maps, args, out, label, session):
        if self.walk:
            self.report_walked(maps, args, out)
            return
        counted: Counter[tuple] = Counter()
        incomplete = 0
        names = []
        for key in self.order:
            stack = self.stacks[key]
            shown = min(stack["depth"], MAX_FRAMES)
            if any(i not in stack["frames"] or i not in stack["funcs"] for i in range(shown)):
                incomplete += 1
                continue
            if ("base" in stack) != ("basefunc" in stack):
                incomplete += 1
                continue
            frames = tuple((stack["frames"][i][0], stack["frames"][i][1], stack["funcs"][i]) for i in range(shown))
            base = (*stack["base"], stack["basefunc"]) if "base" in stack else None
            names += [part for frame in frames + ((base,) if base else ()) for part in (frame[0], frame[2])]
            counted[(frames, stack["depth"] - shown, base)] += 1
        total = sum(counted.values())
        if not total:
            out.write(f"{self.what} was not called from Python\n" if not incomplete else "")
        else:
            out.write(f"{self.what}: {total} calls from {len(counted)} Python stacks, innermost frame first\n")
            shown_stacks, hidden = report.top(counted.most_common(), args.top)
            for (frames, more, base), count in shown_stacks:
                out.write(f"\n{count:>7}  ")
                if not frames and not base:
                    out.write("(no Python frame known: the code runs in a frame entered before tracing began"
                              + ("; without --no-lines its line events show it)\n" if args.no_lines else ")\n"))
                    continue
                places = [f"{report.path(report.name(file, self.strlen))}:{line}" for file, line, _ in frames]
                if base:
                    places.append(f"{report.path(report.name(base[0], self.strlen))}:{base[1]}")
                width = max(len(place) for place in places)
                funcs = [report.name(func, self.strlen) for _, _, func in frames]
                lines = [f"{place.ljust(width)}  {func}" for place, func in zip(places, funcs)]
                if more:
                    lines.append(f"... {more} more frames")
                if base:
                    lines.append(f"{places[-1].ljust(width)}  {report.name(base[2], self.strlen)}  {RUNNING_BEFORE}")
                out.write(("\n" + " " * 9).join(lines) + "\n")
            if hidden:
                out.write(f"\n{hidden} less frequent stacks not shown (-n 0 shows all)\n")
            callers: Counter[tuple] = Counter()
            for (frames, _, base), count in counted.items():
                innermost = frames[0] if frames else base if base else ("", "", "(no Python frame known)")
                callers[innermost] += count
            out.write("\nby innermost Python function:\n")
            report.table(out, ["CALLS", "FUNCTION", "LINE"], [
                [count, func, f"{report.path(file)}:{line}" if file else ""]
                for (file, line, func), count in callers.most_common()
            ], left=["FUNCTION", "LINE"])
        if incomplete:
            out.write(f"{incomplete} stacks were incomplete (events lost) and are not counted\n")
        note = cut_note(names, self.strlen)
        if note:
            out.write(note + "\n")

    def report_walked(self, maps, args, out) -> None:
        """The stacks read from the frames, counted, innermost frame first."""
        counted, broken = pystack.count_stacks(maps, self.resolver)
        self.resolver.close()
        total = sum(counted.values())
        if not total:
            out.write(f"{self.what} was not called from the process's threads\n" if not broken else "")
        else:
            out.write(f"{self.what}: {total} calls from {len(counted)} Python stacks, innermost frame first "
                      "(read from the frames)\n")
            shown, hidden = report.top(sorted(counted.items(), key=lambda item: -item[1]), args.top)
            for frames, count in shown:
                places = [f"{report.path(f.file)}:{f.line}" if f.file else "" for f in frames]
                width = max(len(place) for place in places)
                lines = [f"{place.ljust(width)}  {frame.qualname}" for place, frame in zip(places, frames)]
                out.write(f"\n{count:>7}  " + ("\n" + " " * 9).join(lines) + "\n")
            if hidden:
                out.write(f"\n{hidden} less frequent stacks not shown (-n 0 shows all)\n")
            callers: Counter[tuple] = Counter()
            for frames, count in counted.items():
                callers[(frames[0].qualname, f"{report.path(frames[0].file)}:{frames[0].line}" if frames[0].file else "")] += count
            out.write("\nby innermost Python function:\n")
            report.table(out, ["CALLS", "FUNCTION", "LINE"], [
                [count, func, place] for (func, place), count in callers.most_common()
            ], left=["FUNCTION", "LINE"])
        if broken:
            out.write(f"{broken} stacks could not be put together (a map update failed) and are not counted\n")
