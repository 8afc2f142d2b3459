"""An interpreter's own probes: where CPython fires some probes of provider python itself, the
tools attach to them too.

A CPython built ``--with-dtrace`` fires ``gc__*``, ``import__*`` and ``audit``
itself from 3.12 on, and ``function__entry``/``function__return`` again from
3.15; pydtrace-rs then leaves those probes to it, so that no event is
reported twice (``dtrace._native.interpreter_probes()``). The interpreter's
probes sit in its executable or in libpython, not in the probe object, and
pass CPython's three arguments: no ``arg3`` (``co_qualname``), which the
tools' function clauses read.

So, for a target whose interpreter declares such probes, a tool's program
gets, after each clause on one of them, the same clause on the interpreter's
probe (``usdt:/path/to/python:python:function__entry``) reading ``arg1``
(``co_name``) where the clause reads ``arg3``; the clause itself is bound to
the probe object (``usdt:LIBRARY:python:NAME``), since ``usdt::python:NAME``
under ``-p`` attaches to every object of the process that declares the probe,
and would read an ``arg3`` the interpreter does not pass. A command started
with ``-c`` is not held for those probes (they go live without pydtrace-rs).

UNTESTED against such an interpreter: none can be had on the project's
machine (a CPython 3.15 built ``--with-dtrace``; Debian's python3.11 is built
so, but 3.11 is not supported). The program generation is unit-tested
(tests/test_interpreter_probes.py). Linux (bpftrace) only: on the DTrace
platforms a D script's ``python$target:::`` matches both objects already, and
their clauses are not split by object here.
"""

from __future__ import annotations

import os
import struct
import sys

from dtrace.tools import elfnotes, programs

#: The argument the tools read for the function name, and what stands in for it on an interpreter's probe.
QUALNAME, FUNCNAME = "arg3", "arg1"


def declared(pid: int, library: str | None) -> dict[str, str]:
    """The probes of provider python that the interpreter of process ``pid`` declares
    (bpftrace's spelling, ``function__entry``), each with the object that does: the
    executable or a libpython. Empty where it declares none, and off Linux."""
    if not sys.platform.startswith("linux"):
        return {}
    candidates = []
    try:
        candidates.append(os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)"))
    except OSError:
        pass
    try:
        candidates += [path for path in elfnotes.mapped_objects(pid)
                       if os.path.basename(path).startswith("libpython")]
    except OSError:
        pass
    found: dict[str, str] = {}
    for path in candidates:
        if path == library:
            continue
        try:
            obj = elfnotes.read(path)
        except (ValueError, IndexError, struct.error):  # not an ELF object we can read: no probes
            obj = None
        for probe in obj.probes if obj else []:
            if probe.provider == "python":
                found.setdefault(probe.name, path)
    return found


def extend(program: str, library: str, interpreter: dict[str, str]) -> str:
    """The bpftrace ``program`` with the interpreter's probes added (see the module's doc):
    ``interpreter`` maps each probe the interpreter declares to its object (``declared``)."""
    if not interpreter:
        return program
    edits: list[tuple[int, int, str]] = []
    for clause in programs.clauses(program):
        copies: dict[str, list[str]] = {}  # interpreter object -> its attach points for the copy
        for point in clause.attach_points:
            probe = programs.usdt(point)
            if probe is None or probe.provider != "python" or probe.path not in ("", "*"):
                continue
            objects = {interpreter[name] for name in programs.names_matching(probe.name, sorted(interpreter))}
            if not objects:
                continue
            edits.append((point.start, point.end, f"usdt:{library}:python:{probe.name}"))
            for path in objects:
                copies.setdefault(path, []).append(f"usdt:{path}:python:{probe.name}")
        if not copies:
            continue
        header_end = clause.attach_points[-1].end
        rest = programs.rename_argument(program, header_end, clause.end, QUALNAME, FUNCNAME)
        added = "".join(f"\n\n{', '.join(points)}{rest}" for path, points in sorted(copies.items()))
        edits.append((clause.end, clause.end, added))
    return programs.replace_spans(program, edits)


def adapt(program: str, probes: list[str], pid: int, library: str | None, dialect: str) -> tuple[str, list[str]]:
    """A tool's ``program`` and the ``probes`` a started command waits for, for the target
    process ``pid``: the interpreter's probes added to the one, taken out of the other."""
    if dialect != "bt" or not library:
        return program, probes
    interpreter = declared(pid, library)
    if not interpreter:
        return program, probes
    waited = [p for p in probes if p.replace("-", "__") not in interpreter]
    return extend(program, library, interpreter), waited
