"""The kernel's uprobe floor: a C loop firing the same SDT probes under the same bpftrace program.

Each round pairs the traced loop with an identical, untraced copy of it (a
different file, since uprobes are set per file); ``(traced - untraced) / N``
is what one uprobe hit with bpftrace's ``count()`` costs on this machine.
"""

from __future__ import annotations

import pytest

import harness
import tracing
import workloads

KINDS = {"entry": ("function-entry",), "line": ("line",), "gc": ("gc-start", "gc-done"),
         "instance": workloads.INSTANCE_PROBES, "cfunction": workloads.CFUNCTION_PROBES}
EVENTS = 100_000
#: (kind, probe-site variant): every kind as sys/sdt.h writes it, and function-entry with a 5-byte nop.
CASES = [(kind, "nop") for kind in KINDS] + [("entry", "nop5")]


@pytest.mark.benchmark(timer=harness.child_clock, disable_gc=False, warmup=False)
@pytest.mark.parametrize("kind,variant", CASES, ids=lambda v: v)
def test_uprobe_floor(benchmark, kind, variant):
    tracing.require_tracer()
    plan = harness.plan()
    benchmark.group = "floor: a C loop firing the probe under the same bpftrace program"
    try:
        subject = harness.floor_child(kind, traced=True, variant=variant)
    except harness.FloorUnavailable as why:
        pytest.skip(str(why))
    reference = harness.floor_child(kind, traced=False, variant=variant)
    tracer = None
    n = harness.scaled(EVENTS)
    try:
        tracer = harness.start_tracer(harness.probe_program(KINDS[kind]), subject)
        subject.go()
        reference.go()
        measurement = harness.measure(benchmark, subject, reference, n, plan.traced_rounds, plan.warmup)
        consumer_count = tracer.stop().get("@events", 0)
    finally:
        if tracer is not None:
            tracer.kill()
        subject.kill()
        reference.kill()
    expected = n * (plan.traced_rounds + plan.warmup)
    assert consumer_count == expected, f"the consumer counted {consumer_count} of {expected} events"
    name = f"floor-{kind}" if variant == "nop" else f"floor-{kind}-{variant}"
    info = {"workload": name, "mode": "floor", "variant": variant, "probes": list(KINDS[kind]), "n": n,
            "consumer_count": consumer_count, "expected_count": expected}
    harness.record(benchmark, info, measurement, float(n))
