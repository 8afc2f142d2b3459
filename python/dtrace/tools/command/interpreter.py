"""An interpreter's own probes: how the tools attach where the interpreter declares provider python too.

A CPython built ``--with-dtrace`` (Debian's, Ubuntu's, Fedora's) declares
``gc__*``, ``import__*`` and ``audit`` in its executable or libpython from
3.12 on, and ``function__entry``/``function__return`` again from 3.15
(three arguments: no ``co_qualname``, and generators do not balance). Two
objects of one process then declare the same probe name, and bpftrace 0.17
with ``-p`` cannot tell them apart: it fails ("couldn't get argument",
"Could not resolve symbol"), or attaches silently to the wrong address.

So on such a target a tool attaches to the probe object's sites of those
probes by address (``uprobe:LIBRARY:0xADDRESS``), with ``-p`` as usual and a
``pid == PID`` predicate (bpftrace 0.17 attaches such a uprobe for every
process that maps the file; one whose probes are not armed never reaches the
site, so it pays nothing). The note of each probe
pins argument N to the register a uprobe reads as ``argN`` (the C calling
convention's; build/codegen.rs), so the clause reads the same arguments;
one narrower than 64 bits is cast back to its type. A uprobe raises no
semaphore, so the tool asks the process for those probes through its lease
on the scope channel (``probe:NAME`` lines, ``scope.open_session``): the
process fires them while the lease is held, and stops when the tool ends or
dies. The interpreter's own copies stay off (nobody raised their
semaphores), so every event reaches the tool once, with the qualified name
and balanced entries and returns. The other probes stay USDT probes, bound
to the probe object's path.

In a build for 3.15 on, the notes of ``function__entry`` and ``function__return``
declare CPython's three arguments, not ``qualname`` (bcc merges the two objects'
sites and reads them all by one argument list: build/codegen.rs). A tool then
attaches to them by address on every 3.15 interpreter, with or without
``--with-dtrace``, and ``arg3`` reads qualname from its register.

Which probes the interpreter declares is read from the SDT notes of the
objects mapped in the process (its executable, a libpython), never from one
build's symbols (docs/interpreter-probes.md). Linux (bpftrace) only: on the
DTrace platforms a D script's ``python$target:::`` matches both objects, and
the interpreter's probe is left to it.
"""

from __future__ import annotations

import os
import re
import struct
import sys

from dtrace.tools.command import programs
from dtrace.tools.errors import ToolError
from dtrace.tools.proc import elf, procfs

#: The cast that gives an argument narrower than 64 bits its type back, by its size in the note;
#: and a 64-bit one the type a USDT probe's argN has (int64, where a uprobe's is uint64: bpftrace
#: 0.27 warns when the two meet in one expression, as in flame's hash of arg0 and arg3).
CASTS = {"-1": "int8", "1": "uint8", "-2": "int16", "2": "uint16", "-4": "int32", "4": "uint32",
         "-8": "int64", "8": "int64"}


def declared(pid: int, library: str | None) -> dict[str, str]:
    """The probes of provider python that the interpreter of process ``pid`` declares
    (bpftrace's spelling, ``function__entry``), each with the object that does: the
    executable or a libpython. Empty where it declares none, and off Linux. Raises ToolError
    when the interpreter's object cannot be read (then nobody can say which probes collide)."""
    if not sys.platform.startswith("linux"):
        return {}
    candidates = []
    try:
        candidates.append(procfs.executable(pid).removesuffix(" (deleted)"))
    except ToolError:
        pass
    candidates += [path for path in procfs.mapped_objects(pid) if os.path.basename(path).startswith("libpython")]
    found: dict[str, str] = {}
    for path in candidates:
        if path == library:
            continue
        path = readable(pid, path)
        try:
            obj = elf.read(path)
        except (ValueError, IndexError, struct.error) as error:
            raise ToolError(f"cannot read the SDT notes of {path}, process {pid}'s interpreter ({error}): "
                            "cannot tell which probes it fires itself") from None
        for probe in obj.probes if obj else []:
            if probe.provider == "python":
                found.setdefault(probe.name, path)
    return found


def readable(pid: int, path: str) -> str:
    """``path`` of process ``pid``'s view as this process can read it: through
    ``/proc/PID/root`` where the process is in another mount namespace (a container)."""
    if not os.access(path, os.R_OK) and os.path.exists(f"/proc/{pid}/root{path}"):
        return f"/proc/{pid}/root{path}"
    return path


def sites(library: str) -> dict[str, list[elf.Probe]]:
    """The probe object's probes of provider python, by name, each with its sites."""
    obj = elf.read(library)
    if obj is None:
        raise ToolError(f"cannot read the SDT notes of the probe object {library}")
    found: dict[str, list[elf.Probe]] = {}
    for probe in obj.probes:
        if probe.provider == "python":
            found.setdefault(probe.name, []).append(probe)
    return found


def provider_arguments() -> dict[str, list[str]]:
    """Each probe's argument declarations in the provider file (``["char *filename", ...]``),
    by bpftrace's spelling of its name."""
    from dtrace import _native

    return {name.replace("-", "__"): [argument.strip() for argument in arguments.split(",")]
            for name, arguments in zip(_native.PROBE_NAMES, _native.PROBE_ARGUMENTS)}


def short(library: str, ours: dict[str, list[elf.Probe]] | None = None) -> set[str]:
    """The probes whose notes in the probe object declare fewer arguments than the provider
    file: in a build for CPython 3.15 on, function__entry and function__return declare
    CPython's three (filename, funcname, lineno) and not qualname, because bcc reads every
    site of a name by one site's argument list (build/codegen.rs, FIRED_BY_CPYTHON). The
    firing function still holds qualname in its register at the site. ``ours``: the object's
    probes as :func:`sites` read them, when the caller has them already."""
    declared_here = provider_arguments()
    return {name for name, found in (ours if ours is not None else sites(library)).items()
            if any(len(site.arguments.split()) < len(declared_here.get(name, [])) for site in found)}


def casts(arguments: str, declared_as: list[str] | None = None) -> dict[str, str]:
    """``{"arg2": "int32"}`` for each argument of a note's argument string: its type, as a USDT
    probe would give it (see CASTS). ``declared_as``, the probe's arguments in the provider
    file, adds those the note leaves out: a pointer (qualname) as the int64 a USDT probe's
    64-bit argument is."""
    out = {}
    specs = arguments.split()
    for index, spec in enumerate(specs):
        size = spec.split("@", 1)[0]
        if size in CASTS:
            out[f"arg{index}"] = CASTS[size]
    for index, declaration in enumerate(declared_as or []):
        if index >= len(specs) and "*" in declaration:
            out[f"arg{index}"] = CASTS["-8"]
    return out


def bind(program: str, library: str, colliding: set[str], usdt_path: str | None = None,
         pid: int | None = None, ours: dict[str, list[elf.Probe]] | None = None) -> tuple[str, list[str]]:
    """The bpftrace ``program`` with its python probes bound to ``library``: those in
    ``colliding`` (declared by the interpreter too, or with arguments beyond their notes) as
    uprobes at their sites, the others as USDT probes of that object, named ``usdt_path``
    (default: ``library``). ``ours``: the object's probes, when the caller read them already.
    Returns the program and the probes attached by address (which the process must be asked to
    fire: no semaphore is raised for them).

    bpftrace 0.17 attaches a uprobe by address to the file, for every process that maps it,
    whatever ``-p`` says: a clause bound so gets the predicate ``pid == PID`` (with ``pid``),
    so that another process whose probes are armed (by a tool of its own) is not counted."""
    usdt_path = usdt_path or library
    ours = ours if ours is not None else sites(library)
    declared_here = provider_arguments()
    edits: list[tuple[int, int, str]] = []
    by_address: set[str] = set()
    masked = programs.mask(program)
    for clause in programs.clauses(program):
        clause_casts: dict[str, str] | None = None
        rebound = False
        for point in clause.attach_points:
            probe = programs.usdt(point)
            if probe is None or probe.provider != "python" or probe.path not in ("", "*", library, usdt_path):
                continue
            matched = programs.names_matching(probe.name, sorted(ours))
            if not any(name in colliding for name in matched):
                if probe.path != usdt_path:
                    edits.append((point.start, point.end, f"usdt:{usdt_path}:python:{probe.name}"))
                continue
            points = []
            for name in matched:
                if name not in colliding:
                    points.append(f"usdt:{usdt_path}:python:{name}")
                    continue
                by_address.add(name)
                rebound = True
                for site in ours[name]:
                    points.append(f"uprobe:{library}:{site.location:#x}")
                    wanted = casts(site.arguments, declared_here.get(name))
                    if clause_casts is not None and clause_casts != wanted:
                        raise ToolError(f"{program[clause.start:clause.brace].strip()}: probes with different "
                                        "argument types in one clause cannot be attached by address on this "
                                        "interpreter; give each its own clause")
                    clause_casts = wanted
            edits.append((point.start, point.end, ", ".join(points)))
        if rebound and pid is not None:
            header_end = clause.attach_points[-1].end
            header = masked[header_end:clause.brace]
            if "/" in header:  # the clause's own predicate: both must hold
                first, last = header_end + header.index("/"), header_end + header.rindex("/")
                edits.append((first, last + 1, f"/pid == {pid} && ({program[first + 1:last].strip()})/"))
            else:
                edits.append((header_end, header_end, f" /pid == {pid}/"))
        if clause_casts:
            body = program[clause.brace:clause.end]
            code = programs.mask(program)[clause.brace:clause.end]
            names = "|".join(sorted(clause_casts))
            spans = [(m.start(), m.end(), f"(({clause_casts[m.group()]}){m.group()})")
                     for m in re.finditer(rf"(?<![\w$@])(?:{names})(?!\w)", code)]
            edits.append((clause.brace, clause.end, programs.replace_spans(body, spans)))
    return programs.replace_spans(program, edits), sorted(by_address)


def adapt(program: str, probes: list[str], pid: int, library: str | None,
          dialect: str) -> tuple[str, list[str], list[str]]:
    """A tool's ``program`` for process ``pid``: where its interpreter declares probes of the
    program too, those bound by address (see the module's doc). Returns the program, the probes a
    started command waits for (``probes``, unchanged), and the probes the tool must ask the
    process for (DTrace's spelling), none where no probe of the program is bound by address."""
    if dialect != "bt" or not library:
        return program, probes, []
    interpreter = declared(pid, library)
    used = {name.replace("__", "-") for name in re.findall(r"python:([\w*?\[\]-]+)", programs.mask(program))}
    # Also by address: a probe whose note declares fewer arguments than the provider (in a build
    # for 3.15 on, function__entry's note has CPython's three; see short()), on any interpreter,
    # so that a program's arg3 (qualname) reads the register the site holds it in.
    ours = sites(readable(pid, library))  # read once, for short() and bind()
    colliding = {name for name in set(interpreter) | short(library, ours)
                 if any(programs.names_matching(pattern.replace("-", "__"), [name]) for pattern in used)}
    if not colliding:
        return program, probes, []
    # The other probes by the object's path as the process sees it: bpftrace 0.17 turns a path
    # under -p into this itself, while later releases (0.27) attach a plain path twice, at the
    # path and at /proc/PID/root/PATH, and each event of those probes would count twice.
    bound, by_address = bind(program, library, colliding, f"/proc/{pid}/root{library}", pid, ours)
    return bound, probes, [name.replace("__", "-") for name in by_address]
