"""What every tool shares: its script, the options that vary it, and the run from start to report."""

from __future__ import annotations

import argparse
import itertools
import re
import signal
import sys
from pathlib import Path
from typing import Any, TextIO

from dtrace.tools import report, runner, tracers
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

    # --- the command line

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The tool's own options."""

    def sections(self, args: argparse.Namespace) -> set[str]:
        """The optional script sections these options keep."""
        return set()

    def customize(self, program: str, args: argparse.Namespace, dialect: str) -> str:
        """The program, with what the options change beyond sections (e.g. a probe)."""
        return program

    # --- the program

    def program(self, args: argparse.Namespace, dialect: str) -> str:
        """The exact program the tracer runs for these options."""
        text = keep_sections(script_text(self.script, dialect), self.sections(args))
        text = self.customize(text, args, dialect)
        if not text.endswith("\n"):
            text += "\n"
        interval = getattr(args, "interval", None)
        if interval:
            # With -i, the interval clause also ends the trace (after -d, rounded up to whole
            # intervals): an exit of its own could overtake the last interval's print and clear.
            text += self._interval_clause(interval, self.ticks(args), dialect, text)
        elif args.duration:
            text += self._duration_clause(args.duration, dialect)
        return text

    @staticmethod
    def ticks(args: argparse.Namespace) -> int:
        """With -i and -d: after how many intervals the trace ends (0: at Ctrl-C or the process's exit)."""
        interval = getattr(args, "interval", None)
        return -(-args.duration // interval) if interval and args.duration else 0

    def _interval_clause(self, seconds: int, ticks: int, dialect: str, program: str) -> str:
        code = re.sub(r"/\*.*?\*/|//[^\n]*", "", program, flags=re.S)
        maps = [m for m in self.maps if re.search(re.escape(m) + r"(?!\w)", code)]
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

    def probes(self, program: str) -> list[str]:
        """The probes of provider python the program uses, as DTrace spells them."""
        names = re.findall(r"(?:usdt:[^:\s]*:python:|python\$target:::)([\w-]+)", program)
        return sorted({name.replace("__", "-") for name in names})

    def key_arity(self) -> dict[str, int]:
        """How many parts each map's key has (bpftrace joins them with commas)."""
        return {name: len(types) for name, types in self.maps.items()}

    # --- the run

    def start(self, args: argparse.Namespace, target: runner.Target, out: TextIO) -> None:
        """Called once the tracer is attached, before any event."""

    def on_printf(self, text: str, out: TextIO) -> None:
        """A line the program printed (after its BEGIN line)."""

    def on_lost(self, count: int, out: TextIO) -> None:
        """The tracer lost ``count`` events here (its output buffer was full)."""

    def report(self, maps: dict[str, dict[tuple[str, ...], Any]], args: argparse.Namespace,
               out: TextIO, label: str | None, session: runner.Session) -> None:
        """Print what the maps say: at the end, or at each interval (``label`` is its time)."""

    def finish(self, args: argparse.Namespace, out: TextIO, session: runner.Session) -> None:
        """Called after the last report."""

    def run(self, args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
        tracer = tracers.choose_tracer(args.tracer)
        if not args.script:
            tracer.executable()
            tracer.check_privileges()
        program = self.program(args, tracer.dialect)
        if args.script:
            out.write(program)
            return 0
        probes = self.fired(self.probes(program))
        target = runner.start(args.command, args.startup_timeout) if args.command else runner.attach(args.pid, args.inject)
        env = tracer.environment(self.strlen, args.max_keys or self.max_keys, self.streaming)
        session = runner.Session(tracer, program, target, env, self.key_arity(), self.hists,
                                 self.arguments(target))
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            session.start()
            for sig in previous:
                signal.signal(sig, lambda *_: session.interrupt())
            return self._collect(args, target, session, probes, out)
        except BaseException:
            if getattr(session, "process", None) is not None:
                session.stop()
            if target.held:
                target.stop()  # the trace never began: the command is not left waiting
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _collect(self, args, target, session, probes, out) -> int:
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
        if ready is None or session.interrupted:
            code = session.wait()
            if target.process is not None:
                target.stop()
            if session.interrupted:
                return 130
            raise session.failure(f"failed (exit status {code})")
        target.release(probes)
        print(f"{ready.data.rstrip()}  [{target.describe()}]", file=sys.stderr, flush=True)
        self.start(args, target, out)
        maps: dict[str, dict] = {}
        intervals = 0
        for event in itertools.chain(early, session.events()):
            if event.kind == "printf":
                self.on_printf(event.data, out)
            elif event.kind == "lost":
                self.on_lost(event.data, out)
            elif event.kind == "map":
                maps.setdefault(event.name, {}).update(event.data)
            elif event.kind == "time":
                self.report(maps, args, out, event.data, session)
                out.flush()
                maps, intervals = {}, intervals + 1
        code = session.wait()
        if code != 0 and not maps and not session.interrupted:
            raise session.failure(f"exited with status {code}")
        # With -i, what came after the last interval is reported, unless -d ended the trace
        # with that interval.
        ended_by_duration = intervals and intervals == self.ticks(args)
        if not intervals or (any(maps.get(name) for name in self.maps) and not ended_by_duration):
            self.report(maps, args, out, "at exit" if intervals else None, session)
        self.finish(args, out, session)
        out.flush()
        self.warn_incomplete(session, args)
        if target.process is not None:
            self.wait_for_command(target.process)
        return 0

    @staticmethod
    def wait_for_command(process) -> None:
        """After the trace of -c: the command's end, and its status when it failed."""
        if process.poll() is None:
            runner.warn("the trace has ended; the command runs on, untraced (Ctrl-C stops it)")
        if process.wait():
            status = process.returncode
            killed = f" (killed by {signal.Signals(-status).name})" if status < 0 else ""
            runner.warn(f"the command exited with status {status}{killed}")

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

    def warn_incomplete(self, session: runner.Session, args: argparse.Namespace) -> None:
        """Never a silently wrong table: say what the tracer lost."""
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
