"""One benchmark process: runs a workload in one mode, round by round, as the harness asks.

Started by ``harness.py`` as ``python child.py WORKLOAD MODE PROBES``; speaks a
line protocol on stdin/stdout (each answer is ``TAG JSON``):

- at start it sets the mode up and answers ``READY {"pid", "library"}``;
- ``go``: for the traced modes, waits until the consumer's probes are live
  (the harness sends it once the tracer printed its BEGIN line, so both
  sides of the handshake hold); answers ``LIVE {state}``;
- ``run N``: runs the workload with ``N``, timed; answers ``DONE {"ns", "cpu", "gc"}``:
  wall-clock nanoseconds, CPU nanoseconds of this thread (user and system,
  so a uprobe's trap and the consumer's BPF program count; time spent
  waiting for a CPU other processes hold does not), and collections;
- ``count N``: (mode ``count`` only) runs it once with counting hooks;
  answers ``COUNT {"line", "function-entry", ...}``;
- ``state``: answers ``STATE {state}`` (what is hooked into the interpreter).

Modes: ``bare`` (no dtrace), ``idle`` (dtrace imported and armed),
``shim`` (``PYDTRACE_FORCE`` set by the harness), ``attached`` and
``attached-gc`` (a consumer attaches), ``noop`` and ``builtin`` (a native
no-op, or ``operator.is_``, as the callback of the probes' events: the
dispatch floor), ``pyusdt-idle`` and ``pyusdt-attached`` (PyPI's pyusdt),
``cpython-attached`` (no dtrace: a consumer attaches to the interpreter's own
probes, on a CPython 3.15+ built ``--with-dtrace``; the harness waits for
their semaphores), ``count`` (counts the events of one round).
"""

import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import workloads  # noqa: E402  (no dtrace in it: checked below)

TIMEOUT = 60.0
#: The tool id a floor callback takes: the one pydtrace prefers (arming.rs).
FLOOR_TOOL = 4
PYUSDT_TOOL = 2


def send(tag, data):
    sys.stdout.write(f"{tag} {json.dumps(data)}\n")
    sys.stdout.flush()


def fail(message):
    send("ERROR", {"message": message})
    sys.exit(3)


def monitoring_events():
    return [sys.monitoring.get_events(tool) for tool in range(6)]


def state():
    """What is hooked into the interpreter now."""
    native = sys.modules.get("dtrace._native")
    return {
        "dtrace_imported": "dtrace" in sys.modules,
        "armed": bool(native and native.is_armed()),
        "enabled": sorted(native.enabled_probes()) if native else [],
        "tool": native._testing.monitoring_tool_id() if native else None,
        "watcher": list(native._testing.watcher_stats()) if native else None,
        "events": monitoring_events(),
        "tools": [sys.monitoring.get_tool(tool) for tool in range(6)],
        "gc_callbacks": [getattr(c, "__name__", repr(c)) for c in gc.callbacks],
    }


def gc_collections():
    return sum(generation["collections"] for generation in gc.get_stats())


def register_floor(callback, probes):
    """Makes ``callback`` the handler of the events that serve ``probes``, as pydtrace would."""
    code_probes = [p for p in probes if p in workloads.PROBE_EVENTS]
    if code_probes:
        mon = sys.monitoring
        mon.use_tool_id(FLOOR_TOOL, "bench-floor")
        mask = 0
        for probe in code_probes:
            for name in workloads.PROBE_EVENTS[probe]:
                event = getattr(mon.events, name)
                if not mask & event:
                    mon.register_callback(FLOOR_TOOL, event, callback)
                mask |= event
        mon.set_events(FLOOR_TOOL, mask)
    if any(p in workloads.GC_PROBES for p in probes):
        gc.callbacks.append(callback)


class Counter:
    """Counts the events the probes would see, with plain Python callbacks (mode ``count``)."""

    TOOL = 3

    def __init__(self):
        self.events = {}

    def hook(self, name):
        events = self.events

        def callback(*args):
            events[name] += 1

        return callback

    def __enter__(self):
        mon = sys.monitoring
        mon.use_tool_id(self.TOOL, "bench-count")
        names = sorted({name for names in workloads.PROBE_EVENTS.values() for name in names})
        self.events = dict.fromkeys(names, 0)
        mask = 0
        for name in names:
            event = getattr(mon.events, name)
            mon.register_callback(self.TOOL, event, self.hook(name))
            mask |= event
        mon.set_events(self.TOOL, mask)
        return self

    def __exit__(self, *exc):
        mon = sys.monitoring
        mon.set_events(self.TOOL, 0)
        mon.free_tool_id(self.TOOL)

    @property
    def counts(self):
        """Events per probe, and per sys.monitoring event."""
        out = {probe: sum(self.events[name] for name in names) for probe, names in workloads.PROBE_EVENTS.items()}
        out["events"] = dict(self.events)
        return out


def main():
    workload_name, mode, probes = sys.argv[1], sys.argv[2], [p for p in sys.argv[3].split(",") if p]
    workload = workloads.WORKLOADS[workload_name]
    if "dtrace" in sys.modules:
        fail("dtrace was imported before the mode asked for it (is PYDTRACE=1 set?)")
    library = None

    if mode in ("idle", "shim", "attached", "attached-gc"):
        import dtrace

        if not dtrace._native.is_armed():
            fail("importing dtrace did not arm the probes")
        library = dtrace.library_path()
        if mode == "shim" and not dtrace.wait_for_consumer(*probes, timeout=TIMEOUT):
            fail(f"PYDTRACE_FORCE did not make {probes} live: {state()}")
    elif mode in ("noop", "builtin"):
        if os.environ.get("PYDTRACE") != "0":
            fail("the dispatch floors run with PYDTRACE=0")
        from dtrace import _native

        if mode == "noop":
            callback = _native._testing.noop_callback()
        else:
            import operator

            callback = operator.is_  # a plain METH_FASTCALL builtin taking two arguments
        register_floor(callback, probes)
    elif mode in ("pyusdt-idle", "pyusdt-attached"):
        import libpyusdt  # noqa: F401  (pyusdt's extension; its package only imports it)
        import pyusdt  # noqa: F401

        library = libpyusdt.__file__
    elif mode not in ("bare", "count", "cpython-attached"):
        fail(f"unknown mode {mode}")

    send("READY", {"pid": os.getpid(), "library": library, "state": state()})
    counter = Counter() if mode == "count" else None

    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        command = words[0]
        if command == "go":
            if mode in ("attached", "attached-gc"):
                if not dtrace.wait_for_consumer(*probes, timeout=TIMEOUT):
                    fail(f"the consumer's probes {probes} were not live within {TIMEOUT} s: {state()}")
            elif mode == "pyusdt-attached":
                # pyusdt has no wait_for_consumer: its thread switches sys.monitoring
                # events on when it sees a raised semaphore. Wait for exactly that.
                deadline = time.monotonic() + TIMEOUT
                while not sys.monitoring.get_events(PYUSDT_TOOL):
                    if time.monotonic() > deadline:
                        fail(f"pyusdt did not switch its events on: {state()}")
                    time.sleep(0.001)
            send("LIVE", state())
        elif command == "run":
            n = int(words[1])
            before = gc_collections()
            cpu = time.thread_time_ns()
            start = time.perf_counter_ns()
            workload.function(n)
            elapsed = time.perf_counter_ns() - start
            cpu = time.thread_time_ns() - cpu
            send("DONE", {"ns": elapsed, "cpu": cpu, "gc": gc_collections() - before})
        elif command == "count" and counter is not None:
            n = int(words[1])
            workload.function(n)  # warm up (specialisation, caches) as the timed rounds are
            before = gc_collections()
            with counter:
                workload.function(n)
            counts = dict(counter.counts)
            counts["gc"] = gc_collections() - before
            send("COUNT", counts)
        elif command == "state":
            send("STATE", state())
        else:
            fail(f"unknown command {line!r}")


if __name__ == "__main__":
    main()
