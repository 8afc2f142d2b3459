"""instance-new-start/done and instance-delete-start/done under a real bpftrace."""

from __future__ import annotations

from tracing import trace

ALL_INSTANCE_PROBES = ["instance-new-start", "instance-new-done", "instance-delete-start", "instance-delete-done"]

INSTANCE_PROGRAM = """
usdt:{lib}:python:instance__new__start { @new_start[str(arg0)] = count(); @new_file[str(arg0), str(arg1)] = count(); }
usdt:{lib}:python:instance__new__done { @new_done[str(arg0)] = count(); }
usdt:{lib}:python:instance__delete__start {
    @del_start[str(arg0)] = count();
    @del_file[str(arg0), str(arg1)] = count();
    @level[tid] = @level[tid] + 1;
    @deepest[str(arg0)] = max(@level[tid]);
}
usdt:{lib}:python:instance__delete__done { @del_done[str(arg0)] = count(); @level[tid] = @level[tid] - 1; }
"""


# Two strings as a map key must fit the BPF stack.
SHORT_STRINGS = {"BPFTRACE_STRLEN": "100"}


def counts(run, name: str) -> dict[str, int]:
    return {probe: run.maps.get("@" + probe, {}).get(name, 0) for probe in ("new_start", "new_done", "del_start", "del_done")}


def test_each_probe_fires_once_per_instance_created_and_dropped(workload_dir):
    body = """
        class Point:
            def __init__(self, x):
                self.x = x

        class Slotted:
            __slots__ = ("a", "b")
            def __init__(self):
                self.a = [1]
                self.b = None

        def run(result):
            for i in range(250):
                Point(i)
            kept = [Slotted() for _ in range(40)]
            del kept
            Late = type("Late", (), {})  # made after arming: hooked by type.__init__
            for _ in range(3):
                Late()
    """
    run = trace(body, INSTANCE_PROGRAM, ALL_INSTANCE_PROBES, workload_dir, tracer_env=SHORT_STRINGS)
    file = str(run.workload.path)
    assert counts(run, "Point") == {"new_start": 250, "new_done": 250, "del_start": 250, "del_done": 250}
    assert counts(run, "Slotted") == {"new_start": 40, "new_done": 40, "del_start": 40, "del_done": 40}
    assert counts(run, "Late") == {"new_start": 3, "new_done": 3, "del_start": 3, "del_done": 3}
    assert run.maps["@new_file"][f"Point,{file}"] == 250
    assert run.maps["@del_file"][f"Point,{file}"] == 250
    assert all(level == 0 for level in run.maps["@level"].values())
    # Detaching gave every class CPython's own dealloc back.
    assert run.workload.idle["hooked_classes"] == 0


def test_a_deletion_cascade_nests(workload_dir):
    body = """
        class Node:
            def __init__(self, depth):
                self.children = [Node(depth - 1) for _ in range(2)] if depth else []

        class Leafy:
            __slots__ = ("next",)

        def run(result):
            root = Node(3)  # 1 + 2 + 4 + 8 = 15 nodes
            del root
            chain = None
            for _ in range(20000):  # deeper than any C stack would take unprotected
                link = Leafy()
                link.next = chain
                chain = link
            del chain, link
    """
    run = trace(body, INSTANCE_PROGRAM, ALL_INSTANCE_PROBES, workload_dir, tracer_env=SHORT_STRINGS)
    assert counts(run, "Node") == {"new_start": 15, "new_done": 15, "del_start": 15, "del_done": 15}
    # Deleting the root frees its children inside its own start/done: four levels deep.
    assert run.maps["@deepest"]["Node"] == 4
    assert counts(run, "Leafy")["del_start"] == counts(run, "Leafy")["del_done"] == 20000
    assert all(level == 0 for level in run.maps["@level"].values())


def test_what_fires_for_instances_made_by_c_code(workload_dir):
    body = """
        import copy, pickle

        class Item:
            def __init__(self, n=0):
                self.n = n

        def run(result):
            made_by_c = list(map(Item, range(5)))       # no CALL instruction: no new probes
            clones = [copy.copy(made_by_c[0]) for _ in range(3)]
            thawed = pickle.loads(pickle.dumps(made_by_c[1]))
            result["made"] = len(made_by_c) + len(clones) + 1
            del made_by_c, clones, thawed
    """
    run = trace(body, INSTANCE_PROGRAM, ALL_INSTANCE_PROBES, workload_dir, tracer_env=SHORT_STRINGS)
    # Creation by C code fires nothing; every destruction of a Python class's instance fires.
    assert counts(run, "Item") == {"new_start": 0, "new_done": 0, "del_start": 9, "del_done": 9}


def test_odd_classes_never_crash_and_stay_paired(workload_dir):
    body = """
        import gc, weakref

        revived = []

        class Phoenix:
            def __del__(self):
                if not revived:
                    revived.append(self)  # resurrects itself once

        class WithDel:
            def __del__(self):
                pass

        class Meta(type):
            pass

        class Metaclassed(metaclass=Meta):
            pass

        class MyList(list):
            pass

        class MyInt(int):
            pass

        class Cyclic:
            def __init__(self):
                self.me = self

        class Failing:
            def __init__(self):
                raise ValueError("no")

        class Base:
            __slots__ = ("a",)

        class Derived(Base):
            __slots__ = ("b",)
            def __init__(self):
                self.a = [1]
                self.b = [2]

        def run(result):
            gc.disable()
            Phoenix()             # resurrected: nothing fires for the deletion yet
            result["revived"] = len(revived)
            revived.clear()       # now really freed
            for _ in range(3):
                WithDel()
                Metaclassed()
                MyList([1, 2])
                MyInt(7)
                Derived()
                w = Cyclic()
                ref = weakref.ref(w, lambda r: None)
                del w
                try:
                    Failing()
                except ValueError:
                    pass
            gc.collect()
            result["ok"] = True
    """
    run = trace(body, INSTANCE_PROGRAM, ALL_INSTANCE_PROBES, workload_dir, tracer_env=SHORT_STRINGS)
    assert run.result == {"revived": 1, "ok": True}
    for name in ("WithDel", "Metaclassed", "MyList", "MyInt", "Derived", "Cyclic"):
        assert counts(run, name) == {"new_start": 3, "new_done": 3, "del_start": 3, "del_done": 3}, name
    assert counts(run, "Phoenix") == {"new_start": 1, "new_done": 1, "del_start": 1, "del_done": 1}
    # __init__ raised: new-done still fires; the half-made instance is freed.
    assert counts(run, "Failing") == {"new_start": 3, "new_done": 3, "del_start": 3, "del_done": 3}
    assert all(level == 0 for level in run.maps["@level"].values())
    assert run.workload.idle["hooked_classes"] == 0


def test_a_stress_mix_frees_every_instance_once(workload_dir):
    """Every shape of deallocation the copy of subtype_dealloc follows, many times over: deep chains
    through a __dict__, through __slots__ and through a list subclass; subclasses of builtins;
    weak references with callbacks, also those a finalizer made (called, as CPython does: the
    weak references are cleared after the finalizer ran); __del__ in cycles the collector frees;
    resurrection. Each instance's
    deletion fires exactly once, paired, on every version the delete probes are on for."""
    body = """
        import gc, weakref

        N = 500
        DEPTH = 30000
        called = []
        made_in_del = []
        kept = []

        class Chain:
            pass

        class SlotChain:
            __slots__ = ("next", "__weakref__")

        class Nest(list):
            pass

        class D(dict):
            pass

        class S(str):
            pass

        class T(tuple):
            pass

        class E(Exception):
            pass

        class B(bytes):
            pass

        class I(int):
            __slots__ = ()

        class Weakly:
            pass

        class MakesRef:
            def __del__(self):
                made_in_del.append(weakref.ref(self, lambda r: called.append("late")))

        class CycleDel:
            def __init__(self):
                self.me = self
            def __del__(self):
                pass

        class Phoenix:
            revived = False
            def __del__(self):
                if not self.revived:
                    self.revived = True
                    kept.append(self)

        def chain(cls, depth):
            head = None
            for _ in range(depth):
                link = cls()
                link.next = head
                head = link
            return head

        def run(result):
            gc.disable()
            for cls in (Chain, SlotChain):
                head = chain(cls, DEPTH)
                del head
            nest = Nest()
            for _ in range(DEPTH):
                nest = Nest([nest])
            del nest
            for i in range(N):
                D(a=i); S("s%d" % i); T((i, i)); E(i); B(b"x"); I(i)
                w = Weakly()
                ref = weakref.ref(w, lambda r: called.append("cb"))
                del w
                MakesRef()
                CycleDel()
                Phoenix()
            result["resurrected"] = len(kept)
            kept.clear()
            result["collected"] = gc.collect() > 0
            result["callbacks"] = called.count("cb")
            result["late"] = called.count("late")
            result["dead"] = all(r() is None for r in made_in_del)
            result["refs_made_in_del"] = len(made_in_del)
    """
    run = trace(body, INSTANCE_PROGRAM, ALL_INSTANCE_PROBES, workload_dir, tracer_env=SHORT_STRINGS)
    n, depth = 500, 30000
    assert run.result == {"resurrected": n, "collected": True, "callbacks": n, "late": n, "dead": True,
                          "refs_made_in_del": n}, run.result
    for name in ("Chain", "SlotChain"):
        assert counts(run, name)["del_start"] == counts(run, name)["del_done"] == depth, name
    assert counts(run, "Nest")["del_start"] == counts(run, "Nest")["del_done"] == depth + 1
    for name in ("D", "S", "T", "E", "B", "I", "Weakly", "MakesRef", "CycleDel", "Phoenix"):
        assert counts(run, name)["del_start"] == counts(run, name)["del_done"] == n, (name, counts(run, name))
    assert all(level == 0 for level in run.maps["@level"].values())
    assert run.workload.idle["hooked_classes"] == 0
