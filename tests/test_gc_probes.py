"""gc-start and gc-done under a real bpftrace: one pair per collection, with CPython's arguments."""

from __future__ import annotations

from tracing import trace

GC_PROGRAM = """
usdt:{lib}:python:gc__start { @start[arg0] = count(); @open = @open + 1; }
usdt:{lib}:python:gc__done { @done = count(); @collected = sum(arg0); @open = @open - 1; }
"""


def test_every_collection_gives_a_start_and_a_done(workload_dir):
    body = """
        import gc

        class Node:
            def __init__(self):
                self.me = self  # a cycle only the collector frees

        def run(result):
            gc.disable()  # collections happen only where this body asks for them
            seen = []
            def count(phase, info):
                seen.append((phase, info["generation"], info["collected"] + info["uncollectable"]))
            gc.callbacks.insert(0, count)
            for generation in (0, 1, 2, 0, 2):
                for _ in range(40):
                    Node()
                gc.collect(generation)
            gc.callbacks.remove(count)
            result["starts"] = [g for phase, g, _ in seen if phase == "start"]
            result["collected"] = sum(n for phase, _, n in seen if phase == "stop")
    """
    run = trace(body, GC_PROGRAM, ["gc-start", "gc-done"], workload_dir)
    starts = run.result["starts"]
    assert starts == [0, 1, 2, 0, 2]
    assert {int(g): n for g, n in run.maps["@start"].items()} == {0: 2, 1: 1, 2: 2}
    assert run.count("done") == len(starts)
    assert run.count("collected") == run.result["collected"] >= 200
    assert run.count("open") == 0
    assert sorted(run.workload.live) == ["gc-done", "gc-start"]
    # Attaching only the gc probes sets no sys.monitoring event.
    assert run.workload.idle["tool"] is None
    assert "pydtrace_gc" not in run.workload.idle["gc_callbacks"]
