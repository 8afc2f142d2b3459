"""The command line: ``python -m dtrace TOOL [options]``, also installed as ``pydtrace``."""

from __future__ import annotations

import argparse
import os
import sys

from dtrace.tools import TOOLS, runner
from dtrace.tools.tracers import ToolError

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
"""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def parser(prog: str) -> argparse.ArgumentParser:
    top = Parser(
        prog=prog,
        description="Ready-made tracing tools on the probes of pydtrace-rs (bpftrace on Linux, "
                    "DTrace on macOS and illumos).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tools = top.add_subparsers(dest="tool", metavar="TOOL", title="tools", parser_class=Parser)
    for tool in TOOLS.values():
        sub = tools.add_parser(tool.name, help=tool.summary, description=tool.description,
                               epilog=tool.examples, formatter_class=argparse.RawDescriptionHelpFormatter)
        tool.add_arguments(sub)
        target = sub.add_mutually_exclusive_group()
        target.add_argument("-p", "--pid", type=int, help="trace the running process PID")
        target.add_argument("-c", "--command", metavar="COMMAND",
                            help="start COMMAND (split like a shell would, run without one) and trace it "
                                 "from its first line")
        sub.add_argument("--inject", action="store_true",
                         help="with -p, on a Python process that has not loaded the probes: load them without "
                              "asking (runs `import dtrace` in it through gdb, or sys.remote_exec on 3.14+; "
                              "see docs/injection.md)")
        sub.add_argument("-d", "--duration", type=positive, metavar="SECONDS",
                         help="stop after SECONDS (with -i, rounded up to whole intervals; default: at "
                              "Ctrl-C or when the process exits)")
        if tool.intervals:
            sub.add_argument("-i", "--interval", type=positive, metavar="SECONDS",
                             help="print (and reset) the report every SECONDS")
        sub.add_argument("--script", action="store_true",
                         help="print the tracer program these options run, and exit")
        sub.add_argument("--tracer", choices=["bpftrace", "dtrace"],
                         help="the tracer (default: bpftrace on Linux, dtrace on macOS and illumos)")
        sub.add_argument("--max-keys", type=positive, metavar="N",
                         help=f"the most keys a map holds (bpftrace's BPFTRACE_MAP_KEYS_MAX; default: {tool.max_keys})")
        sub.add_argument("--startup-timeout", type=float, default=runner.STARTUP_TIMEOUT, metavar="SECONDS",
                         help="how long -c waits for the command to load dtrace (default: %(default)g)")
    return top


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    prog = "python -m dtrace" if os.path.basename(sys.argv[0]) == "__main__.py" else "pydtrace"
    top = parser(prog)
    args = top.parse_args(argv)
    if args.tool is None:
        top.print_help()
        return 1
    tool = TOOLS[args.tool]
    if tool.name != "list" and not args.script and args.pid is None and args.command is None:
        top._subparsers._group_actions[0].choices[tool.name].error("give -p PID or -c COMMAND (or --script)")
    if not hasattr(args, "interval"):
        args.interval = None
    try:
        return tool.run(args)
    except ToolError as error:
        print(f"pydtrace: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (| head): nothing more to say.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
