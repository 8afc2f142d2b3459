"""The command line: ``python -m dtrace TOOL [options]``, also installed as ``pydtrace``.

Exit status: 0 when the trace ended (the process or command exited, ``-d`` passed,
or Ctrl-C, SIGTERM or SIGHUP stopped it) and the report was printed; 1 for a
problem the message says how to solve; 2 for a usage error (argparse's
convention); a ``-c`` command that failed on its own makes it the command's
status (128 + N when a signal N killed it); 130 for Ctrl-C, and 128 + N for
SIGTERM or SIGHUP, before tracing began.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys

from dtrace.tools import TOOLS
from dtrace.tools.errors import ToolError
from dtrace.tools.proc import scope
from dtrace.tools.command.options import (EXIT_FAILURE, EXIT_USAGE, STARTUP_TIMEOUT, Options, UsageError, positive,
                                  with_own_python)

EPILOG = """\
examples:
  python -m dtrace list -p 4711                  the probes of process 4711, and which are enabled
  python -m dtrace calls -c "python3 app.py"     count calls of a command, traced from its first line
  python -m dtrace calls --latency -p 4711       count and time the calls of a running process
  python -m dtrace where connect -p 4711         which Python code opens connections
  python -m dtrace gc --script                   print the bpftrace program of a tool

The process must have the probes armed: `import dtrace` in it, or PYDTRACE=1 in its
environment; -c arms the command it starts; -p --inject loads them into a running Python
(docs/injection.md). Tracing needs root (sudo).

exit status: 0 once the trace ended and its report was printed (also after Ctrl-C,
SIGTERM or SIGHUP); 1 for a problem the message explains; 2 for a usage error; the
status of a -c command that failed on its own (128+N if signal N killed it).
"""

COMMON_HELP = {
    "pid": "trace the running process PID",
    "command": "start COMMAND (split like a shell would, run without one) and trace it from its first "
               "line; it ends with the trace (-d, Ctrl-C, SIGTERM, SIGHUP, the tool's end): SIGTERM, "
               "then SIGKILL after 5 s",
    "list-command": "start COMMAND, list its probes, and let it run on untraced (the tool waits for it, "
                    "and exits with its status)",
    "duration": "stop after SECONDS (with -i, rounded up to whole intervals; default: at Ctrl-C, "
                "SIGTERM or SIGHUP, or when the process exits); a command started by -c is then stopped",
}


def parser(prog: str) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser, and each tool's parser by name."""
    top = argparse.ArgumentParser(
        prog=prog,
        description="Ready-made tracing tools on the probes of pydtrace-rs (bpftrace on Linux, "
                    "DTrace on macOS and illumos).",
        epilog=with_own_python(EPILOG),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tools = top.add_subparsers(dest="tool", metavar="TOOL", title="tools")
    subparsers = {}
    for tool in TOOLS.values():
        sub = tools.add_parser(tool.name, help=tool.summary, description=tool.description,
                               epilog=with_own_python(tool.examples), formatter_class=argparse.RawDescriptionHelpFormatter)
        subparsers[tool.name] = sub
        tool.add_arguments(sub)
        if tool.name != "list":
            scope.add_arguments(sub)  # --module, --file
        target = sub.add_mutually_exclusive_group()
        target.add_argument("-p", "--pid", type=int, help=COMMON_HELP["pid"])
        target.add_argument("-c", "--command", metavar="COMMAND",
                            help=COMMON_HELP["command"] if tool.needs_target else COMMON_HELP["list-command"])
        if tool.needs_target:
            sub.add_argument("--children", action="store_true",
                             help="also trace every Python process the command (-c) starts, or the process "
                                  "(-p) starts from now on (fork, exec, multiprocessing, subprocess), each from "
                                  "its first line, in a section of its own (or with its PID first on each line)")
        sub.add_argument("--inject", action="store_true",
                         help="with -p, on a Python process that has not loaded the probes: load them without "
                              "asking (runs `import dtrace` in it through gdb, or sys.remote_exec on 3.14+; "
                              "see docs/injection.md)")
        sub.add_argument("--gdb", metavar="PATH",
                         help="with --inject on Python 3.12 and 3.13: the gdb to use (default: $PYDTRACE_GDB, "
                              "else gdb on PATH)")
        sub.add_argument("-d", "--duration", type=positive, metavar="SECONDS", help=COMMON_HELP["duration"])
        if tool.intervals:
            sub.add_argument("-i", "--interval", type=positive, metavar="SECONDS",
                             help="print (and reset) the report every SECONDS")
        sub.add_argument("--script", action="store_true",
                         help="print the tracer program these options run, and exit")
        sub.add_argument("--tracer", choices=["bpftrace", "dtrace"],
                         help="the tracer (default: bpftrace on Linux, dtrace on macOS and illumos)")
        sub.add_argument("--tracer-path", metavar="PATH",
                         help="the tracer's executable (default: $PYDTRACE_BPFTRACE or $PYDTRACE_DTRACE if set, "
                              "else the first on PATH)")
        sub.add_argument("--max-keys", type=positive, metavar="N",
                         help=f"the most keys a map holds (bpftrace's BPFTRACE_MAP_KEYS_MAX; default: {tool.max_keys})")
        sub.add_argument("--startup-timeout", type=float, default=STARTUP_TIMEOUT, metavar="SECONDS",
                         help="how long -c waits for the command to load dtrace (default: %(default)g)")
    return top, subparsers


def parse(argv: list[str] | None, prog: str) -> tuple[Options, argparse.ArgumentParser]:
    """The options of a command line, and the parser of its tool (for its usage); exits with
    status 2 and the right usage on a usage error."""
    top, subparsers = parser(prog)
    namespace, extras = top.parse_known_args(argv)
    if namespace.tool is None:
        top.print_usage(sys.stderr)
        top.exit(EXIT_USAGE, f"{prog}: error: give a tool, e.g. {prog} calls -p PID ({prog} --help lists them)\n")
    sub = subparsers[namespace.tool]
    if extras:
        sub.error(f"{namespace.tool} does not take {' '.join(extras)} ({prog} {namespace.tool} --help lists "
                  "its options)")
    try:
        return options_of(namespace), sub
    except UsageError as error:
        sub.error(str(error))


def options_of(namespace: argparse.Namespace) -> Options:
    """The options of a parsed command line, checked by the shared rules and then by its tool's own
    (UsageError for what cannot work)."""
    tool = TOOLS[namespace.tool]
    return tool.check_options(Options.from_args(namespace, needs_target=tool.needs_target))


class Stopped(BaseException):
    """SIGTERM or SIGHUP before the trace began: the tool cleans up and exits with 128 + N."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum, frame):
    raise Stopped(signum)


def main(argv: list[str] | None = None) -> int:
    prog = "python -m dtrace" if os.path.basename(sys.argv[0]) == "__main__.py" else "pydtrace"
    options, sub = parse(argv, prog)
    tool = type(TOOLS[options.tool])()  # a fresh tool object for this run
    # Until the trace begins (then the tool stops it instead), SIGTERM and SIGHUP end the
    # tool the way Ctrl-C does: whatever it started is stopped on the way out.
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return tool.run(options)
    except UsageError as error:
        sub.error(str(error))
    except ToolError as error:
        print(f"pydtrace: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:
        # The reader went away (| head): nothing more to say.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as error:
        if error.errno != errno.EIO:
            raise
        # The terminal is gone (closed: SIGHUP); the tracer was stopped before the report.
        return 128 + signal.SIGHUP
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except Stopped as stop:
        return 128 + stop.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
