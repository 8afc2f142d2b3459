"""The Python stack of another process, read from the interpreter's own frames (Linux).

DTrace's ``jstack()`` for bpftrace: at any event (a libc function, a kernel function, a timer
sample) the tracer's program walks the Python frames of the thread that hit it, and the process
pays nothing until then: no Python probe is enabled, no Python call traps into the kernel, and
the process need not have imported ``dtrace``.

Three parts:

- :func:`read_layout` finds where the interpreter keeps what the walk reads (the runtime's
  interpreter list, a thread state's native thread id and current frame, a frame's code object,
  previous frame and instruction pointer, a code object's names and line table) and checks it
  against the running process before trusting it. CPython 3.13 and later describe their own
  layout at the start of ``_PyRuntime`` (``_Py_DebugOffsets``: cookie ``xdebugpy``, the version,
  the offsets); this module knows the order of that structure's fields per minor version.
  3.12 has no such structure: its layout is a table here (from 3.12's own headers, fixed per
  minor version), checked against the process (:func:`check_layout`: a thread of the process
  found by its native id, whose frames' code objects have the code type and names that are
  strings). A layout that does not check out is refused with the reason, never guessed.
- :func:`bpftrace_walk` writes the bpftrace statements that walk the current thread's frames:
  its thread state found by native thread id (a bounded walk of every interpreter's thread
  list), then up to ``depth`` frames, skipping the frames the interpreter's C code owns (the
  shim frames between a C call and the Python code it calls). Each frame is one 64-bit value:
  its code object's address, with the instruction's index in the top 16 bits. The stack is a
  chain of nodes keyed by a running hash (``@__pyframe[node] = value``, ``@__pyup[node] =
  parent``), so any clause can use the stack's last node as a map key, and a map of nodes stays
  small. A code object seen for the first time is printed (``__pycode ADDRESS ...``, with its
  names as the tracer read them) so that the tool reads it while it is surely alive.
- :class:`Resolver` turns the values into ``file:line qualname`` by reading the process
  (``/proc/PID/mem``): names from the code object, the line from its line table at the
  instruction's offset; ``?`` for a code object gone since.

Free-threaded builds are refused (their frames and code objects differ). Frames of
sub-interpreters are walked like the main interpreter's (every interpreter's thread list is
searched); their code objects live in the same address space.
"""

from __future__ import annotations

import os
import re
import struct
import time
from dataclasses import dataclass, field

from dtrace.tools.errors import ToolError
from dtrace.tools.proc import procfs, pyprocess

#: Frames walked per stack unless the tool says otherwise; deeper stacks end in a "cut" marker.
DEFAULT_DEPTH = 48
#: The most frames a walk may be asked for (the kernel verifier accepts the loop up to beyond it).
MAX_DEPTH = 128
#: Times the layout is checked against a process before it is refused (see read_layout).
CHECKS = 3
#: Thread states looked at (over every interpreter) to find the current thread's.
MAX_THREADS = 64
#: Where a stack's chain of nodes starts (the FNV-1a offset basis, below 2**63 for bpftrace).
SEED = 1469598103934665603
#: Values below this are markers, not code objects (no object lives in the first page).
#: ``CUT``: frames beyond the depth limit; ``NOT_CODE``: a frame whose executable is not a code
#: object (refused, never guessed); ``NO_THREAD``: the thread has no Python thread state;
#: ``NO_FRAME``: it has one, with no Python frame running; ``SUBINTERPRETER``: the frames above
#: are a sub-interpreter's (the thread's state there is the one running).
CUT, NOT_CODE, NO_THREAD, NO_FRAME, SUBINTERPRETER = 1, 2, 3, 4, 5
MARKERS = {
    CUT: "(more frames: the walk stops at the depth limit)",
    NOT_CODE: "(a frame whose code could not be read)",
    NO_THREAD: "(not a Python thread)",
    NO_FRAME: "(no Python frame)",
    SUBINTERPRETER: "(in a sub-interpreter: the frames of the code that runs it are not shown)",
}
MASK = (1 << 64) - 1
#: The instruction index that stands for "not known" (out of the 16 bits kept).
NO_INDEX = 0xFFFF
#: Frame owners from this value on are the interpreter's own (shim or base frames):
#: FRAME_OWNED_BY_CSTACK is 3 on 3.12 and 3.13; 3.14 adds FRAME_OWNED_BY_INTERPRETER (3) before it (4).
SHIM_OWNER = 3


#: Where user space ends (x86-64 and arm64 with 48-bit addresses; the walk refuses code beyond it too).
USER_END = 1 << 48


class LayoutError(ToolError):
    """The interpreter's layout cannot be read or does not check out: the walk is refused."""


@dataclass
class Layout:
    """Where the walk finds things in one process: addresses, and offsets into the interpreter's
    structures (bytes)."""

    version: tuple[int, ...]
    pid: int
    #: How the offsets were found: "_Py_DebugOffsets" or "the table for 3.12".
    source: str
    runtime: int  # the address of _PyRuntime
    code_type: int  # the address of PyCode_Type
    interpreters_head: int
    interp_next: int
    threads_head: int
    thread_next: int
    native_thread_id: int
    #: The thread state's current frame; on 3.12 its cframe, whose first field is the current frame.
    current_frame: int
    through_cframe: bool
    frame_previous: int
    frame_executable: int
    frame_instr: int
    frame_owner: int
    code_filename: int
    code_name: int
    code_qualname: int
    code_linetable: int
    code_firstlineno: int
    code_adaptive: int
    ob_type: int = 8
    bytes_size: int = 16
    bytes_sval: int = 32
    unicode_length: int = 16
    unicode_state: int = 32
    ascii_size: int = 40
    compact_size: int = 56
    checked: list[str] = field(default_factory=list)


# --- _Py_DebugOffsets, per minor version: its fields in order, up to what the walk reads ----------

_HEAD = ["cookie", "version", "free_threaded"]
_RUNTIME = ["size", "finalizing", "interpreters_head"]
_INTERP_313 = ["size", "id", "next", "threads_head", "gc", "imports_modules", "sysdict", "builtins", "ceval_gil",
               "gil_runtime_state", "gil_runtime_state_enabled", "gil_runtime_state_locked",
               "gil_runtime_state_holder"]
_INTERP_314 = ["size", "id", "next", "threads_head", "threads_main", "gc", "imports_modules", "sysdict", "builtins",
               "ceval_gil", "gil_runtime_state", "gil_runtime_state_enabled", "gil_runtime_state_locked",
               "gil_runtime_state_holder", "code_object_generation", "tlbc_generation"]
_THREAD_313 = ["size", "prev", "next", "interp", "current_frame", "thread_id", "native_thread_id",
               "datastack_chunk", "status"]
_THREAD_315 = ["size", "prev", "next", "interp", "current_frame", "base_frame", "last_profiled_frame", "_3_15",
               "thread_id", "native_thread_id", "datastack_chunk", "status", "holds_gil", "gil_requested",
               "current_exception", "exc_state", "err_stackitem_exc_value"]
_FRAME_313 = ["size", "previous", "executable", "instr_ptr", "localsplus", "owner"]
_FRAME_314 = _FRAME_313 + ["stackpointer", "tlbc_index"]
_CODE_313 = ["size", "filename", "name", "qualname", "linetable", "firstlineno", "argcount", "localsplusnames",
             "localspluskinds", "co_code_adaptive"]
_CODE_314 = _CODE_313 + ["co_tlbc"]
_OBJECTS_313 = [("pyobject", ["size", "ob_type"]), ("type_object", ["size", "tp_name", "tp_repr", "tp_flags"]),
                ("tuple_object", ["size", "ob_item", "ob_size"]), ("list_object", ["size", "ob_item", "ob_size"]),
                ("dict_object", ["size", "ma_keys", "ma_values"]), ("float_object", ["size", "ob_fval"]),
                ("long_object", ["size", "lv_tag", "ob_digit"]), ("bytes_object", ["size", "ob_size", "ob_sval"]),
                ("unicode_object", ["size", "state", "length", "asciiobject_size"])]
_OBJECTS_314 = _OBJECTS_313[:4] + [("set_object", ["size", "used", "table", "mask"])] + _OBJECTS_313[4:]
#: Read from each version's Include/internal headers (3.13: pycore_runtime.h; 3.14 on:
#: pycore_debug_offsets.h) and checked against Debian's and pyenv's builds.
DEBUG_OFFSETS = {
    (3, 13): [("runtime_state", _RUNTIME), ("interpreter_state", _INTERP_313), ("thread_state", _THREAD_313),
              ("interpreter_frame", _FRAME_313), ("code_object", _CODE_313), *_OBJECTS_313],
    (3, 14): [("runtime_state", _RUNTIME), ("interpreter_state", _INTERP_314), ("thread_state", _THREAD_313),
              ("interpreter_frame", _FRAME_314), ("code_object", _CODE_314), *_OBJECTS_314],
    # 3.15's object sections after the code object are not read (the table stops there).
    (3, 15): [("runtime_state", _RUNTIME), ("interpreter_state", _INTERP_314), ("thread_state", _THREAD_315),
              ("interpreter_frame", _FRAME_314), ("code_object", _CODE_314)],
}

#: 3.12 (no _Py_DebugOffsets): offsetof() in 3.12's own headers (x86-64 and other LP64 targets),
#: the same for every 3.12.x; checked against the process before use.
TABLE_312 = dict(
    interpreters_head=40, interp_next=0, threads_head=72, thread_next=8, native_thread_id=144,
    current_frame=56, through_cframe=True,  # tstate->cframe->current_frame
    frame_previous=8, frame_executable=0, frame_instr=56, frame_owner=70,  # f_code, prev_instr
    code_filename=112, code_name=120, code_qualname=128, code_linetable=136, code_firstlineno=68,
    code_adaptive=192,
)


class Memory:
    """Reads of another process's memory (``/proc/PID/mem``; the rights of ptrace: root or its owner)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self.fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        except (FileNotFoundError, ProcessLookupError):
            raise procfs.gone(pid) from None
        except PermissionError:
            raise ToolError(f"Permission denied reading the memory of process {pid}: run as root (sudo)") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, address: int, size: int) -> bytes | None:
        """``size`` bytes at ``address``; None if they cannot be read (unmapped, or the process is gone)."""
        if address <= 0 or size < 0 or address + size > USER_END:
            return None  # a wrong offset reads garbage: never past user space
        try:
            data = os.pread(self.fd, size, address)
        except (OSError, OverflowError):
            return None
        return data if len(data) == size else None

    def u64(self, address: int) -> int | None:
        data = self.read(address, 8)
        return None if data is None else struct.unpack("<Q", data)[0]

    def i32(self, address: int) -> int | None:
        data = self.read(address, 4)
        return None if data is None else struct.unpack("<i", data)[0]

    def u8(self, address: int) -> int | None:
        data = self.read(address, 1)
        return None if data is None else data[0]

    def string(self, obj: int, layout: Layout) -> str | None:
        """The text of the compact str object at ``obj`` (names and file names are compact)."""
        length, state = self.u64(obj + layout.unicode_length), self.u8(obj + layout.unicode_state)
        if length is None or state is None or length > 1 << 20:
            return None
        kind, compact, ascii_ = state >> 2 & 7, state >> 5 & 1, state >> 6 & 1
        if not compact or kind not in (1, 2, 4):
            return None
        data = self.read(obj + (layout.ascii_size if ascii_ else layout.compact_size), length * kind)
        if data is None:
            return None
        codec = {1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}[kind]
        return data.decode(codec, errors="replace")

    def bytes_object(self, obj: int, layout: Layout) -> bytes | None:
        size = self.u64(obj + layout.bytes_size)
        if size is None or size > 1 << 24:
            return None
        return self.read(obj + layout.bytes_sval, size)


# --- the layout --------------------------------------------------------------------------------


def _symbol(process: pyprocess.PythonProcess, name: str) -> int:
    address = process.address(name)
    if address is None:
        raise LayoutError(f"{process.describe()} exports no symbol {name} (a stripped or unusual build): "
                          "the Python stack cannot be read")
    return address


def _debug_offsets(process: pyprocess.PythonProcess, memory: Memory, runtime: int) -> dict[str, int]:
    """The fields of the process's _Py_DebugOffsets, by "section.field"; LayoutError when they do not read."""
    sections = DEBUG_OFFSETS.get(process.minor)
    if sections is None:
        raise LayoutError(f"{process.describe()}: this pydtrace-rs does not know the order of _Py_DebugOffsets' "
                          f"fields for Python {process.minor[0]}.{process.minor[1]}: the Python stack cannot be read")
    names = [f"{section}.{name}" for section, fields in sections for name in fields]
    data = memory.read(runtime, 24 + 8 * len(names))
    if data is None:
        raise LayoutError(f"cannot read _PyRuntime in process {memory.pid} (has it exited?)")
    if data[:8] != b"xdebugpy":
        raise LayoutError(f"{process.describe()}: _PyRuntime does not start with _Py_DebugOffsets (cookie "
                          f"{data[:8]!r}, not b'xdebugpy'): the Python stack cannot be read")
    version, free_threaded = struct.unpack_from("<QQ", data, 8)
    found = (version >> 24, version >> 16 & 0xFF, version >> 8 & 0xFF)
    if found[:len(process.version)] != tuple(process.version)[:3]:
        raise LayoutError(f"{process.describe()}: _Py_DebugOffsets says version {pyprocess.version_text(found)}, "
                          "not the interpreter's: the Python stack cannot be read")
    if free_threaded:
        raise LayoutError(f"{process.describe()} is a free-threaded build: its stacks cannot be read here")
    values = struct.unpack_from(f"<{len(names)}Q", data, 24)
    return dict(zip(names, values))


def read_layout(process: pyprocess.PythonProcess, memory: Memory) -> Layout:
    """The layout of ``process``'s interpreter, checked against it; LayoutError with the reason if
    it cannot be read or does not check out."""
    if process.version < (3, 12):
        raise LayoutError(f"{process.describe()}: the Python stack is read on CPython 3.12 and later")
    if process.free_threaded:
        raise LayoutError(f"{process.describe()} is a free-threaded build: its stacks cannot be read here")
    runtime = _symbol(process, "_PyRuntime")
    code_type = _symbol(process, "PyCode_Type")
    if process.minor == (3, 12):
        layout = Layout(process.version, process.pid, "the table for 3.12", runtime, code_type, **TABLE_312)
    else:
        d = _debug_offsets(process, memory, runtime)
        layout = Layout(
            process.version, process.pid, "_Py_DebugOffsets", runtime, code_type,
            interpreters_head=d["runtime_state.interpreters_head"], interp_next=d["interpreter_state.next"],
            threads_head=d["interpreter_state.threads_head"], thread_next=d["thread_state.next"],
            native_thread_id=d["thread_state.native_thread_id"], current_frame=d["thread_state.current_frame"],
            through_cframe=False, frame_previous=d["interpreter_frame.previous"],
            frame_executable=d["interpreter_frame.executable"], frame_instr=d["interpreter_frame.instr_ptr"],
            frame_owner=d["interpreter_frame.owner"], code_filename=d["code_object.filename"],
            code_name=d["code_object.name"], code_qualname=d["code_object.qualname"],
            code_linetable=d["code_object.linetable"], code_firstlineno=d["code_object.firstlineno"],
            code_adaptive=d["code_object.co_code_adaptive"],
        )
        if "pyobject.ob_type" in d:  # the object sections, where this module reads them
            got = (d["pyobject.ob_type"], d["bytes_object.ob_size"], d["bytes_object.ob_sval"],
                   d["unicode_object.length"], d["unicode_object.state"], d["unicode_object.asciiobject_size"])
            want = (layout.ob_type, layout.bytes_size, layout.bytes_sval, layout.unicode_length,
                    layout.unicode_state, layout.ascii_size)
            if got != want:
                raise LayoutError(f"{process.describe()}: _Py_DebugOffsets gives object offsets {got}, not the "
                                  f"expected {want}: the Python stack cannot be read")
    # A thread that runs changes its frames while they are read: a right layout can fail once;
    # a wrong one fails every time.
    for attempt in range(CHECKS):
        try:
            check_layout(process, memory, layout)
            return layout
        except LayoutError:
            if attempt == CHECKS - 1 or not os.path.exists(f"/proc/{process.pid}"):
                raise
            time.sleep(0.01)
    return layout


def _frames(memory: Memory, layout: Layout, thread: int, limit: int = 256):
    """(frame, owner, code) of a thread state's frames, innermost first; code is None when the
    frame's executable is not a code object."""
    frame = memory.u64(thread + layout.current_frame)
    if frame and layout.through_cframe:
        frame = memory.u64(frame)
    for _ in range(limit):
        if not frame:
            return
        owner = memory.u8(frame + layout.frame_owner)
        executable = memory.u64(frame + layout.frame_executable)
        if owner is None or executable is None:
            raise LayoutError(f"a frame of process {memory.pid} could not be read (has it exited?)")
        executable &= ~7  # 3.14 tags it (a stack reference)
        code = executable if memory.u64(executable + layout.ob_type) == layout.code_type else None
        yield frame, owner, code
        frame = memory.u64(frame + layout.frame_previous)


def threads(memory: Memory, layout: Layout) -> list[tuple[int, int]]:
    """(native thread id, thread state) of every Python thread of every interpreter."""
    found = []
    interp = memory.u64(layout.runtime + layout.interpreters_head)
    seen = 0
    while interp and seen < MAX_THREADS:
        thread = memory.u64(interp + layout.threads_head)
        while thread and seen < MAX_THREADS:
            found.append((memory.u64(thread + layout.native_thread_id), thread))
            thread = memory.u64(thread + layout.thread_next)
            seen += 1
        interp = memory.u64(interp + layout.interp_next)
    return found


def check_layout(process: pyprocess.PythonProcess, memory: Memory, layout: Layout) -> None:
    """LayoutError unless the layout reads this process right: a thread state whose native id is
    one of the process's threads, with at least one frame, every frame's code a code object whose
    names are strings (the interpreter's own frames aside)."""
    pid = process.pid
    tasks = set(procfs.threads(pid) or ())
    if not tasks:
        raise procfs.gone(pid)
    where = f"{process.describe()}, offsets from {layout.source}"
    found = threads(memory, layout)
    ours = [(tid, state) for tid, state in found if tid in tasks]
    if not ours:
        raise LayoutError(f"{where}: no thread state found whose native thread id is a thread of process {pid} "
                          f"(read {len(found)}): the layout does not check out, the Python stack cannot be read")
    codes = 0
    for _tid, state in ours:
        for _frame, owner, code in _frames(memory, layout, state):
            if owner >= SHIM_OWNER:
                continue
            if code is None:
                raise LayoutError(f"{where}: a frame's code is not a code object: the layout does not check "
                                  "out, the Python stack cannot be read")
            name = memory.u64(code + layout.code_qualname)
            if not name or memory.string(name, layout) is None:
                raise LayoutError(f"{where}: a code object's name does not read as a string: the layout does "
                                  "not check out, the Python stack cannot be read")
            codes += 1
    if not codes:
        raise LayoutError(f"{where}: none of its {len(ours)} Python threads runs a Python frame now, so the "
                          "layout could not be checked; try again while it runs Python code")
    layout.checked.append(f"{len(ours)} threads, {codes} frames read")


def layout_of(pid: int) -> Layout:
    """The checked layout of process ``pid`` (LayoutError, ToolError with the reason)."""
    process = pyprocess.identify(pid)
    with Memory(pid) as memory:
        return read_layout(process, memory)


# --- turning values into frames ---------------------------------------------------------------


def line_at(linetable: bytes, firstlineno: int, offset: int) -> int | None:
    """The line of the instruction at byte ``offset``, from a 3.11+ location table
    (CPython's Objects/locations.md); None when the instruction has no line."""
    line, address, i = firstlineno, 0, 0

    def varint() -> int:
        nonlocal i
        value, shift = 0, 0
        while i < len(linetable):
            byte = linetable[i]
            i += 1
            value |= (byte & 63) << shift
            shift += 6
            if not byte & 64:
                break
        return value

    def svarint() -> int:
        value = varint()
        return -(value >> 1) if value & 1 else value >> 1

    while i < len(linetable):
        first = linetable[i]
        i += 1
        code, length = first >> 3 & 15, (first & 7) + 1
        delta: int | None = 0
        if code == 15:  # no location
            delta = None
        elif code == 14:  # long form
            delta = svarint()
            varint(), varint(), varint()
        elif code == 13:  # no column
            delta = svarint()
        elif code >= 10:  # one line: start and end column
            delta = code - 10
            i += 2
        else:  # short form: one byte of columns
            i += 1
        if delta is not None:
            line += delta
        end = address + 2 * length
        if address <= offset < end:
            return None if delta is None else line
        address = end
    return None


@dataclass(frozen=True)
class Frame:
    file: str
    line: str
    qualname: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} {self.qualname}"


def unsigned_keys(entries: dict) -> dict[int, int]:
    """A walk map as the tracer printed it (keys as tuples or text, maybe signed) -> {node: value}."""
    out = {}
    for key, value in entries.items():
        key = key[0] if isinstance(key, tuple) else key
        out[int(key) & MASK] = int(value) & MASK
    return out


class Resolver:
    """Frames of one process from the walk's values, reading its memory (code objects cached)."""

    def __init__(self, pid: int, layout: Layout) -> None:
        self.pid = pid
        self.layout = layout
        try:
            self.memory: Memory | None = Memory(pid)
        except ToolError:
            self.memory = None
        #: code address -> (file, qualname, firstlineno, linetable), or None when it could not be read
        self.codes: dict[int, tuple[str, str, int, bytes | None] | None] = {}
        #: What the tracer read of a code object at first sight: (qualname, file) fallbacks.
        self.seen: dict[int, tuple[str, str]] = {}

    def close(self) -> None:
        if self.memory is not None:
            self.memory.close()

    def learn(self, code: int, qualname: str = "", file: str = "") -> None:
        """A code object the tracer saw for the first time: read it now, while it surely lives."""
        if qualname or file:
            self.seen[code] = (qualname, file)
        self.code(code)

    def learn_file(self, code: int, file: str) -> None:
        """The file name of a code object the tracer saw for the first time (after its name)."""
        qualname, _ = self.seen.get(code, ("", ""))
        self.seen[code] = (qualname, file)

    def code(self, address: int):
        if address in self.codes:
            return self.codes[address]
        found = None
        memory, layout = self.memory, self.layout
        if memory is not None and memory.u64(address + layout.ob_type) == layout.code_type:
            file = memory.u64(address + layout.code_filename)
            name = memory.u64(address + layout.code_qualname)
            table = memory.u64(address + layout.code_linetable)
            first = memory.i32(address + layout.code_firstlineno)
            file_text = memory.string(file, layout) if file else None
            name_text = memory.string(name, layout) if name else None
            if file_text is not None and name_text is not None and first is not None:
                found = (file_text, name_text, first, memory.bytes_object(table, layout) if table else None)
        if found is not None or address in self.seen:
            self.codes[address] = found  # a failed read is tried again later, unless the tracer saw it
        return found

    def frame(self, value: int) -> Frame:
        """One value of the walk as a frame (or a marker's text)."""
        if value in MARKERS:
            return Frame("", "", MARKERS[value])
        address, index = value & ((1 << 48) - 1), value >> 48
        code = self.code(address)
        if code is None:
            qualname, file = self.seen.get(address, ("", ""))
            if qualname:  # as the tracer read them: no line without the line table
                return Frame(file or "?", "?", qualname)
            return Frame("?", "?", "? (a code object gone before it was read)")
        file, qualname, first, table = code
        line = None
        if table is not None and index != NO_INDEX:
            line = line_at(table, first, 2 * index)
        return Frame(file, str(line) if line is not None else "?", qualname)

    def stack(self, node: int, frames: dict[int, int], parents: dict[int, int]) -> list[Frame] | None:
        """The frames of the stack that ends at ``node``, innermost first; None when the chain is
        broken (a map lost an update)."""
        values = []
        node &= MASK  # bpftrace prints 64-bit values as signed
        while node != SEED:
            if node not in frames or node not in parents or len(values) > 4096:
                return None
            values.append(frames[node] & MASK)
            node = parents[node] & MASK
        return [self.frame(v) for v in reversed(values)]  # the walk pushed the innermost first


# --- the bpftrace program -----------------------------------------------------------------------

#: The maps the walk writes; a tool's report reads them.
FRAME_MAP, PARENT_MAP, STACKS_MAP = "@__pyframe", "@__pyup", "@__pystacks"
#: The maps of the walk, as bpftrace prints their entries.
WALK_MAPS = (f"{FRAME_MAP}[", f"{PARENT_MAP}[", "@__pycode[")
#: The variable holding the stack's last node after the walk: the key to aggregate on.
STACK_VARIABLE = "$__pystack"
#: How the walk prints a code object seen for the first time.
CODE_LINE = "__pycode"
#: ... and its file name (a compact ASCII str's text; the tool reads the object itself when it can).
FILE_LINE = "__pyfile"
#: How an announcing walk prints a new node of a stack.
NODE_LINE = "__pynode"


def bpftrace_walk(layout: Layout | None, depth: int = DEFAULT_DEPTH, announce: bool = False) -> str:
    """bpftrace statements that leave the current thread's Python stack in ``$__pystack`` (a node
    of @__pyframe/@__pyup). Without a layout (``--script`` before there is a process), the
    addresses and offsets are named, as ``PY_...``.

    One counter per loop, and few branches in it: the kernel's verifier follows every path of
    every iteration, and a second counter (frames kept besides frames walked) multiplies them
    past its limit. A thread of another process (a kernel probe or a timer fires in any) has no
    Python thread here: it reads nothing of that process. With ``announce``, each node is printed
    when it is new (``__pynode NODE PARENT VALUE``), for a tool that reads the program's output
    as it comes rather than its maps."""

    def v(name: str) -> str:
        return str(int(getattr(layout, name))) if layout is not None else f"PY_{name.upper()}"

    def push(indent: str) -> str:
        text = (f"{indent}$__pyu = $__pystack;\n{indent}$__pystack = ($__pystack ^ $__pyv) * 1099511628211;\n"
                f"{indent}{FRAME_MAP}[$__pystack] = $__pyv;\n{indent}{PARENT_MAP}[$__pystack] = $__pyu;\n")
        if not announce:
            return text
        return (f"{indent}$__pyu = $__pystack;\n{indent}$__pystack = ($__pystack ^ $__pyv) * 1099511628211;\n"
                f"{indent}if ({FRAME_MAP}[$__pystack] == 0) {{\n"
                f"{indent}\t{FRAME_MAP}[$__pystack] = $__pyv;\n{indent}\t{PARENT_MAP}[$__pystack] = $__pyu;\n"
                f'{indent}\tprintf("{NODE_LINE} %lu %lu %lu\\n", $__pystack, $__pyu, $__pyv);\n{indent}}}\n')

    def skip(indent: str) -> str:
        # The interpreter's own frames (the shim between a C call and the Python code it calls;
        # 3.14's base frame): at most two in a row.
        return "".join(f"{indent}if ($__pyf != 0 && *(uint8 *)uptr($__pyf + {v('frame_owner')}) >= {SHIM_OWNER}) "
                       f"{{ $__pyf = *(uint64 *)uptr($__pyf + {v('frame_previous')}); }}\n" for _ in range(2))

    # 3.12 keeps the current frame in tstate->cframe->current_frame (1 there, 0 from 3.13 on).
    cframe = f"\t\tif ($__pyf != 0 && {v('through_cframe')} != 0) {{ $__pyf = *(uint64 *)uptr($__pyf); }}\n"
    return f"""\t// --- the Python stack of this thread, read from its frames (pydtrace-rs pystack)
\t$__pyin = pid == {v('pid')} ? *(uint64 *)uptr({v('runtime')} + {v('interpreters_head')}) : (uint64)0;
\t$__pyt = (uint64)0;
\tif ($__pyin != 0) {{
\t\t$__pyt = *(uint64 *)uptr($__pyin + {v('threads_head')});
\t}}
\t$__pyts = (uint64)0;
\t$__pyi = 0;
\twhile ($__pyi < {MAX_THREADS}) {{
\t\tif ($__pyt == 0) {{
\t\t\t$__pyin = *(uint64 *)uptr($__pyin + {v('interp_next')});
\t\t\tif ($__pyin == 0) {{ break; }}
\t\t\t$__pyt = *(uint64 *)uptr($__pyin + {v('threads_head')});
\t\t}} else {{
\t\t\tif (*(uint64 *)uptr($__pyt + {v('native_thread_id')}) == tid) {{
\t\t\t\t$__pyf = *(uint64 *)uptr($__pyt + {v('current_frame')});
{cframe}\t\t\t\tif ($__pyts == 0 || $__pyf != 0) {{ $__pyts = $__pyt; $__pysub = $__pyin; }}
\t\t\t\tif ($__pyf != 0) {{ break; }}
\t\t\t}}
\t\t\t$__pyt = *(uint64 *)uptr($__pyt + {v('thread_next')});
\t\t}}
\t\t$__pyi = $__pyi + 1;
\t}}
\t$__pystack = (uint64){SEED};
\t$__pyf = (uint64)0;
\tif ($__pyts != 0) {{
\t\t$__pyf = *(uint64 *)uptr($__pyts + {v('current_frame')});
{cframe}\t\t$__pysub = *(uint64 *)uptr($__pysub + {v('interp_next')});
\t}}
\t$__pyj = 0;
\twhile ($__pyj < {depth}) {{
{skip(chr(9) * 2)}\t\tif ($__pyf == 0) {{ break; }}
\t\t$__pyc = (*(uint64 *)uptr($__pyf + {v('frame_executable')}) >> 3) << 3;
\t\t$__pyv = (uint64){NOT_CODE};
\t\tif ($__pyc < {USER_END} && *(uint64 *)uptr($__pyc + 8) == {v('code_type')}) {{
\t\t\t$__pyx = (*(uint64 *)uptr($__pyf + {v('frame_instr')}) - $__pyc - {v('code_adaptive')}) >> 1;
\t\t\t$__pyx = $__pyx > {NO_INDEX} ? {NO_INDEX} : $__pyx;
\t\t\t$__pyv = $__pyc | ($__pyx << 48);
\t\t\tif (@__pycode[$__pyc] == 0) {{
\t\t\t\t@__pycode[$__pyc] = 1;
\t\t\t\tprintf("{CODE_LINE} %lu %s\\n", $__pyc, str(uptr(*(uint64 *)uptr($__pyc + {v('code_qualname')}) + {v('ascii_size')})));
\t\t\t\tprintf("{FILE_LINE} %lu %s\\n", $__pyc, str(uptr(*(uint64 *)uptr($__pyc + {v('code_filename')}) + {v('ascii_size')})));
\t\t\t}}
\t\t}}
{push(chr(9) * 2)}\t\t$__pyf = *(uint64 *)uptr($__pyf + {v('frame_previous')});
\t\t$__pyj = $__pyj + 1;
\t}}
{skip(chr(9))}\tif ($__pyf != 0) {{
\t\t$__pyv = (uint64){CUT};
{push(chr(9) * 2)}\t}}
\tif ($__pyj == 0) {{
\t\t$__pyv = (uint64)($__pyts == 0 ? {NO_THREAD} : {NO_FRAME});
{push(chr(9) * 2)}\t}}
\tif ($__pysub != 0) {{
\t\t$__pyv = (uint64){SUBINTERPRETER};
{push(chr(9) * 2)}\t}}
\t// --- end of the Python stack walk
"""


def uses_walk(program: str) -> bool:
    """Whether ``program`` walks the Python stack (has the walk's names to fill in)."""
    return "PY_RUNTIME" in program


def bind(program: str, layout: Layout) -> str:
    """``program`` with ``layout``'s addresses and offsets in place of the walk's ``PY_...`` names."""
    names = {f"PY_{name.upper()}": value for name, value in vars(layout).items() if isinstance(value, int)}
    return re.sub(r"\bPY_[A-Z_]+\b", lambda m: str(int(names[m.group(0)])) if m.group(0) in names else m.group(0),
                  program)


def stack_program(probe: str, what: str, depth: int = DEFAULT_DEPTH, predicate: str = "pid == $1") -> str:
    """A program that counts the Python stacks of the target's threads at ``probe``, by node
    (``@__pystacks``); its BEGIN prints the "Tracing ..." line."""
    return (f'BEGIN\n{{\n\tprintf("Tracing {what}, from their frames... Hit Ctrl-C to end.\\n");\n}}\n\n'
            f"{probe}\n/{predicate}/\n{{\n{bpftrace_walk(None, depth)}\t{STACKS_MAP}[{STACK_VARIABLE}] = count();\n}}\n")


def count_stacks(maps: dict[str, dict], resolver: Resolver, counts: str = STACKS_MAP) -> tuple[dict, int]:
    """({stack: count}, how many events had a broken chain) from a walk's maps as a tool received
    them; a stack is a tuple of :class:`Frame`, innermost first."""
    frames, parents = unsigned_keys(maps.get(FRAME_MAP, {})), unsigned_keys(maps.get(PARENT_MAP, {}))
    counted: dict[tuple[Frame, ...], int] = {}
    broken = 0
    for node, count in unsigned_keys(maps.get(counts, {})).items():
        stack = resolver.stack(node, frames, parents)
        if stack is None:
            broken += count
            continue
        key = tuple(stack)
        counted[key] = counted.get(key, 0) + count
    return counted, broken


def on_printf(text: str, resolver: Resolver | None) -> bool:
    """Whether ``text`` is the walk's own line (a code object seen for the first time: its name,
    then its file, as the tracer read them; read from the process now)."""
    kind = text.split(" ", 1)[0]
    if kind not in (CODE_LINE, FILE_LINE):
        return False
    if resolver is not None:
        words = text.rstrip("\n").split(" ", 2)
        try:
            code, name = int(words[1]) & MASK, words[2] if len(words) > 2 else ""
        except (ValueError, IndexError):
            return True
        if kind == CODE_LINE:
            resolver.learn(code, name)
        else:
            resolver.learn_file(code, name)
    return True
