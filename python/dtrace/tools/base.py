"""What every tool shares: its script, the options that vary it, and the run from start to report."""

from __future__ import annotations

import argparse
import itertools
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any, TextIO

from dtrace.tools import aggregate, interpreter, pystack, report, runner, scope, tracers
from dtrace.tools.options import Options
from dtrace.tools.tracers import ToolError


#: The bundled scripts, installed with the package.
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def script_text(name: str, dialect: str) -> str:
    """The bundled script ``scripts/NAME.bt`` or ``scripts/NAME.d``, as shipped."""
    return (SCRIPTS / f"{name}.{dialect}").read_text()


def keep_sections(text: str, keep: set[str]) -> str:
    """The script without the optional sections not in ``keep``.

    A section runs from a line ``// begin NAME`` to ``// end NAME`` (``/* begin
    NAME */`` in D). The script as shipped has every section.
    """
    out, dropping = [], None
    for line in text.splitlines(keepends=True):
        marker = re.match(r"\s*(?://|/\*)\s*(begin|end) (\w+)\s*(?:\*/)?\s*$", line)
        if marker and marker.group(2) not in keep:
            dropping = marker.group(2) if marker.group(1) == "begin" else None
            continue
        if dropping is None:
            out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "".join(out))


class Tool:
    """One tool: ``python -m dtrace NAME``. Subclasses set the class attributes and report."""

    name = ""
    summary = ""  # one line, for the tool list
    description = ""  # the help's first paragraph
    examples = ""  # the help's epilog
    #: Script files: scripts/SCRIPT.bt and scripts/SCRIPT.d.
    script = ""
    #: The bpftrace script on the aggregate probes (scripts/NAME.bt), run unless --per-event:
    #: the process counts inside itself and reports at each flush (tools/aggregate.py).
    aggregate_script = ""
    #: The run's flushes, while it aggregates.
    aggregation: aggregate.Aggregation | None = None
    #: BPFTRACE_STRLEN: the most the script's strings fit on bpftrace 0.17's 512-byte stack.
    strlen = 160
    #: BPFTRACE_MAP_KEYS_MAX, unless --max-keys.
    max_keys = 16384
    #: Whether every event passes through the tracer's output (a bigger buffer then).
    streaming = False
    #: Maps the report reads: name -> the types of its key's parts ("s" string, "d" number;
    #: "ss" for a (file, function) key, "" for no key). With -i, they are printed and
    #: cleared at each interval.
    maps: dict[str, str] = {}
    #: Which of them are histograms.
    hists: frozenset[str] = frozenset()
    #: Whether -i/--interval makes sense for this tool.
    intervals = True
    #: Whether the tool needs a target (-p or -c) to run.
    needs_target = True

    # --- the command line

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The tool's own options."""

    def sections(self, args: Options) -> set[str]:
        """The optional script sections these options keep."""
        return set()

    def customize(self, program: str, args: Options, dialect: str) -> str:
        """The program, with what the options change beyond sections (e.g. a probe)."""
        return program

    # --- the program

    def aggregated(self, args: Options, dialect: str) -> bool:
        """Whether this run counts in the process (the aggregate probes) rather than per event: the
        default where the tool has such a script, on Linux (the flush requests go through
        /proc/PID/mem), unless --per-event or --native (C functions are per event only)."""
        return bool(self.aggregate_script) and dialect == "bt" and not args.per_event and not args.native

    def program(self, args: Options, dialect: str) -> str:
        """The exact program the tracer runs for these options."""
        aggregated = self.aggregated(args, dialect)
        name = self.aggregate_script if aggregated else self.script
        text = keep_sections(script_text(name, dialect), self.sections(args))
        text = self.customize(text, args, dialect)
        if not text.endswith("\n"):
            text += "\n"
        interval = getattr(args, "interval", None)
        if aggregated:
            # The tool times -d and -i itself: it asks for a flush, and the end of the flush prints
            # the interval's maps (tools/aggregate.py).
            if interval:
                text = text.replace("\t// interval\n", self._interval_body(text) + "\n", 1)
            return text
        if interval:
            # With -i, the interval clause also ends the trace (after -d, rounded up to whole
            # intervals): an exit of its own could overtake the last interval's print and clear.
            text += self._interval_clause(interval, self.ticks(args), dialect, text)
        elif args.duration:
            text += self._duration_clause(args.duration, dialect)
        return text

    @staticmethod
    def ticks(args: Options) -> int:
        """With -i and -d: after how many intervals the trace ends (0: at Ctrl-C or the process's exit)."""
        interval = getattr(args, "interval", None)
        return -(-args.duration // interval) if interval and args.duration else 0

    def _printed_maps(self, program: str) -> list[str]:
        """The maps of the report that ``program`` uses (outside comments)."""
        code = re.sub(r"/\*.*?\*/|//[^\n]*", "", program, flags=re.S)
        return [m for m in self.maps if re.search(re.escape(m) + r"(?!\w)", code)]

    def _interval_body(self, program: str) -> str:
        """Print and clear the maps, then the time: the end of an aggregating tool's interval,
        once it counts (``@on``)."""
        body = "".join(f"\t\tprint({m});\n\t\tclear({m});\n" for m in self._printed_maps(program))
        return f"\tif (@on) {{\n{body}\t\ttime(\"%H:%M:%S\\n\");\n\t}}"

    def _interval_clause(self, seconds: int, ticks: int, dialect: str, program: str) -> str:
        maps = self._printed_maps(program)
        if dialect == "bt":
            body = "".join(f"\tprint({m});\n\tclear({m});\n" for m in maps)
            body += '\ttime("%H:%M:%S\\n");\n'
            if ticks:
                body += f"\t@intervals = @intervals + 1;\n\tif (@intervals == {ticks}) {{\n\t\texit();\n\t}}\n"
            return f"\ninterval:s:{seconds}\n{{\n{body}}}\n"
        body = "".join(f'\tprinta("{self.printa_format(m)}", {m});\n\ttrunc({m});\n' for m in maps)
        body += '\tprintf("@time\\t%Y\\n", walltimestamp);\n\tintervals++;\n'
        clause = f"\ntick-{seconds}s\n{{\n{body}}}\n"
        if ticks:
            clause += f"\ntick-{seconds}s\n/intervals == {ticks}/\n{{\n\texit(0);\n}}\n"
        return clause

    @staticmethod
    def _duration_clause(seconds: int, dialect: str) -> str:
        if dialect == "bt":
            return f"\ninterval:s:{seconds}\n{{\n\texit();\n}}\n"
        return f"\ntick-{seconds}s\n{{\n\texit(0);\n}}\n"

    def printa_format(self, name: str) -> str:
        """How our D scripts print map ``name``: ``@name<TAB>key...<TAB>value``, a histogram
        as ``@name<TAB>key...`` and DTrace's own table below it (escaped for D)."""
        keys = "".join("\\t%s" if t == "s" else "\\t%d" for t in self.maps[name])
        return f"{name}{keys}\\n%@d\\n" if name in self.hists else f"{name}{keys}\\t%@d\\n"

    def arguments(self, target: runner.Target) -> list[str]:
        """The program's positional parameters ($1, ...) for this target."""
        return []

    def aggregate_arguments(self, target: runner.Target) -> list[str]:
        """The aggregating scripts' parameters: the PID that asks for flushes, and 1 when the tool
        started the process (every report counts: nothing ran before the tool)."""
        return [str(os.getpid()), "1" if target.process is not None else "0"]

    def probes(self, program: str) -> list[str]:
        """The probes of provider python the program uses, as DTrace spells them."""
        names = re.findall(r"(?:usdt:[^:\s]*:python:|python\$target:::)([\w-]+)", program)
        return sorted({name.replace("__", "-") for name in names})

    def key_arity(self) -> dict[str, int]:
        """How many parts each map's key has (bpftrace joins them with commas); ``@dropped`` is the
        aggregating scripts' count of what the process could not gather (a bound was reached)."""
        return {"@dropped": 0, **{name: len(types) for name, types in self.maps.items()}}

    # --- the run

    def start(self, args: Options, target: runner.Target, out: TextIO) -> None:
        """Called once the tracer is attached, before any event."""

    def on_printf(self, text: str, out: TextIO) -> None:
        """A line the program printed (after its BEGIN line)."""

    def on_lost(self, count: int, out: TextIO) -> None:
        """The tracer lost ``count`` events here (its output buffer was full)."""

    def report(self, maps: dict[str, dict[tuple[str, ...], Any]], args: Options,
               out: TextIO, label: str | None, session: runner.Session) -> None:
        """Print what the maps say: at the end, or at each interval (``label`` is its time)."""

    def finish(self, args: Options, out: TextIO, session: runner.Session) -> None:
        """Called after the last report."""

    def bind(self, program: str, pid: int) -> str:
        """The program for process ``pid``: a Python stack walk (pystack) gets the process's
        checked layout in place of its ``PY_...`` names (ToolError when it has none)."""
        if not pystack.uses_walk(program):
            return program
        self.layout = pystack.layout_of(pid)
        return pystack.bind(program, self.layout)

    def check(self, options: Options, tracer: tracers.Tracer) -> None:
        """Before anything starts: UsageError for options that cannot work here (e.g. a function
        that resolves to no probe)."""

    def run(self, options: Options, out: TextIO = sys.stdout) -> int:
        """One run: the tracer's program on the target, and the report. Returns the exit status."""
        scope_text = scope.requested(options)  # --module/--file, checked before anything starts
        tracer = tracers.choose_tracer(options.tracer)
        if not options.script:
            tracer.executable()
            tracer.check_privileges()
        program = self.program(options, tracer.dialect)
        if options.script:
            # A Python stack walk names the target's addresses: filled in when there is a target.
            out.write(self.bind(program, options.pid) if options.pid is not None else program)
            return 0
        self.check(options, tracer)
        probes = self.fired(self.probes(program))
        if options.argv:
            target = runner.start(options.argv, options.startup_timeout)
        elif not probes and pystack.uses_walk(program):
            target = runner.attach_any(options.pid)  # the walk needs no probe: any Python process
        else:
            target = runner.attach(options.pid, options.inject, options.gdb)
        # An interpreter that declares some of these probes itself (--with-dtrace): ours are
        # attached by address, and asked for through the lease (dtrace/tools/interpreter.py).
        try:
            program = self.bind(program, target.pid)
            program, probes, asked = interpreter.adapt(program, probes, target.pid, target.library, tracer.dialect)
        except BaseException:
            if target.held:
                target.stop()
            raise
        # In force before the tracer attaches, so no out-of-scope event reaches it.
        lease = scope.open_session(options, target, scope_text, asked)
        env = tracer.environment(self.strlen, options.max_keys or self.max_keys, self.streaming)
        aggregated = self.aggregated(options, tracer.dialect)
        arguments = self.aggregate_arguments(target) if aggregated else self.arguments(target)
        session = runner.Session(tracer, program, target, env, self.key_arity(), self.hists, arguments)
        self.aggregation = (aggregate.Aggregation(session, target, options.interval, self.ticks(options),
                                                  options.duration) if aggregated else None)
        interrupt = self.aggregation.interrupt if self.aggregation else session.interrupt
        stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {sig: signal.getsignal(sig) for sig in stops}
        try:
            session.start()
            for sig in stops:
                signal.signal(sig, lambda signum, frame: interrupt(signum))
            return self._collect(options, target, session, probes, out)
        except BaseException:
            if getattr(session, "process", None) is not None and session.process.poll() is None:
                session.process.kill()  # nothing more is read: the kernel detaches its probes
                session.wait()
            if target.process is not None:
                target.stop()  # a command started for the trace does not outlive it
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.aggregation is not None:
                self.aggregation.close()
            if lease is not None:
                lease.release()  # the scope goes back to what it was

    def _collect(self, options, target, session, probes, out) -> int:
        # The program's BEGIN prints "Tracing ..." once every probe is attached. Another CPU's
        # output may come first: keep it for after.
        early, ready = [], None
        try:
            for event in session.events(timeout=runner.ATTACH_TIMEOUT):
                if event.kind == "printf" and event.data.startswith("Tracing "):
                    ready = event
                    break
                early.append(event)
        except TimeoutError:
            raise ToolError(f"{session.tracer.name} did not attach within {runner.ATTACH_TIMEOUT:g} s") from None
        if ready is None:
            code = session.stop()
            if target.process is not None:
                target.stop()
            if session.signals:  # stopped before tracing began: the status says by what
                return 128 + session.signals[0]
            raise session.failure(f"failed (exit status {code})")
        if self.aggregation is not None:
            self.aggregation.begin(early)  # under -p, the first flush: nothing from before counts
        target.release(probes)
        print(f"{ready.data.rstrip()}  [{target.describe()}]", file=sys.stderr, flush=True)
        self.start(options, target, out)
        maps: dict[str, dict] = {}
        intervals = 0
        dropped = 0
        for event in itertools.chain(early, session.events()):
            if event.kind == "printf" and self.aggregation is not None and event.data.strip() == aggregate.FLUSHED:
                self.aggregation.flushed()
            elif event.kind == "printf" and self.aggregation is not None and event.data.strip() == aggregate.EXIT_FLUSHED:
                self.aggregation.exit_flushed()
            elif event.kind == "printf":
                self.on_printf(event.data, out)
            elif event.kind == "map" and event.name == "@dropped":
                dropped += sum(event.data.values())
            elif event.kind == "lost":
                self.on_lost(event.data, out)
            elif event.kind == "map":
                maps.setdefault(event.name, {}).update(event.data)
            elif event.kind == "time":
                self.report(maps, options, out, event.data, session)
                out.flush()
                maps, intervals = {}, intervals + 1
        code = session.wait()
        # Whether the command ended by itself, before anything stopped the trace: only then is
        # its exit status its own (after Ctrl-C, the terminal's SIGINT reached it too).
        command_ended = target.process is not None and target.process.poll() is not None
        if code != 0 and not maps and not session.stop_requested and not session.killed:
            if target.process is not None:
                target.stop()
            raise session.failure(f"exited with status {code}")
        # With -i, what came after the last interval is reported, unless -d ended the trace
        # with that interval.
        ended_by_duration = intervals and intervals == self.ticks(options)
        if not intervals or (any(maps.get(name) for name in self.maps) and not ended_by_duration):
            self.report(maps, options, out, "at exit" if intervals else None, session)
        self.finish(options, out, session)
        out.flush()
        self.warn_incomplete(session, options)
        if self.aggregation is not None and not session.killed:
            self.aggregation.warn_incomplete()
        if dropped:
            runner.warn(f"{dropped} calls or lines were not gathered: the process reached a bound of its "
                        "aggregation (the call tree's nodes, a code object's lines; docs/probes.md)")
        if target.process is None:
            return 0
        if not command_ended:
            return self.stop_command(target)
        if session.stop_requested:
            return 0
        return self.command_status(target.process.returncode)

    @staticmethod
    def stop_command(target: runner.Target) -> int:
        """The trace ended (-d, a stop signal, the tracer) while the command it started runs: the
        command is stopped with it (SIGTERM, then SIGKILL after COMMAND_GRACE seconds)."""
        runner.warn(f"the trace has ended: stopping the command (PID {target.pid}) with SIGTERM")
        target.stop()
        return 0

    @staticmethod
    def command_status(status: int) -> int:
        """The tool's exit status for a command that ended by itself: 0, its status, or 128 + N
        when signal N killed it; said on stderr when it failed."""
        if status == 0:
            return 0
        if status < 0:
            try:
                name = signal.Signals(-status).name
            except ValueError:
                name = f"signal {-status}"
            runner.warn(f"the command was killed by {name}")
            return 128 - status
        runner.warn(f"the command exited with status {status}")
        return status

    def fired(self, probes: list[str]) -> list[str]:
        """The probes of ``probes`` that this build of pydtrace-rs fires; warns about the others
        (a command started by -c then need not wait for them)."""
        try:
            from dtrace import _native
        except ImportError:
            return probes
        missing = [p for p in probes if p not in _native.ARMABLE_PROBES]
        if missing:
            runner.warn(
                f"this build of pydtrace-rs does not fire {', '.join(missing)} yet: "
                "the output will have no such events"
            )
        return [p for p in probes if p in _native.ARMABLE_PROBES]

    def warn_incomplete(self, session: runner.Session, args: Options) -> None:
        """Never a silently wrong table: say what the tracer lost."""
        if session.killed:
            runner.warn(
                f"{session.tracer.name} did not stop after two SIGINTs and was killed: "
                "what it gathered last is lost"
            )
        if session.lost:
            runner.warn(
                f"{session.lost} events were lost (the tracer's output buffer overflowed): "
                "the output above is incomplete"
            )
        if session.map_full:
            limit = args.max_keys or self.max_keys
            runner.warn(
                f"{session.map_full} map updates failed because a map was full "
                f"({limit} keys): the counts above are incomplete; raise the limit with --max-keys"
            )
        for error, count in session.helper_errors.items():
            runner.warn(f"{count} tracer helper errors: {error}")
        errors = session.errors()
        if errors:
            print(errors, file=sys.stderr)


def cut_note(names: list[str], strlen: int) -> str | None:
    """A footnote when some names reached the tracer's string limit and may be cut."""
    cut = [n for n in names if report.is_cut(n, strlen)]
    if not cut:
        return None
    return f"{len(cut)} names reached the tracer's string limit ({strlen - 1} bytes) and may be cut (marked ...)"
