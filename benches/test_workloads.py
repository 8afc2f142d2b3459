"""The workloads in every mode, each paired round by round with a bare interpreter.

Modes (see child.py): ``bare`` (an A/A run: the noise), ``idle``, ``noop`` and
``builtin`` (the sys.monitoring / gc.callbacks dispatch floor), ``shim``
(probes forced on without a consumer), ``pyusdt-idle``, ``attached`` (bpftrace
counts the workload's probes), ``attached-gc`` (only the gc probes are
attached: the code workloads must stay at idle cost), ``pyusdt-attached``,
``cpython-attached`` (bpftrace counts the interpreter's own ``function__entry``
in a process without dtrace, CPython 3.15+ built ``--with-dtrace``; pydtrace
attached and the C floor in the same rounds).
"""

from __future__ import annotations

import contextlib

import pytest

import dtrace
import harness
import tracing
import workloads

QUIET_MODES = ["bare", "idle", "noop", "builtin", "shim", "pyusdt-idle"]
TRACED_MODES = {"attached", "attached-gc", "pyusdt-attached", "cpython-attached"}


def cases():
    for name, workload in workloads.WORKLOADS.items():
        for mode in QUIET_MODES:
            if mode == "builtin" and workload.probes in (workloads.INSTANCE_PROBES, workloads.CFUNCTION_PROBES):
                continue  # CALL passes four arguments: operator.is_ takes two
            yield name, mode
        yield name, "attached"
        if workload.gc_only_check:
            yield name, "attached-gc"
        if workload.pyusdt_probes:
            yield name, "pyusdt-attached"
        if workload.cpython_check:
            yield name, "cpython-attached"


#: Events per round of the C floor run beside an attached workload.
FLOOR_EVENTS = 100_000


@pytest.mark.benchmark(timer=harness.child_clock, disable_gc=False, warmup=False)
@pytest.mark.parametrize("workload_name,mode", list(cases()), ids=lambda v: v)
def test_workload(benchmark, workload_name, mode):
    workload = workloads.WORKLOADS[workload_name]
    plan = harness.plan()
    benchmark.group = f"{workload_name}: {workload.description}"
    # Under a consumer that counts every event, a round does less work (uprobe hits are slow).
    slow = mode in ("attached", "pyusdt-attached", "cpython-attached")
    n = harness.scaled(workload.n_traced if slow else workload.n_quiet)
    rounds = plan.traced_rounds if mode in TRACED_MODES else plan.quiet_rounds
    probes = workload.probes
    wait_for = probes
    env: dict[str, str] = {}
    unsupported = {p: why for p, why in dtrace._native.UNSUPPORTED_PROBES.items() if p in probes}
    if unsupported and mode in ("shim", "attached", "pyusdt-attached", "cpython-attached"):
        # This interpreter's build of pydtrace never arms them (the test process is the same interpreter).
        pytest.skip("; ".join(f"{p}: {why}" for p, why in unsupported.items()))
    if mode in TRACED_MODES:
        tracing.require_tracer()
    if mode.startswith("pyusdt"):
        reason = harness.pyusdt_available()
        if reason:
            pytest.skip(reason)
        env["PYUSDT_CHECK_MSEC"] = "20"  # pydtrace's poll interval, for a like-for-like idle
    if mode == "shim":
        env["PYDTRACE_FORCE"] = ",".join(probes)
    if mode in ("noop", "builtin"):
        env["PYDTRACE"] = "0"
    if mode == "attached-gc":
        wait_for = workloads.GC_PROBES

    info: dict = {"workload": workload_name, "mode": mode, "probes": list(probes), "n": n}
    with contextlib.ExitStack() as stack:
        def start(proc_factory, *args, **kwargs):
            proc = proc_factory(*args, **kwargs)
            stack.callback(proc.kill)
            return proc

        tracers = {}
        companions = []

        def attach(program, proc, library=None):
            tracer = harness.start_tracer(program, proc, library)
            stack.callback(tracer.kill)
            return tracer

        def floor_beside():
            """The C floor, traced by the same program, measured in the same rounds."""
            kind = harness.FLOOR_KIND[probes]
            try:
                floor = start(harness.floor_child, kind, traced=True)
                floor_reference = start(harness.floor_child, kind, traced=False)
            except harness.FloorUnavailable as why:
                info["floor_unavailable"] = str(why)
            else:
                tracers["floor"] = attach(harness.probe_program(probes), floor)
                companions.append(harness.Pair("floor", floor, floor_reference, harness.scaled(FLOOR_EVENTS)))

        def pydtrace_beside():
            """pydtrace attached as in mode ``attached``, measured in the same rounds."""
            ours = start(harness.python_child, workload_name, "attached", probes)
            ours_reference = start(harness.python_child, workload_name, "bare")
            tracers["pydtrace"] = attach(harness.probe_program(probes), ours)
            companions.append(harness.Pair("pydtrace", ours, ours_reference, n))

        reference = start(harness.python_child, workload_name, "bare")
        subject = start(harness.python_child, workload_name, mode, wait_for, **env)
        if mode == "attached":
            tracers["subject"] = attach(harness.probe_program(probes), subject)
            floor_beside()
        elif mode == "attached-gc":
            tracers["subject"] = attach(harness.probe_program(workloads.GC_PROBES), subject)
        elif mode == "pyusdt-attached":
            tracers["subject"] = attach(harness.probe_program(workload.pyusdt_probes, "pyusdt"), subject)
            pydtrace_beside()
        elif mode == "cpython-attached":
            own = harness.interpreter_object(subject.pid, probes)
            if own is None:
                pytest.skip(f"this interpreter does not declare {', '.join(probes)} itself "
                            "(CPython 3.15 and later built --with-dtrace do)")
            # The interpreter's own object named as the probe object: nothing of the program
            # collides there, so bpftrace -p attaches it by name, as a user would write it.
            tracers["subject"] = attach(harness.probe_program(probes), subject, own)
            harness.wait_for_interpreter_consumer(subject.pid, own, probes)
            info["interpreter_object"] = own
            pydtrace_beside()
            floor_beside()
        live = subject.go()
        reference.go()
        for pair in companions:
            pair.traced.go()
            pair.reference.go()
        check_live(mode, probes, live)
        measurement = harness.measure(benchmark, subject, reference, n, rounds, plan.warmup, companions)
        after = subject.state()
        counts = {name: tracer.stop().get("@events", 0) for name, tracer in tracers.items()}

    if mode in ("idle", "attached-gc"):
        # The premise of the figure: the watcher took no GIL while the rounds ran.
        assert after["watcher"][1] == live["watcher"][1], (live, after)
    gc_per_round = sum(measurement.subject_gc) / len(measurement.subject_gc)
    events = harness.events_per_round(workload_name, probes, n, gc_per_round)
    info["live"] = live
    if "subject" in counts:
        info["consumer_count"] = counts["subject"]
    if mode == "attached":
        # Every event of the timed and warm-up rounds was seen (the child's own protocol code
        # between rounds adds a few more).
        expected = round(events * (rounds + plan.warmup))
        info["expected_count"] = expected
        assert counts["subject"] >= expected, f"the consumer lost events: {counts['subject']} < {expected}"
        if workload.events_per_n is not None:  # a declared count: check it is not an undercount either
            assert counts["subject"] <= expected * 1.01 + 1000, f"more events than declared: {counts['subject']} > {expected}"
    if mode == "cpython-attached":
        # Both consumers saw every event of the timed and warm-up rounds, once: the interpreter's
        # copy alone in the subject, pydtrace's alone beside it (docs/interpreter-probes.md).
        expected = round(events * (rounds + plan.warmup))
        info["expected_count"] = expected
        for name in ("subject", "pydtrace"):
            assert expected <= counts[name] <= expected * 1.01 + 1000, \
                f"{name}'s consumer counted {counts[name]}, expected {expected} (a few more from the protocol)"
        info["pydtrace_count"] = counts["pydtrace"]
    if "floor" in counts:
        floor_expected = harness.scaled(FLOOR_EVENTS) * (rounds + plan.warmup)
        assert counts["floor"] == floor_expected, f"the floor's consumer counted {counts['floor']} of {floor_expected}"
    harness.record(benchmark, info, measurement, events)


def check_live(mode: str, probes: tuple[str, ...], live: dict) -> None:
    """What each mode must have hooked in before its rounds start."""
    if mode in ("bare", "pyusdt-idle", "noop", "builtin", "cpython-attached"):
        assert not live["armed"], live
    if mode == "cpython-attached":
        assert not live["dtrace_imported"] and live["events"] == [0] * 6, live
    if mode in ("idle",):
        assert live["armed"] and live["enabled"] == [], live
        assert live["events"] == [0] * 6, f"idle, yet sys.monitoring events are set: {live}"
        assert "pydtrace_gc" not in live["gc_callbacks"], live
    if mode in ("shim", "attached"):
        assert set(probes) <= set(live["enabled"]), live
    if mode == "attached-gc":
        assert set(live["enabled"]) == set(workloads.GC_PROBES), live
        assert live["events"] == [0] * 6, f"only gc probes attached, yet code events are set: {live}"
    if mode == "pyusdt-idle":
        assert live["events"] == [0] * 6, live
