"""The built shared object: the nineteen probes of provider python, as readelf sees them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dtrace
from tracing import noted_arguments

PROVIDER_FILE = Path(__file__).resolve().parent.parent / "provider" / "pydtrace.d"

# CPython's argument layout (Include/pydtrace.d), as the SDT notes spell the sizes, then this
# provider's additions: co_qualname after the function and line probes' three, and the C function
# probes, laid out as the function probes are.
EXPECTED_ARGUMENT_SIZES = {
    "function__entry": ["8", "8", "-4", "8"],
    "function__return": ["8", "8", "-4", "8"],
    "line": ["8", "8", "-4", "8"],
    "gc__start": ["-4"],
    "gc__done": ["-8"],
    "instance__new__start": ["8", "8"],
    "instance__new__done": ["8", "8"],
    "instance__delete__start": ["8", "8"],
    "instance__delete__done": ["8", "8"],
    "import__find__load__start": ["8"],
    "import__find__load__done": ["8", "-4"],
    "audit": ["8", "8"],
    "cfunction__entry": ["8", "8", "-4", "8"],
    "cfunction__return": ["8", "8", "-4", "8"],
    "aggregate__calls": ["8", "8", "-4", "8", "-8"],
    "aggregate__time": ["8", "8", "-4", "8", "-8", "-8"],
    "aggregate__lines": ["8", "8", "-4", "8", "-8"],
    "aggregate__node": ["-8", "-8", "8", "8", "-8", "-8"],
    "aggregate__flush": ["-4", "-8"],
}

NOTE = re.compile(
    r"Provider: (?P<provider>\S+)\s+Name: (?P<name>\S+)\s+"
    r"Location: (?P<location>0x[0-9a-f]+), Base: (?P<base>0x[0-9a-f]+), Semaphore: (?P<semaphore>0x[0-9a-f]+)\s+"
    r"Arguments: (?P<arguments>[^\n]*)"
)


def readelf(*options: str) -> str:
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) is not installed")
    library = dtrace.library_path()
    assert library is not None
    return subprocess.run(["readelf", *options, library], check=True, capture_output=True, text=True).stdout


def probe_notes() -> list[dict[str, str]]:
    return [m.groupdict() for m in NOTE.finditer(readelf("-n"))]


def sections() -> dict[str, tuple[int, int, int]]:
    """Section name -> (address, file offset, size), from ``readelf -S -W``."""
    found = {}
    for m in re.finditer(r"\]\s+(\S+)\s+\S+\s+([0-9a-f]{8,})\s+([0-9a-f]{6,})\s+([0-9a-f]{6,})", readelf("-S", "-W")):
        found[m.group(1)] = (int(m.group(2), 16), int(m.group(3), 16), int(m.group(4), 16))
    return found


def test_nineteen_probes_in_provider_python():
    notes = probe_notes()
    assert sorted(n["name"] for n in notes if n["provider"] == "python") == sorted(EXPECTED_ARGUMENT_SIZES)
    assert len(notes) == 19, "each probe has exactly one site"


def test_probe_names_follow_the_provider_file():
    declared = re.findall(r"probe (\w+)\(", PROVIDER_FILE.read_text())
    assert [n["name"] for n in sorted(probe_notes(), key=lambda n: declared.index(n["name"]))] == declared
    assert list(dtrace.probe_names()) == [name.replace("__", "-") for name in declared]


def test_semaphores_are_aligned_and_every_note_has_a_base():
    for note in probe_notes():
        semaphore = int(note["semaphore"], 16)
        assert semaphore != 0 and semaphore % 2 == 0, note
        assert int(note["base"], 16) != 0, note


def test_arguments_have_cpythons_layout():
    for note in probe_notes():
        sizes = [arg.split("@")[0] for arg in note["arguments"].split()]
        expected = EXPECTED_ARGUMENT_SIZES[note["name"]]
        assert sizes == expected[:noted_arguments(note["name"], len(expected), sys.version_info[:2])], note


def test_perf_and_systemtap_find_each_probe_site():
    """perf and SystemTap place a probe at location + (file offset - address of .stapsdt.base):
    that must be the file offset of the probe's site, whatever the linker's layout."""
    table = sections()
    base_address, base_offset, _ = table[".stapsdt.base"]
    text_address, text_offset, text_size = table[".text"]
    for note in probe_notes():
        location, base = int(note["location"], 16), int(note["base"], 16)
        assert base == base_address, note
        assert text_address <= location < text_address + text_size, note
        site_offset = location - text_address + text_offset
        assert location + (base_offset - base_address) == site_offset, note
