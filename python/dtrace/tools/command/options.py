"""The options of one run of a tool: one typed object, made and checked when the command line is parsed.

:meth:`Options.from_args` turns argparse's namespace into :class:`Options` and
checks everything that can be checked before anything starts: a command that
splits into nothing or does not split (``-c ""``, an unclosed quote), a target
that is missing, and what a tool checks of its own (``check_options``: flame's output
file, say). What it finds wrong is
a :class:`UsageError`: the command line prints the tool's usage and the one
line, and exits with status 2, argparse's convention for usage errors.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, fields, replace

from dtrace.tools.errors import UsageError
from dtrace.tools.proc.pystack import DEFAULT_DEPTH
from dtrace.tools.render import report

#: Exit status of a usage error (argparse's convention) and of a failure the user can act on.
EXIT_USAGE = 2
EXIT_FAILURE = 1

#: Seconds a started command may take to load dtrace and report, by default.
STARTUP_TIMEOUT = 30.0


def own_python() -> str:
    """How to name this environment's own Python in an example: ``python3`` when that is it on
    PATH, else its path (relative when below the working directory). Another Python (pyenv's,
    the system's) would run a command untraced: it has no pydtrace-rs."""
    exe = sys.executable or "python3"
    for name in ("python3", "python"):
        found = shutil.which(name)
        if found and os.path.realpath(found) == os.path.realpath(exe) and os.path.dirname(found) == os.path.dirname(exe):
            return name
    return report.path(exe)


def with_own_python(examples: str) -> str:
    """A help's examples with ``"python3 ...`` naming this environment's Python, the columns
    realigned."""
    python = own_python()
    if python == "python3":
        return examples
    lines = [line.replace('"python3 ', f'"{python} ') for line in examples.splitlines()]
    split = [re.match(r"^(  \S.*?)(?:\s{2,}(\S.*))?$", line) for line in lines]
    width = max((len(m.group(1)) for m in split if m and m.group(2)), default=0)
    out = []
    for line, match in zip(lines, split):
        if match and match.group(2) and width > 64:  # too wide for one line: the words below
            out.append(f"{match.group(1)}\n      {match.group(2)}")
        elif match and match.group(2):
            out.append(f"{match.group(1).ljust(width)}  {match.group(2)}")
        else:
            out.append(line)
    return "\n".join(out) + ("\n" if examples.endswith("\n") else "")


@dataclass(frozen=True)
class Options:
    """Everything one run of a tool was asked to do, typed.

    Fields every tool has come first; then the options some tools take (their
    defaults are the tool's, from its parser). Every option of every tool has its
    field here: a tool's parser that adds another is refused by :meth:`from_args`.
    """

    tool: str
    pid: int | None = None
    #: -c as given, and split like a shell would split it (never empty when given).
    command: str | None = None
    argv: tuple[str, ...] = ()
    duration: int | None = None
    interval: int | None = None
    script: bool = False
    tracer: str | None = None
    #: --tracer-path: the tracer's executable, instead of the first on PATH.
    tracer_path: str | None = None
    max_keys: int | None = None
    startup_timeout: float = STARTUP_TIMEOUT
    #: -p on a process without the probes: load them without asking (docs/injection.md).
    inject: bool = False
    #: --gdb: the gdb that --inject runs on 3.12 and 3.13 (None: $PYDTRACE_GDB, else gdb on PATH).
    gdb: str | None = None
    #: --children: trace the Python processes a -c command (or a -p process, from now on) starts too
    #: (dtrace/tools/command/children.py).
    children: bool = False
    #: --module and --file: the session's scope (docs/scope.md), as given.
    scope_modules: tuple[str, ...] = ()
    scope_files: tuple[str, ...] = ()
    # calls, lines, objnew, where
    top: int = 20
    # calls
    latency: bool = False
    # calls, flow, flame: C functions too (the cfunction probes)
    native: bool = False
    # calls, lines, flame: the per-event probes rather than aggregation in the process
    per_event: bool = False
    # where
    function: str | None = None
    no_lines: bool = False
    trace_calls: bool = False
    # flame, where, run: the frames a Python stack walk reads
    depth: int = DEFAULT_DEPTH
    # flame: --sample's rate (None: timed from the entry and return events)
    sample: int | None = None
    # flame: the file to write (None: standard output) and its format, settled by flame's
    # check_options from --format, --folded and -o's suffix
    output: str | None = None
    format: str | None = None
    folded: bool = False
    # run: the program, as a file or as text (-e)
    program_file: str | None = None
    program_text: str | None = None

    @property
    def target_given(self) -> bool:
        return self.pid is not None or bool(self.argv)

    @classmethod
    def from_args(cls, namespace: argparse.Namespace, needs_target: bool = True) -> Options:
        """The options of a parsed command line; UsageError for what cannot work."""
        values = dict(vars(namespace))
        names = {f.name for f in fields(cls)} - {"argv"}
        unknown = sorted(set(values) - names)
        if unknown:  # a tool's parser added an option without its field: a bug, not a usage error
            raise TypeError(f"Options has no field for {', '.join(unknown)}: add one")
        for name in ("scope_modules", "scope_files"):
            if name in values:
                values[name] = tuple(values[name] or ())
        options = cls(**values)

        argv: tuple[str, ...] = ()
        if options.command is not None:
            argv = split_command(options.command)
        if options.pid is not None and options.pid <= 0:
            raise UsageError(f"-p {options.pid} is not a process ID: give the PID of a running process")
        if needs_target and not options.script and options.pid is None and not argv:
            raise UsageError("give -p PID or -c COMMAND (or --script)")
        if options.startup_timeout <= 0:
            raise UsageError(f"--startup-timeout must be more than 0 seconds, not {options.startup_timeout:g}")
        if options.top < 0:
            raise UsageError(f"-n must be 0 (show all) or more, not {options.top}")
        return replace(options, argv=argv)


def split_command(command: str) -> tuple[str, ...]:
    """-c COMMAND split like a shell would split it; UsageError when it is empty or does not split."""
    try:
        argv = shlex.split(command)
    except ValueError as error:  # "No closing quotation", "No escaped character"
        raise UsageError(
            f"-c cannot split {command!r} like a shell: {str(error).lower()}; quote it as a shell would, "
            f"e.g. -c \"{own_python()} app.py 'two words'\""
        ) from None
    if not argv:
        raise UsageError(f"-c needs a command, e.g. -c \"{own_python()} app.py\"")
    return tuple(argv)


def positive(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value
