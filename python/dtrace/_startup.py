"""The start-up handshake of a command that a dtrace tool starts (``python -m dtrace TOOL -c
COMMAND``): in a module of its own, imported only then, so that ``import dtrace`` does not load it."""

import os
import sys

import dtrace

#: Seconds the started command waits for the tool's probes to be live before it runs untraced.
STARTUP_TIMEOUT = 30.0


def wait_for_tool() -> None:
    """The first interpreter of a command started by a dtrace tool reports to the tool and
    waits until the tool's consumer is attached (its ``BEGIN`` ran) and the probes it asked
    for are live, so that the command is traced from its first line (docs/decisions.md, 9).

    The variable is removed first, so the command's own children do not wait. Protocol:
    this process writes ``"PID LIBRARY\\n"``; the tool answers ``"go NAME,NAME\\n"`` once
    its tracer is attached (or closes the pipe to give up); then this process waits for
    those probes to be live.
    """
    variable = dtrace._STARTUP_VARIABLE
    setting = os.environ.pop(variable, "")
    try:
        to_tool, from_tool = (int(fd) for fd in setting.split(","))
    except ValueError:
        print(f"pydtrace: ignoring malformed {variable}={setting!r}", file=sys.stderr)
        return
    try:
        with open(to_tool, "w", closefd=True) as out:
            out.write(f"{os.getpid()} {dtrace.library_path()}\n")
        with open(from_tool, "r", closefd=True) as answer:
            words = answer.readline().split()
    except OSError as error:
        print(f"pydtrace: cannot talk to the tool that started this process: {error}", file=sys.stderr)
        return
    if words[:1] != ["go"]:
        return  # the tool gave up: run untraced
    probes = [name for name in (words[1] if len(words) > 1 else "").split(",") if name]
    if not dtrace.wait_for_consumer(*probes, timeout=STARTUP_TIMEOUT):
        print(f"pydtrace: the tool's probes were not live within {STARTUP_TIMEOUT:g} s; running on", file=sys.stderr)
