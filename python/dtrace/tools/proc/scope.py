"""``--module`` and ``--file``: the scope of a tool's session, set through the process's scope channel.

A process with pydtrace-rs armed carries a small buffer, the dynamic symbol
``pydtrace_scope_channel`` of its probe object (``src/channel.rs`` has the
layout). A tool finds it through the object's ELF dynamic symbols and the
process's ``/proc/PID/maps``, and writes its lease into it through
``/proc/PID/mem``: the same ptrace access the tracer needs, nothing else
(docs/scope.md). The process's watcher thread reads the lease within about
20 ms, puts the scope in force (the union of every tool's scope, while more
than one holds a lease) and acknowledges; only then does the tool start its
tracer, so no event of out-of-scope code reaches it. When the tool leaves, it
releases the lease and waits for the acknowledgement; when it dies, the
process notices and drops the lease. Either way the scope goes back to what
it was.

Protocol, per lease: with an exclusive ``flock`` on ``/proc/PID/mem`` held
(only processes with ptrace access can open that file, so tools never race
for a slot), take a free slot, write the scope's text, this process's start
time and PID, bump the slot's request number and ring the doorbell; then wait
until the slot's acknowledgement carries this PID and request, and check its
status and the hash of the text the process read.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import re
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from typing import Protocol

from dtrace.tools.errors import ToolError, UsageError, warn
from dtrace.tools.proc import procfs
from dtrace.tools.proc.elf import ElfFile, load_bias


class Target(Protocol):
    """What a session needs of the process it leases (the command layer's ``runner.Target``,
    above this one, is one)."""

    pid: int
    library: str | None

    @property
    def held(self) -> bool: ...

    def stop(self) -> None: ...


#: The channel's symbol in the probe object's dynamic symbol table.
SYMBOL = "pydtrace_scope_channel"
MAGIC = b"pydtrace:scope\0\0"
VERSION = 1

#: The layout of version 1 (tests/test_scope.py checks it against the native module's).
LAYOUT = {
    "doorbell": 32,
    "generation": 36,
    "published_seq": 40,
    "published_len": 44,
    "watcher_pid": 48,
    "published_tools": 56,
    "published": 72,
    "slots": 4168,
    "slot_size": 1328,
    "slot_request": 4,
    "slot_lease_start": 8,
    "slot_text_len": 16,
    "slot_text": 24,
    "slot_ack_pid": 1048,
    "slot_ack_request": 1052,
    "slot_ack_hash": 1056,
    "slot_ack_status": 1064,
    "slot_ack_message_len": 1068,
    "slot_ack_message": 1072,
    "slot_text_capacity": 1024,
    "message_capacity": 256,
    "published_capacity": 4096,
    "slot_count": 4,
}

#: Seconds the process may take to put a scope in force (its watcher polls every 20 ms, and
#: then needs the GIL once).
APPLY_TIMEOUT = 30.0
#: Seconds a leaving tool waits for the process to take its scope back.
RELEASE_TIMEOUT = 10.0
#: How often the acknowledgement is read while waiting, and how often the doorbell is rung again.
ACK_POLL = 0.005
RING_AGAIN = 0.2


# --- the command line ------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--module NAME`` and ``--file GLOB``, repeatable."""
    group = parser.add_argument_group(
        "scope",
        # The tools' help keeps descriptions as written: wrapped here.
        "Trace only some code: only functions of these modules, or from these files, fire the\n"
        "function and line probes, and other code costs nothing while the tool runs. The scope\n"
        "goes back to what it was when the tool ends (or dies). gc, import, audit and instance\n"
        "probes are not scoped.",
    )
    group.add_argument("--module", action="append", default=[], metavar="NAME", dest="scope_modules",
                       help="a module, with its submodules (repeatable; a module not imported yet is "
                            "fine; the script run as python app.py is __main__)")
    group.add_argument("--file", action="append", default=[], metavar="GLOB", dest="scope_files",
                       help="files whose path matches GLOB (repeatable): * and ? within a path "
                            "component, ** for any components, [abc]; a GLOB not starting with / "
                            "matches the end of the path (app/*.py, worker.py)")


def requested(args: argparse.Namespace) -> str | None:
    """The scope the options ask for, as the channel's text; None without --module or --file.

    Raises UsageError for a malformed module name or glob (parsed by the same code the
    process uses, where the native module can be loaded here), and for a malformed
    ``PYDTRACE_SCOPE`` that a command started by -c would inherit (it would warn and run
    unscoped).
    """
    inherited = os.environ.get("PYDTRACE_SCOPE")
    if getattr(args, "argv", None) and inherited is not None:
        error = _parse_error(inherited)
        if error:
            raise UsageError(f"PYDTRACE_SCOPE={inherited!r} in the environment, which the command would inherit, "
                             f"is malformed: {error}; correct it, or unset it and give --module/--file")
    modules = getattr(args, "scope_modules", None) or []
    files = getattr(args, "scope_files", None) or []
    if not modules and not files:
        return None
    entries = [f"module:{m.strip()}" for m in modules] + [f"file:{g.strip()}" for g in files]
    for entry, option in zip(entries, [f"--module {m}" for m in modules] + [f"--file {g}" for g in files]):
        if "\n" in entry or "," in entry:
            raise UsageError(f"{option}: a scope entry cannot hold a comma or a newline "
                            "(match such a character with ? in a --file glob)")
        error = _parse_error(entry)
        if error:
            raise UsageError(f"{option}: {error}")
    text = "\n".join(entries)
    if len(text.encode()) > LAYOUT["slot_text_capacity"]:
        raise UsageError(f"the scope is {len(text.encode())} bytes long; at most "
                        f"{LAYOUT['slot_text_capacity']} fit in a lease")
    return text


def _parse_error(entry: str) -> str | None:
    try:
        from dtrace import _native
    except ImportError:
        return None  # the process checks it and refuses it with the reason
    try:
        _native.parse_scope(entry)
    except ValueError as error:
        return str(error)
    return None


# --- the channel in a process --------------------------------------------------------------


def fnv1a(data: bytes) -> int:
    value = 0xCBF29CE484222325
    for byte in data:
        value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return value


@dataclass
class Published:
    """The scope in force in a process, as it publishes it."""

    entries: list[str]  # "module:NAME" / "file:GLOB"
    tools: list[int]  # the tools whose leases make it; empty: PYDTRACE_SCOPE

    def describe(self) -> str:
        text = ", ".join(e.replace(":", " ", 1) for e in self.entries)
        return text or "none"


class Channel:
    """The scope channel of process ``pid``, open for reading and writing through /proc/PID/mem."""

    def __init__(self, pid: int, library: str | None = None) -> None:
        if not sys.platform.startswith("linux"):
            raise ToolError("--module and --file need Linux: the scope channel is written through /proc/PID/mem")
        self.pid = pid
        self.fd = -1
        try:
            self.fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise procfs.gone(pid) from None
        except PermissionError:
            raise ToolError(
                f"cannot open /proc/{pid}/mem to set the scope: permission denied. The scope channel needs "
                "the rights of the tracer itself: run as root (sudo), or with ptrace access to the process"
            ) from None
        try:
            self.address = self._locate(library)
            header = self.read(0, 32)
        except OSError as error:
            self.close()
            raise ToolError(f"cannot read the scope channel of process {pid}: {error.strerror or error}") from None
        except BaseException:
            self.close()
            raise
        if header[:16] != MAGIC:
            self.close()
            raise ToolError(f"the scope channel of process {pid} is unreadable (no channel at its {SYMBOL}: "
                            f"was the probe object replaced after the process loaded it?)")
        version, slots, slot_size, text_capacity = struct.unpack_from("=IIII", header, 16)
        if (version, slots, slot_size, text_capacity) != (VERSION, LAYOUT["slot_count"], LAYOUT["slot_size"],
                                                          LAYOUT["slot_text_capacity"]):
            self.close()
            raise ToolError(f"the scope channel of process {pid} has layout version {version}; this tool "
                            f"speaks version {VERSION}: use the tools of the pydtrace-rs the process runs")

    def _locate(self, library: str | None) -> int:
        """The channel's address in the process: the symbol's value plus the object's load bias."""
        pid = self.pid
        library = library or procfs.probe_object(pid)
        if library is None:
            raise ToolError(f"process {pid} has not loaded the dtrace module (pydtrace-rs)")
        try:
            elf = ElfFile(library)
        except (OSError, ValueError, IndexError, struct.error):  # unreadable, or no 64-bit ELF object
            elf = None
        symbol = elf.symbols.get(SYMBOL) if elf is not None else None
        if symbol is None:
            raise ToolError(f"{library} has no scope channel ({SYMBOL}): the pydtrace-rs in process {pid} is "
                            "older than --module/--file; upgrade it, or trace without a scope")
        try:
            # The mapping of the file the process loaded: not one deleted or replaced since.
            maps = [m for m in procfs.mappings(pid) if not m.deleted]
        except (OSError, ToolError):
            maps = []
        bias = load_bias(maps, library, elf)
        if bias is None:
            raise ToolError(f"cannot find where process {pid} mapped {library} (in /proc/{pid}/maps)")
        return bias + symbol[0]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def read(self, offset: int, size: int) -> bytes:
        data = os.pread(self.fd, size, self.address + offset)
        if len(data) != size:
            raise OSError(errno.EIO, "short read")
        return data

    def write(self, offset: int, data: bytes) -> None:
        if os.pwrite(self.fd, data, self.address + offset) != len(data):
            raise OSError(errno.EIO, "short write")

    def u32(self, offset: int) -> int:
        return struct.unpack("=I", self.read(offset, 4))[0]

    def put_u32(self, offset: int, value: int) -> None:
        self.write(offset, struct.pack("=I", value & 0xFFFFFFFF))

    def slot(self, index: int) -> int:
        return LAYOUT["slots"] + index * LAYOUT["slot_size"]

    def lock(self, timeout: float) -> None:
        """The exclusive lock every tool holds while it takes, releases or rings for a slot."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ToolError(f"another tool holds the scope channel of process {self.pid} "
                                    f"for more than {timeout:g} s") from None
                time.sleep(ACK_POLL)

    def unlock(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def ring(self) -> None:
        """Adds one to the doorbell (under the lock: no ring is lost to another tool's)."""
        self.lock(APPLY_TIMEOUT)
        try:
            self.put_u32(LAYOUT["doorbell"], self.u32(LAYOUT["doorbell"]) + 1)
        finally:
            self.unlock()

    def published(self) -> Published:
        """The scope in force, read consistently (the process's sequence number is even and
        unchanged around the read)."""
        for _ in range(1000):
            seq = self.u32(LAYOUT["published_seq"])
            if seq % 2 == 0:
                length = self.u32(LAYOUT["published_len"])
                tools = struct.unpack("=4I", self.read(LAYOUT["published_tools"], 16))
                text = self.read(LAYOUT["published"], min(length, LAYOUT["published_capacity"]))
                if self.u32(LAYOUT["published_seq"]) == seq:
                    entries = [e for e in text.decode(errors="replace").split("\n") if e]
                    return Published(entries, [t for t in tools if t])
            time.sleep(ACK_POLL)
        raise ToolError(f"the scope channel of process {self.pid} keeps changing: cannot read the scope in force")


def _runs(pid: int, start: int) -> bool:
    try:
        return procfs.start_time(pid) == start
    except (OSError, ValueError, IndexError):
        return False


class Lease:
    """This tool's lease on a slot of the channel: its scope is in force while the lease is held."""

    def __init__(self, channel: Channel, text: str, timeout: float = APPLY_TIMEOUT) -> None:
        self.channel = channel
        self.text = text.encode()
        self.pid = os.getpid()
        self.index: int | None = None
        self.request = 0
        self._take(timeout)

    def _take(self, timeout: float) -> None:
        channel = self.channel
        try:
            same_namespace = os.stat("/proc/self/ns/pid").st_ino == os.stat(f"/proc/{channel.pid}/ns/pid").st_ino
        except OSError:
            same_namespace = True  # cannot tell: the process checks the lease holder itself
        if not same_namespace:
            raise ToolError(f"process {channel.pid} runs in another PID namespace (a container?): it cannot see "
                            "this tool to hold its lease; run the tool in the process's namespace")
        start = procfs.start_time("self")
        channel.lock(timeout)
        try:
            holders = []
            for index in range(LAYOUT["slot_count"]):
                base = channel.slot(index)
                pid = channel.u32(base)
                holder_start = struct.unpack("=Q", channel.read(base + LAYOUT["slot_lease_start"], 8))[0]
                if pid == 0 or not _runs(pid, holder_start):  # free, or its holder died unnoticed
                    self.index = index
                    break
                holders.append(pid)
            else:
                raise ToolError(f"{len(holders)} tools (PIDs {', '.join(map(str, holders))}) hold scopes in "
                                f"process {channel.pid} already; at most {LAYOUT['slot_count']} at once")
            base = channel.slot(self.index)
            self.request = channel.u32(base + LAYOUT["slot_request"]) + 1
            channel.write(base + LAYOUT["slot_text"], self.text)
            channel.put_u32(base + LAYOUT["slot_text_len"], len(self.text))
            channel.write(base + LAYOUT["slot_lease_start"], struct.pack("=Q", start))
            channel.put_u32(base, self.pid)
            channel.put_u32(base + LAYOUT["slot_request"], self.request)
            channel.put_u32(LAYOUT["doorbell"], channel.u32(LAYOUT["doorbell"]) + 1)
        finally:
            channel.unlock()
        try:
            status, message, digest = self._wait(self.pid, timeout)
        except BaseException:  # no answer, or Ctrl-C: the slot is not left behind
            try:
                self._clear()
            except (OSError, ToolError):
                pass
            raise
        if status != 0:
            self._clear()
            raise ToolError(f"process {channel.pid} {message or 'refused the scope'}")
        if digest != fnv1a(self.text):
            self.release()
            raise ToolError(f"process {channel.pid} read another scope than the one written (a torn write?); "
                            "try again")

    def _wait(self, ack_pid: int, timeout: float) -> tuple[int, str, int]:
        """The slot's acknowledgement of this request: (status, message, hash of the text read)."""
        channel, base = self.channel, self.channel.slot(self.index)
        deadline = time.monotonic() + timeout
        rung = time.monotonic()
        while True:
            pid, request = struct.unpack("=II", channel.read(base + LAYOUT["slot_ack_pid"], 8))
            if pid == ack_pid and request == self.request:
                digest, status, length = struct.unpack("=QII", channel.read(base + LAYOUT["slot_ack_hash"], 16))
                message = channel.read(base + LAYOUT["slot_ack_message"],
                                       min(length, LAYOUT["message_capacity"])).decode(errors="replace")
                return status, message, digest
            now = time.monotonic()
            if now > deadline:
                raise ToolError(
                    f"process {channel.pid} did not take up the scope (or the probes asked for) within {timeout:g} s: "
                    "are its probes armed, "
                    "and does it run Python (a thread that holds the GIL in C code for long delays it)?")
            if now - rung > RING_AGAIN:
                procfs.check_running(channel.pid)
                channel.ring()
                rung = now
            time.sleep(ACK_POLL)

    def _clear(self) -> bool:
        """Frees the slot if it is still ours; returns whether it was."""
        channel, base = self.channel, self.channel.slot(self.index)
        channel.lock(RELEASE_TIMEOUT)
        try:
            if channel.u32(base) != self.pid:
                return False
            self.request += 1
            channel.put_u32(base, 0)
            channel.put_u32(base + LAYOUT["slot_text_len"], 0)
            channel.put_u32(base + LAYOUT["slot_request"], self.request)
            channel.put_u32(LAYOUT["doorbell"], channel.u32(LAYOUT["doorbell"]) + 1)
            return True
        finally:
            channel.unlock()

    def release(self, timeout: float = RELEASE_TIMEOUT) -> None:
        """Gives the lease back and waits until the process has taken the scope back."""
        if self.index is None:
            return
        try:
            if self._clear():
                self._wait(0, timeout)
        except (OSError, ToolError) as error:
            if os.path.exists(f"/proc/{self.channel.pid}"):
                warn(f"the scope of process {self.channel.pid} may not have gone back: {error}")
        finally:
            self.index = None
            self.channel.close()


# --- what a tool calls ---------------------------------------------------------------------


def open_session(args: argparse.Namespace, target: Target, text: str | None,
                 probes: Sequence[str] = (), quiet: bool = False, follow: str | None = None) -> Lease | None:
    """Set the session's scope in ``target`` (``text`` from :func:`requested`), ask it to fire
    ``probes`` (attached by address, which raises no semaphore: dtrace/tools/command/interpreter.py),
    have the processes it starts report to the socket ``follow`` (``-p PID --children``:
    dtrace/tools/command/children.py), and say what scope is in force.

    Without a scope of its own, the tool only says so when the process has one in force (best
    effort: nothing is said where the channel cannot be read). On failure a command started by
    ``-c`` is stopped, not left waiting.
    """
    if text is None:
        if not quiet:
            _note_scope_in_force(target)
        if not probes and follow is None:
            return None
    text = lease_text(text, probes, follow)
    try:
        channel = Channel(target.pid, target.library)
        try:
            if channel.u32(LAYOUT["watcher_pid"]) != target.pid:
                raise ToolError(f"the probes of process {target.pid} are not armed (PYDTRACE=0 in its "
                                "environment?): it cannot take a scope")
            lease = Lease(channel, text)
        except BaseException:
            channel.close()
            raise
    except BaseException:
        if target.held:
            target.stop()
        raise
    try:
        published = channel.published()
    except (OSError, ToolError):
        return lease
    if follow is not None and any(follow in entry for entry in published.entries):
        # A pydtrace-rs older than the follow: line took it for a file glob.
        lease.release()
        raise ToolError(f"the pydtrace-rs in process {target.pid} is older than -p --children: upgrade it "
                        "(and restart the process), or trace its children by starting it with -c")
    others = [pid for pid in published.tools if pid != os.getpid()]
    if others:
        warn(f"tools {', '.join(map(str, others))} also set scopes in process {target.pid}: while they "
             f"run, the scope is the union of all: {published.describe()}")
    return lease


def lease_text(scope_text: str | None, probes: Sequence[str] = (), follow: str | None = None) -> str:
    """A lease's text (src/channel.rs reads it): the scope's entries, a ``probe:NAME`` line per probe
    to fire, and a ``follow:PATH`` line for the socket where the process's children report."""
    lines = [scope_text or ""] + [f"probe:{name}" for name in probes]
    if follow is not None:
        if "," in follow or "\n" in follow or not follow.startswith("/"):
            raise ToolError(f"the socket path {follow!r} cannot go into a lease (an absolute path without "
                            "a comma or a newline): set TMPDIR to another directory")
        lines.append(f"follow:{follow}")
    return "\n".join(lines).strip("\n")


def _read_published(pid: int, library: str | None) -> Published | None:
    """The scope in force in process ``pid``; None where the channel cannot be read."""
    try:
        channel = Channel(pid, library)
    except (ToolError, OSError):
        return None
    try:
        return channel.published()
    except (ToolError, OSError):
        return None
    finally:
        channel.close()


def _note_scope_in_force(target: Target) -> None:
    if not sys.platform.startswith("linux") or not target.pid:
        return
    published = _read_published(target.pid, target.library)
    if published is not None and published.entries:
        source = (f"by tools {', '.join(map(str, published.tools))}" if published.tools
                  else "by PYDTRACE_SCOPE in its environment")
        warn(f"process {target.pid} has a scope set {source}: only {published.describe()} fire the "
                    "function and line probes")


def asked_probes(pid: int, library: str | None) -> dict[str, list[int]] | None:
    """The probes that tools ask process ``pid`` to fire through their leases (``probe:NAME``
    lines), each with the PIDs of the tools; None where the channel cannot be read."""
    try:
        channel = Channel(pid, library)
    except (ToolError, OSError):
        return None
    asked: dict[str, list[int]] = {}
    try:
        for index in range(LAYOUT["slot_count"]):
            base = channel.slot(index)
            holder = channel.u32(base)
            if not holder:
                continue
            length = min(channel.u32(base + LAYOUT["slot_text_len"]), LAYOUT["slot_text_capacity"])
            text = channel.read(base + LAYOUT["slot_text"], length).decode(errors="replace")
            for entry in re.split(r"[,\n]", text):
                if entry.strip().startswith("probe:"):
                    name = entry.strip()[len("probe:"):].strip().replace("-", "__")
                    asked.setdefault(name, []).append(holder)
    except (ToolError, OSError):
        return None
    finally:
        channel.close()
    return asked


def describe(pid: int, library: str | None) -> str | None:
    """The scope in force in process ``pid``, in words, for ``list``; None where it cannot be read."""
    published = _read_published(pid, library)
    if published is None:
        return None
    if not published.entries:
        return "none (every code object fires the function and line probes)"
    source = (f"set by tools {', '.join(map(str, published.tools))}" if published.tools
              else "from PYDTRACE_SCOPE")
    return f"{published.describe()} ({source})"
