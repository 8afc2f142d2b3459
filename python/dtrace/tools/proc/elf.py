"""The one ELF reader: an object's loadable segments, dynamic symbols, initialized data and SDT probes
(its ``.note.stapsdt`` notes), and where a process loaded it.

A consumer enables a probe by raising its semaphore, a counter in the object's data; reading it
in ``/proc/PID/mem`` shows which probes are enabled right now (:func:`semaphores`). The tools
also find a function or a variable of an object in a process (:func:`symbol_address`: the
interpreter's functions for ``--inject``, the probe object's flush requests and scope channel)
and read a constant from the file (``Py_Version``).

64-bit objects, either byte order. Reads the headers and the sections it needs, not the whole file.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

from dtrace.tools.errors import ToolError
from dtrace.tools.proc import procfs
from dtrace.tools.proc.procfs import Mapping

NT_STAPSDT = 3
PT_LOAD = 1
SHT_DYNSYM = 11


@dataclass
class Probe:
    provider: str
    name: str
    arguments: str  # as the note spells them: "8@%rdi 8@%rsi -4@%edx"
    semaphore: int  # its link-time address, 0 if it has none
    location: int = 0  # the probe site's link-time address


class ElfFile:
    """One ELF object (64-bit, either byte order); ValueError when it is none, OSError when it
    cannot be read, struct.error or IndexError when its headers are cut short."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            ident = f.read(64)
            if len(ident) < 64 or ident[:4] != b"\x7fELF" or ident[4] != 2:
                raise ValueError("not a 64-bit ELF object")
            end = "<" if ident[5] == 1 else ">"
            #: struct's byte order of the object: "<" or ">".
            self.byte_order = end
            e_phoff, e_shoff = struct.unpack_from(end + "QQ", ident, 0x20)
            e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx = struct.unpack_from(end + "HHHHH", ident, 0x36)
            f.seek(e_phoff)
            headers = f.read(e_phentsize * e_phnum)
            #: (vaddr, file offset, file size) of each PT_LOAD, in order.
            self.loads: list[tuple[int, int, int]] = []
            for i in range(e_phnum):
                p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from(end + "IIQQQQ", headers, i * e_phentsize)
                if p_type == PT_LOAD:
                    self.loads.append((p_vaddr, p_offset, p_filesz))
            f.seek(e_shoff)
            table = f.read(e_shentsize * e_shnum)
            # (name, type, flags, addr, offset, size, link, info, align, entsize)
            sections = [struct.unpack_from(end + "IIQQQQIIQQ", table, i * e_shentsize) for i in range(e_shnum)]
            self.symbols: dict[str, tuple[int, int]] = {}
            for _name, kind, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
                if kind == SHT_DYNSYM and entsize:
                    self._read_symbols(f, sections, offset, size, link, entsize)
            named = self._named(f, sections, e_shstrndx)
            notes, base = named.get(".note.stapsdt"), named.get(".stapsdt.base")
            #: Whether the object has SDT notes, and its probes.
            self.has_notes = notes is not None
            self.probes: list[Probe] = []
            if notes is not None:
                f.seek(notes[4])
                self._read_probes(f.read(notes[5]), base[3] if base is not None else None)

    @property
    def first_load(self) -> tuple[int, int]:
        """(vaddr, file offset) of the first loadable segment: where the object starts in memory."""
        return self.loads[0][:2] if self.loads else (0, 0)

    def _read_symbols(self, f, sections, offset: int, size: int, link: int, entsize: int) -> None:
        f.seek(offset)
        data = f.read(size)
        strings_header = sections[link]
        f.seek(strings_header[4])
        strings = f.read(strings_header[5])
        for i in range(size // entsize):
            st_name, _info, _other, st_shndx, st_value, st_size = struct.unpack_from(
                self.byte_order + "IBBHQQ", data, i * entsize)
            if st_shndx == 0 or not st_name:  # undefined here
                continue
            name = strings[st_name : strings.index(b"\0", st_name)].decode(errors="replace")
            self.symbols[name] = (st_value, st_size)

    @staticmethod
    def _named(f, sections, shstrndx: int) -> dict[str, tuple]:
        """The sections by name."""
        if not sections:
            return {}
        names_header = sections[shstrndx]
        f.seek(names_header[4])
        names = f.read(names_header[5])
        return {names[s[0] : names.index(b"\0", s[0])].decode(errors="replace"): s for s in sections}

    def _read_probes(self, data: bytes, base: int | None) -> None:
        end = self.byte_order
        position = 0
        while position + 12 <= len(data):
            namesz, descsz, kind = struct.unpack_from(end + "III", data, position)
            owner_at = position + 12
            desc_at = owner_at + (namesz + 3 & ~3)
            position = desc_at + (descsz + 3 & ~3)
            if kind != NT_STAPSDT or data[owner_at : owner_at + namesz].rstrip(b"\0") != b"stapsdt":
                continue
            pc, note_base, semaphore = struct.unpack_from(end + "QQQ", data, desc_at)
            provider, name, arguments = data[desc_at + 24 : desc_at + descsz].split(b"\0")[:3]
            if base is not None:  # prelink adjustment, as the SystemTap spec says
                pc += base - note_base
                if semaphore:
                    semaphore += base - note_base
            self.probes.append(Probe(provider.decode(), name.decode(), arguments.decode(), semaphore, pc))

    def read(self, vaddr: int, size: int) -> bytes | None:
        """``size`` bytes of the file's image at link-time address ``vaddr`` (from a PT_LOAD)."""
        for start, offset, filesz in self.loads:
            if start <= vaddr and vaddr + size <= start + filesz:
                with open(self.path, "rb") as f:
                    f.seek(offset + vaddr - start)
                    return f.read(size)
        return None

    def unsigned(self, name: str) -> int | None:
        """The value of the constant ``name`` (an unsigned integer of its symbol's size)."""
        if name not in self.symbols:
            return None
        vaddr, size = self.symbols[name]
        data = self.read(vaddr, size)
        if data is None or size not in (4, 8):
            return None
        return struct.unpack(self.byte_order + ("I" if size == 4 else "Q"), data)[0]


def read(path: str) -> ElfFile | None:
    """The ELF object at ``path`` with its probes; None when it cannot be read, is no 64-bit ELF
    object or has no SDT notes."""
    try:
        elf = ElfFile(path)
    except (OSError, ValueError):
        return None
    return elf if elf.has_notes else None


def load_bias(maps: list[Mapping], path: str, elf: ElfFile) -> int | None:
    """Where ``path`` is loaded: the start of the mapping of its first segment minus that
    segment's address, both rounded down to the page, as the kernel maps a segment: from the page
    that holds its first byte (so a segment that does not start on a page boundary shows in the
    maps at its offset rounded down; tests/test_tools.py checks one). ``path`` may lead through
    symlinks."""
    if not elf.loads:
        return None
    vaddr, offset = elf.first_load
    # The maps name the object by the path the kernel resolved: a path through a symlink (a venv
    # reached through a link, as `.venv -> .venv-3.12`) is matched by where it leads.
    paths = {path, os.path.realpath(path)}
    for mapping in maps:
        if mapping.path in paths and mapping.offset == offset - offset % mmap.PAGESIZE:
            return mapping.start - (vaddr - vaddr % mmap.PAGESIZE)
    return None


def semaphores(pid: int, elf: ElfFile) -> dict[str, int] | None:
    """Each probe's semaphore in process ``pid`` (how many consumers enable it); None if unreadable."""
    try:
        bias = load_bias(procfs.mappings(pid), elf.path, elf)
    except (ToolError, OSError):
        return None
    if bias is None:
        return None
    values = {}
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            for probe in elf.probes:
                if probe.semaphore:
                    mem.seek(bias + probe.semaphore)
                    values[probe.name] = struct.unpack(elf.byte_order + "H", mem.read(2))[0]
    except OSError:
        return None
    return values


def symbol_address(pid: int, library: str, name: str) -> int | None:
    """Where process ``pid`` has the dynamic symbol ``name`` of ``library`` (an object it loaded and
    that was not replaced since); None when the object has no such symbol or is not mapped."""
    try:
        elf = ElfFile(library)
    except (OSError, ValueError, IndexError, struct.error):  # unreadable, or no 64-bit ELF object
        return None
    symbol = elf.symbols.get(name)
    if symbol is None:
        return None
    bias = load_bias([m for m in procfs.mappings(pid) if not m.deleted], library, elf)
    return None if bias is None else bias + symbol[0]
