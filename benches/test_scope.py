"""Scoped tracing under a real consumer: out of scope costs nothing, in scope counts are exact.

Two modes (and a control), each on the call-heavy and the line-heavy workload, with bpftrace
attached to the subject and counting every event of the workload's probe (``usdt:...:function__entry`` or
``line``, no predicate):

- ``scoped-out``: ``PYDTRACE_SCOPE`` names a module that never runs, so the whole workload is
  out of scope. Paired round by round with an *idle* process (``import dtrace``, nothing
  attached): the ratio is the issue's "at most 1.05x its idle time". The consumer must count
  no event at all (the child's own protocol code is out of scope too).
- ``idle-aa``: the control, an idle process paired with another (no tracer): the spread of a
  ratio that should be 1.
- ``scoped-in``: ``PYDTRACE_SCOPE=workloads`` (the module the workloads live in). Paired with a
  bare interpreter, as the other attached figures are. The consumer's count must be exactly
  the workload's own events, round for round: none from the child's protocol code around it.

``python benches/scope.py`` runs these and the instruction counts (callgrind) and writes the
"Scoped tracing" section of BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import pytest

import harness
import tracing
import workloads

#: A module that never runs: everything the benchmark child does is out of this scope.
ELSEWHERE = "pydtrace_bench_elsewhere"
#: The module the workloads live in (benches/workloads.py, imported as ``workloads``).
INSIDE = "workloads"

#: ``idle-aa`` is the control: an idle process paired with another idle one, in the same rounds
#: as ``scoped-out``, so that the noise of the "1.05x idle" ratio is measured beside it.
CASES = [("call", "scoped-out"), ("call", "idle-aa"), ("line", "scoped-out"), ("line", "idle-aa"),
         ("call", "scoped-in"), ("line", "scoped-in")]

COUNT_OWN_EVENTS = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import workloads
w = workloads.WORKLOADS[sys.argv[2]]
n = int(sys.argv[3])
w.function(n)  # warm-up, as the timed rounds are
mon = sys.monitoring
own = workloads.__file__
counts = {"function-entry": 0, "line": 0}

def counter(probe):
    def callback(code, *rest):
        if code.co_filename == own:
            counts[probe] += 1
    return callback

mon.use_tool_id(3, "bench-scope-count")
for event, probe in ((mon.events.PY_START, "function-entry"), (mon.events.PY_RESUME, "function-entry"),
                     (mon.events.PY_THROW, "function-entry"), (mon.events.LINE, "line")):
    mon.register_callback(3, event, counter(probe))
mon.set_events(3, mon.events.PY_START | mon.events.PY_RESUME | mon.events.PY_THROW | mon.events.LINE)
w.function(n)
mon.set_events(3, 0)
print(json.dumps(counts))
"""


def own_events(workload: str, n: int) -> dict[str, int]:
    """The events one round of ``workload`` gives in workloads.py itself (nothing else is in scope)."""
    done = subprocess.run([sys.executable, "-c", COUNT_OWN_EVENTS, str(harness.BENCHES), workload, str(n)],
                          capture_output=True, text=True, env=harness.clean_env(), timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"counting {workload} failed: {done.stderr}")
    return json.loads(done.stdout)


@pytest.mark.benchmark(timer=harness.child_clock, disable_gc=False, warmup=False)
@pytest.mark.parametrize("workload_name,mode", CASES, ids=lambda v: v)
def test_scope(benchmark, workload_name, mode):
    if mode != "idle-aa":
        tracing.require_tracer()
    workload = workloads.WORKLOADS[workload_name]
    plan = harness.plan()
    probes = workload.probes
    inside = mode == "scoped-in"
    benchmark.group = f"scope: {workload_name}"
    # Out of scope nothing traps: a round is as long as an idle one.
    n = harness.scaled(workload.n_traced if inside else workload.n_quiet)
    rounds = plan.traced_rounds if inside else plan.quiet_rounds
    setting = INSIDE if inside else ELSEWHERE
    info: dict = {"workload": workload_name, "mode": mode, "probes": list(probes), "n": n, "scope": setting,
                  "reference_mode": "bare" if inside else "idle"}
    if mode == "idle-aa":
        info.update(scope=None, reference_mode="idle")
        with contextlib.ExitStack() as stack:
            reference = harness.python_child(workload_name, "idle")
            stack.callback(reference.kill)
            subject = harness.python_child(workload_name, "idle")
            stack.callback(subject.kill)
            subject.go()
            reference.go()
            measurement = harness.measure(benchmark, subject, reference, n, rounds, plan.warmup)
        harness.record(benchmark, info, measurement, None)
        return
    with contextlib.ExitStack() as stack:
        reference = harness.python_child(workload_name, info["reference_mode"])
        stack.callback(reference.kill)
        subject = harness.python_child(workload_name, "attached", probes, PYDTRACE_SCOPE=setting)
        stack.callback(subject.kill)
        tracer = harness.start_tracer(harness.probe_program(probes), subject)
        stack.callback(tracer.kill)
        live = subject.go()
        reference.go()
        assert set(probes) <= set(live["enabled"]), live
        measurement = harness.measure(benchmark, subject, reference, n, rounds, plan.warmup)
        count = tracer.stop().get("@events", 0)
    own = own_events(workload_name, n)[probes[0]]
    expected = own * (rounds + plan.warmup) if inside else 0
    info.update(live=live, consumer_count=count, expected_count=expected, events_per_round_in_scope=own)
    assert count == expected, f"the consumer counted {count} events, exactly {expected} expected"
    harness.record(benchmark, info, measurement, own if inside else None)
