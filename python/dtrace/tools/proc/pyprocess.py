"""What can be known about a Python process from outside, without stopping it (Linux).

- Which interpreter it runs: the object that holds it (``libpython3.X.so`` in its maps, or the
  executable), its version (the ``Py_Version`` constant, read from that file), whether it is a
  free-threaded build, and where its functions are in the process (ELF dynamic symbols plus the
  load address in ``/proc/PID/maps``): what ``--inject`` needs.
- How pydtrace-rs got there: the watcher thread's name (``/proc/PID/task/*/comm``), which the
  module sets when ``python -m dtrace --inject`` loaded it, else the environment the process
  started with (``/proc/PID/environ``: ``PYDTRACE=1``, or a tool's ``-c``).
- Which pydtrace-rs it loaded: the ``pydtrace_rs-*.dist-info`` beside the mapped package.

Reading maps, environ and the files they name needs the rights to read the process's maps (its
owner, or root); thread names need none.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

from dtrace.tools.errors import ToolError
from dtrace.tools.proc import procfs
from dtrace.tools.proc.elf import ElfFile, load_bias
from dtrace.tools.proc.procfs import Mapping

#: A libpython in /proc/PID/maps: libpython3.12.so.1.0, libpython3.13t.so, libpython3.12d.so...
_LIBPYTHON = re.compile(r"(?:^|/)libpython(\d+)\.(\d+)([a-z]*)\.so(?:\.[\d.]+)?$")
#: A Python executable's name: python3.12, python3.13t.
_EXECUTABLE = re.compile(r"(?:^|/)python(\d+)\.(\d+)([a-z]*)$")
#: Symbols only a free-threaded (Py_GIL_DISABLED) build exports: Py_DECREF's shared path.
_FREE_THREADED_SYMBOLS = ("_Py_DecRefShared", "_Py_MergeZeroLocalRefcount")
#: The oldest interpreter pydtrace-rs supports.
OLDEST = (3, 12)


def version_text(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


@dataclass
class PythonProcess:
    """A process that runs a CPython interpreter, as seen from outside."""

    pid: int
    #: The file that holds the interpreter: libpython, or the executable for a static build.
    python_object: str
    #: (major, minor, micro), from Py_Version; (major, minor) when only a file name says it.
    version: tuple[int, ...]
    free_threaded: bool
    executable: str
    elf: ElfFile | None = None
    #: Where python_object is loaded: its addresses in the process are these plus the symbols'.
    bias: int | None = None
    #: The C library's first mapping (mmap and munmap come from there).
    libc: Mapping | None = None

    @property
    def minor(self) -> tuple[int, int]:
        return (self.version[0], self.version[1])

    def describe(self) -> str:
        """``CPython 3.12.1 (/usr/lib/libpython3.12.so.1.0)``."""
        flavour = " free-threaded" if self.free_threaded else ""
        return f"CPython {version_text(self.version)}{flavour} ({self.python_object})"

    def address(self, name: str) -> int | None:
        """The address of the interpreter's function ``name`` in the process."""
        if self.elf is None or self.bias is None or name not in self.elf.symbols:
            return None
        return self.bias + self.elf.symbols[name][0]


def identify(pid: int) -> PythonProcess:
    """The Python interpreter process ``pid`` runs; ToolError when it runs none (that can be found)."""
    maps = procfs.mappings(pid)
    executable = procfs.executable(pid)
    exe_path = executable[: -len(" (deleted)")] if executable.endswith(" (deleted)") else executable
    # (the path, a path that opens it: a deleted file's mapping still does)
    candidates = [(m.path, m.readable_path(pid)) for m in maps if _LIBPYTHON.search(m.path) and m.offset == 0]
    candidates.append((exe_path, f"/proc/{pid}/exe"))
    seen: set[str] = set()
    for path, readable in candidates:
        if path in seen:
            continue
        seen.add(path)
        try:
            elf = ElfFile(readable)
        except (OSError, ValueError, IndexError, struct.error):
            continue
        if "Py_Initialize" not in elf.symbols and "Py_Version" not in elf.symbols:
            continue
        named = _LIBPYTHON.search(path) or _EXECUTABLE.search(path)
        packed = elf.unsigned("Py_Version")
        if packed is not None:
            version: tuple[int, ...] = (packed >> 24, packed >> 16 & 0xFF, packed >> 8 & 0xFF)
        elif named:
            version = (int(named.group(1)), int(named.group(2)))
        else:
            version = (0, 0)  # older than 3.11, which added Py_Version; the name says nothing
        free_threaded = any(name in elf.symbols for name in _FREE_THREADED_SYMBOLS) or bool(
            named and "t" in named.group(3))
        libc = next((m for m in maps if m.offset == 0 and re.search(
            r"/libc\.so\.6$|/libc\.musl[^/]*\.so|/ld-musl[^/]*\.so", m.path)), None)
        return PythonProcess(pid, path, version, free_threaded, executable, elf, load_bias(maps, path, elf), libc)
    raise ToolError(f"process {pid} ({procfs.command_name(pid)}, {executable}) is not a Python interpreter: "
                    "neither its executable nor a libpython in its maps has CPython's symbols")


def check_supported(process: PythonProcess) -> None:
    """ToolError unless pydtrace-rs can work in this interpreter (3.12+, with the GIL)."""
    pid = process.pid
    if process.version < OLDEST:
        known = version_text(process.version) if process.version != (0, 0) else "older than 3.11"
        raise ToolError(f"process {pid} runs Python {known} ({process.python_object}): pydtrace-rs needs "
                        f"CPython {version_text(OLDEST)} or later")
    if process.free_threaded:
        raise ToolError(f"process {pid} runs a free-threaded build, {process.describe()}: pydtrace-rs needs a "
                        "build with the GIL")


# --- How pydtrace-rs got into a process, and which one ----------------------------------------

#: The watcher thread's name (the kernel keeps 15 bytes) and how the module came in.
WATCHER_NAMES = {
    "pydtrace-watche": "imported",
    "pydtrace-watchG": "gdb",
    "pydtrace-watchR": "remote_exec",
}


def watcher_names(pid: int) -> list[str]:
    """The names of the probes' watcher threads in ``pid`` (one, or none when the probes are not armed)."""
    return [name for name in procfs.thread_names(pid) if name.startswith("pydtrace-watch")]


def watcher_running(pid: int) -> bool | None:
    """Whether the probes' watcher thread runs in ``pid`` (the probes are armed); None if unknown."""
    if procfs.threads(pid) is None:
        return None
    return bool(watcher_names(pid))


def origin(pid: int) -> str:
    """How the probes got into ``pid`` (which has the probe object mapped), in words."""
    names = watcher_names(pid)
    how = WATCHER_NAMES.get(names[0]) if names else None
    if how == "gdb":
        return "injected by python -m dtrace --inject, through gdb"
    if how == "remote_exec":
        return "injected by python -m dtrace --inject, through sys.remote_exec"
    environment = procfs.start_environment(pid)
    if environment is None:
        return "imported (how: unknown, its environment is not readable here)"
    if environment.get("PYDTRACE_STARTUP"):
        return "started by a dtrace tool (-c), armed through PYDTRACE=1"
    if environment.get("PYDTRACE", "").strip() == "1":
        return "PYDTRACE=1 in its environment: pydtrace-rs.pth imported dtrace at start-up"
    if environment.get("PYDTRACE", "").strip() == "0":
        return "imported by the program, disarmed by PYDTRACE=0 in its environment"
    return "imported by the program (import dtrace)"


def package_version(library: str) -> tuple[str | None, str | None]:
    """(version, where it was read) of the pydtrace-rs whose probe object is ``library``: the
    ``pydtrace_rs-*.dist-info`` beside the package whose RECORD lists the object (any one if
    none lists it); (None, None) for a build that was not installed from a wheel."""
    package = Path(library).parent
    site = package.parent
    try:
        infos = sorted(site.glob("pydtrace_rs-*.dist-info"))
    except OSError:
        return None, None
    relative = f"{package.name}/{Path(library).name}"
    chosen = None
    for info in infos:
        try:
            record = (info / "RECORD").read_text(errors="replace")
        except OSError:
            record = ""
        if relative in record:
            chosen = info
            break
    if chosen is None and len(infos) == 1:
        chosen = infos[0]
    if chosen is None:
        return None, None
    try:
        for line in (chosen / "METADATA").read_text(errors="replace").splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip(), str(chosen)
            if not line.strip():
                break
    except OSError:
        pass
    return None, str(chosen)


def summary(pid: int, library: str | None) -> list[str]:
    """``list -p``'s lines about the interpreter and how the probes got there (``library``: the
    mapped probe object, None when there is none). ToolError for a process that runs no
    supported Python."""
    try:
        process = identify(pid)
        check_supported(process)
    except ToolError as error:
        if library is None:
            raise
        return [f"python: unknown ({error})", f"probes loaded: yes, {origin(pid)}"]
    lines = [f"python: {process.describe()}"]
    if library is None:
        lines.append("probes loaded: no, the program has not imported dtrace; a tool with -p asks to load them, "
                     "--inject loads them at once (see docs/injection.md)")
        return lines
    lines.append(f"probes loaded: yes, {origin(pid)}")
    version, where = package_version(library)
    if version is not None:
        lines.append(f"pydtrace-rs: {version} ({where})")
    else:
        lines.append("pydtrace-rs: version unknown (no pydtrace_rs-*.dist-info beside the package: a development build?)")
    return lines
