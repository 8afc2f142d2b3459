"""The one reader of ``/proc/PID/*`` (Linux): a process's maps, stat, status, command line, executable,
environment and threads, and the facts the tools take from them (whether it runs, the probe object it
mapped).

What a process holds in its memory (``/proc/PID/mem``) is read by the module that knows its layout:
semaphores (``elf``), frames (``pystack``), the scope channel (``scope``), the flush requests
(``command/aggregate``). Reading maps, environ and exe needs the rights to read the process's maps
(its owner, or root); stat, status, comm and thread names need none.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from dtrace.tools.errors import ToolError

#: The probe object in /proc/PID/maps: dtrace/_native.cpython-312-x86_64-linux-gnu.so and the like.
PROBE_OBJECT = re.compile(r"(?:^|/)dtrace/_native[^/]*\.(?:so|dylib|pyd)$")


def gone(pid: int) -> ToolError:
    """The error for a PID that no process has (any more)."""
    return ToolError(f"no process with PID {pid} is running")


# --- maps --------------------------------------------------------------------------------------


@dataclass
class Mapping:
    start: int
    end: int
    offset: int
    #: The file's path, without the " (deleted)" the kernel adds when it was removed or replaced.
    path: str
    deleted: bool = False

    def readable_path(self, pid: int) -> str:
        """A path that opens the mapped file, even one deleted or replaced since (root only)."""
        return f"/proc/{pid}/map_files/{self.start:x}-{self.end:x}" if self.deleted else self.path


def mappings(pid: int) -> list[Mapping]:
    """The file mappings of process ``pid``; ToolError if it is gone or its maps are not ours to read."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise gone(pid) from None
    except PermissionError:
        hint = ("another user's process, or another container's?" if os.geteuid() == 0
                else "run as root (sudo) or as the process's owner")
        raise ToolError(f"Permission denied reading /proc/{pid}/maps: {hint}") from None
    found = []
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/"):
            start, end = (int(address, 16) for address in parts[0].split("-"))
            path = parts[5]
            deleted = path.endswith(" (deleted)")
            if deleted:
                path = path[: -len(" (deleted)")]
            found.append(Mapping(start, end, int(parts[2], 16), path, deleted))
    return found


def mapped_objects(pid: int) -> list[str]:
    """The files mapped into process ``pid``, in order of first mapping (a deleted one as the
    kernel names it, `` (deleted)`` after its path); empty when the maps cannot be read."""
    seen: list[str] = []
    try:
        found = mappings(pid)
    except ToolError:
        return seen
    for mapping in found:
        name = mapping.path + (" (deleted)" if mapping.deleted else "")
        if name not in seen:
            seen.append(name)
    return seen


def probe_object(pid: int) -> str | None:
    """The path of the probe object mapped into process ``pid`` (Linux), or None if it has none.

    Raises ToolError when the maps cannot be read, or when the object was
    replaced on disk after the process loaded it.
    """
    for mapping in mappings(pid):
        if PROBE_OBJECT.search(mapping.path):
            if mapping.deleted:
                raise ToolError(
                    f"process {pid} loaded {mapping.path}, which has since been deleted or replaced "
                    "(pydtrace-rs reinstalled?): the tracer cannot read its probes; restart the process"
                )
            return mapping.path
    return None


# --- stat and status ---------------------------------------------------------------------------


def stat(pid: int | str) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name: [0] the state, [1] the parent,
    [19] the start time (clock ticks after boot). OSError when it is gone."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return text[text.rindex(")") + 1:].split()


def parent(pid: int) -> int | None:
    """The parent PID of ``pid`` (field 4 of /proc/PID/stat), or None once it is gone."""
    try:
        return int(stat(pid)[1])
    except (OSError, ValueError, IndexError):
        return None


def start_time(pid: int | str) -> int:
    """When a process started, in clock ticks after boot (field 22 of /proc/PID/stat); OSError
    when it is gone."""
    return int(stat(pid)[19])


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie counts as ended)."""
    try:
        return stat(pid)[0] not in ("Z", "X")
    except (OSError, ValueError, IndexError):
        return False


def check_running(pid: int) -> None:
    """Raise ToolError unless a process with this PID runs."""
    if pid <= 0:
        raise ToolError(f"{pid} is not a process ID")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise gone(pid) from None
    except PermissionError:
        pass  # it runs; whether we may trace it is the tracer's question


def status(pid: int | str) -> dict[str, str] | None:
    """The fields of ``/proc/PID/status`` (``"State": "S (sleeping)"``); None when it cannot be
    read (the process is gone)."""
    try:
        with open(f"/proc/{pid}/status", errors="replace") as f:  # Name: is any bytes the process chose
            lines = f.read().splitlines()
    except OSError:
        return None
    fields = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            fields[name] = value.strip()
    return fields


def has_capabilities(*bits: int) -> bool:
    """Whether this process has all the effective capabilities ``bits`` (their numbers)."""
    fields = status("self") or {}
    if "CapEff" not in fields:
        return False
    effective = int(fields["CapEff"].split()[0], 16)
    return all(effective >> bit & 1 for bit in bits)


def state(pid: int) -> str | None:
    """The process's state letter (R, S, T...), None when it is gone."""
    fields = status(pid)
    if fields is None or "State" not in fields:
        return None
    return fields["State"].split()[0]


def tracer_pid(pid: int) -> int:
    """The process that ptrace-traces ``pid`` (a debugger), 0 for none."""
    fields = status(pid)
    if fields is None or "TracerPid" not in fields:
        return 0
    try:
        return int(fields["TracerPid"].split()[0])
    except ValueError:
        return 0


# --- what it runs ------------------------------------------------------------------------------


def command_name(pid: int) -> str:
    """Its name (``/proc/PID/comm``), ``?`` when it cannot be read."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def command_line(pid: int) -> list[str]:
    """Its arguments (``/proc/PID/cmdline``); empty when they cannot be read."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [w.decode(errors="replace") for w in f.read().split(b"\0") if w]
    except OSError:
        return []


def executable(pid: int) -> str:
    """The path of its executable (``/proc/PID/exe``); ToolError when it cannot be read."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except FileNotFoundError:
        raise gone(pid) from None
    except PermissionError:
        raise ToolError(f"Permission denied reading /proc/{pid}/exe: run as root (sudo) or as the process's owner") from None
    except OSError as error:  # a kernel thread has no executable
        raise ToolError(f"process {pid} is not a Python interpreter (it has no executable: {error.strerror})") from None


def start_environment(pid: int) -> dict[str, str] | None:
    """The environment process ``pid`` started with (changes it made since do not show); None if unreadable."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:
        return None
    environment = {}
    for entry in data.split(b"\0"):
        name, sep, value = entry.partition(b"=")
        if sep:
            environment[name.decode(errors="replace")] = value.decode(errors="replace")
    return environment


# --- threads -----------------------------------------------------------------------------------


def threads(pid: int) -> list[int] | None:
    """Its threads' ids (``/proc/PID/task``); None when it is gone."""
    try:
        return [int(task) for task in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return None


def thread_names(pid: int) -> list[str]:
    """Its threads' names (``/proc/PID/task/*/comm``); those that cannot be read left out."""
    names = []
    for task in threads(pid) or []:
        try:
            with open(f"/proc/{pid}/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            continue
    return names
