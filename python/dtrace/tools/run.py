"""``run``: your own bpftrace program (a D script on the DTrace platforms), with the tools' start-up handshake.

``python -m dtrace run PROGRAM_FILE -c COMMAND`` (or ``-e PROGRAM``, or
``-p PID``) runs the program as it is, with what the other tools do around
theirs (see ``runner``): a command is started held at start-up with
``PYDTRACE=1``, and let run once the tracer has attached every probe and the
program's probes are live in it, so that it is traced from its first line.

What the tool adds to the program, and nothing else:

- two lines printed from ``BEGIN``, which bpftrace runs once every probe is
  attached: first and last in the program's own ``BEGIN`` (bpftrace 0.17
  takes one), or in a ``BEGIN`` of the tool's; the tool takes them out of the
  output, and lets a started command run after the last, so that whatever the
  program's ``BEGIN`` prints comes before anything the command does;
- ``@TARGET@`` (CPython's test_dtrace placeholder) in an attach point names
  the probe object; ``usdt:*:python:NAME`` and ``usdt::python:NAME`` stay as
  written (with ``-p``, bpftrace finds them in every object of the process),
  except where the interpreter declares the probe itself (built
  ``--with-dtrace``), which bpftrace 0.17 cannot attach under ``-p``: there
  every python attach point of such a probe (``*``, none, or ``@TARGET@``)
  names the probe object's sites by address, and the tool asks the process
  to fire them while it runs (``interpreter``; the clause's ``probe``
  builtin then names a uprobe);
- with ``-d``, a clause that ends the trace;
- ``@PYSTACK@`` in a clause's body stands for the Python stack of the thread that hit the probe,
  read from the interpreter's frames (``pystack``): the walk goes first in that clause (on its
  first line, so that bpftrace's messages keep the program's line numbers), and the placeholder
  becomes the stack's node (a number). In the output, every number that is such a node is
  printed as the stack, one ``file:line qualname`` per line, innermost first, as bpftrace prints
  a ``ustack``. A program whose only Python is ``@PYSTACK@`` needs no probe of pydtrace-rs: with
  ``-p`` it runs on any CPython 3.12+ process.

The program's output goes to stdout as bpftrace prints it, the maps it prints
at exit included; bpftrace's "Attaching N probes..." line is left out, and
the tool says on stderr when the trace has begun ("Tracing ...").
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import secrets
import signal
import sys
import threading
import time

from dtrace.tools.command import children, engine, interpreter, programs, runner, tracers
from dtrace.tools.command.base import Command
from dtrace.tools.errors import ToolError, warn
from dtrace.tools.proc import procfs, pystack, scope
from dtrace.tools.render import report

#: The exit status for a program the tool refuses (no probe of provider python, and the like).
BAD_PROGRAM = 2
#: Seconds of quiet after the first line of BEGIN, without its last, after which BEGIN is taken
#: to have returned early (a `return` in it), and the command is let run.
BEGIN_QUIET = 1.0
#: The Python stack, in a clause of the user's program (bpftrace).
PYSTACK = "@PYSTACK@"


class ProgramError(Exception):
    """A program the tool will not run: printed as ``pydtrace: MESSAGE``, exit status 2."""


class Run(Command):
    name = "run"
    summary = "run your own bpftrace program (D script on DTrace platforms); -c traces from the first line"
    description = (
        "Run your own bpftrace program (a D script on macOS and illumos) on a process (-p) or on a command "
        "started for it (-c), which is traced from its first line: it is held at start-up until every probe "
        "of the program is attached and live. Probes may be written usdt:*:python:NAME, usdt::python:NAME, "
        "or usdt:@TARGET@:python:NAME, where the tool puts the probe object's path for @TARGET@ (as CPython's "
        "test_dtrace does with the interpreter's). The program's output goes to stdout as it comes, the maps "
        "printed at exit included. A program that names no probe of provider python is refused (exit 2); one "
        "that bpftrace rejects gives bpftrace's message and its exit status, and a command started for it is "
        "ended."
    )
    examples = """\
examples:
  python -m dtrace run calls.bt -c "python3 app.py"
  python -m dtrace run -e 'usdt:*:python:function__entry { @[str(arg1)] = count(); }' -p 4711
  python -m dtrace run -e 'usdt:@TARGET@:python:gc__done { @collected = sum(arg0); }' -c "python3 app.py"
  python -m dtrace run calls.bt --script         the program as the tool runs it
  python -m dtrace run -e 'uprobe:libc:connect { @[@PYSTACK@] = count(); }' -p 4711
                                                 the Python stacks that call connect(), from the frames
"""
    intervals = False

    def add_arguments(self, parser):
        parser.add_argument("program_file", nargs="?", metavar="PROGRAM_FILE",
                            help="the program: a bpftrace file (a D script on macOS and illumos)")
        parser.add_argument("-e", dest="program_text", metavar="PROGRAM", help="the program itself, instead of a file")
        parser.add_argument("--depth", type=int, default=pystack.DEFAULT_DEPTH, metavar="N",
                            help=f"frames read per {PYSTACK} stack (default: %(default)s)")

    # --- the program

    def source(self, args) -> tuple[str, str]:
        """(the program's text, what to call it)."""
        if args.program_file and args.program_text is not None:
            raise ProgramError("give the program as a file or with -e, not both")
        if args.program_text is not None:
            return args.program_text, "the program"
        if not args.program_file:
            raise ProgramError("give a program: a file (python -m dtrace run PROGRAM_FILE ...) or -e PROGRAM")
        try:
            with open(args.program_file, encoding="utf-8") as f:
                return f.read(), args.program_file
        except OSError as error:
            raise ProgramError(f"cannot read {args.program_file}: {error.strerror or error}") from None

    def prepare(self, text: str, dialect: str, library: str | None,
                marker: str, duration: int | None, depth: int = pystack.DEFAULT_DEPTH) -> tuple[str, list[str]]:
        """The program as the tracer runs it, and the probes it uses (DTrace's spelling). It prints
        ``MARKER-attached`` first in its ``BEGIN`` and ``MARKER-begun`` last."""
        if dialect == "d":
            return self._prepare_d(text, marker, duration)
        clauses = programs.clauses(text)
        names = [name.replace("-", "__") for name in _probe_names()]
        used: set[str] = set()
        edits: list[tuple[int, int, str]] = []
        begin = None
        walks = self._walks(text, clauses, depth)
        edits += walks
        for clause in clauses:
            for point in clause.attach_points:
                if point.kind == "BEGIN" and begin is None:
                    begin = clause
                probe = programs.usdt(point)
                if probe is None or not _is_python(probe):
                    continue
                matched = programs.names_matching(probe.name, names)
                if not matched:
                    raise ProgramError(
                        f"{point.text}: provider python has no probe {probe.name!r}; its probes: {', '.join(names)}"
                    )
                used.update(matched)
                if probe.path == "@TARGET@":
                    if library is None:
                        raise ProgramError("@TARGET@: the process reported no probe object")
                    provider = f":{probe.provider}" if probe.provider else ""
                    edits.append((point.start, point.end, f"usdt:{library}{provider}:{probe.name}"))
        if not used and not walks:
            if not any(p.kind not in ("BEGIN", "END") for c in clauses for p in c.attach_points):
                raise ProgramError("the program names no probe at all; trace Python with usdt:*:python:PROBE "
                                   f"(probes: {', '.join(names)})")
            raise ProgramError("the program names no probe of provider python, e.g. usdt:*:python:function__entry "
                               f"(probes: {', '.join(names)})")
        attached, begun = f'printf("{marker}-attached\\n"); ', f'printf("{marker}-begun\\n"); '
        # A program that leaves a brace open is passed on as it is, for bpftrace to say so.
        complete = all(clause.closed(text) for clause in clauses)
        if begin is not None and complete:
            # On the body's lines, so that bpftrace's messages keep the user's line numbers.
            # bpftrace 0.17 wants a ';' after an expression, and takes none after a block.
            last = programs.mask(text)[begin.brace + 1:begin.end - 1].rstrip()[-1:]
            edits.append((begin.brace + 1, begin.brace + 1, attached))
            edits.append((begin.end - 1, begin.end - 1, (" " if last in ("", ";", "}") else "; ") + begun))
        program = programs.replace_spans(text, edits)
        if begin is None and complete:
            program += f"\n\nBEGIN\n{{\n\t{begun.strip()}\n}}\n"
        if duration and complete:
            program += f"\ninterval:s:{duration}\n{{\n\texit();\n}}\n"
        return program, sorted(name.replace("__", "-") for name in used)

    @staticmethod
    def _walks(text: str, clauses: list, depth: int) -> list[tuple[int, int, str]]:
        """The edits that put the Python stack walk in each clause that uses @PYSTACK@."""
        code = programs.mask(text)
        edits = []
        if PYSTACK not in code:
            return edits
        if not 1 <= depth <= pystack.MAX_DEPTH:
            raise ProgramError(f"--depth {depth}: give 1 to {pystack.MAX_DEPTH}")
        walk = " ".join(line.strip() for line in pystack.bpftrace_walk(None, depth, announce=True).splitlines()
                        if line.strip() and not line.strip().startswith("//"))
        for clause in clauses:
            body = code[clause.brace + 1:clause.end]
            places = [m.start() for m in re.finditer(re.escape(PYSTACK), body)]
            if not places:
                continue
            edits.append((clause.brace + 1, clause.brace + 1, f" {walk} "))
            edits += [(clause.brace + 1 + at, clause.brace + 1 + at + len(PYSTACK), pystack.STACK_VARIABLE)
                      for at in places]
        if not edits:
            raise ProgramError(f"{PYSTACK} stands for the Python stack in a clause's body, e.g. "
                               "uprobe:libc:connect { @[@PYSTACK@] = count(); }")
        return edits

    def _prepare_d(self, text: str, marker: str, duration: int | None) -> tuple[str, list[str]]:
        """A D script (UNTESTED: DTrace cannot be run here): python$target:::NAME probes."""
        code = programs.mask(text)
        names = _probe_names()
        used: set[str] = set()
        for match in re.finditer(r"\bpython(?:\$target|\$\d+|\d+|\*)?:[^:\s]*:[^:\s]*:([\w*?-]*)", code):
            pattern = match.group(1) or "*"
            matched = programs.names_matching(pattern.replace("__", "-"), names)
            if not matched:
                raise ProgramError(f"{match.group()}: provider python has no probe {pattern!r}")
            used.update(matched)
        if not used:
            raise ProgramError("the program names no probe of provider python, e.g. python$target:::function-entry")
        # D runs every BEGIN clause, in order: the program's first.
        program = text.rstrip("\n") + f'\n\nBEGIN\n{{\n\tprintf("{marker}-begun\\n");\n}}\n'
        if duration:
            program += f"\ntick-{duration}s\n{{\n\texit(0);\n}}\n"
        return program, sorted(used)

    # --- the run

    def run(self, args, out=sys.stdout) -> int:
        try:
            return self._run(args, out)
        except ProgramError as error:
            print(f"pydtrace: {error}", file=sys.stderr)
            return BAD_PROGRAM

    def _run(self, args, out) -> int:
        text, label = self.source(args)
        scope_text = scope.requested(args)  # --module/--file, checked before anything starts
        tracer = tracers.choose_tracer(args.tracer, args.tracer_path)
        marker = f"pydtrace-run-{secrets.token_hex(6)}"
        depth = getattr(args, "depth", pystack.DEFAULT_DEPTH)
        if args.script:
            import dtrace

            program, _ = self.prepare(text, tracer.dialect, dtrace.library_path(), marker, args.duration, depth)
            out.write(self.bind(program, args.pid) if args.pid is not None else program)
            return 0
        # The program is checked before anything is started.
        _, needed = self.prepare(text, tracer.dialect, "/probe-object", marker, args.duration, depth)
        tracer.executable()
        tracer.check_privileges()
        if not args.argv and not args.children:
            if not needed:  # only @PYSTACK@: any Python process, nothing injected
                target = runner.attach_any(args.pid)
            else:
                target = runner.attach(args.pid, args.inject, args.gdb)
            return self._trace(args, text, depth, tracer, marker, label, scope_text, target, out)
        # The command's Python processes report to the follower: each gets a tracer of its own with
        # --children, and runs on untraced otherwise (dtrace/tools/command/children.py). With -p --children,
        # those the process starts from now on, told through the lease.
        self._traces: list[Trace] = []
        self._children: list[threading.Thread] = []

        def follow(child: runner.Target) -> None:
            thread = threading.Thread(target=self._trace_child,
                                      args=(args, text, depth, tracer, marker, label, scope_text, child, out),
                                      daemon=True)
            self._children.append(thread)
            thread.start()

        if args.argv:
            follower = children.Follower(args.children, follow)
        else:
            target = runner.attach(args.pid, args.inject, args.gdb)
            follower = children.follow_running(target.pid, follow)
        try:
            if args.argv:
                target = runner.start(args.argv, args.startup_timeout, follower.environment())
                follower.start(target.pid)
            code = self._trace(args, text, depth, tracer, marker, label, scope_text, target, out,
                               follow=None if args.argv else follower.path)
            for thread in list(self._children):
                thread.join()
        finally:
            follower.close()
        if (note := follower.untraced_note()) is not None:
            warn(note)
        return code

    def _trace(self, args, text, depth, tracer, marker, label, scope_text, target, out, child: bool = False,
               follow: str | None = None) -> int:
        """One process's trace: the program bound to its probe object (and, for @PYSTACK@, to its
        frames' layout), its scope, its tracer; ``follow``: the socket where the processes it starts
        report (-p --children)."""
        resolver = None
        try:
            program, probes = self.prepare(text, tracer.dialect, target.library, marker, args.duration, depth)
            program, probes, asked = interpreter.adapt(program, self.fired(probes), target.pid, target.library,
                                                       tracer.dialect)
            if pystack.uses_walk(program):
                program = self.bind(program, target.pid)
                resolver = pystack.Resolver(target.pid, self.layout)
        except BaseException:
            if target.held:
                target.stop()
            raise
        # In force before the tracer attaches, as for the other tools (base.ScriptTool.run).
        lease = scope.open_session(args, target, scope_text, asked, quiet=child, follow=follow)
        try:
            trace = Trace(tracer, program, probes, target, marker, label, args, out)
            trace.resolver = resolver
            if child:
                self._traces.append(trace)  # the command's Ctrl-C reaches it
            else:
                trace.others = getattr(self, "_traces", [])
            return trace.run()
        finally:
            if resolver is not None:
                resolver.close()
            if lease is not None:
                lease.release()  # the scope goes back to what it was

    def _trace_child(self, args, text, depth, tracer, marker, label, scope_text, target, out) -> None:
        """A child's trace (in a thread of its own); one that cannot be traced runs on untraced."""
        try:
            self._trace(args, text, depth, tracer, marker, label, scope_text, target, out, child=True)
        except (ToolError, OSError) as error:
            target.abandon()
            warn(f"the child process {target.pid} is not traced: {error}")


def _probe_names() -> list[str]:
    import dtrace

    return list(dtrace.probe_names()) or [
        "function-entry", "function-return", "line", "gc-start", "gc-done", "instance-new-start",
        "instance-new-done", "instance-delete-start", "instance-delete-done", "import-find-load-start",
        "import-find-load-done", "audit",
    ]


def _is_python(probe: programs.UsdtProbe) -> bool:
    """Whether a usdt attach point names provider python (a provider-less one in the probe object)."""
    if probe.provider:
        return programs.names_matching(probe.provider, ["python"]) == ["python"]
    return probe.path == "@TARGET@" or bool(procfs.PROBE_OBJECT.search(probe.path))


class Trace:
    """One run of the tracer on the user's program: output passed through, the handshake,
    Ctrl-C, the end. The tracer process is the engine's (started, stopped and reaped as for
    every tool), its output read raw."""

    def __init__(self, tracer, program, probes, target, marker, label, args, out) -> None:
        self.tracer, self.program, self.probes, self.target = tracer, program, probes, target
        self.label, self.args, self.out = label, args, out
        self.attached_line = f"{marker}-attached\n".encode()
        self.begun_line = f"{marker}-begun\n".encode()
        self.interrupts = 0
        # The program's output is text, not bpftrace's JSON: a blank line is a sign that bpftrace
        # is leaving only once it was sent SIGINT (before, it is the program's own).
        self.engine = engine.TracerProcess(self.argv(), self.environment(),
                                           lambda line, signalled: signalled and tracer.leaving(line, signalled),
                                           raw=True, on_stderr=self._stderr)
        #: With @PYSTACK@: the process's code objects, and the stacks' nodes (node -> (parent, value)).
        self.resolver: pystack.Resolver | None = None
        self.nodes: dict[int, tuple[int, int]] = {}
        self.others: list[Trace] = []

    def argv(self) -> list[str]:
        if self.tracer.dialect == "d":
            path = tracers._program_file(self.program, ".d")
            return [self.tracer.executable(), "-q", "-p", str(self.target.pid), "-s", path]
        return [self.tracer.executable(), "-p", str(self.target.pid), "-e", self.program]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.args.max_keys or "BPFTRACE_MAP_KEYS_MAX" not in env:
            env["BPFTRACE_MAP_KEYS_MAX"] = str(self.args.max_keys or Run.max_keys)
        return env

    def run(self) -> int:
        # The stop signals reach the trace until the cleanup below is done, as in ScriptTool.run:
        # a Ctrl-C while the tracer is killed and the command stopped hurries that, not cuts it short.
        with contextlib.ExitStack() as handlers:
            try:
                self.engine.start()
                # (In a child's trace, a thread of its own, the command's handler reaches it.)
                handlers.enter_context(engine.stop_signals(self.interrupt))
                state = self._pass_output()
                code = self.engine.wait()
            except BaseException:
                self.engine.kill()
                if self.target.held:
                    self.target.stop()
                raise
        self.out.flush()
        if state != "begun":
            ended = ""
            if self.target.process is not None:
                self.target.stop()  # the trace never began: the command is not left waiting
                ended = "; the command was ended"
            if self.interrupts:
                return 130
            if state == "attached" and code == 0:
                warn(f"{self.label} ended in its BEGIN, before the trace began{ended}")
                return 0
            warn(f"{self.tracer.name} did not run {self.label} (exit status {code}){ended}")
            return code or 1
        if self.target.process is not None:
            # As the other tools: a command that outlives the trace (-d, exit() in the program, a
            # stop signal) is stopped with it; one that ended by itself gives its status.
            if self.target.process.poll() is None:
                return Command.stop_command(self.target)
            if not self.interrupts and (status := Command.command_status(self.target.process.returncode)):
                return status
        if code:
            warn(f"{self.tracer.name} exited with status {code}")
        return code

    # --- output

    @staticmethod
    def _stderr(line: str) -> None:
        """The tracer's stderr goes through as it comes, but for its noise (the engine's NOISE)."""
        if not engine.is_noise(line):
            sys.stderr.write(line)
            sys.stderr.flush()

    def _write(self, data: bytes) -> None:
        if not data:
            return
        buffer = getattr(self.out, "buffer", None)
        if buffer is not None:
            self.out.flush()
            buffer.write(data)
            buffer.flush()
        else:
            self.out.write(data.decode(errors="replace"))
            self.out.flush()

    def _pass_output(self) -> str:
        """Pass the tracer's output through until it ends, and let a started command run once the
        program's BEGIN is done. Returns how far the tracer came: "begun" (BEGIN done: the trace
        ran), "attached" (every probe attached, but BEGIN ended early: exit() there), or ""."""
        markers = (self.attached_line, self.begun_line)
        pending = b""  # output held back: until BEGIN is done, or a line that may be a marker
        state = ""
        deadline = time.monotonic() + engine.ATTACH_TIMEOUT
        while True:
            try:
                chunk = self.engine.read()
            except queue.Empty:
                if state == "attached" and time.monotonic() - self.engine.last_output > BEGIN_QUIET:
                    state = self._begun(pending)  # BEGIN returned early, without its last line
                    pending = b""
                elif not state and time.monotonic() > deadline:
                    raise ToolError(f"{self.tracer.name} did not attach within {engine.ATTACH_TIMEOUT:g} s")
                continue
            if chunk is None:
                self._write(self._stacks(self._clean(pending, markers)))
                return state
            pending += chunk
            if state != "begun":
                if not state and _line_at(pending, self.attached_line) >= 0:
                    state = "attached"
                at = _line_at(pending, self.begun_line)
                if at < 0:
                    continue
                state = self._begun(pending[:at])
                pending = pending[at + len(self.begun_line):]
            # Complete lines go out at once (but a marker again, from a BEGIN that shares its
            # clause); so does a partial line that cannot become a marker.
            cut = pending.rfind(b"\n") + 1
            done, pending = pending[:cut], pending[cut:]
            self._write(self._stacks(self._clean(done, markers)))
            if pending and self.resolver is None and not any(marker.startswith(pending) for marker in markers):
                self._write(pending)
                pending = b""

    def _begun(self, before: bytes) -> str:
        """BEGIN is done: what it printed goes out, then the command runs."""
        self._write(self._clean(before, (self.attached_line, self.begun_line)))
        self.target.release(self.probes)
        print(f"Tracing with {self.label}... Hit Ctrl-C to end.  [{self.target.describe()}]",
              file=sys.stderr, flush=True)
        return "begun"

    def _stacks(self, data: bytes) -> bytes:
        """With @PYSTACK@: the walk's own lines taken out (read), and each stack node in the rest
        printed as its stack."""
        if self.resolver is None or not data:
            return data
        out = []
        for line in data.decode(errors="replace").splitlines(keepends=True):
            if line.startswith(pystack.NODE_LINE + " "):
                try:
                    node, parent, value = (int(word) & pystack.MASK for word in line.split()[1:4])
                    self.nodes[node] = (parent, value)
                except ValueError:
                    pass
                continue
            if pystack.on_printf(line, self.resolver) or line.startswith(pystack.WALK_MAPS):
                continue  # the walk's own output and maps (printed at exit)
            out.append(re.sub(r"-?\b\d{6,20}\b", self._stack_text, line))
        return "".join(out).encode()

    def _stack_text(self, match: re.Match) -> str:
        node = int(match.group(0)) & pystack.MASK
        if node not in self.nodes:
            return match.group(0)
        frames = {n: v for n, (_, v) in self.nodes.items()}
        parents = {n: p for n, (p, _) in self.nodes.items()}
        stack = self.resolver.stack(node, frames, parents) or []
        return "\n" + "".join(f"    {report.path(f.file)}:{f.line} {f.qualname}\n" if f.file else f"    {f.qualname}\n"
                               for f in stack)

    @staticmethod
    def _clean(data: bytes, markers: tuple[bytes, ...]) -> bytes:
        """``data`` without the markers' lines and bpftrace's "Attaching N probes..." line."""
        return b"".join(line for line in data.splitlines(keepends=True)
                        if line not in markers and not engine.ATTACHING.match(line.decode(errors="replace").rstrip("\n")))

    # --- Ctrl-C

    def interrupt(self, signum: int = signal.SIGINT) -> None:
        """Ctrl-C, SIGTERM or SIGHUP (from a signal handler): the engine stops the tracer (SIGINT
        once its output has been quiet: bpftrace stops reading its buffers at SIGINT); each
        further signal hurries it (SIGINT at once, then SIGKILL). The tracers of the command's
        children (--children) are stopped too."""
        self.interrupts += 1
        for other in list(self.others):
            other.interrupt(signum)
        self.engine.interrupt(signum)


def _line_at(data: bytes, line: bytes) -> int:
    """Where ``line`` (ending in a newline) stands as a whole line in ``data``, or -1."""
    at = data.find(line)
    while at > 0 and data[at - 1:at] != b"\n":
        at = data.find(line, at + 1)
    return at
