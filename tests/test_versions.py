"""Interpreter versions and builds the package is not tested on: what it promises there.

- Free-threaded builds: ``import dtrace`` does not load the native module (which would switch the
  GIL back on for the whole process) and reports ``available = False`` with the reason.
- Probes whose implementation follows one CPython version (the instance-delete probes copy
  ``subtype_dealloc``, checked against 3.12 to 3.15) are never armed on other versions, and
  ``python -m dtrace list`` names them with the reason.

No free-threaded interpreter exists on the machines these tests run on, so the free-threaded path
is driven by the one thing it reads (``sys.abiflags``); the version rule is checked as it applies
to the running interpreter (3.12 to 3.15 here: all checked, so the rule's other side is shown
through ``list`` with the unsupported set replaced).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import dtrace
from dtrace.tools import listing

#: The interpreter versions the instance-delete probes were checked against (src/instances/mod.rs).
DELETE_CHECKED = {(3, 12), (3, 13), (3, 14), (3, 15)}
DELETE_PROBES = {"instance-delete-start", "instance-delete-done"}


def test_free_threaded_build_is_unavailable_with_a_reason():
    code = (
        "import sys, json\n"
        "sys.abiflags = 't'  # what a free-threaded build reports\n"
        "import dtrace\n"
        "print(json.dumps({'available': dtrace.available, 'reason': dtrace.unavailable_reason,\n"
        "    'loaded': 'dtrace._native' in sys.modules, 'library': dtrace.library_path(),\n"
        "    'enabled': sorted(dtrace.enabled_probes()), 'wait': dtrace.wait_for_consumer(timeout=0),\n"
        "    'names': list(dtrace.probe_names())}))\n"
    )
    # Without PYDTRACE: with PYDTRACE=1 the .pth file would import dtrace before abiflags is set.
    env = {k: v for k, v in os.environ.items() if k != "PYDTRACE"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["available"] is False
    assert "free-threaded" in seen["reason"]
    assert seen["loaded"] is False, "the native module was loaded (it would re-enable the GIL)"
    assert seen["library"] is None and seen["enabled"] == [] and seen["wait"] is False
    assert result.stderr == "", result.stderr


def test_unsupported_probes_are_the_ones_never_armed():
    armable = set(dtrace._native.ARMABLE_PROBES)
    off = dict(dtrace._native.UNSUPPORTED_PROBES)
    assert armable.isdisjoint(off)
    assert armable | set(off) == set(dtrace.probe_names())
    assert all(reason for reason in off.values())
    if sys.version_info[:2] in DELETE_CHECKED:
        assert not DELETE_PROBES & set(off)
    else:
        # An interpreter version nobody has checked the copy of subtype_dealloc against.
        assert DELETE_PROBES <= set(off) and not DELETE_PROBES & armable


def test_list_says_which_probes_are_off_and_why(monkeypatch):
    reason = "off on this Python version: a test reason"
    monkeypatch.setattr(dtrace._native, "UNSUPPORTED_PROBES", dict.fromkeys(DELETE_PROBES, reason))
    out = io.StringIO()
    listing.List().show(None, dtrace.library_path(), out)
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert (f"never fired by this build (Python {version}): instance__delete__done, instance__delete__start: "
            f"{reason}") in out.getvalue()
    # Another process's probe object may belong to another Python version: nothing is claimed for it.
    assert listing.unsupported("/elsewhere/_native.so") == {}


def test_list_on_this_interpreter():
    result = subprocess.run([sys.executable, "-m", "dtrace", "list"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    off = "never fired by this build" in result.stdout
    assert off == (sys.version_info[:2] not in DELETE_CHECKED), result.stdout
