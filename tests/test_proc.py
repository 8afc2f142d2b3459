"""What the tools read from another process (dtrace/tools/proc/): the one ELF reader and where a
process loaded an object (the load bias, against the kernel's page-rounded mappings), and the one
procfs reader. No tracer needed."""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import subprocess
import sys

import pytest

import dtrace
from dtrace.tools.errors import ToolError
from dtrace.tools.proc import elf, procfs
from dtrace.tools.proc.procfs import Mapping

LIBRARY = dtrace.library_path()
needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")


def elf_with_first_load(path, vaddr: int, offset: int) -> None:
    """A minimal 64-bit little-endian ELF file whose one PT_LOAD starts at file offset ``offset``
    and address ``vaddr`` (congruent modulo the page, as a linker makes them)."""
    header = bytearray(64)
    header[:4] = b"\x7fELF"
    header[4], header[5], header[6] = 2, 1, 1  # 64-bit, little-endian, version 1
    struct.pack_into("<HHI", header, 16, 3, 62, 1)  # ET_DYN, x86-64
    struct.pack_into("<QQQ", header, 0x18, 0, 64, 0)  # entry, e_phoff, e_shoff (no sections)
    struct.pack_into("<HHHHHH", header, 0x34, 64, 56, 1, 64, 0, 0)  # ehsize, phentsize, phnum, ...
    program = struct.pack("<IIQQQQQQ", 1, 5, offset, vaddr, vaddr, 16, 16, mmap.PAGESIZE)
    path.write_bytes(bytes(header) + program + b"\0" * (offset + 16 - 64 - len(program)))


def test_load_bias_matches_the_kernels_page_rounded_offset(tmp_path):
    """The kernel maps a segment from the page that holds its first byte: /proc/PID/maps shows its
    offset rounded down to the page, and its start at the address rounded down. A first segment
    at file offset 0x1234 is found at offset 0x1000 (the raw p_offset matched nothing there)."""
    path = tmp_path / "obj.so"
    page = mmap.PAGESIZE
    vaddr, offset = 0x40 * page + 0x234, page + 0x234
    elf_with_first_load(path, vaddr, offset)
    obj = elf.ElfFile(str(path))
    assert obj.first_load == (vaddr, offset) and not obj.has_notes and elf.read(str(path)) is None
    start = 0x7F00_0000_0000
    maps = [Mapping(start, start + page, page, str(path))]  # as the kernel shows it
    assert elf.load_bias(maps, str(path), obj) == start - 0x40 * page
    assert elf.load_bias([Mapping(start, start + page, offset, str(path))], str(path), obj) is None
    assert elf.load_bias([Mapping(start, start + page, page, "/other.so")], str(path), obj) is None


@needs_linux
def test_symbol_address_is_where_the_process_has_the_symbol():
    """The ELF reader and the load bias agree with the dynamic linker: the probe object's flush
    requests, as this process has them."""
    native = ctypes.CDLL(LIBRARY)
    expected = ctypes.addressof(ctypes.c_uint32.in_dll(native, "pydtrace_flush_requests"))
    assert elf.symbol_address(os.getpid(), LIBRARY, "pydtrace_flush_requests") == expected
    assert elf.symbol_address(os.getpid(), LIBRARY, "no_such_symbol") is None


def test_a_path_through_a_symlink_finds_the_object_the_maps_name_resolved(tmp_path):
    # A venv reached through a link (`.venv -> .venv-3.12`): the process reports its probe object by
    # the linked path, the maps name it by the resolved one. The flush requests were not found.
    link = tmp_path / "linked"
    link.symlink_to(os.path.dirname(LIBRARY))
    through_link = str(link / os.path.basename(LIBRARY))
    expected = elf.symbol_address(os.getpid(), LIBRARY, "pydtrace_flush_requests")
    assert expected is not None
    assert elf.symbol_address(os.getpid(), through_link, "pydtrace_flush_requests") == expected


@needs_linux
def test_the_probe_objects_probes_and_semaphores_in_this_process():
    obj = elf.read(LIBRARY)
    names = {probe.name for probe in obj.probes if probe.provider == "python"}
    assert {"function__entry", "function__return", "line", "gc__start"} <= names
    assert all(probe.semaphore for probe in obj.probes if probe.provider == "python")
    counts = elf.semaphores(os.getpid(), obj)
    assert counts is not None and set(counts) == names  # read from this process's memory


def test_no_elf_object_is_none(tmp_path):
    (tmp_path / "text").write_text("not an object")
    assert elf.read(str(tmp_path / "text")) is None
    assert elf.read(str(tmp_path / "missing")) is None
    with pytest.raises(ValueError):
        elf.ElfFile(str(tmp_path / "text"))


@needs_linux
def test_procfs_reads_a_process():
    code = "import sys; print('ready', flush=True); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env={**os.environ, "PYDTRACE_TEST_MARK": "1"})
    try:
        assert child.stdout.readline() == b"ready\n"  # it runs Python: exec is done
        assert procfs.alive(child.pid)
        assert procfs.stat(child.pid)[1] == str(os.getpid())  # its parent
        assert procfs.command_line(child.pid) == [sys.executable, "-c", code]
        assert procfs.start_environment(child.pid)["PYDTRACE_TEST_MARK"] == "1"
        assert os.path.realpath(procfs.executable(child.pid)) == os.path.realpath(sys.executable)
        assert child.pid in procfs.threads(child.pid)
        assert procfs.status(child.pid)["Pid"] == str(child.pid)
        assert procfs.probe_object(child.pid) is None  # it never imported dtrace
        assert procfs.probe_object(os.getpid()) == LIBRARY
    finally:
        child.stdin.close()
        child.wait()
        child.stdout.close()
    assert not procfs.alive(child.pid)
    with pytest.raises(ToolError, match=f"no process with PID {child.pid} is running"):
        procfs.mappings(child.pid)
    assert procfs.threads(child.pid) is None and procfs.command_line(child.pid) == []
