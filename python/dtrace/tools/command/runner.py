"""Run a tool: find or start the target, start the tracer, handshake, collect the tracer's output.

The steps, for ``python -m dtrace TOOL``:

1. The tracer is chosen (bpftrace on Linux, dtrace on macOS and illumos) and
   checked: installed, and run with enough privileges.
2. The target: ``-p PID`` checks that the process runs and has loaded the
   probe object (``dtrace/_native*.so``), else offers to load it (``inject/loader.py``);
   ``-c COMMAND`` starts the command with ``PYDTRACE=1`` and
   ``PYDTRACE_STARTUP=WFD,RFD`` (two pipes): its first
   interpreter reports ``PID LIBRARY`` and waits (see ``dtrace._startup``).
3. The tracer attaches with ``-p PID`` and runs the program; its ``BEGIN``
   prints the "Tracing ..." line once every probe is attached.
4. For ``-c``, the command is then told ``go PROBES``: it waits until those
   probes are live in it and runs, traced from its first line.
5. The tracer's output is read until it exits: at Ctrl-C, SIGTERM or SIGHUP
   (forwarded to it as SIGINT, see ``engine.py``), at the end of
   ``--duration``, or when the process exits.

The tracer process itself (started to die with the tool, read, stopped, reaped) is the
engine's (``engine.py``). A command started by ``-c`` gets SIGTERM when the tool dies.
"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from dtrace.tools.command.engine import TracerProcess, die_with_parent
from dtrace.tools.command.options import STARTUP_TIMEOUT, own_python
from dtrace.tools.command.tracers import DTrace, Event, Tracer
from dtrace.tools.errors import ToolError, warn
from dtrace.tools.proc import procfs, pyprocess

#: Seconds a started command has to exit after SIGTERM before it gets SIGKILL.
COMMAND_GRACE = 5.0

# --- the target ------------------------------------------------------------------------------

_ARM_HINT = (
    "arm it with `import dtrace` in the program, or start it with PYDTRACE=1 in its environment "
    "(pydtrace-rs installed in its Python), or let the tool start it: -c \"COMMAND\""
)


@dataclass
class Target:
    """The traced process: attached by PID, or started by the tool (then ``process`` is set)."""

    pid: int
    library: str | None
    process: subprocess.Popen | None = None
    _to_child: int | None = None

    @property
    def held(self) -> bool:
        """Whether a started command still waits at start-up for the tool's word."""
        return self._to_child is not None

    def release(self, probes: list[str]) -> None:
        """Let a started command run, once the probes are live in it (no-op for ``-p``)."""
        if self._to_child is None:
            return
        if not probes:
            self._close()  # nothing to wait for: it runs at once
            return
        try:
            os.write(self._to_child, f"go {','.join(probes)}\n".encode())
        except OSError:
            pass  # the command has gone; the tracer will say so by exiting
        self._close()

    def abandon(self) -> None:
        """Give up on a started command: it runs on untraced, unless it is stopped too."""
        self._close()

    def stop(self) -> None:
        """Stop a started command: SIGTERM, then SIGKILL after COMMAND_GRACE seconds."""
        self._close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(COMMAND_GRACE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _close(self) -> None:
        if self._to_child is not None:
            os.close(self._to_child)
            self._to_child = None

    def describe(self) -> str:
        """``PID 4711 (python app.py)``."""
        command = " ".join(procfs.command_line(self.pid))
        if len(command) > 60:
            command = command[:57] + "..."
        return f"PID {self.pid} ({command})" if command else f"PID {self.pid}"


def attach(pid: int, inject: bool = False, gdb: str | None = None) -> Target:
    """The target of ``-p PID``: it must run and have loaded dtrace (checked on Linux). A Python
    process that has not is offered the probes (dtrace/tools/inject/loader.py): on a terminal the user
    is asked; with ``inject`` they are loaded at once (through ``gdb``, on 3.12 and 3.13, when given)."""
    procfs.check_running(pid)
    if not sys.platform.startswith("linux"):
        return Target(pid, None)  # DTrace reports a process without the provider itself
    library = procfs.probe_object(pid)
    if library is None:
        from dtrace.tools.inject import loader as injection

        not_loaded = (f"process {pid} has not loaded the dtrace module (pydtrace-rs): {_ARM_HINT}; "
                      "or pass --inject to load it into the running process now")
        injection.load_probes(pid, inject, Target(pid, None).describe(), not_loaded, gdb)
        library = procfs.probe_object(pid)
        if library is None:
            raise ToolError(f"the probes were loaded into process {pid}, but its maps show no probe object")
    if pyprocess.watcher_running(pid) is False:
        warn(
            f"process {pid} has loaded dtrace but its probes are not armed (PYDTRACE=0 in its "
            "environment?): they will not fire"
        )
    return Target(pid, library)


def attach_any(pid: int) -> Target:
    """The target of ``-p PID`` for a program that enables no probe of pydtrace-rs (a Python stack
    walk): any running process, whether or not it loaded dtrace; nothing is injected."""
    procfs.check_running(pid)
    library = procfs.probe_object(pid) if sys.platform.startswith("linux") else None
    return Target(pid, library)


def start(command: str | Sequence[str], timeout: float = STARTUP_TIMEOUT,
          environment: dict[str, str] | None = None) -> Target:
    """Start ``command`` (an argument list, or a string split like a shell would split it; run
    without a shell) held at start-up, see the module doc. It gets SIGTERM if the tool dies.
    ``environment``: variables added to its environment (``PYDTRACE_FOLLOW``)."""
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if not argv:
        raise ToolError(f"-c needs a command, e.g. -c \"{own_python()} app.py\"")
    from_child, child_writes = os.pipe()
    child_reads, to_child = os.pipe()
    env = {**os.environ, **(environment or {}), "PYDTRACE": "1",
           "PYDTRACE_STARTUP": f"{child_writes},{child_reads}"}
    try:
        process = subprocess.Popen(argv, env=env, pass_fds=(child_writes, child_reads),
                                   preexec_fn=die_with_parent(signal.SIGTERM))
    except FileNotFoundError:
        _close_all(from_child, child_writes, child_reads, to_child)
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
            raise ToolError(f"command not found: {argv[0]}: -c runs the command without a shell, so it cannot "
                            f"set a variable that way; use env: -c \"env {shlex.join(argv)}\"") from None
        raise ToolError(f"command not found: {argv[0]}") from None
    except PermissionError:
        _close_all(from_child, child_writes, child_reads, to_child)
        raise ToolError(f"cannot run {argv[0]}: permission denied") from None
    _close_all(child_writes, child_reads)
    target = Target(0, None, process, to_child)
    try:
        report = _read_line(from_child, timeout, process)
    except BaseException:  # Ctrl-C while waiting: the command does not stay behind
        target.stop()
        raise
    finally:
        os.close(from_child)
    if report is None:
        hint = startup_hint(argv)
        try:
            code = process.wait(timeout=1)  # it closed the pipe (exited), or the time is up
        except subprocess.TimeoutExpired:
            code = None
        target.stop()
        if code is None:
            raise ToolError(f"the command did not load dtrace within {timeout:g} s; {hint}")
        raise ToolError(f"the command exited (status {code}) before loading dtrace; {hint}")
    try:
        pid_text, library = report.split(" ", 1)
        target.pid = int(pid_text)
    except ValueError:
        target.stop()
        raise ToolError(f"unexpected start-up report from the command: {report!r}") from None
    target.library = library if library != "None" else None
    return target


#: What an interpreter says about itself, for :func:`startup_hint`: its version, where it
#: would import dtrace from, and which of its site directories hold pydtrace-rs.pth.
_INTERPRETER_FACTS = """\
import importlib.util, json, os, site, sys
spec = importlib.util.find_spec("dtrace")
sites = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
print(json.dumps({"version": list(sys.version_info[:2]), "dtrace": spec and spec.origin, "sites": sites,
                  "pth": [d for d in sites if any(os.path.exists(os.path.join(d, name))
                                                  for name in ("pydtrace-rs.pth", "pydtrace_rs_arm.pth"))]}))
"""
_PYTHON_NAME = re.compile(r"python[\d.]*")


def command_python(argv: Sequence[str]) -> str | None:
    """The Python interpreter a command runs: its first word when that is a Python, or the
    interpreter named by the ``#!`` line of the script it runs; None when neither."""
    exe = shutil.which(argv[0]) or argv[0]
    if _PYTHON_NAME.fullmatch(os.path.basename(exe)):
        return exe
    try:
        with open(exe, "rb") as f:
            first = f.readline(256)
    except OSError:
        return None
    words = first[2:].decode(errors="replace").split() if first.startswith(b"#!") else []
    if words and os.path.basename(words[0]) == "env":
        words = [w for w in words[1:] if not w.startswith("-")]
    if words and _PYTHON_NAME.fullmatch(os.path.basename(words[0])):
        return shutil.which(words[0]) or words[0]
    return None


def interpreter_facts(python: str) -> dict | None:
    """What ``python`` says about itself (see _INTERPRETER_FACTS), or None if it cannot say."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYDTRACE")}
    try:
        done = subprocess.run([python, "-c", _INTERPRETER_FACTS], capture_output=True, text=True, env=env,
                              timeout=10)
        return json.loads(done.stdout)
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


#: The name the one extra step gives pydtrace-rs.pth: site loads .pth files in name order, and this
#: name sorts after maturin's editable pydtrace_rs.pth, which puts the checkout on sys.path first.
PTH_AFTER_EDITABLE = "pydtrace_rs_arm.pth"


def missing_pth_fix(python: str, facts: dict) -> str:
    """The one step that makes PYDTRACE=1 work in an environment without pydtrace-rs.pth."""
    site = facts["sites"][0] if facts["sites"] else "its site-packages"
    source = "pydtrace-rs.pth"
    if facts["dtrace"]:  # an editable install (maturin develop) imports dtrace from the checkout
        checkout = Path(facts["dtrace"]).resolve().parents[2]
        if (checkout / "pydtrace-rs.pth").exists():
            source = str(checkout / "pydtrace-rs.pth")
    return (f"PYDTRACE=1 does nothing in {python}: pydtrace-rs.pth is missing from {site} (`maturin develop` "
            f"leaves it out); add it: cp {source} {site}/{PTH_AFTER_EDITABLE} (or install with `pip install .`)")


def startup_hint(argv: Sequence[str]) -> str:
    """What to do about a command that never loaded dtrace: its Python, as far as it can be told."""
    generic = (f"is it a Python {pyprocess.version_text(pyprocess.OLDEST)}+ with pydtrace-rs installed (the "
               f"environment's python, e.g. {sys.executable})?")
    python = command_python(argv)
    facts = interpreter_facts(python) if python else None
    if facts is None:
        # Not a Python the tool can ask: say whether this environment's own Python would work.
        own = interpreter_facts(sys.executable)
        if own and own["dtrace"] and not own["pth"]:
            return f"{generic} Note: {missing_pth_fix(sys.executable, own)}"
        return generic
    version = ".".join(map(str, facts["version"]))
    if tuple(facts["version"]) < pyprocess.OLDEST:
        return (f"{python} is Python {version}: pydtrace-rs needs CPython {pyprocess.version_text(pyprocess.OLDEST)} "
                f"or later; run the command with a Python that has pydtrace-rs, e.g. {sys.executable}")
    if not facts["dtrace"]:
        return (f"pydtrace-rs is not installed in {python}: install it there, or run the command with a Python "
                f"that has it, e.g. {sys.executable}")
    if not facts["pth"]:
        return missing_pth_fix(python, facts)
    return f"{python} has pydtrace-rs and PYDTRACE=1 works there: does the command start it, and without -S (which skips .pth files)?"


def _read_line(fd: int, timeout: float, process: subprocess.Popen) -> str | None:
    """One line from ``fd`` within ``timeout`` s; None at end of file, timeout, or when ``process`` ended."""
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], min(remaining, 0.5))
        if not ready:
            if process.poll() is not None:
                return None
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        data += chunk
    return data.decode(errors="replace").strip()


def _close_all(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


# --- one run ---------------------------------------------------------------------------------


@dataclass
class Session:
    """A running tool's tracer: its output read as events (the engine's :class:`TracerProcess`
    runs the process), and what the events said went wrong."""

    tracer: Tracer
    program: str
    target: Target
    env: dict[str, str]
    keys: dict[str, int]
    hists: frozenset[str]
    arguments: list[str] = field(default_factory=list)
    lost: int = 0
    map_full: int = 0
    helper_errors: dict[str, int] = field(default_factory=dict)

    def start(self) -> None:
        self.engine = TracerProcess(self.tracer.argv(self.program, self.target.pid, self.arguments), self.env,
                                    self.tracer.leaving)
        self.engine.start()

    @property
    def signals(self) -> list[int]:
        """The stop signals the tool received while tracing, in order."""
        return self.engine.signals

    def interrupt(self, signum: int = signal.SIGINT) -> None:
        """Ctrl-C, SIGTERM or SIGHUP to the tool (from a signal handler): stop the tracer, which
        prints what it gathered (see :meth:`TracerProcess.interrupt`)."""
        self.engine.interrupt(signum)

    def request_stop(self) -> None:
        """Stop the tracer once its output has been quiet for a moment, as after Ctrl-C, without a
        signal to the tool (the end of an aggregating tool's last flush)."""
        self.engine.request_stop()

    @property
    def stop_requested(self) -> bool:
        """Whether a stop was asked for: a stop signal to the tool (also one an aggregating tool
        answers with a last flush first), or the end of its last flush."""
        return self.engine.stop_requested

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """The tracer's events up to its exit; TimeoutError if a line takes longer than ``timeout``."""
        for line in self.engine.lines(timeout, before=self._reap_command):
            for event in self.tracer.events(line, self.keys, self.hists):
                if event.kind == "lost":
                    self.lost += event.data
                    yield event
                elif event.kind == "map_full":
                    self.map_full += 1
                elif event.kind == "helper_error":
                    self.helper_errors[event.data] = self.helper_errors.get(event.data, 0) + 1
                else:
                    yield event
        if isinstance(self.tracer, DTrace):
            yield from self.tracer.finish()

    def _reap_command(self) -> None:
        # A started command that has exited is reaped at once: bpftrace 0.17 ends when its -p
        # process becomes a zombie, later releases (0.27) only once it is reaped.
        if self.target.process is not None:
            self.target.process.poll()

    def wait(self) -> int:
        """The tracer's exit status, once it exits (stopping it first if a stop was requested)."""
        return self.engine.wait()

    def stop(self) -> int:
        """Stop the tracer now (SIGINT, again if missed, then SIGKILL) and wait for it."""
        return self.engine.stop()

    def kill(self) -> None:
        """On an error: the tracer killed and reaped."""
        if getattr(self, "engine", None) is not None:
            self.engine.kill()

    @property
    def killed(self) -> bool:
        """Whether the tracer had to be killed (its last output is lost)."""
        return self.engine.killed

    def errors(self) -> str:
        """The tracer's stderr, without its harmless noise."""
        return self.engine.errors()

    def failure(self, what: str) -> ToolError:
        """A ToolError for a tracer that failed, with its own words and a hint where one fits."""
        errors = self.errors()
        hint = ""
        if re.search(r"permission|not permitted|EPERM", errors, re.I):
            hint = "\nPermission denied: run as root (sudo)."
        elif re.search(r"usdt|probe", errors, re.I) and self.target.library:
            hint = f"\n(probe object: {self.target.library})"
        return ToolError(f"{self.tracer.name} {what}:\n{errors or '(no message)'}{hint}")
