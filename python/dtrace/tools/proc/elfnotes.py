"""The SDT probes of an ELF object (its ``.note.stapsdt`` notes), and their semaphores in a process.

A consumer enables a probe by raising its semaphore, a counter in the object's
data; reading it in ``/proc/PID/mem`` shows which probes are enabled right now.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

NT_STAPSDT = 3


@dataclass
class Probe:
    provider: str
    name: str
    arguments: str  # as the note spells them: "8@%rdi 8@%rsi -4@%edx"
    semaphore: int  # its link-time address, 0 if it has none
    location: int = 0  # the probe site's link-time address


@dataclass
class Object:
    path: str
    probes: list[Probe]
    #: (vaddr, file offset) of the first loadable segment, to place semaphores in a process.
    first_load: tuple[int, int]
    #: struct's byte order of the object: "<" or ">".
    byte_order: str = "<"


def read(path: str) -> Object | None:
    """The probes of the ELF object at ``path``; None when it is no 64-bit ELF object or has none."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only
        return None
    end = "<" if data[5] == 1 else ">"
    (e_phoff, e_shoff) = struct.unpack_from(end + "QQ", data, 0x20)
    (e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx) = struct.unpack_from(end + "HHHHH", data, 0x36)

    first_load = (0, 0)
    for i in range(e_phnum):
        p_type, _, p_offset, p_vaddr = struct.unpack_from(end + "IIQQ", data, e_phoff + i * e_phentsize)
        if p_type == 1:  # PT_LOAD
            first_load = (p_vaddr, p_offset)
            break

    sections = []
    for i in range(e_shnum):
        name, _, _, addr, offset, size = struct.unpack_from(end + "IIQQQQ", data, e_shoff + i * e_shentsize)
        sections.append((name, addr, offset, size))
    if not sections:
        return None
    strtab = sections[e_shstrndx][2]

    def section_name(entry) -> str:
        start = strtab + entry[0]
        return data[start : data.index(b"\0", start)].decode(errors="replace")

    named = {section_name(s): s for s in sections}
    notes = named.get(".note.stapsdt")
    if notes is None:
        return None
    base = named.get(".stapsdt.base")
    probes = []
    position, stop = notes[2], notes[2] + notes[3]
    while position + 12 <= stop:
        namesz, descsz, kind = struct.unpack_from(end + "III", data, position)
        owner_at = position + 12
        desc_at = owner_at + (namesz + 3 & ~3)
        position = desc_at + (descsz + 3 & ~3)
        if kind != NT_STAPSDT or data[owner_at : owner_at + namesz].rstrip(b"\0") != b"stapsdt":
            continue
        pc, note_base, semaphore = struct.unpack_from(end + "QQQ", data, desc_at)
        provider, name, arguments = data[desc_at + 24 : desc_at + descsz].split(b"\0")[:3]
        if base is not None:  # prelink adjustment, as the SystemTap spec says
            pc += base[1] - note_base
            if semaphore:
                semaphore += base[1] - note_base
        probes.append(Probe(provider.decode(), name.decode(), arguments.decode(), semaphore, pc))
    return Object(path, probes, first_load, end)


def load_bias(pid: int, obj: Object) -> int | None:
    """Where process ``pid`` loaded ``obj``: its mapping start minus the segment's address."""
    vaddr, offset = obj.first_load
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].strip() == obj.path and int(parts[2], 16) == offset:
                    return int(parts[0].split("-")[0], 16) - (vaddr - vaddr % 4096)
    except OSError:
        return None
    return None


def semaphores(pid: int, obj: Object) -> dict[str, int] | None:
    """Each probe's semaphore in process ``pid`` (how many consumers enable it); None if unreadable."""
    bias = load_bias(pid, obj)
    if bias is None:
        return None
    values = {}
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            for probe in obj.probes:
                if probe.semaphore:
                    mem.seek(bias + probe.semaphore)
                    values[probe.name] = struct.unpack(obj.byte_order + "H", mem.read(2))[0]
    except OSError:
        return None
    return values


def mapped_objects(pid: int) -> list[str]:
    """The files mapped into process ``pid``, in order of first mapping."""
    seen = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/") and parts[5].strip() not in seen:
                    seen.append(parts[5].strip())
    except OSError:
        pass
    return seen
