"""The built shared object: twelve probes of provider python, as readelf sees them."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

import dtrace

PROVIDER_FILE = Path(__file__).resolve().parent.parent / "provider" / "pydtrace.d"

# CPython's argument layout (Include/pydtrace.d), as the SDT notes spell the sizes.
EXPECTED_ARGUMENT_SIZES = {
    "function__entry": ["8", "8", "-4"],
    "function__return": ["8", "8", "-4"],
    "line": ["8", "8", "-4"],
    "gc__start": ["-4"],
    "gc__done": ["-8"],
    "instance__new__start": ["8", "8"],
    "instance__new__done": ["8", "8"],
    "instance__delete__start": ["8", "8"],
    "instance__delete__done": ["8", "8"],
    "import__find__load__start": ["8"],
    "import__find__load__done": ["8", "-4"],
    "audit": ["8", "8"],
}

NOTE = re.compile(
    r"Provider: (?P<provider>\S+)\s+Name: (?P<name>\S+)\s+"
    r"Location: (?P<location>0x[0-9a-f]+), Base: (?P<base>0x[0-9a-f]+), Semaphore: (?P<semaphore>0x[0-9a-f]+)\s+"
    r"Arguments: (?P<arguments>[^\n]*)"
)


def probe_notes() -> list[dict[str, str]]:
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) is not installed")
    library = dtrace.library_path()
    assert library is not None
    output = subprocess.run(["readelf", "-n", library], check=True, capture_output=True, text=True).stdout
    return [m.groupdict() for m in NOTE.finditer(output)]


def test_twelve_probes_in_provider_python():
    notes = probe_notes()
    assert sorted(n["name"] for n in notes if n["provider"] == "python") == sorted(EXPECTED_ARGUMENT_SIZES)
    assert len(notes) == 12, "each probe has exactly one site"


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
        assert sizes == EXPECTED_ARGUMENT_SIZES[note["name"]], note
