"""Idle means idle: the deterministic guards behind the benchmarks' cost model (docs/decisions.md, 4).

While no consumer is attached, nothing of ours is hooked into the interpreter:
no ``sys.monitoring`` event for any tool, no tool id before a code probe was
ever wanted, no ``gc.callbacks`` entry, no audit hook, and the watcher thread
polls without taking the GIL. After a consumer detaches, the same again (the
tool id stays claimed, with no events). Attaching only the gc probes sets no
code events.

How an audit hook is detected: CPython raises the audit event
``sys.addaudithook`` to the hooks already installed whenever a hook is added,
by ``sys.addaudithook`` or by the C API's ``PySys_AddAuditHook`` alike. The
driver installs a recording hook before it imports ``dtrace``, so any hook
pydtrace adds later, at any moment, is seen.

Nothing here waits on a timer: the workload waits for the tracer's BEGIN line
and for ``wait_for_consumer``; "the watcher polled N times" is read from
``dtrace._native._testing.watcher_stats()``, and "probes off again" from
``dtrace.enabled_probes()``.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import tracing

#: Watcher polls observed per idle check (about 5 x 20 ms).
POLLS = 5

DRIVER = r'''
import gc, json, os, sys, threading, time

added_hooks = []

def recorder(event, args):
    # Raised to existing hooks by sys.addaudithook and by PySys_AddAuditHook alike.
    if event == "sys.addaudithook":
        added_hooks.append(event)

sys.addaudithook(recorder)
sys.addaudithook(lambda event, args: None)  # the control: this one must be seen
control_seen = len(added_hooks)

import ctypes
import importlib._bootstrap as bootstrap

ORIGINAL_FIND_AND_LOAD = bootstrap._find_and_load  # before dtrace could wrap it

import dtrace
native = dtrace._native
TIMEOUT = float(os.environ["IDLE_TIMEOUT"])

# Where our shared object is mapped: a type slot pointing in there is a hook of ours.
LIBRARY = os.path.realpath(dtrace.library_path())
OURS = []
with open("/proc/self/maps") as maps:
    for entry in maps:
        fields = entry.split()
        if len(fields) >= 6 and os.path.realpath(fields[5]) == LIBRARY:
            low, high = (int(x, 16) for x in fields[0].split("-"))
            OURS.append((low, high))

# PyTypeObject offsets on LP64 release builds of 3.12 and 3.13, checked against fields
# Python exposes (tp_basicsize, tp_flags) before they are used.
TP_BASICSIZE, TP_DEALLOC, TP_FLAGS, TP_INIT = 32, 48, 168, 296
HEAPTYPE = 1 << 9

def word(obj, offset):
    return ctypes.c_ssize_t.from_address(id(obj) + offset).value

class _Probe:
    pass

LAYOUT_OK = (word(_Probe, TP_BASICSIZE) == _Probe.__basicsize__ and word(_Probe, TP_FLAGS) == _Probe.__flags__
             and word(type, TP_FLAGS) == type.__flags__)

def ours(address):
    return any(low <= (address & (2**64 - 1)) < high for low, high in OURS)

def type_slots():
    """How many Python classes have a deallocator of ours, and whether type.__init__'s slot is ours."""
    if not LAYOUT_OK:
        return None
    classes = [t for t in gc.get_objects() if isinstance(t, type) and t.__flags__ & HEAPTYPE]
    return {"classes": len(classes),
            "patched_deallocs": sum(1 for t in classes if ours(word(t, TP_DEALLOC))),
            "type_init_ours": ours(word(type, TP_INIT))}

def send(tag, data):
    print(tag, json.dumps(data), flush=True)

def snapshot():
    return {
        "enabled": sorted(dtrace.enabled_probes()),
        "events": [sys.monitoring.get_events(tool) for tool in range(6)],
        "tools": [sys.monitoring.get_tool(tool) for tool in range(6)],
        "tool": native._testing.monitoring_tool_id(),
        "gc_callbacks": [getattr(c, "__name__", repr(c)) for c in gc.callbacks],
        "hooks_added": len(added_hooks) - control_seen,
        "find_and_load_original": bootstrap._find_and_load is ORIGINAL_FIND_AND_LOAD,
        "slots": type_slots(),
        "watcher": list(native._testing.watcher_stats()),
        "cfunction_cache": native._testing.cfunction_cache_stats()[0],
    }

def after_polls(count):
    """The state once the watcher has polled `count` more times (not a timed sleep: a wait
    for the watcher's own counter, bounded by TIMEOUT)."""
    target = native._testing.watcher_stats()[0] + count
    deadline = time.monotonic() + TIMEOUT
    tick = threading.Event()
    while native._testing.watcher_stats()[0] < target:
        if time.monotonic() > deadline:
            send("ERROR", {"why": "the watcher stopped polling", "state": snapshot()})
            sys.exit(3)
        tick.wait(0.002)
    return snapshot()

def idle_window():
    first = after_polls(1)
    return {"first": first, "last": after_polls(POLLS)}

def leaf(x):
    return x

class Thing:
    def __init__(self, i):
        self.i = i

def work():
    for i in range(200):
        leaf(i)
        Thing(i)
    import colorsys, json.tool  # imports (modules not loaded yet)
    gc.collect()
    for _ in range(3):  # audited operations
        compile("1", "<idle>", "eval")
        open(os.devnull).close()

send("READY", {"pid": os.getpid(), "library": dtrace.library_path(), "armed": native.is_armed(),
               "control_seen": control_seen})
send("BEFORE", idle_window())
if sys.stdin.readline().strip() != "go":
    sys.exit(2)
if not dtrace.wait_for_consumer(*PROBES, timeout=TIMEOUT):
    send("ERROR", {"why": "probes not live", "state": snapshot()})
    sys.exit(3)
live = snapshot()
work()
send("LIVE", live)
if sys.stdin.readline().strip() != "detached":
    sys.exit(2)
deadline = time.monotonic() + TIMEOUT
tick = threading.Event()
while dtrace.enabled_probes():
    if time.monotonic() > deadline:
        send("ERROR", {"why": "probes still live after the consumer left", "state": snapshot()})
        sys.exit(3)
    tick.wait(0.002)
send("AFTER", idle_window())
'''


class IdleRun(tracing.Speaker):
    """The driver above, one step at a time (its lines read by tracing.Speaker)."""

    name = "the idle driver"

    def __init__(self, directory: Path, probes: list[str]) -> None:
        script = directory / "idle_driver.py"
        script.write_text(f"PROBES = {probes!r}\nPOLLS = {POLLS!r}\n" + textwrap.dedent(DRIVER))
        self.spawn([sys.executable, str(script)],
                   tracing.clean_environment(IDLE_TIMEOUT=str(tracing.STEP_TIMEOUT)))
        self.ready = self.expect("READY")


def assert_idle(window: dict[str, Any], *, tool_claimed: bool) -> None:
    """Nothing of ours is hooked in, and the watcher polled without taking the GIL."""
    for state in (window["first"], window["last"]):
        assert state["enabled"] == [], state
        assert state["events"] == [0] * 6, f"sys.monitoring events are set while idle: {state}"
        assert not [c for c in state["gc_callbacks"] if c.startswith("pydtrace")], state
        assert state["hooks_added"] == 0, f"an audit hook was added while idle: {state}"
        assert state["find_and_load_original"], f"the import hook is in place while idle: {state}"
        slots = state["slots"]
        assert slots is not None, "PyTypeObject layout check failed: cannot read type slots here"
        assert slots["patched_deallocs"] == 0 and not slots["type_init_ours"], f"type slots of ours while idle: {slots}"
        if not tool_claimed:
            assert state["tool"] is None and "pydtrace" not in state["tools"], state
    polls = window["last"]["watcher"][0] - window["first"]["watcher"][0]
    gil = window["last"]["watcher"][1] - window["first"]["watcher"][1]
    assert polls >= POLLS, window
    assert gil == 0, f"the watcher took the GIL {gil} times in {polls} idle polls"


def attached_run(directory: Path, program: str, probes: list[str],
                 cleanup: tracing.Cleanup) -> tuple[IdleRun, dict, dict, dict, dict]:
    """Idle, attach ``program``, let the workload run, detach, idle again."""
    tracing.require_tracer()
    run = cleanup.ends(IdleRun(directory, probes))
    tracer = cleanup.ends(tracing.Bpftrace(program, run.ready["pid"], run.ready["library"]))
    before = run.expect("BEFORE")
    tracer.start()
    run.tell("go")
    live = run.expect("LIVE")
    maps = tracer.stop()
    run.tell("detached")
    after = run.expect("AFTER")
    run.process.stdin.close()
    assert run.process.wait(tracing.STEP_TIMEOUT) == 0, run.stderr.rest()
    return run, before, live, after, maps


def test_nothing_is_hooked_before_any_consumer(workload_dir, cleanup):
    """Needs no tracer: armed, never attached, nothing of ours in the interpreter."""
    run = cleanup.ends(IdleRun(workload_dir, ["function-entry"]))
    assert run.ready["armed"], "importing dtrace did not arm the probes"
    assert run.ready["control_seen"] == 1, "the audit-hook detector did not see its control hook"
    before = run.expect("BEFORE")
    run.kill()
    assert_idle(before, tool_claimed=False)
    # Not even once: arming starts from what is hooked in (nothing), so the watcher never
    # needed the GIL before a consumer came.
    assert before["last"]["watcher"][1] == 0, before


CODE_PROGRAM = """
usdt:{lib}:python:function__entry { @entry = count(); }
usdt:{lib}:python:function__return { @return = count(); }
usdt:{lib}:python:line { @line = count(); }
"""


def test_idle_again_after_a_code_consumer_detaches(workload_dir, cleanup):
    _, before, live, after, maps = attached_run(
        workload_dir, CODE_PROGRAM, ["function-entry", "function-return", "line"], cleanup)
    assert_idle(before, tool_claimed=False)
    assert set(live["enabled"]) >= {"function-entry", "function-return", "line"}, live
    assert live["tool"] is not None and live["events"][live["tool"]] != 0, live
    assert maps.get("@entry", 0) >= 200 and maps.get("@line", 0) > 0, maps
    assert live["hooks_added"] == 0, live  # code probes add no audit hook either
    # The tool id stays claimed (no race for it on the next attach), with no events set.
    assert_idle(after, tool_claimed=True)


GC_PROGRAM = """
usdt:{lib}:python:gc__start { @start = count(); }
usdt:{lib}:python:gc__done { @done = count(); }
"""


def test_gc_probes_set_no_code_events(workload_dir, cleanup):
    _, before, live, after, maps = attached_run(workload_dir, GC_PROGRAM, ["gc-start", "gc-done"], cleanup)
    assert_idle(before, tool_claimed=False)
    assert sorted(live["enabled"]) == ["gc-done", "gc-start"], live
    assert live["events"] == [0] * 6, f"only gc probes are attached, yet code events are set: {live}"
    assert live["tool"] is None and "pydtrace" not in live["tools"], live
    assert "pydtrace_gc" in live["gc_callbacks"], live
    assert maps.get("@start", 0) >= 1 and maps.get("@start") == maps.get("@done"), maps
    assert_idle(after, tool_claimed=False)


AUDIT_PROGRAM = """
usdt:{lib}:python:audit { @audit = count(); }
"""


INSTANCE_PROGRAM = """
usdt:{lib}:python:instance__new__start { @new = count(); }
usdt:{lib}:python:instance__delete__start { @delete = count(); }
"""


def test_idle_again_after_an_instance_consumer_detaches(workload_dir, cleanup):
    """The positive control of the slot check: while instance-delete is enabled, Python classes
    have our deallocator and type.__init__ our hook; after the consumer leaves, none."""
    import dtrace

    if not {"instance-new-start", "instance-delete-start"} <= dtrace._native.ARMABLE_PROBES:
        pytest.skip("the instance probes are not armable in this build")
    _, before, live, after, maps = attached_run(
        workload_dir, INSTANCE_PROGRAM, ["instance-new-start", "instance-delete-start"], cleanup)
    assert_idle(before, tool_claimed=False)
    assert live["slots"]["patched_deallocs"] > 0 and live["slots"]["type_init_ours"], live["slots"]
    assert maps.get("@new", 0) >= 200 and maps.get("@delete", 0) >= 200, maps
    assert_idle(after, tool_claimed=True)


CFUNCTION_PROGRAM = """
usdt:{lib}:python:cfunction__entry { @entry = count(); }
usdt:{lib}:python:cfunction__return { @return = count(); }
"""


def test_idle_again_after_a_cfunction_consumer_detaches(workload_dir, cleanup):
    """The C function probes switch on CALL (sys.monitoring keeps C_RETURN and C_RAISE with it)
    and nothing else; after the consumer leaves, no event, and their name cache is empty."""
    import dtrace

    if "cfunction-entry" not in dtrace._native.ARMABLE_PROBES:
        pytest.skip("the C function probes are not armable in this build")
    _, before, live, after, maps = attached_run(
        workload_dir, CFUNCTION_PROGRAM, ["cfunction-entry", "cfunction-return"], cleanup)
    assert_idle(before, tool_claimed=False)
    assert sorted(live["enabled"]) == ["cfunction-entry", "cfunction-return"], live
    call = 16  # sys.monitoring.events.CALL: get_events() shows C_RETURN and C_RAISE folded into it
    assert live["tool"] is not None and live["events"][live["tool"]] == call, live
    assert live["hooks_added"] == 0 and live["find_and_load_original"], live
    assert not [c for c in live["gc_callbacks"] if c.startswith("pydtrace")], live
    assert live["slots"]["patched_deallocs"] == 0, live["slots"]
    # A C call in progress at detach (the driver's readline) has no return counted; one in progress
    # when the events went live (the driver's wait, its readline) has no entry counted.
    assert maps.get("@entry", 0) > 10 and -3 <= maps["@entry"] - maps.get("@return", 0) <= 2, maps
    assert_idle(after, tool_claimed=True)
    assert after["last"]["cfunction_cache"] == 0, after


IMPORT_PROGRAM = """
usdt:{lib}:python:import__find__load__start { @start = count(); }
"""


def test_idle_again_after_an_import_consumer_detaches(workload_dir, cleanup):
    import dtrace

    if "import-find-load-start" not in dtrace._native.ARMABLE_PROBES:
        pytest.skip("the import probes are not armable in this build")
    _, before, live, after, maps = attached_run(workload_dir, IMPORT_PROGRAM, ["import-find-load-start"], cleanup)
    assert_idle(before, tool_claimed=False)
    assert not live["find_and_load_original"], live
    assert maps.get("@start", 0) >= 2, maps
    assert_idle(after, tool_claimed=False)


def test_an_audit_hook_is_added_only_for_an_audit_consumer(workload_dir, cleanup):
    """The positive side of the audit guard: the hook appears exactly when a consumer enables
    ``audit`` (once: it cannot be removed, docs/decisions.md, 4), and the detector sees it."""
    import dtrace

    if "audit" not in dtrace._native.ARMABLE_PROBES:
        pytest.skip("the audit probe is not armable in this build: nothing adds an audit hook")
    _, before, live, after, maps = attached_run(workload_dir, AUDIT_PROGRAM, ["audit"], cleanup)
    assert_idle(before, tool_claimed=False)
    assert live["hooks_added"] == 1, f"enabling audit should add exactly one audit hook: {live}"
    assert maps.get("@audit", 0) > 0, maps
    # The hook stays (CPython cannot remove one) but no other is added, and nothing else is on.
    for state in (after["first"], after["last"]):
        assert state["hooks_added"] == 1, state
        assert state["events"] == [0] * 6, state
    assert after["last"]["watcher"][1] == after["first"]["watcher"][1], after
