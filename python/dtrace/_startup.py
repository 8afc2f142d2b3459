"""The handshakes of a command that a dtrace tool starts (``python -m dtrace TOOL -c COMMAND``)
and of the processes of its tree (``--children``): in a module of its own, imported only then, so
that ``import dtrace`` does not load them."""

import os
import sys

import dtrace

#: Seconds the started command waits for the tool's probes to be live before it runs untraced.
STARTUP_TIMEOUT = 30.0
#: Seconds a process of the tree waits for the tool's answer (its tracer's start-up).
FOLLOW_TIMEOUT = 60.0


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


def follow_tool() -> None:
    """A process of a traced command's tree (a child, started by exec or fork) reports to the
    tool: ``"PID LIBRARY\\n"`` on its socket. Under ``--children`` the tool answers
    ``"go NAME,NAME\\n"`` once a tracer is attached to this process, and this process waits
    until those probes are live; otherwise the tool closes the connection and this process
    runs on at once, untraced. Nothing is waited for when the tool is gone."""
    path = os.environ.get(dtrace._FOLLOW_VARIABLE)
    if not path:
        return
    import _socket  # the C module: `import socket` would cost this start-up more

    words: list[str] = []
    connection = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        connection.settimeout(FOLLOW_TIMEOUT)
        connection.connect(path)
        connection.sendall(f"{os.getpid()} {dtrace.library_path()}\n".encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = connection.recv(4096)
            if not chunk:
                break
            data += chunk
        words = data.decode(errors="replace").split()
    except OSError:
        return  # the tool has gone (or never listened): run untraced
    finally:
        connection.close()
    if words[:1] != ["go"]:
        return
    probes = [name for name in (words[1] if len(words) > 1 else "").split(",") if name]
    if not dtrace.wait_for_consumer(*probes, timeout=STARTUP_TIMEOUT):
        print(f"pydtrace: the tool's probes were not live within {STARTUP_TIMEOUT:g} s; running on",
              file=sys.stderr)
