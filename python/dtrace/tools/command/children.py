"""``--children``: the Python processes a traced command starts, each traced from its first line.

Mechanism: one tracer per process of the tree. ``-c`` puts ``PYDTRACE_FOLLOW``
in the command's environment: the path of a Unix socket of the tool, in a
directory only the tool's user can enter. Every Python process of the tree that
arms the probes afterwards reports there and waits, as the command itself does
through ``PYDTRACE_STARTUP`` (``dtrace._startup.follow_tool``): a process started by
exec (``subprocess``, multiprocessing's spawn, ``python -m test -jN``) when it
imports dtrace at start-up (``PYDTRACE=1`` is inherited), a process forked
from a Python process (multiprocessing's fork and forkserver) in its
``os.register_at_fork`` hook, before any of its own code runs. The tool
answers ``go PROBES`` once a tracer of its own is attached to that PID (``-p``,
as for the command: the same program, the same scope and, on an interpreter
that declares provider python itself, the same probes by address asked for
through a lease), or closes the connection at once without ``--children``:
then the process runs untraced and the tool only counts it, to say so.

Why not one tracer attached system-wide by the probe object's path, with a
predicate on the process tree: bpftrace would raise the probes' semaphores in
every process that maps the object, inside the tree or not, and each of them
would switch its hooks on and trap into the kernel at every event, to be
filtered out there (docs/decisions.md has the measurement). One tracer per
process costs nothing outside the tree; it costs the tree a tracer's start-up
(about a second of bpftrace 0.17's compiling) per Python process, during
which that process waits.

The tool checks who reports: the connecting process's PID (``SO_PEERCRED``)
must be the PID it reports, and a descendant of the command.

With ``-p PID`` (:func:`follow_running`) the process runs already: the tool's
lease on its scope channel names the socket (a ``follow:PATH`` line,
dtrace/tools/proc/scope.py), and while the lease is held the process has
``PYDTRACE_FOLLOW`` and ``PYDTRACE=1`` in its environment and reports each
child it forks (src/follow.rs); when the lease ends, its environment is as it
was. Its children started before that are not followed. The socket is made
connectable for the process's user where it is not the tool's (a tool run as
root on another user's process), and for nobody else.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import sys
import tempfile
import threading
from typing import Callable

from dtrace.tools.command import runner
from dtrace.tools.errors import ToolError
from dtrace.tools.proc import procfs

#: The variable that names the tool's socket in the traced command's environment.
VARIABLE = "PYDTRACE_FOLLOW"


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether process ``pid`` is ``ancestor`` or one of its descendants (a process whose parent
    died is re-parented and no longer counts)."""
    seen = 0
    while pid and pid > 1 and seen < 4096:
        if pid == ancestor:
            return True
        pid = procfs.parent(pid) or 0
        seen += 1
    return False


class Follower:
    """The tool's socket for the processes of a traced command: it accepts their reports and
    hands each to ``on_child(target)`` (with ``--children``), or lets it run untraced."""

    def __init__(self, follow: bool, on_child: Callable[[runner.Target], None]) -> None:
        self.follow = follow
        self.on_child = on_child
        self.root = 0
        #: The processes that reported, in order: (PID, whether it is traced).
        self.reported: list[tuple[int, bool]] = []
        self._lock = threading.Lock()
        self._closed = False
        self.directory = tempfile.mkdtemp(prefix="pydtrace-follow-")  # mode 0700
        self.path = os.path.join(self.directory, "socket")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socket.bind(self.path)
        self.socket.listen(64)
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def environment(self) -> dict[str, str]:
        """What the command's environment gets."""
        return {VARIABLE: self.path}

    def admit(self, pid: int) -> None:
        """Let the processes of ``pid``'s user connect, where that is not this tool's user (the
        directory stays this user's and unlistable; the socket becomes that user's, mode 0600)."""
        try:
            uid = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            raise procfs.gone(pid) from None
        if uid == os.geteuid():
            return
        try:
            os.chown(self.path, uid, -1)
            os.chmod(self.path, 0o600)
            os.chmod(self.directory, 0o711)
        except OSError as error:
            raise ToolError(f"cannot let process {pid}'s user (UID {uid}) report its children to "
                            f"this tool: {error.strerror or error}") from None

    def start(self, root: int) -> None:
        """Accept reports from the descendants of process ``root`` from now on."""
        self.root = root
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return  # closed
            try:
                self._take(connection)
            except OSError:
                connection.close()

    def _take(self, connection: socket.socket) -> None:
        creds = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        peer = struct.unpack("3i", creds)[0]
        connection.settimeout(5)
        data = b""
        while not data.endswith(b"\n") and len(data) < 4096:
            chunk = connection.recv(4096)
            if not chunk:
                break
            data += chunk
        try:
            pid_text, library = data.decode(errors="replace").strip().split(" ", 1)
            pid = int(pid_text)
        except ValueError:
            connection.close()
            return
        if pid != peer or not descends_from(pid, self.root):
            connection.close()  # not one of the command's processes: it gets no tracer
            return
        with self._lock:
            follow = self.follow and not self._closed
            self.reported.append((pid, follow))
        if not follow:
            connection.close()  # runs on untraced at once
            return
        connection.settimeout(None)
        target = runner.Target(pid, library if library != "None" else None, None, connection.detach())
        self.on_child(target)

    def close(self) -> None:
        """Stop accepting: processes that report later run untraced."""
        with self._lock:
            self._closed = True
        try:
            self.socket.close()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def untraced(self) -> list[int]:
        with self._lock:
            return [pid for pid, traced in self.reported if not traced]

    def untraced_note(self) -> str | None:
        """What the tool says of the processes that ran untraced, if any: without --children, that
        it traces them; with it, those are the ones that reported after the trace had ended."""
        untraced = self.untraced
        if not untraced:
            return None
        pids = f"{', '.join(map(str, untraced[:8]))}{', ...' if len(untraced) > 8 else ''}"
        why = ("they started after the trace ended" if self.follow
               else "--children traces them too, each from its first line")
        return f"{len(untraced)} Python child processes of the command ran untraced (PIDs {pids}): {why}"


def follow_running(pid: int, on_child: Callable[[runner.Target], None]) -> Follower:
    """``-p PID --children``: a socket where the processes that ``pid`` starts report, each handed to
    ``on_child``; its path goes into the tool's lease (``follow:PATH``), which puts it into the
    process's environment while the tool runs."""
    if not sys.platform.startswith("linux"):
        raise ToolError("-p --children needs Linux: the process is told through its scope channel "
                        "(/proc/PID/mem); start the program with -c --children instead")
    follower = Follower(True, on_child)
    try:
        follower.admit(pid)
        follower.start(pid)
    except BaseException:
        follower.close()
        raise
    return follower
