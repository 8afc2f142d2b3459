"""The bases of the commands: :class:`Command` (every ``python -m dtrace NAME``: its help, options and
run) and :class:`ScriptTool` (a tool that runs a bundled script: its variants, the run from start to
report, the end of a ``-c`` command and its exit status). ``list`` and ``run`` are Commands; the
others are ScriptTools."""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from dtrace.tools.command import aggregate, children, engine, interpreter, runner, tracers
from dtrace.tools.command.options import Options
from dtrace.tools.errors import ToolError, warn
from dtrace.tools.proc import procfs, pystack, scope
from dtrace.tools.render import report


#: The bundled scripts, installed with the package.
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


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


class Command:
    """One command: ``python -m dtrace NAME``. Subclasses set the class attributes and run."""

    name = ""
    summary = ""  # one line, for the tool list
    description = ""  # the help's first paragraph
    examples = ""  # the help's epilog
    #: BPFTRACE_MAP_KEYS_MAX, unless --max-keys.
    max_keys = 16384
    #: Whether -i/--interval makes sense for this command.
    intervals = True
    #: Whether the command needs a target (-p or -c) to run.
    needs_target = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The command's own options."""

    def check_options(self, options: Options) -> Options:
        """At parse time, before anything starts: the command's own options checked (UsageError)
        and settled."""
        return options

    def run(self, options: Options, out: TextIO = sys.stdout) -> int:
        """One run. Returns the exit status."""
        raise NotImplementedError

    def bind(self, program: str, pid: int) -> str:
        """The program for process ``pid``: a Python stack walk (pystack) gets the process's
        checked layout in place of its ``PY_...`` names (ToolError when it has none)."""
        if not pystack.uses_walk(program):
            return program
        self.layout = pystack.layout_of(pid)
        return pystack.bind(program, self.layout)

    def fired(self, probes: list[str]) -> list[str]:
        """The probes of ``probes`` that this build of pydtrace-rs fires; warns about the others
        (a command started by -c then need not wait for them)."""
        try:
            from dtrace import _native
        except ImportError:
            return probes
        missing = [p for p in probes if p not in _native.ARMABLE_PROBES]
        if missing:
            warn(
                f"this build of pydtrace-rs does not fire {', '.join(missing)} yet: "
                "the output will have no such events"
            )
        return [p for p in probes if p in _native.ARMABLE_PROBES]

    @staticmethod
    def stop_command(target: runner.Target) -> int:
        """The trace ended (-d, a stop signal, the tracer) while the command it started runs: the
        command is stopped with it (SIGTERM, then SIGKILL after COMMAND_GRACE seconds)."""
        warn(f"the trace has ended: stopping the command (PID {target.pid}) with SIGTERM")
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
            warn(f"the command was killed by {name}")
            return 128 - status
        warn(f"the command exited with status {status}")
        return status


class ScriptTool(Command):
    """A tool that runs a bundled script (``scripts/NAME.bt``, ``.d``) and reports what it printed.
    Subclasses set the class attributes and report."""

    #: Script files: scripts/SCRIPT.bt and scripts/SCRIPT.d.
    script = ""
    #: The bpftrace script on the aggregate probes (scripts/NAME.bt), run unless --per-event:
    #: the process counts inside itself and reports at each flush (tools/command/aggregate.py).
    aggregate_script = ""
    #: The run's flushes, while it aggregates.
    aggregation: aggregate.Aggregation | None = None
    #: BPFTRACE_STRLEN: the most the script's strings fit on bpftrace 0.17's 512-byte stack.
    strlen = 160
    #: Whether every event passes through the tracer's output (a bigger buffer then).
    streaming = False
    #: Maps the report reads: name -> the types of its key's parts ("s" string, "d" number;
    #: "ss" for a (file, function) key, "" for no key). With -i, they are printed and
    #: cleared at each interval.
    maps: dict[str, str] = {}
    #: Which of them are histograms.
    hists: frozenset[str] = frozenset()
    #: The maps whose counts are events of the function and line probes, keyed by file first
    #: (calls' @calls, lines' @lines): the cost note's numbers (see cost_note).
    event_maps: tuple[str, ...] = ()

    # --- the command line

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
        /proc/PID/mem), unless --per-event or --native (C functions are per event only), or
        --children: a child process often ends with ``os._exit`` (a forked multiprocessing worker) or
        by a signal (a pool's terminate()), before the counts it gathered could be reported."""
        return (bool(self.aggregate_script) and dialect == "bt" and not args.per_event and not args.native
                and not args.children)

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
            # the interval's maps (tools/command/aggregate.py).
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

    def events_by_file(self) -> dict[str, int]:
        """A streaming tool's events so far, per file (for the cost note); map tools use event_maps."""
        return {}

    def report(self, maps: dict[str, dict[tuple[str, ...], Any]], args: Options,
               out: TextIO, label: str | None, session: runner.Session) -> None:
        """Print what the maps say: at the end, or at each interval (``label`` is its time)."""

    def finish(self, args: Options, out: TextIO, session: runner.Session) -> None:
        """Called after the last report."""

    def check(self, options: Options, tracer: tracers.Tracer) -> None:
        """Before anything starts: UsageError for options that cannot work here (e.g. a function
        that resolves to no probe)."""

    def run(self, options: Options, out: TextIO = sys.stdout) -> int:
        """One run: the tracer's program on the target, and the report. Returns the exit status."""
        scope_text = scope.requested(options)  # --module/--file, checked before anything starts
        tracer = tracers.choose_tracer(options.tracer, options.tracer_path)
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
        self._children: list[threading.Thread] = []
        self._child_sessions: list[runner.Session] = []
        self._child_interrupts: list[Callable[[int], None]] = []
        self._out_lock = threading.Lock()
        follower = None
        if options.argv:
            # Every Python process of the command's tree reports to the follower: traced with
            # --children, counted otherwise (dtrace/tools/command/children.py).
            follower = children.Follower(
                options.children,
                lambda child: self._follow(child, options, tracer, program, probes, scope_text, out))
            try:
                target = runner.start(options.argv, options.startup_timeout, follower.environment())
            except BaseException:
                follower.close()
                raise
            follower.start(target.pid)
        elif not probes and pystack.uses_walk(program) and not options.children:
            target = runner.attach_any(options.pid)  # the walk needs no probe: any Python process
        else:
            target = runner.attach(options.pid, options.inject, options.gdb)
            if options.children:
                # -p --children: the process's children report here once the lease names the socket.
                follower = children.follow_running(
                    target.pid,
                    lambda child: self._follow(child, options, tracer, program, probes, scope_text, out))
        try:
            return self._run_target(options, tracer, program, probes, scope_text, target, follower, out)
        finally:
            if follower is not None:
                follower.close()

    def _run_target(self, options, tracer, program, probes, scope_text, target, follower, out) -> int:
        """The run once the target is known: the root process's tracer, then what its
        children's tracers report."""
        # An interpreter that declares some of these probes itself (--with-dtrace): ours are
        # attached by address, and asked for through the lease (dtrace/tools/command/interpreter.py).
        try:
            program = self.bind(program, target.pid)
            program, probes, asked = interpreter.adapt(program, probes, target.pid, target.library, tracer.dialect)
        except BaseException:
            if target.held:
                target.stop()
            raise
        # In force before the tracer attaches, so no out-of-scope event reaches it. With -p --children
        # the lease also names the follower's socket (a -c command has it in its environment).
        follow = follower.path if follower is not None and target.process is None else None
        lease = scope.open_session(options, target, scope_text, asked, follow=follow)
        env = tracer.environment(self.strlen, options.max_keys or self.max_keys, self.streaming)
        aggregated = self.aggregated(options, tracer.dialect)
        arguments = self.aggregate_arguments(target) if aggregated else self.arguments(target)
        session = runner.Session(tracer, program, target, env, self.key_arity(), self.hists, arguments)
        self.aggregation = (aggregate.Aggregation(session, target, options.interval, self.ticks(options),
                                                  options.duration) if aggregated else None)
        interrupt = self.aggregation.interrupt if self.aggregation else session.interrupt
        # The stop signals reach the trace until the cleanup below is done: a Ctrl-C while the
        # tracers are killed and the command stopped hurries that, it does not cut it short.
        with contextlib.ExitStack() as handlers:
            try:
                session.start()
                handlers.enter_context(engine.stop_signals(lambda signum: self._interrupt_all(interrupt, signum)))
                code = self._collect(options, target, session, probes, self._sink(options, target, out))
                self._end_children(session, follower, out)
                return code
            except BaseException:
                for child in self._child_sessions:
                    child.kill()
                session.kill()  # nothing more is read: the kernel detaches its probes
                if target.process is not None:
                    target.stop()  # a command started for the trace does not outlive it
                raise
            finally:
                if self.aggregation is not None:
                    self.aggregation.close()
                if lease is not None:
                    lease.release()  # the scope goes back to what it was

    # --- --children: a tracer per process of the command's tree

    def _sink(self, options: Options, target: runner.Target, out: TextIO) -> TextIO:
        """Where a process's output goes: with --children, a streaming tool's lines carry the
        process's PID; a map tool's reports are per-process sections (see _section)."""
        return Prefixed(out, target.pid, self._out_lock) if options.children and self.streaming else out

    def _interrupt_all(self, interrupt: Callable[[int], None], signum: int) -> None:
        """A stop signal: the command's trace (``interrupt``: its session's, or its aggregation's,
        which asks for a last flush first) and every child's."""
        interrupt(signum)
        for child in list(self._child_interrupts):
            child(signum)

    def _follow(self, target: runner.Target, options, tracer, program, probes, scope_text, out) -> None:
        """A process of the command's tree reported (from the follower's thread): trace it."""
        thread = threading.Thread(target=self._trace_child,
                                  args=(target, options, tracer, program, probes, scope_text, out), daemon=True)
        self._children.append(thread)
        thread.start()

    def _trace_child(self, target: runner.Target, options, tracer, program, probes, scope_text, out) -> None:
        """One child's tracer, from its attach to its report: the same program, scope and
        probes as the command's. A child that cannot be traced runs on untraced, said on stderr."""
        described = target.describe()
        lease = tool = None
        try:
            program, probes, asked = interpreter.adapt(program, probes, target.pid, target.library, tracer.dialect)
            lease = scope.open_session(options, target, scope_text, asked, quiet=True)
            env = tracer.environment(self.strlen, options.max_keys or self.max_keys, self.streaming)
            aggregated = self.aggregated(options, tracer.dialect)
            arguments = self.aggregate_arguments(target) if aggregated else self.arguments(target)
            session = runner.Session(tracer, program, target, env, self.key_arity(), self.hists, arguments)
            tool = type(self)()
            tool.aggregation = (aggregate.Aggregation(session, target, options.interval, self.ticks(options),
                                                      options.duration) if aggregated else None)
            session.start()
            self._child_sessions.append(session)
            self._child_interrupts.append(tool.aggregation.interrupt if tool.aggregation else session.interrupt)
            early, ready = [], None
            for event in session.events(timeout=engine.ATTACH_TIMEOUT):
                if event.kind == "printf" and event.data.startswith("Tracing "):
                    ready = event
                    break
                early.append(event)
            if ready is None:
                session.stop()
                raise session.failure("failed")
            if tool.aggregation is not None:
                tool.aggregation.begin(early)
            target.release(probes)
            sink = self._sink(options, target, out)
            buffer = sink if self.streaming else io.StringIO()
            tool.start(options, target, buffer)
            gathered = tool._gather(early, session, options, buffer)
            session.wait()
            if gathered.maps or not self.intervals or not getattr(options, "interval", None):
                tool.report(gathered.maps, options, buffer, None, session)
            tool.finish(options, buffer, session)
            ended = "ended" if not procfs.alive(target.pid) else "still running"
            if not self.streaming:
                self._section(out, f"{described}, a child process ({ended})", buffer.getvalue())
            tool.warn_incomplete(session, options, f"PID {target.pid}: ")
            if tool.aggregation is not None and not session.killed:
                tool.aggregation.warn_incomplete()
            warn_dropped(gathered.dropped, f"PID {target.pid}: ")
            if tool.aggregation is None:  # aggregating, the process traps once per flush, not per event
                cost_note(gathered.by_file or tool.events_by_file(), gathered.seconds, session.lost, options,
                          f"PID {target.pid}: ")
        except (ToolError, OSError, TimeoutError) as error:
            target.abandon()
            if not procfs.alive(target.pid):
                # Its parent ended it (a pool's terminate()) while it waited: it ran none of its code.
                self._section(out, f"{described}, a child process (ended before its tracer attached)", "")
            else:
                warn(f"the child process {described} is not traced: {error}")
        finally:
            if tool is not None and tool.aggregation is not None:
                tool.aggregation.close()
            if lease is not None:
                lease.release()

    def _section(self, out: TextIO, title: str, text: str) -> None:
        with self._out_lock:
            out.write(f"\n=== {title}\n{text}")
            out.flush()

    def _end_children(self, session: runner.Session, follower, out: TextIO) -> None:
        """After the command's trace: the children's tracers end with their processes, or are
        stopped with the trace; a child that started untraced is said."""
        if follower is None:
            return
        if session.stop_requested:
            for child in list(self._child_sessions):
                child.interrupt()
        for thread in list(self._children):
            thread.join()
        follower.close()
        if (note := follower.untraced_note()) is not None:
            warn(note)

    def _collect(self, options, target, session, probes, out) -> int:
        # The program's BEGIN prints "Tracing ..." once every probe is attached. Another CPU's
        # output may come first: keep it for after.
        early, ready = [], None
        try:
            for event in session.events(timeout=engine.ATTACH_TIMEOUT):
                if event.kind == "printf" and event.data.startswith("Tracing "):
                    ready = event
                    break
                early.append(event)
        except TimeoutError:
            raise ToolError(f"{session.tracer.name} did not attach within {engine.ATTACH_TIMEOUT:g} s") from None
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
        described = target.describe()
        print(f"{ready.data.rstrip()}  [{described}]", file=sys.stderr, flush=True)
        self.start(options, target, out)
        gathered = self._gather(early, session, options, out)
        maps, intervals = gathered.maps, gathered.intervals
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
        if options.children and not self.streaming:
            # The command's own section; its children's come as they end.
            for thread in list(self._children):
                thread.join()
            out.write(f"\n=== {described}, {'the command' if target.process is not None else 'the process'}\n")
        if not intervals or (any(maps.get(name) for name in self.maps) and not ended_by_duration):
            self.report(maps, options, out, "at exit" if intervals else None, session)
        self.finish(options, out, session)
        out.flush()
        self.warn_incomplete(session, options)
        if self.aggregation is not None and not session.killed:
            self.aggregation.warn_incomplete()
        warn_dropped(gathered.dropped)
        if self.aggregation is None:  # aggregating, the process traps once per flush, not per event
            cost_note(gathered.by_file or self.events_by_file(), gathered.seconds, session.lost, options)
        if target.process is None:
            return 0
        if not command_ended:
            return self.stop_command(target)
        if session.stop_requested:
            return 0
        return self.command_status(target.process.returncode)

    def _gather(self, early: list, session: runner.Session, options: Options, out: TextIO) -> Gathered:
        """A process's events, from its tracer's first to its exit, passed to this tool: its
        printed lines, lost events and, at each interval, its report. Returns the maps not yet
        reported, the intervals, and what the cost note needs. One loop for the command's tracer
        and each child's (--children)."""
        gathered = Gathered()
        began = last = time.monotonic()
        for event in itertools.chain(early, session.events()):
            last = time.monotonic()
            if event.kind == "printf" and self.aggregation is not None and event.data.strip() == aggregate.FLUSHED:
                self.aggregation.flushed()
            elif event.kind == "printf" and self.aggregation is not None and event.data.strip() == aggregate.EXIT_FLUSHED:
                self.aggregation.exit_flushed()
            elif event.kind == "printf":
                self.on_printf(event.data, out)
            elif event.kind == "map" and event.name == "@dropped":
                gathered.dropped += sum(event.data.values())
            elif event.kind == "lost":
                self.on_lost(event.data, out)
            elif event.kind == "map":
                gathered.maps.setdefault(event.name, {}).update(event.data)
                if event.name in self.event_maps:
                    count_by_file(gathered.by_file, event.data)
            elif event.kind == "time":
                self.report(gathered.maps, options, out, event.data, session)
                out.flush()
                gathered.maps, gathered.intervals = {}, gathered.intervals + 1
        gathered.seconds = last - began  # until the last event: not the tracer's drain after a stop
        return gathered

    def warn_incomplete(self, session: runner.Session, args: Options, who: str = "") -> None:
        """Never a silently wrong table: say what the tracer lost (``who``: the process, for a child)."""
        if session.killed:
            warn(
                f"{session.tracer.name} did not stop after two SIGINTs and was killed: "
                "what it gathered last is lost"
            )
        if session.lost:
            warn(
                f"{who}{session.lost} events were lost (the tracer's output buffer overflowed): "
                "the output above is incomplete"
            )
        if session.map_full:
            limit = args.max_keys or self.max_keys
            warn(
                f"{session.map_full} map updates failed because a map was full "
                f"({limit} keys): the counts above are incomplete; raise the limit with --max-keys"
            )
        for error, count in session.helper_errors.items():
            warn(f"{count} tracer helper errors: {error}")
        errors = session.errors()
        if errors:
            print(errors, file=sys.stderr)


def cut_note(names: list[str], strlen: int) -> str | None:
    """A footnote when some names reached the tracer's string limit and may be cut."""
    cut = [n for n in names if report.is_cut(n, strlen)]
    if not cut:
        return None
    return f"{len(cut)} names reached the tracer's string limit ({strlen - 1} bytes) and may be cut (marked ...)"


@dataclass
class Gathered:
    """What :meth:`ScriptTool._gather` read from one process's tracer."""

    maps: dict[str, dict] = field(default_factory=dict)
    intervals: int = 0
    #: The events of the function and line probes per file, and the seconds they came in.
    by_file: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    #: What the process could not gather while it aggregated (it reached a bound).
    dropped: int = 0


def warn_dropped(dropped: int, prefix: str = "") -> None:
    """Say that an aggregating process reached a bound, if it did."""
    if dropped:
        warn(f"{prefix}{dropped} calls or lines were not gathered: the process reached a bound of its "
                    "aggregation (the call tree's nodes, a code object's lines; docs/probes.md)")


#: Events per second above which a trace is said to slow the program: each event of the function
#: and line probes stops the program for a trap into the kernel, about 4 us (decision 22 in
#: docs/decisions.md), so 25,000 a second take about a tenth of its time.
BUSY_RATE = 25_000
#: The seconds one event costs the traced program, for the estimate the note gives.
EVENT_COST = 4e-6
#: Seconds of the program's time below which the trace's cost goes unsaid (a short start-up's
#: burst of imports has a high rate and costs nothing that matters).
NOTICEABLE = 0.1


def count_by_file(by_file: dict[str, int], data: dict) -> None:
    """Add a map's counts (keys with the file first) to ``by_file``."""
    for key, value in data.items():
        if isinstance(value, int) and key:
            file = key[0] if isinstance(key, tuple) else str(key)
            by_file[file] = by_file.get(file, 0) + value


def scope_option(file: str) -> str:
    """The --module or --file option that selects ``file``'s code: the top-level package for a
    file of the standard library or of site-packages, the file otherwise."""
    match = re.search(r"/(?:site-packages|dist-packages|lib/python3\.\d+t?)/(.+?)\.py$", file)
    if match and not match.group(1).startswith(("site-packages/", "dist-packages/")):
        return f"--module {match.group(1).split('/')[0]}"
    if file.startswith("<"):
        return f"--file '{file}'"
    return f"--file {os.path.basename(file)}" if file.startswith("/") else f"--file {file}"


def cost_note(by_file: dict[str, int], seconds: float, lost: int, options: Options, who: str = "") -> None:
    """When the trace was busy enough to slow the program, or lost events: say so with numbers,
    and name the cheapest way out: a scope on the code asked about (where the events came from),
    or sampling for where time goes."""
    events = sum(by_file.values())
    rate = events / seconds if seconds > 0 else 0.0
    if not lost and (rate < BUSY_RATE or events * EVENT_COST < NOTICEABLE):
        return
    scoped = bool(options.scope_modules or options.scope_files)
    sources: dict[str, int] = {}
    for file, count in by_file.items():
        option = scope_option(file)
        sources[option] = sources.get(option, 0) + count
    top = [item for item in sorted(sources.items(), key=lambda item: -item[1])[:3] if item[1] * 100 >= events]
    where = ", ".join(f"{option} ({100 * count / events:.0f}%)" for option, count in top) if events else ""
    spent = events * EVENT_COST
    lines = [f"{who}the trace saw {events:,} events in {seconds:.1f} s ({rate:,.0f} a second)"
             + (f", and lost {lost:,}" if lost else "")
             + f": at about {EVENT_COST * 1e6:.0f} us each, it took about {spent:.1f} s of the program's time."]
    if where and not scoped:
        lines.append(f"Most events came from: {where}. Trace only the code you are asking about, with "
                     "--module NAME or --file GLOB (other code then costs nothing).")
    elif where:
        lines.append(f"Within the scope, most events came from: {where}: narrow it further.")
    lines.append("For where time goes, sample instead of tracing every call (flame --sample, or perf, "
                 "py-spy): the cost does not grow with the calls.")
    warn(" ".join(lines))


class Prefixed(io.TextIOBase):
    """An output whose lines carry a process's PID first, written whole under a lock (the
    tracers of a command's processes write at once)."""

    def __init__(self, out: TextIO, pid: int, lock: threading.Lock) -> None:
        self.out, self.prefix, self.lock, self.pending = out, f"{pid:<7} ", lock, ""

    def write(self, text: str) -> int:
        self.pending += text
        if "\n" in self.pending:
            lines, self.pending = self.pending.rsplit("\n", 1)
            with self.lock:
                self.out.write("".join(f"{self.prefix}{line}\n" for line in lines.split("\n")))
        return len(text)

    def flush(self) -> None:
        self.out.flush()
